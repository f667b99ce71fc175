"""Divide-and-conquer contrastive (gradient cache): peak memory and time per cell of one optimizer
step (`pretrain.objectives.train_step` under a DeepSpeed engine) against the contrastive batch
size, with the cache (chunks of ``--chunk-cells`` cells, one DeepSpeed micro-step each) and
without it (one micro-step over the whole batch). Writes
``benchmarks/results/contrastive_<device>.json`` and a PNG beside it.

    python benchmarks/bench_contrastive.py                  # CPU: 16 ... 256 cells (a few min on 2 cores)
    python benchmarks/bench_contrastive.py --budget-s 60    # CUDA (bf16): 256 ... 65,536 cells, one process
    python benchmarks/bench_contrastive.py --smoke --out /tmp/c.json   # tiny shapes on CPU: checks the script

Targets (the issue's): with the cache, peak memory flat in the batch size; at most 1.5x the time
per cell of the uncached step at equal batch; the largest batch that fits on one GPU, reported.

Workload: a `CellModel` (``--d-model``, ``--layers``, ``--heads``, ``--attention``) in a
`PretrainModule`, masked expression + InfoNCE (both weight 1), AdamW, ZeRO stage ``--zero-stage``,
fp32 on CPU and bf16 on CUDA. Synthetic `PackedBatch`es: every cell has two views (sequences 2i
and 2i+1, view_index i) of exactly ``--genes`` random genes of a 2,000-token vocabulary each,
binned values, 15% of positions masked, so a cell costs the same in every batch. Attention is
FAVOR+ on CUDA (the Triton kernel) and exact SDPA on CPU by default: on CPU FAVOR+ runs in
batched PyTorch ops which, at the CPU default's 129 tokens per sequence (about as many as its 128
random features), cost about twice SDPA and would double the run, while the attention backend
does not change what the cache does (``--attention favor`` measures it anyway).

Each configuration (batch size x mode) builds its own engine (`run_one`, world size 1: a new engine
per gradient-accumulation value). On CUDA (and with ``--smoke``) all of them run in this one process:
the peak is read from the allocator's counters, reset per configuration, so earlier configurations
do not raise it; a ``torch.cuda.OutOfMemoryError`` (or any other failure) is caught and recorded,
the engine destroyed and the cache emptied before the next one (fresh processes per configuration,
``--no-in-process``, cost DeepSpeed's and torch's imports and a CUDA context each: too slow for a
short lease). On CPU each configuration runs in a fresh process by default, because the resident
set's peak, which CPU memory is read from, depends on what ran before. ``--budget-s`` bounds the
sweep: a configuration whose predicted time (the same mode's last step time scaled by the batch,
times its steps, plus a few seconds to build) would pass it is skipped and recorded as such; on CUDA,
from the batch whose predicted step passes ``--long-step-s`` (1 s) on, one timed step instead of
``--repeats``. The JSON is rewritten after every configuration (``"partial": true`` until the
end). After building the engine and the batch, one step
over a tiny batch with the same number of chunks allocates the optimizer state and ZeRO buffers;
then the baseline is taken and the peak reset, ``--warmup`` steps and ``--repeats`` timed steps
run, and the peak is read at the end:

- time: median over the timed steps (CUDA events on CUDA; ``time.perf_counter`` on CPU); time per
  cell = step time / cells (a cell is two sequences). On CPU also the process's CPU time per cell
  (``time.process_time``), which other load on a shared machine skews less than wall time (each
  row records the 1-minute load average). CPU runs use one torch thread by default (``--threads``):
  with more, OpenMP threads spin while waiting for a core that other processes hold, and the CPU
  time inflates along with the wall time;
- peak memory on CUDA: ``torch.cuda.max_memory_allocated`` (live tensors) and
  ``max_memory_reserved`` (what the caching allocator held) over the warm-up and timed steps, after
  ``reset_peak_memory_stats``;
- peak memory on CPU: the process's peak resident set (``VmHWM``), reset at the baseline by
  writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0) after returning freed heap to the OS
  (``malloc_trim``). Under glibc's default malloc that is what the allocator held, which keeps
  freed blocks for reuse and so grows with the number of chunks while live memory does not; so
  each configuration runs twice: the timed run with the default allocator (its peak recorded as
  ``held_*``), and a second fresh process, one step, with ``MALLOC_MMAP_THRESHOLD_`` set so that
  blocks of 128 KiB or more are unmapped when freed: its peak follows the live allocations.
  ``--in-process`` skips the second run (its CPU peaks are glibc-default ones). Where
  ``clear_refs`` cannot be written, CPU memory is recorded as null.

``peak_bytes`` is the live peak (model, optimizer state and batch included; on CPU the whole
process's resident set) and ``step_peak_bytes`` the peak minus the memory in use before the steps:
what a step adds, the quantity the flatness target is about; ``held_peak_bytes`` and
``held_step_peak_bytes`` are the same for what the allocator held.

A configuration that runs out of memory (``torch.cuda.OutOfMemoryError``, or a CPU process killed)
is recorded as ``"oom"`` (one over ``--timeout`` as ``"timeout"``), larger batches of that mode are
skipped, and ``largest_batch_fits`` reports the largest batch that ran, per mode (``limited_by``: what
stopped the sweep, out of memory, the time budget or nothing).

Note: both modes compute InfoNCE over the whole batch at once (`pretrain.objectives.info_nce`), with
[B, B] fp32 tensors (the logits, a log-softmax per direction and their gradients): 16 GiB each at
65,536 cells. The cached peak is flat in the encoder's activations, not in that term, which grows
as B^2 and bounds the largest batch at the top of the GPU range.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import ResultFile, cpu_device, device_record, device_slug, versions  # noqa: E402

VOCAB, N_BINS, MASK_RATIO = 2000, 51, 0.15
N_SPECIAL = 3  # <pad>, <cls>, <mask>: gene tokens are 3 .. VOCAB-1
MODES = ("cached", "uncached")
CPU_BATCHES = [16, 32, 64, 128, 256]
GPU_BATCHES = [256 * 2 ** i for i in range(9)]  # 256 ... 65,536
FLAT_TOLERANCE = 1.25  # "flat": the cached step peak at the largest batch within 25% of the smallest's
TIME_TARGET = 1.5
# CPU live-memory runs: blocks of 128 KiB or more mmap'd and unmapped when freed (glibc's default
# raises that threshold as blocks are freed and keeps them), so that the peak RSS follows live memory
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}


def synthetic_batch(n_cells: int, genes: int, device, seed: int):
    """A `PackedBatch` of two views of each of ``n_cells`` cells (sequences 2i, 2i+1: view_index i),
    each view ``genes`` distinct random gene tokens in ascending order, bins 1..N_BINS-1, about
    MASK_RATIO of the positions masked (input the mask bin N_BINS, target the bin). No labels."""
    import torch

    from data_pipeline.loading.batch import PackedBatch

    if not 1 <= genes <= VOCAB - N_SPECIAL:
        raise ValueError(f"--genes {genes}: choose 1 .. {VOCAB - N_SPECIAL} (the synthetic vocabulary's genes)")
    g = torch.Generator(device=device).manual_seed(seed)
    n_seqs = 2 * n_cells
    rows, block = [], max(1, (1 << 24) // VOCAB)  # random keys of `block` sequences at a time
    for start in range(0, n_seqs, block):
        keys = torch.rand(min(block, n_seqs - start), VOCAB - N_SPECIAL, generator=g, device=device)
        rows.append(keys.topk(genes, dim=1).indices.sort(dim=1).values.flatten() + N_SPECIAL)
    gene_ids = torch.cat(rows)
    targets = torch.randint(1, N_BINS, gene_ids.shape, generator=g, device=device)
    mask = torch.rand(gene_ids.shape, generator=g, device=device) < MASK_RATIO
    values = torch.where(mask, torch.full_like(targets, N_BINS), targets)
    cu = torch.arange(n_seqs + 1, device=device, dtype=torch.int32) * genes
    view = torch.arange(n_seqs, device=device) // 2
    return PackedBatch(gene_ids=gene_ids, values=values, cu_seqlens=cu, max_seqlen=genes, mlm_mask=mask,
                       mlm_targets=targets, labels=torch.zeros(n_seqs, 0, dtype=torch.long, device=device),
                       view_index=view, cell_index=view.clone())


# --- one configuration, in its own process -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class _CpuMemory:
    """Resident memory of this process, from Linux's /proc (see the module docstring)."""

    def __init__(self):
        import ctypes

        try:
            self.malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            self.malloc_trim = None
        self.available = os.access("/proc/self/clear_refs", os.W_OK)

    def reset(self) -> int | None:
        """Return freed heap to the OS and reset the peak; the resident bytes now (the baseline)."""
        if not self.available:
            return None
        if self.malloc_trim is not None:
            self.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
        return _proc_kib("VmRSS") * 1024

    def peak(self) -> int | None:
        return _proc_kib("VmHWM") * 1024 if self.available else None

    def method(self) -> str:
        if not self.available:
            return "unavailable: /proc/self/clear_refs is not writable here (the peak RSS cannot be reset)"
        allocator = ("big blocks unmapped when freed (MALLOC_MMAP_THRESHOLD_={}): follows the live allocations"
                     .format(os.environ["MALLOC_MMAP_THRESHOLD_"]) if "MALLOC_MMAP_THRESHOLD_" in os.environ
                     else "glibc malloc's defaults, which keep freed blocks for reuse")
        return f"VmHWM reset via /proc/self/clear_refs after malloc_trim; {allocator}"


