"""What every benchmark's results JSON shares: the machine, the versions, the header, the write
(atomic, and incremental: `ResultFile` rewrites its JSON after every row), the timer, and the two
ceilings of the device (`measure_ceilings`: a large bf16 matrix product and a device-to-device
copy) that achieved rates are put against.

torch is imported inside the functions: `bench_train.py` hides the GPUs for ``--device cpu``
before torch first looks for them."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from data_pipeline.conversion.fsio import atomic_write_with

RESULTS = Path(__file__).resolve().parent / "results"
# the real count matrices beside the checkout (absent in a user's fresh clone) and the one file
# among them without gene identifiers, which every benchmark leaves out
SHARED_H5AD = Path(__file__).resolve().parents[2] / "shared" / "data" / "h5ad"
NO_GENE_IDS = "scdcc_10X_PBMC_top2000.h5ad"
# dense bf16 datasheet peaks (TFLOP/s) are in pretrain.metrics.PEAK_TFLOPS; the measured ones here
CEILINGS_PREFIX = "ceilings_"


def cpu_device() -> dict:
    """This machine, as results JSONs record it."""
    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if info.exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "platform": platform.platform()}


def device_record() -> dict:
    """The machine with its GPU (name, multiprocessors, memory, L2, compute capability) when torch
    sees one."""
    import torch

    record = cpu_device()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                      gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                      multiprocessors=props.multi_processor_count,
                      l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
                      compute_capability=f"{props.major}.{props.minor}")
    return record


def device_slug() -> str:
    """A file-name-safe name of the accelerator, e.g. ``nvidia-h100-80gb-hbm3``; ``cpu`` without one."""
    import torch

    return slug_of(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")


def slug_of(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; ``cpu`` for an empty name."""
    slug = "-".join(part for part in re.split(r"[^0-9a-z]+", device_name.lower()) if part)
    return slug or "cpu"


def nvidia_smi() -> dict | None:
    """Driver version, clocks, power limit and temperature as nvidia-smi reads them (read-only
    queries); None where nvidia-smi is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    full = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit", "temperature.gpu",
            "memory.used", "memory.total")
    for fields in (full, ("name", "driver_version")):  # the short query where a field is not known there
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and out.stdout.strip():
            return dict(zip(fields, (v.strip() for v in out.stdout.strip().splitlines()[0].split(","))))
    return None


def versions(*modules: str) -> dict:
    """Python and the named packages' versions (missing ones as None); with torch, also CUDA, cuDNN
    and the driver."""
    import importlib
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in modules:
        try:
            version = getattr(importlib.import_module(name), "__version__", None)
        except Exception:  # noqa: BLE001 - ImportError, or a package that fails while importing
            out[name] = None
            continue
        if version is None:  # no __version__ (performer_pytorch): the installed distribution's
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "?"
        out[name] = str(version)
    if "torch" in modules and out.get("torch"):
        import torch

        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        smi = nvidia_smi() if torch.cuda.is_available() else None
        out["driver"] = smi.get("driver_version") if smi else None
    return out


def code_version() -> dict | None:
    """The checkout's commit, and whether tracked files other than the results differ from it:
    which code a number came from (None outside a git checkout, as on the device machine, which
    gets a copy of the files). The results folder is left out: a benchmark that writes its file
    row by row, or a run after another benchmark's, would otherwise mark its own code modified."""
    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=RESULTS.parents[1], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        return {"commit": head.stdout.strip(),
                "modified": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                     f":(exclude){RESULTS.relative_to(RESULTS.parents[1]).as_posix()}").stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return None


# the code this process started from: a benchmark of hours writes its record at the end, after the
# checkout may have moved on (its own modules were read at the start)
CODE_AT_START = code_version()