def run_one(job: dict) -> dict:
    """Build the engine and batch of one configuration, then measure it (see the module docstring)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import torch

    from pretrain.config import DeepSpeedConfig, ModelConfig, ObjectiveConfig
    from pretrain.distributed import deepspeed_engine, host_all_reduce
    from pretrain.model import CellModel
    from pretrain.objectives import PretrainModule, StepCounts, train_step

    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    elif job["threads"]:
        torch.set_num_threads(job["threads"])
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    m = job["model"]
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=m["d_model"], n_layers=m["layers"], n_heads=m["heads"],
                         n_bins=N_BINS, dropout=0.1, attention=m["attention"], favor_features=m["favor_features"],
                         contrastive_dim=m["contrastive_dim"], label_classes=[])
    cached = job["mode"] == "cached"
    objectives = ObjectiveConfig(mlm_weight=1.0, contrastive_weight=1.0, gradient_cache=cached)
    module = PretrainModule(CellModel(config, seed=0), objectives)
    n_params = sum(p.numel() for p in module.parameters())
    cells, chunk_cells = job["batch_cells"], job["chunk_cells"] if cached else job["batch_cells"]
    n_chunks = -(-cells // chunk_cells)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    # the trainer's engine (its ZeRO and precision settings: under bf16, fp32 sums of the chunks' gradients)
    ds = DeepSpeedConfig(zero_stage=job["zero_stage"], bf16=job["bf16"], gradient_clipping=1.0)
    engine, _ = deepspeed_engine(module, optimizer, ds, torch.device("cuda", 0) if cuda else torch.device("cpu"),
                                 micro_steps=n_chunks)
    try:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        batch = synthetic_batch(cells, job["genes"], device, seed=1)
        chunks = batch.split(chunk_cells)
        # optimizer state and ZeRO buffers, allocated by a first step: one cell per chunk
        train_step(engine, synthetic_batch(n_chunks, job["genes"], device, seed=2).split(1), objectives, step_seed=0)

        memory = None if cuda else _CpuMemory()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline, held_baseline = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        else:
            baseline = memory.reset()
        times, cpu_times, losses = [], [], []
        # the step's counts as the trainer gives them (taken once, outside the clock: counting them inside
        # the step would add device reads per chunk, which the trainer does not pay)
        counts = StepCounts(*host_all_reduce(StepCounts.of(chunks).as_list()))
        for step in range(job["warmup"] + job["repeats"]):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = train_step(engine, chunks, objectives, step_seed=step + 1, counts=counts)
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t, cpu = time.perf_counter(), time.process_time()
                result = train_step(engine, chunks, objectives, step_seed=step + 1, counts=counts)
                seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
            if step >= job["warmup"]:
                times.append(seconds)
                losses.append(float(result.loss))
                if not cuda:
                    cpu_times.append(cpu_seconds)
        held = {}
        if cuda:
            peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
            held = {"held_peak_bytes": torch.cuda.max_memory_reserved(),
                    "held_step_peak_bytes": torch.cuda.max_memory_reserved() - held_baseline,
                    "held_memory_method": "torch.cuda.max_memory_reserved (the caching allocator's pool)"}
        else:
            peak, method = memory.peak(), memory.method()
        step_s = statistics.median(times)
        return {"mode": job["mode"], "batch_cells": cells, "chunk_cells": chunk_cells, "n_chunks": n_chunks,
                "status": "ok", "step_s": step_s, "step_s_each": times, "ms_per_cell": step_s / cells * 1e3,
                # CPU: the process's CPU time (all threads) per step, which other load on the machine skews less
                "cpu_ms_per_cell": statistics.median(cpu_times) / cells * 1e3 if cpu_times else None,
                "peak_bytes": peak, "step_peak_bytes": None if peak is None else peak - baseline,
                "baseline_bytes": baseline, "memory_method": method, **held,
                "tokens_per_step": batch.n_tokens, "loss": losses[-1], "n_params": n_params,
                "load_average_1min": os.getloadavg()[0],
                "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
                "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}
    finally:  # in-process sweeps: this engine's memory goes before the next configuration's
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, optimizer, module


def run_here(job: dict) -> dict:
    """`run_one` in this process; an "oom" row if CUDA runs out of memory, an "error" row (traceback
    on stderr) if it fails otherwise; the memory freed either way before the next configuration."""
    import gc
    import traceback

    import torch

    try:
        return run_one(job)
    except torch.cuda.OutOfMemoryError as err:
        return {"mode": job["mode"], "batch_cells": job["batch_cells"], "status": "oom", "error": str(err)[:300]}
    except Exception as err:  # noqa: BLE001 - recorded; larger batches of this mode are skipped
        traceback.print_exc()
        return {"mode": job["mode"], "batch_cells": job["batch_cells"], "status": "error",
                "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a faulted device raises its fault again: the row already says why
                traceback.print_exc()


def run_config(job: dict, timeout: float, env: dict | None = None) -> dict:
    """`run_one` in a fresh process (`run_here` there; ``env`` added to its environment); its row,
    or a row saying why there is none."""
    base = {"mode": job["mode"], "batch_cells": job["batch_cells"]}
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "row.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, **(env or {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", str(job_file), str(out_file)], env=env,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {**base, "status": "timeout", "error": f"over {timeout:.0f} s: raise --timeout or lower the batch"}
        if out_file.exists():
            return json.loads(out_file.read_text())
        killed = proc.returncode in (-9, 137)  # the kernel's OOM killer
        tail = proc.stderr[-1500:]
        if not killed and not any(text in tail.lower() for text in ("out of memory", "can't allocate memory")):
            raise RuntimeError(f"{job['mode']} at {job['batch_cells']} cells failed (exit {proc.returncode}):\n{tail}")
        reason = next((line for line in reversed(tail.splitlines()) if "Error" in line), tail[-300:])
        return {**base, "status": "oom", "error": f"exit {proc.returncode}: {reason.strip()[:300]}"}


def measure(job: dict, in_process: bool, timeout: float) -> dict:
    """One configuration's row. On CPU, in fresh processes, twice: the timed run under glibc's
    default malloc (its peak becomes ``held_*``), and one step in a process whose big blocks go back
    to the OS when freed, for the live peak (``peak_bytes``, ``step_peak_bytes``)."""
    if in_process:
        return run_here(job)
    row = run_config(job, timeout)
    if job["device"] != "cpu" or row["status"] != "ok":
        return row
    live = run_config({**job, "warmup": 0, "repeats": 1}, timeout, env=LIVE_MALLOC_ENV)
    held = {f"held_{key}": row[key] for key in ("peak_bytes", "step_peak_bytes", "memory_method")}
    if live["status"] != "ok":
        return {**row, **held, "peak_bytes": None, "step_peak_bytes": None,
                "memory_method": f"live-memory run: {live['status']}"}
    return {**row, **held, **{key: live[key] for key in ("peak_bytes", "step_peak_bytes", "memory_method")}}


# --- the sweep -----------------------------------------------------------------------------------
def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def summarize(rows: list[dict], chunk_cells: int) -> dict:
    """Cached / uncached ratios at equal batch, the targets' verdicts, the largest batch per mode."""
    ok = {(r["mode"], r["batch_cells"]): r for r in rows if r["status"] == "ok"}
    comparison = []
    for b in sorted({r["batch_cells"] for r in rows}):
        c, u = ok.get(("cached", b)), ok.get(("uncached", b))
        if c and u:
            comparison.append({"batch_cells": b, "time_per_cell_ratio": c["ms_per_cell"] / u["ms_per_cell"],
                               "cpu_time_per_cell_ratio": _ratio(c.get("cpu_ms_per_cell"), u.get("cpu_ms_per_cell")),
                               "step_peak_ratio": _ratio(c["step_peak_bytes"], u["step_peak_bytes"])})
            c["time_ratio_vs_uncached"] = comparison[-1]["time_per_cell_ratio"]
    fits = {mode: max((b for m, b in ok if m == mode), default=None) for mode in MODES}
    first_oom = {mode: min((r["batch_cells"] for r in rows if r["mode"] == mode and r["status"] == "oom"),
                           default=None) for mode in MODES}
    # flatness over the batches with at least one full chunk (below that the cached step is one small chunk)
    flat_rows = sorted((r for (m, b), r in ok.items() if m == "cached" and b >= chunk_cells
                        and r["step_peak_bytes"] is not None), key=lambda r: r["batch_cells"])
    memory = None
    if len(flat_rows) >= 2:
        lo, hi = flat_rows[0], flat_rows[-1]
        growth = hi["step_peak_bytes"] / lo["step_peak_bytes"]
        memory = {"from_cells": lo["batch_cells"], "to_cells": hi["batch_cells"],
                  "batch_growth": hi["batch_cells"] / lo["batch_cells"], "cached_step_peak_growth": growth,
                  "cached_held_step_peak_growth": _ratio(hi.get("held_step_peak_bytes"), lo.get("held_step_peak_bytes")),
                  "tolerance": FLAT_TOLERANCE, "holds": growth <= FLAT_TOLERANCE}
        un = [ok.get(("uncached", r["batch_cells"])) for r in (lo, hi)]
        if all(un):
            memory["uncached_step_peak_growth"] = _ratio(un[1]["step_peak_bytes"], un[0]["step_peak_bytes"])
    timing = None
    if comparison:
        worst = max(c["time_per_cell_ratio"] for c in comparison)
        timing = {"worst_ratio": worst, "target": TIME_TARGET, "holds": worst <= TIME_TARGET}
        cpu = [c["cpu_time_per_cell_ratio"] for c in comparison if c["cpu_time_per_cell_ratio"] is not None]
        if cpu:
            timing["worst_cpu_time_ratio"] = max(cpu)
    return {"comparison": comparison, "largest_batch_fits": fits, "first_oom_batch": first_oom,
            "targets": {"memory_flat_with_cache": memory, "time_per_cell_within_1_5x": timing}}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and batches on CPU: checks the script")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where available (cpu with --smoke)")
    ap.add_argument("--batches", type=int, nargs="+", help=f"cells per step (CPU {CPU_BATCHES}; CUDA 256 ... 65536)")
    ap.add_argument("--chunk-cells", type=int, help="cells per gradient-cache chunk (CPU 16, CUDA 256)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--d-model", type=int, help="model width (CPU 128, CUDA 256)")
    ap.add_argument("--layers", type=int, help="transformer blocks (CPU 2, CUDA 4)")
    ap.add_argument("--heads", type=int, help="attention heads (4: head dim 64 on CUDA, the FAVOR+ kernel "
                    "variant the other GPU benchmarks compile too)")
    ap.add_argument("--attention", choices=("favor", "sdpa", "flash"),
                    help="default: favor on CUDA (the Triton kernel), sdpa on CPU (see the module docstring)")
    ap.add_argument("--favor-features", type=int, help="FAVOR+ random features (CPU 128, CUDA 256)")
    ap.add_argument("--genes", type=int, help="genes per view of a cell (CPU 128, CUDA 256)")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="default: on for CUDA, off for CPU")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per process (default 1, see the module docstring; 0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, help="timed steps per configuration (median reported; CPU 3, CUDA 5)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction,
                    help="run every configuration in this process (default on CUDA and with --smoke: the peak is "
                         "read per configuration by the allocator, and each OOM is caught and freed) or each in a "
                         "fresh process (default on CPU, whose resident-set peak depends on what ran before)")
    ap.add_argument("--budget-s", type=float,
                    help="seconds for the whole sweep: a configuration whose predicted time (the same mode's last "
                         "one, scaled by the batch) would pass it is skipped, recorded as such")
    ap.add_argument("--long-step-s", type=float, default=1.0,
                    help="CUDA: where the predicted step passes this many seconds, one timed step instead of "
                         "--repeats (after the warm-up)")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/contrastive_<device>.json)")
    return ap