def result_record(benchmark: str, **fields) -> dict:
    """A results JSON's fields: the benchmark's name, date and code first, the command that made it
    last. ``code`` is the checkout's when this process started; ``code_at_write`` is added where the
    checkout changed since (a module imported late would come from it)."""
    now = code_version()
    moved = {"code_at_write": now} if now != CODE_AT_START else {}
    return {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code": CODE_AT_START, **moved, **fields,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}


def write_result(path: Path, result: dict, quiet: bool = False) -> None:
    """Write ``result`` as JSON atomically (a temporary file beside it, then a rename): a reader,
    or a run killed mid-write, sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(result, indent=1) + "\n").encode()
    atomic_write_with(path, lambda fh: fh.write(text), durable=False)
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)


class ResultFile:
    """A results JSON written as it grows: ``add(row)`` appends to ``rows`` and rewrites the file,
    ``update(**fields)`` sets header fields and rewrites it; ``partial`` stays true until
    ``finish()``. A run killed half-way leaves every row measured so far."""

    def __init__(self, path: Path, benchmark: str, **fields):
        self.path = Path(path)
        self.record = result_record(benchmark, **fields, partial=True, rows=[])
        self.write()

    @property
    def rows(self) -> list[dict]:
        return self.record["rows"]

    def write(self) -> None:
        command = self.record.pop("command")  # keep it last
        self.record["command"] = command
        write_result(self.path, self.record, quiet=True)

    def add(self, row: dict) -> None:
        self.record["rows"].append(row)
        self.write()

    def update(self, **fields) -> None:
        self.record.update(fields)
        self.write()

    def finish(self, **fields) -> None:
        self.record.update(fields, partial=False)
        self.write()
        print(f"wrote {self.path}", file=sys.stderr)


def time_ms(fn, cuda: bool, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3) -> float:
    """Median milliseconds of ``fn()``: on CUDA `triton.testing.do_bench` (CUDA events around each
    call, the L2 cache flushed between calls, warm-up first), or CUDA events by hand where Triton is
    absent; on CPU ``time.perf_counter`` (one warm-up call, then at least ``min_reps`` calls or
    ``rep_ms`` of them)."""
    if cuda:
        import torch

        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(min_reps, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn()
    times, spent = [], 0.0
    while len(times) < min_reps or spent * 1e3 < rep_ms and len(times) < 100:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return statistics.median(times) * 1e3


def device_kernel_ms(fn, runs: int = 5, cuda: bool = True) -> dict:
    """The GPU's own time in ``fn()``: the device time of every kernel, copy and fill it launched,
    summed over ``runs`` calls under torch.profiler, per call. Beside `time_ms` (CUDA events around
    each call: the device's timeline, idle gaps included) it shows what the host's launches cost:
    ``wall - kernels`` is time the device sat waiting. ``cuda=False``: the CPU operators' own time
    instead (what the CPU smoke runs).  -> {"kernel_ms", "kernels_per_call"}"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # anything lazy (a first-call allocation, a plan) outside the profile
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
        sync()
    events = prof.key_averages()
    if cuda:  # the attribute's name changed in torch 2.4 (self_cuda_time_total before)
        total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
                       for e in events)
    else:
        total_us = sum(e.self_cpu_time_total for e in events)
    return {"kernel_ms": total_us / 1e3 / runs, "kernels_per_call": sum(e.count for e in events) / runs}


# --- the two ceilings -------------------------------------------------------------------------------
def measure_ceilings(smoke: bool = False) -> dict:
    """The device's two ceilings, measured (METHOD.md's "two numbers"): a large matrix product on
    random data (bf16, and fp32 with TF32 products) and a device-to-device copy (bytes read +
    written). Each timed twice (median of each), so that the spread is on record. On CPU (smoke)
    the same code at a tiny size."""
    import torch

    cuda = torch.cuda.is_available() and not smoke
    device = "cuda" if cuda else "cpu"
    n = 8192 if cuda else 256
    copy_bytes = (2 << 30) if cuda else (8 << 20)  # 2 GiB source: far past the 60 MB L2
    out = {"device": device, "gemm_n": n, "copy_buffer_bytes": copy_bytes,
           "method": "triton.testing.do_bench medians (warm-up first, L2 flushed between calls), two runs each; "
                     "random normal inputs" if cuda else "time.perf_counter medians on CPU (smoke: tiny sizes)"}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True)):
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            runs = [time_ms(lambda a=a, b=b: a @ b, cuda, warmup_ms=50, rep_ms=300) for _ in range(2)]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        out[f"gemm_{name}_ms"] = runs
        out[f"gemm_{name}_tflops"] = 2 * n**3 / (min(runs) * 1e-3) / 1e12
        out[f"gemm_{name}_tflops_runs"] = [2 * n**3 / (t * 1e-3) / 1e12 for t in runs]
        del a, b
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    runs = [time_ms(lambda dst=dst, src=src: dst.copy_(src), cuda, warmup_ms=50, rep_ms=300) for _ in range(2)]
    out["copy_ms"] = runs
    out["copy_gbps"] = 2 * copy_bytes / (min(runs) * 1e-3) / 1e9  # read + written
    out["copy_gbps_runs"] = [2 * copy_bytes / (t * 1e-3) / 1e9 for t in runs]
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return out


def read_ceilings(path: Path | None) -> dict | None:
    """The ``ceilings`` of a ``ceilings_<device>.json`` (None where absent or unreadable)."""
    if not path or not Path(path).exists():
        return None
    try:
        return json.loads(Path(path).read_text()).get("ceilings")
    except (OSError, ValueError):
        return None