FINISH_RESERVE_S = 5.0  # of --budget-s, kept for writing the summary and the plot after the last size


def main(argv=None) -> None:
    begun = time.monotonic()  # --budget-s counts from here: the imports and CUDA's start-up are the suite's seconds too
    if len(sys.argv) == 4 and sys.argv[1] == "--one":  # the child of run_config: job file, row file
        row = run_here(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(row))
        return
    args = parser().parse_args(argv)

    import torch

    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here; run on a GPU machine or pass --device cpu")
    gpu = device == "cuda"
    args.attention = args.attention or ("favor" if gpu else "sdpa")
    if args.in_process is None:
        args.in_process = args.smoke or gpu
    if args.attention == "flash" and not gpu:
        sys.exit("--attention flash needs CUDA (flash-attn); use favor or sdpa on CPU")
    if args.smoke:
        defaults = {"batches": [4, 8], "chunk_cells": 2, "d_model": 32, "layers": 1, "heads": 2, "favor_features": 16,
                    "genes": 16, "repeats": 1}
    else:
        defaults = {"batches": GPU_BATCHES if gpu else CPU_BATCHES, "chunk_cells": 256 if gpu else 16,
                    "d_model": 256 if gpu else 128, "layers": 4 if gpu else 2, "heads": 4,
                    "favor_features": 256 if gpu else 128, "genes": 256 if gpu else 128, "repeats": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.chunk_cells < 1 or min(args.batches) < 1:
        sys.exit(f"--chunk-cells {args.chunk_cells} and --batches {args.batches} must be >= 1 cell")
    if args.d_model % args.heads:
        sys.exit(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    bf16 = gpu if args.bf16 is None else args.bf16
    model = {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "attention": args.attention,
             "favor_features": args.favor_features, "contrastive_dim": 128 if not args.smoke else 16}

    load_before = os.getloadavg()
    out = args.out or REPO / "benchmarks" / "results" / f"contrastive_{'cpu' if not gpu else device_slug()}.json"
    info = device_record() if gpu else cpu_device()
    result = ResultFile(
        out, "contrastive", device=info, smoke=args.smoke, versions=versions("torch", "deepspeed"),
        config={"model": model, "vocab_size": VOCAB, "n_bins": N_BINS, "genes_per_view": args.genes,
                "views_per_cell": 2, "mask_ratio": MASK_RATIO, "chunk_cells": args.chunk_cells,
                "zero_stage": args.zero_stage, "dtype": "bf16" if bf16 else "fp32", "optimizer": "AdamW",
                "objectives": {"mlm_weight": 1.0, "contrastive_weight": 1.0}, "warmup_steps": args.warmup,
                "timed_steps": args.repeats, "long_step_s": args.long_step_s if gpu else None,
                "budget_s": args.budget_s, "world_size": 1,
                "cpu_threads": None if gpu else (args.threads or torch.get_num_threads())},
        method=None)
    method = {"timing": "median of the timed steps; " + ("CUDA events" if gpu else "time.perf_counter (wall; "
              "cpu_ms_per_cell: time.process_time, the process's CPU time over all its threads)"),
              "peak_bytes": "peak of the live allocations (model, optimizer state, batch included; on CPU the "
                            "whole process's resident set)",
              "step_peak_bytes": "peak_bytes minus the memory in use before the steps, after the optimizer "
                                 "state was allocated: what a step adds (the flatness target's measure)",
              "held_peak_bytes": "peak of what the allocator held (CUDA: reserved; CPU: resident under glibc's "
                                 "default malloc, in the timed run), held_step_peak_bytes its growth",
              "process": "every configuration in this one process, a new DeepSpeed engine each (out-of-memory "
                         "caught, the engine destroyed and the cache emptied before the next)"
              if args.in_process else "each configuration in a fresh process with its own DeepSpeed engine"}
    started = time.monotonic()
    last = {}  # mode -> (cells, seconds the configuration took (None: the first), step seconds, steps)
    stopped = {}  # mode -> why larger batches are skipped
    for cells in sorted(args.batches):  # both modes of a batch back to back: other load hits them alike
        for mode in args.modes:
            if mode in stopped:
                result.add({"mode": mode, "batch_cells": cells, "status": "skipped", "error": stopped[mode]})
                continue
            repeats, predicted = args.repeats, None
            if mode in last:  # the step scales with the batch; building the engine and batch (and a fresh
                # process) cost what they cost last time beyond the steps, at least a few seconds
                prev_cells, prev_wall, prev_step, prev_steps = last[mode]
                step = prev_step * cells / prev_cells
                if gpu and step > args.long_step_s:
                    repeats = 1
                # (the sweep's first configuration also paid the imports and compiles once: not counted)
                overhead = 3.0 if prev_wall is None else max(3.0, prev_wall - prev_step * prev_steps)
                predicted = overhead + step * (args.warmup + repeats + 1)
            if args.budget_s is not None and predicted is not None and \
                    time.monotonic() - begun + predicted > args.budget_s - FINISH_RESERVE_S:
                stopped[mode] = (f"time budget: {cells} cells predicted {predicted:.0f} s, "
                                 f"{args.budget_s - (time.monotonic() - begun):.0f} s of --budget-s left")
                result.add({"mode": mode, "batch_cells": cells, "status": "skipped", "error": stopped[mode]})
                continue
            job = {"mode": mode, "batch_cells": cells, "chunk_cells": args.chunk_cells, "genes": args.genes,
                   "model": model, "zero_stage": args.zero_stage, "bf16": bf16, "device": device,
                   "warmup": args.warmup, "repeats": repeats, "threads": args.threads}
            t0 = time.monotonic()
            row = measure(job, args.in_process, args.timeout)
            row["wall_s"] = round(time.monotonic() - t0, 2)
            if row["status"] == "ok":
                first = not any(r.get("status") == "ok" for r in result.rows)
                last[mode] = (cells, None if first and args.in_process else row["wall_s"], row["step_s"],
                              args.warmup + repeats + 1)
            if row["status"] in ("oom", "timeout", "error"):
                stopped[mode] = f"{row['status']} at {cells} cells"
            result.add(row)
            if row.get("memory_method") and not method.get("memory"):
                method.update(memory=row.get("memory_method"), held_memory=row.get("held_memory_method"))
                result.update(method=method)
            shown = {k: row.get(k) for k in ("mode", "batch_cells", "n_chunks", "status", "ms_per_cell",
                                             "step_peak_bytes", "wall_s")}
            print(json.dumps(shown), file=sys.stderr, flush=True)
    rows = result.rows
    result.finish(method=method,
                  # other work on the machine skews CPU times: the 1-minute load average around the sweep
                  load_average_1min={"before": load_before[0], "after": os.getloadavg()[0]},
                  sweep_seconds=round(time.monotonic() - started, 1), **summarize(rows, args.chunk_cells),
                  # what ended each mode's sweep: the largest batch that ran is the largest that fits only
                  # when memory ended it
                  limited_by={mode: ("out of memory" if stopped.get(mode, "").startswith("oom") else
                                     "time budget" if stopped.get(mode, "").startswith("time budget") else
                                     stopped.get(mode) or "none: every batch ran") for mode in args.modes})
    print_table(rows)
    result = result.record
    _plot(result, out.with_suffix(".png"))


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':<10}{'cells':>7}{'chunks':>7}{'status':>9}{'step s':>9}{'ms/cell':>9}{'step MiB':>10}", flush=True)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['mode']:<10}{r['batch_cells']:>7}{'':>7}{r['status']:>9}  {(r.get('error') or '')[:60]}", flush=True)
            continue
        mib = f"{r['step_peak_bytes'] / 2**20:.0f}" if r.get("step_peak_bytes") is not None else "-"
        print(f"{r['mode']:<10}{r['batch_cells']:>7}{r['n_chunks']:>7}{'ok':>9}{r['step_s']:>9.3f}"
              f"{r['ms_per_cell']:>9.3f}{mib:>10}", flush=True)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, mode in enumerate(MODES):
        rows = sorted((r for r in result["rows"] if r["mode"] == mode and r["status"] == "ok"),
                      key=lambda r: r["batch_cells"])
        if not rows:
            continue
        cells = [r["batch_cells"] for r in rows]
        for key, style, what in (("step_peak_bytes", "-", "live"), ("held_step_peak_bytes", "--", "held")):
            mem = [r for r in rows if r.get(key) is not None]
            axes[0].plot([r["batch_cells"] for r in mem], [r[key] / 2**20 for r in mem], marker="o", linestyle=style,
                         color=f"C{i}", label=f"{mode}: {what}")
        axes[1].plot(cells, [r["ms_per_cell"] for r in rows], marker="o", color=f"C{i}", label=mode)
    for ax, label in zip(axes, ("memory a step adds, peak (MiB)", "time per cell (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("contrastive batch (cells, 2 views each)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    c = result["config"]
    fig.suptitle(f"gradient-cached vs uncached step on {result['device'].get('gpu') or 'CPU'} "
                 f"({c['dtype']}, ZeRO-{c['zero_stage']}, chunk {c['chunk_cells']} cells, d={c['model']['d_model']}, "
                 f"{c['model']['layers']} layers, {c['genes_per_view']} genes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
