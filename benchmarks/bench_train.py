"""Steady-state training throughput of the cell model per preset x attention backend x batching mode:
cells/s, tokens/s (real gene tokens, no padding), MFU, peak memory and padding waste. Writes
``benchmarks/results/train_<device>.json`` (``train_cpu.json`` on CPU) and prints a table.

    python benchmarks/bench_train.py                               # CUDA: full presets, bf16, budget 65,536
    python benchmarks/bench_train.py --device cpu                  # CPU: shrunk presets (minutes on 2 cores)
    python benchmarks/bench_train.py --presets geneformer-10m --backends sdpa   # a subset
    python benchmarks/bench_train.py --smoke --result /tmp/t.json  # tiny shapes on CPU: checks the script
    torchrun --nproc_per_node 8 benchmarks/bench_train.py          # one node, 8 GPUs (or `deepspeed ...`)
    python benchmarks/bench_train.py --device cpu --scaling 1,2,4  # relaunch under torchrun with 1, 2, 4 ranks
    python benchmarks/bench_train.py --write-lengths benchmarks/gpu_inputs/lengths.npy   # real lengths, to carry

The comparison (Geneformer credits length grouping with a 29.4x speed-up over padding every cell to
2,048): the SAME cells, with a REAL length distribution, batched four ways at the same memory
budget, measured side by side in one run:

- ``padded_to_cap``: Geneformer's baseline: cells in random order, EVERY cell padded to the preset's
  longest cell (its ``max_genes``: 2,048 for geneformer-10m, the cap of that claim), batches of
  ``token_budget // L`` cells as random_padded's;

- ``random_padded``: cells in random order, each batch padded to its longest cell. Batches hold a
  FIXED number of cells, ``token_budget // L`` with L the preset's longest cell (its ``max_genes``,
  + 1 for ``<cls>``): the size that fits the budget whatever cells are drawn, as Geneformer's
  baseline sized its batches for cells padded to 2,048 (without grouping, a batch's length is not
  known before its cells are drawn);
- ``grouped_padded``: Geneformer's length-grouped megabatches: ``--megabatch-cells`` cells shuffled,
  sorted by length (longest first) and cut greedily into batches of ``n_cells * max_len <=
  token_budget``, padded to their longest cell;
- ``packed``: the project's packed varlen batches (`PackedBatch`, no padding tokens; what the trainer
  uses): the same sorted megabatch cut as the trainer cuts it, by the trainer's batcher
  (`data_pipeline.loading.batching`: ``sum(len) <= token_budget``, except under ``sdpa``, which pads
  a packed batch internally to its longest cell for the attention itself and is therefore cut by
  ``n_cells * max_len <= token_budget``, like grouped_padded; ``favor``, ``varlen`` (torch's
  FlashAttention over packed sequences) and ``flash`` do not pad). All three modes size their batches
  with that one batcher (random_padded: a run of cells costing the longest). The padded modes run the model's
  padded path (`CellModel.encode_padded`): everything but attention runs on every padded slot;
  attention is torch SDPA with a key mask whatever the exact backend, so padded rows are measured
  once, under ``sdpa`` (``varlen`` and ``flash`` padded rows are skipped with that reason).
  ``favor`` runs packed only: its padded reference gathers the real tokens and loops per sequence,
  so it would time the reference rather than padding.

``len`` is the cell's sequence as the model runs it (`ModelConfig.token_cost`, as in the trainer): its
expressed genes capped at the preset's ``max_genes``, + 1 for ``<cls>`` where the model uses one;
scBERT (``gene_set=all``) and the scFoundation encoder-decoder run every cell over the full gene set
(``--n-genes`` tokens), so their cells cost ``n_genes`` each. Padded modes do not apply to those two (every scBERT
cell is already the full gene set; the encoder-decoder has no padded path): their rows are skipped
with a reason, as are ``flash`` without CUDA, bf16 or flash-attn, ``varlen`` without CUDA or bf16,
and any backend `pretrain.config.ATTENTION_BACKENDS` does not offer.

Length distribution: genes detected per cell (``np.diff(X.indptr)``) pooled over the real files in
``--data`` (``../shared/data/h5ad``, minus ``scdcc_10X_PBMC_top2000.h5ad``, which has no gene ids,
and the files of fewer than 5,000 genes, gene subsets whose cells are not a transcriptome's length),
or a ``--lengths-file`` (``.npy`` of genes per cell, e.g. a corpus's cell lengths; ``--write-lengths
NPY`` writes the real files' lengths to one, with a ``.json`` beside it naming the files: read back,
it is recorded as ``"lengths": "real"``, without the ``.json`` as ``"file"``; this is how the real
distribution travels to a GPU machine without ``../shared/data``); where neither is at hand, 4,096
cells of `data_pipeline.synthetic` (recorded as ``"lengths": "synthetic"``). Every
rank draws its own ``--megabatch-cells`` cells from it (with replacement, seeded by the rank), the
same cells for every preset, backend and mode. Gene ids and values are random (throughput does
not depend on them): distinct gene ids per cell; bins in [1, n_bins) (bins), rank positions (rank:
Geneformer masks the gene token), or log-scale floats (continuous); 15% of tokens masked.

The step: a DeepSpeed engine built by the trainer's `pretrain.train.build_engine` (AdamW, ZeRO stage
``--zero-stage``, bf16 on CUDA by default) around the cell model, masked-expression loss only (the
dominant cost; the contrastive and label heads add little); packed: ``model(batch)``, padded:
``encode_padded`` -> ``mlm_head`` at the masked positions; then ``engine.backward(loss);
engine.step()``. Every row: warm-up steps first (the batches with the most padded slots and the
longest cells among them, so that the memory peak, and an OOM, come before the timing), then the
timed steps: for the grouped and packed modes batches evenly spaced over the length-sorted
megabatch (a stratified sample: long-cell and short-cell batches in their proportions), for
random_padded the next batches of the random order. Reported: the median step time and the
throughput over all timed steps (cells / summed step time; CUDA events on CUDA, ``perf_counter``
on CPU); ``cells_per_step`` and ``padding_waste`` (1 - real tokens / padded slots) over ALL batches
of every rank's megabatch (known from the lengths without running them). MFU counts useful FLOPs only
(`pretrain.model.flops.model_cost` per real cell length: exact attention is quadratic in the length)
over the device's dense bf16 datasheet peak (``mfu``; None on CPU) and over the bf16 matrix-product
rate measured on the device (``mfu_measured_gemm``, from the ``--ceilings`` JSON that
`gpu_suite.py`'s setup part writes; None without it). Peak memory: ``torch.cuda.max_memory_allocated``,
reset per row, on CUDA; on CPU the process's peak resident set (VmHWM, reset per row via
``/proc/self/clear_refs`` where writable, else ``ru_maxrss``, the process's lifetime peak; recorded
in ``settings.memory``). A CUDA out-of-memory is recorded as ``"oom": true`` for its row, any other
failure of a step as ``"error"`` (with its traceback on stderr), and the run goes on with a fresh
engine. (On CUDA, the Triton FAVOR+ kernel takes head dims that are powers of two >= 16: scBERT's
200 / 10 heads = 20 fails there and is recorded so.)

Multi-rank (``torchrun`` / ``deepspeed`` launcher, any number of GPUs or nodes): every rank builds
the same model, draws its own cells, times its steps; per-row figures are gathered and rank 0
writes one JSON: per-rank cells/s, the per-rank mean (``cells_per_s``), the aggregate (all ranks'
cells over the slowest rank's time) and the world size. Under several ranks, the warm-up steps agree
on a failed forward pass (OOM or other) before backward; a failure inside backward or the optimizer
step (ZeRO collectives) can still leave the other ranks waiting. ``--scaling 1,2,4`` relaunches this script under ``torchrun
--standalone`` for each rank count on this machine (one thread per CPU rank) for one preset /
backend / mode (default geneformer-10m shrunk, sdpa, packed) and records the scaling efficiency
``aggregate_N / (N * single-rank)`` and ``os.cpu_count()`` (more ranks than cores is oversubscribed).

CPU (2 cores cannot run the full presets): presets shrunk (``--width-div`` 4: widths and FAVOR+
feature counts divided by 4, heads kept; ``--max-layers`` 2; ``--max-genes`` 1,024 also capping the
lengths; ``--n-genes`` 2,048), budget 8,192 tokens, favor and sdpa, 2 warm-up + 3 timed steps, one
torch thread (``--threads``: with more, OpenMP threads spin waiting for a core that another process
holds, and a step on a busy 2-core machine took 10x longer here); each row records its shape and
``"shrunk": true``. On CPU, FAVOR+ runs as batched PyTorch ops (the Triton kernel is CUDA's), which
pad a packed batch to its longest cell: CPU favor rows say little about the GPU kernel.

Time limits: ``--budget-s S`` skips the rows not started within S seconds (recorded as skipped
with that reason), and the JSON is rewritten after every row (``"partial": true`` until the end),
so a process killed by an outer time limit leaves every row it measured. MLflow is not used.

JSON: ``benchmark``, ``date``, ``device``, ``versions``, ``settings`` (budget, steps, shapes, length
source with percentiles, memory method, datasheet and measured peak TFLOP/s), ``rows`` (one per
preset x backend x mode: shape, ``cells_per_s``, ``tokens_per_s``, ``median_step_s``,
``cells_per_step``, ``padding_waste``, ``mfu``, ``mfu_measured_gemm``, ``tflops``, ``peak_memory_bytes``, ``world_size``, ``per_rank_cells_per_s``,
``aggregate_cells_per_s``, ``attention_padding_waste`` (packed under sdpa pads for the attention
only), ``flops_over_useful`` (the FLOPs of the slots every layer runs on over the real cells'),
``skipped`` / ``oom`` / ``error``), ``speedups`` (per preset x backend: ``speedup_vs_random_padded``
of grouped_padded and packed, ``speedup_vs_padded_to_cap`` of the other three modes, every mode's
waste; a backend that runs packed only is compared with the preset's padded rows, measured under
sdpa, and ``baseline_backend`` says so; ``padded_to_cap_flops_over_useful``, exact attention only:
the most a FLOP-bound step can gain over padding every cell to the cap), ``scaling`` (with
``--scaling``), ``command``.
A CUDA fault (not an out-of-memory) leaves the device unusable for the process: at world size 1, the
row that hit it is written with its error and the rows after it are skipped with that reason (under
several ranks, a fault on one rank still ends the collective and the run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import (  # noqa: E402
    NO_GENE_IDS,
    RESULTS,
    SHARED_H5AD,
    ResultFile,
    device_record,
    device_slug,
    read_ceilings,
    result_record,
    versions,
    write_result,
)

# torch (and what imports it) is imported inside functions: `main` hides the GPUs for --device cpu
# before torch first looks for them (`init_distributed` takes CUDA wherever torch sees it)

MODES = ("random_padded", "grouped_padded", "packed", "padded_to_cap")  # appended last: the seeds stay per mode
BACKENDS = ("favor", "varlen", "sdpa", "flash")
PRESET_NAMES = ("scbert", "geneformer-10m", "celllm", "scgpt", "scfoundation")
MASK_RATIO = 0.15
N_SPECIAL = 3  # <pad> = 0, <cls> = 1, <mask> = 2; gene tokens are 3 .. vocab_size - 1
PAD, CLS, MASK = 0, 1, 2
SYNTHETIC_CELLS = 4096
# defaults per device (what the user leaves out)
GPU_DEFAULTS = {"token_budget": 65536, "warmup": 3, "timed": 10, "backends": ["favor", "varlen", "sdpa"],
                "n_genes": 20000, "megabatch_cells": 8192}
CPU_DEFAULTS = {**GPU_DEFAULTS, "token_budget": 8192, "warmup": 2, "timed": 3, "backends": ["favor", "sdpa"],
                "width_div": 4, "max_layers": 2, "max_genes": 1024, "n_genes": 2048, "threads": 1}
SMOKE = {"presets": ["geneformer-10m", "scgpt"], "backends": ["sdpa", "favor", "varlen", "flash"], "token_budget": 8192,
         "warmup": 1, "timed": 1, "width_div": 16, "max_layers": 1, "max_genes": 2048, "n_genes": 2100,
         "megabatch_cells": 1024, "threads": 1}
SCALING_DEFAULT = ("geneformer-10m", "sdpa", "packed")


# --- arguments ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where available (cpu with --smoke)")
    ap.add_argument("--presets", nargs="+", choices=PRESET_NAMES, help="default: all")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS,
                    help="default: CUDA favor varlen sdpa, CPU favor sdpa (a backend that pretrain.config does not "
                         "offer is skipped with that reason)")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="default: all four")
    ap.add_argument("--token-budget", type=int, help="most tokens (padded slots) per batch (CUDA 65536, CPU 8192)")
    ap.add_argument("--megabatch-cells", type=int, help="cells per rank, shuffled and sorted together (8192)")
    ap.add_argument("--n-genes", type=int, help="vocabulary genes (CUDA 20000, CPU 2048): scBERT's and "
                    "scFoundation's full gene set, rank mode's output classes")
    ap.add_argument("--full", action="store_true", help="CPU: the presets at full size (very slow)")
    ap.add_argument("--width-div", type=int, help="shrunk presets: d_model divided by this (CPU 4)")
    ap.add_argument("--max-layers", type=int, help="shrunk presets: at most this many layers (CPU 2)")
    ap.add_argument("--max-genes", type=int, help="cap on genes per cell, below the preset's (CPU 1024)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per row (CUDA 3, CPU 2)")
    ap.add_argument("--timed", type=int, help="timed steps per row (CUDA 10, CPU 3)")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="default: on for CUDA, off for CPU")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs' dense bf16 peak)")
    ap.add_argument("--ceilings", type=Path, help="a ceilings_<device>.json (gpu_suite.py's setup part): MFU also "
                    "against its measured bf16 matrix-product rate (mfu_measured_gemm)")
    ap.add_argument("--budget-s", type=float, help="seconds: rows not started by then are skipped (so that a time "
                    "limit around this process keeps the rows measured)")
    ap.add_argument("--threads", type=int, help="CPU: torch threads per rank (default 1; see the docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=SHARED_H5AD, help="folder of .h5ad files for the length distribution")
    ap.add_argument("--lengths-file", type=Path, help="a .npy of genes per cell: the length distribution "
                    "(instead of --data; e.g. where ../shared/data is not at hand)")
    ap.add_argument("--smoke", action="store_true", help="two tiny presets, 1 + 1 steps on CPU: checks the script")
    ap.add_argument("--scaling", help="e.g. 1,2,4: relaunch under torchrun with that many ranks each, for one "
                    "preset / backend / mode (default geneformer-10m, sdpa, packed)")
    ap.add_argument("--scaling-timeout", type=float, default=1200, help="seconds per scaling launch")
    ap.add_argument("--result", type=Path, help="result JSON (default benchmarks/results/train_<device>.json), "
                    "rewritten after every row")
    ap.add_argument("--write-lengths", type=Path, metavar="NPY",
                    help="write genes per cell of the real files in --data to this .npy (and a .json beside it "
                         "saying where they come from), for --lengths-file where ../shared/data is not at hand; "
                         "then exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.smoke else ("cuda" if _cuda_available() else "cpu")
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the user left out from the device's defaults (module docstring), in place."""
    cpu = args.device == "cpu"
    defaults = dict(CPU_DEFAULTS if cpu and not args.full else GPU_DEFAULTS)
    if args.smoke:
        defaults.update(SMOKE)
    if args.scaling:
        defaults.update(dict(zip(("presets", "backends", "modes"), ([c] for c in SCALING_DEFAULT))))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.presets = args.presets or list(PRESET_NAMES)
    args.modes = args.modes or list(MODES)
    args.shrunk = bool(args.width_div and args.width_div > 1) or bool(args.max_layers)
    if args.scaling and (len(args.presets), len(args.backends), len(args.modes)) != (1, 1, 1):
        raise SystemExit("--scaling measures one preset, one backend and one mode: give one of each")
    if args.zero_stage == 0 and not (args.bf16 if args.bf16 is not None else not cpu):
        raise SystemExit("--zero-stage 0 in fp32 is refused by the trainer's engine: use 1-3 (or --bf16)")
    return args


# --- the length distribution -------------------------------------------------------------------------
# a file of fewer genes is a panel or a gene subset: its cells' lengths are not a transcriptome's
MIN_FILE_GENES = 5_000


def real_lengths(folder: Path) -> tuple[np.ndarray, dict] | None:
    """Genes detected per cell (stored nonzeros per row), pooled over the .h5ad files in ``folder``
    whose X is CSR (as the converter reads it: `data_pipeline.conversion.readers`) and holds a
    transcriptome (at least `MIN_FILE_GENES` genes); the others are listed under ``left_out``.
    -> ([N] int64, source)"""
    from data_pipeline.conversion.readers import open_source

    files = sorted(p for p in folder.glob("*.h5ad") if p.name != NO_GENE_IDS) if folder.is_dir() else []
    parts, used, left_out = [], {}, {}
    for path in files:
        with open_source(path) as source:
            pointers = source.row_pointers()  # None for CSC or dense X: no per-cell counts without a scan
            if pointers is None:
                left_out[path.name] = "X is not CSR"
                continue
            if source.n_vars < MIN_FILE_GENES:
                left_out[path.name] = f"{source.n_vars:,} genes: a gene subset, not a transcriptome"
                continue
            lengths = np.diff(pointers).astype(np.int64)
        parts.append(lengths)
        used[path.name] = int(len(lengths))
    if not parts:
        return None
    return np.concatenate(parts), {"kind": "real", "folder": str(folder), "files": used, "left_out": left_out}


def synthetic_lengths() -> tuple[np.ndarray, dict]:
    """Genes per cell of `data_pipeline.synthetic` cells (20,000 genes, median library 5,000)."""
    from data_pipeline.synthetic import iter_synthetic_chunks

    lengths = np.concatenate([np.diff(m.indptr) for _, m, _ in iter_synthetic_chunks(SYNTHETIC_CELLS)])
    return lengths.astype(np.int64), {"kind": "synthetic", "generator": "data_pipeline.synthetic",
                                      "cells": SYNTHETIC_CELLS}


def file_lengths(path: Path) -> tuple[np.ndarray, dict]:
    """Genes per cell from a .npy file (1-D integers). Where `write_lengths` made it, the .json
    beside it says where they came from (kind "real" with the files); else kind "file"."""
    lengths = np.load(path)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise SystemExit(f"--lengths-file {path}: expected a 1-D integer array of genes per cell, got "
                         f"{lengths.dtype} {lengths.shape}")
    source = {"kind": "file"}
    sidecar = Path(path).with_suffix(".json")
    if sidecar.exists():
        source.update(json.loads(sidecar.read_text()))
        if source.get("kind") == "real" and "left_out" not in source:
            print(f"warning: {path} was written before gene-subset files were left out of the real lengths: "
                  f"rewrite it (--write-lengths {path}; benchmarks/gpu_prepare.sh does)", file=sys.stderr)
    return lengths.astype(np.int64), {**source, "file": str(path)}


def write_lengths(folder: Path, path: Path) -> dict:
    """Save genes per cell of the real files in ``folder`` (`real_lengths`) to ``path`` (.npy, int32)
    and their description to the .json beside it.  -> the description"""
    found = real_lengths(folder)
    if found is None:
        raise SystemExit(f"--write-lengths: no CSR .h5ad files in {folder} (pass --data)")
    lengths, source = found
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, lengths.astype(np.int32))
    source = {**source, "n_cells": int(len(lengths)), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.with_suffix(".json").write_text(json.dumps(source, indent=1) + "\n")
    print(f"wrote {path}: {len(lengths):,} cells from {len(source['files'])} files "
          f"(median {int(np.median(lengths))} genes)", file=sys.stderr)
    return source


def length_distribution(folder: Path, lengths_file: Path | None = None) -> tuple[np.ndarray, dict]:
    """``lengths_file`` if given, else the real distribution where the data folder is present, else
    the synthetic one; cells without a detected gene dropped.  -> (lengths [N], description with
    percentiles)"""
    found = file_lengths(lengths_file) if lengths_file else real_lengths(folder)
    lengths, source = found if found is not None else synthetic_lengths()
    lengths = lengths[lengths > 0]
    source.update(n_cells=int(len(lengths)), percentiles={
        str(q): float(v) for q, v in zip((0, 10, 50, 90, 99, 100), np.percentile(lengths, (0, 10, 50, 90, 99, 100)))})
    return lengths, source


# --- batches: which cells go together -----------------------------------------------------------------
def plan_batches(mode: str, lengths: np.ndarray, token_cost, budget: int, longest: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Cells of each batch (indices into ``lengths`` [n]) for ``mode``, cut by the trainer's batcher
    with the model's ``token_cost`` (`data_pipeline.loading.batching.TokenCost`); ``longest``: the
    preset's longest cell (random_padded's and padded_to_cap's batch size). Grouped and packed batches
    are listed costliest cells first (the order of the sorted megabatch); random_padded and
    padded_to_cap ones in random order."""
    from data_pipeline.loading.batching import cut_batches, group_by_length

    order = rng.permutation(len(lengths))  # the shuffle buffer
    if mode in ("random_padded", "padded_to_cap"):  # a fixed size: as many cells as fit when every one is the longest
        worst = np.full(len(order), token_cost.cells(np.array([longest]))[0])
        bounds = cut_batches(worst, budget, padded=True)
        full = int(bounds[1]) if len(bounds) > 1 else 0  # every batch but a short last one
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a == full]
    padded = mode == "grouped_padded" or token_cost.padded
    sorted_order, bounds = group_by_length(token_cost.cells(lengths[order]), budget, padded=padded)
    order = order[sorted_order]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def padding_counts(mode: str, batches: list[np.ndarray], lengths: np.ndarray, longest: int, config=None,
                   padded_attention: bool = False) -> dict:
    """Totals over all of ``batches`` (summed over ranks, then `padding_figures`): cells, batches,
    real gene tokens and the slots they take (padded: cells x longest cell, per batch;
    padded_to_cap: cells x ``longest``, the preset's cap); the slots attention runs over (a packed
    batch under a backend that pads it for the attention itself, ``padded_attention``: sdpa, is
    padded there only); with ``config``, the training FLOPs of the real cells and of the slots every
    layer runs on (a padded cell costs a cell of its padded length with its own masked genes; a
    packed batch's attention padding under sdpa is not counted there: ``pool_attn_slots`` is)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    if mode == "padded_to_cap":
        padded_to = [np.full(len(b), longest) for b in batches]
    else:
        padded_to = [np.full(len(b), int(lengths[b].max())) for b in batches]
    padded_slots = sum(int(p.sum()) for p in padded_to)
    slots = real if mode == "packed" else padded_slots
    counts = {"pool_cells": sum(len(b) for b in batches), "pool_batches": len(batches), "pool_real": real,
              "pool_slots": slots, "pool_attn_slots": padded_slots if mode != "packed" or padded_attention else real}
    if config is not None and batches:
        real_len = np.concatenate([lengths[b] for b in batches])
        useful = useful_flops(config, real_len)
        run = useful if mode == "packed" else useful_flops(config, real_len, np.concatenate(padded_to))
        counts.update(pool_useful_flops=useful, pool_run_flops=run)
    return counts


def padding_figures(ranks: list[dict]) -> dict:
    """Mean cells per batch, padding waste (1 - real tokens / padded slots), the attention's
    padding waste and the FLOPs the slots cost over the real cells' (``flops_over_useful``: padding
    every cell to the cap costs this many times the useful work, the most any batching of those
    cells can gain where a step is bound by its FLOPs) over every rank's megabatch."""
    keys = ("pool_cells", "pool_batches", "pool_real", "pool_slots", "pool_attn_slots", "pool_useful_flops",
            "pool_run_flops")
    total = {key: sum(r.get(key, 0.0) for r in ranks) for key in keys}
    return {"cells_per_step": total["pool_cells"] / total["pool_batches"],
            "padding_waste": 1.0 - total["pool_real"] / total["pool_slots"],
            "attention_padding_waste": 1.0 - total["pool_real"] / total["pool_attn_slots"],
            "flops_over_useful": (total["pool_run_flops"] / total["pool_useful_flops"]
                                  if total["pool_useful_flops"] else None),
            "batches_in_megabatch": total["pool_batches"] / len(ranks)}


def choose_steps(mode: str, batches: list[np.ndarray], lengths: np.ndarray, warmup: int, timed: int,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(warm-up batch indices, timed batch indices). Warm-up starts with the batches with the most
    padded slots and the longest cells (the memory peak). Timed: grouped/packed stratified over
    the sorted list (midpoints of ``timed`` equal strata); random_padded the first ones of the
    random order."""
    n = len(batches)
    if mode in ("random_padded", "padded_to_cap"):
        timed_idx = [i % n for i in range(timed)]
    else:
        timed_idx = [min(n - 1, int((k + 0.5) * n / timed)) for k in range(timed)]
    slots = [len(b) * int(lengths[b].max()) for b in batches]
    squared = [len(b) * int(lengths[b].max()) ** 2 for b in batches]  # exact attention's memory
    heavy = list(dict.fromkeys([int(np.argmax(slots)), int(np.argmax(squared))]))
    others = [int(i) for i in rng.permutation(n) if i not in heavy]
    warm = (heavy + others)[:warmup]
    while len(warm) < warmup:  # fewer batches than warm-up steps: repeat
        warm.append(warm[len(warm) % max(1, len(heavy))])
    return warm, timed_idx


# --- batches: tensors -------------------------------------------------------------------------------
def make_batch(lengths: np.ndarray, config, n_genes: int, generator):
    """A `PackedBatch` (on CPU) of cells with ``lengths`` [B] expressed genes: distinct random gene
    ids per cell, random values as ``config.value_mode`` expects, ~MASK_RATIO of tokens masked."""
    import torch

    from data_pipeline.loading.batch import PackedBatch

    lens = torch.as_tensor(lengths, dtype=torch.int64)
    b, t = len(lens), int(lens.sum())
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    position = torch.arange(t) - torch.repeat_interleave(cu[:-1].long(), lens)  # [T] position within its cell
    offset = torch.repeat_interleave(torch.randint(0, n_genes, (b,), generator=generator), lens)
    genes = N_SPECIAL + (offset + position) % n_genes  # distinct within a cell while len <= n_genes
    mask = torch.rand(t, generator=generator) < MASK_RATIO
    if config.value_mode == "rank":  # Geneformer: value = rank, the gene token is masked and predicted
        values, targets = position, genes.clone()
        genes = torch.where(mask, torch.full_like(genes, MASK), genes)
    elif config.value_mode == "bins":
        targets = torch.randint(1, config.n_bins, (t,), generator=generator)
        values = torch.where(mask, torch.full_like(targets, config.n_bins), targets)  # the mask bin
    else:  # continuous: log-scale values, -1 = masked
        targets = torch.log1p(torch.rand(t, generator=generator) * 20)
        values = torch.where(mask, torch.full_like(targets, -1.0), targets)
    raw_total = 1000 + 19000 * torch.rand(b, generator=generator)  # T and S, for scfoundation's depth tokens
    read_depth = torch.stack([raw_total, raw_total * torch.rand(b, generator=generator).clamp_min(0.1)], dim=1)
    return PackedBatch(gene_ids=genes, values=values, cu_seqlens=cu, max_seqlen=int(lens.max()), mlm_mask=mask,
                       mlm_targets=targets, labels=torch.zeros(b, 0, dtype=torch.int64),
                       view_index=torch.arange(b), cell_index=torch.arange(b), read_depth=read_depth)


def model_input(mode: str, batch, device, longest: int):
    """What the module's forward takes: the `PackedBatch` (packed) or its padded ``[B, L]`` dict
    (padded_to_cap: L = ``longest``, the preset's cap, whatever the batch's cells)."""
    batch = batch.to(device)
    if mode == "padded_to_cap":
        batch = replace(batch, max_seqlen=longest)  # to_padded pads to max_seqlen
    return batch if mode == "packed" else batch.to_padded(pad_id=PAD)


# --- the model and its step ---------------------------------------------------------------------------
def shrink_config(config, width_div: int, max_layers: int | None):
    """``config`` with every width divided by ``width_div`` (kept a multiple of the heads, the heads
    kept) and at most ``max_layers`` layers in the encoder and the decoder. A set ``head_dim`` and
    the FAVOR+ features shrink with the width, so that attention keeps its share of the cost."""
    layers = max_layers or config.n_layers

    def width(d, heads):
        return max(heads, d // width_div // heads * heads)

    features = max(16, config.favor_features // width_div // 16 * 16)
    head_dim = None if config.head_dim is None else max(1, config.head_dim // width_div)
    return replace(config, d_model=width(config.d_model, config.n_heads), n_layers=min(config.n_layers, layers),
                   head_dim=head_dim, favor_features=features,
                   decoder=replace(config.decoder, d_model=width(config.decoder.d_model, config.decoder.n_heads),
                                   n_layers=min(config.decoder.n_layers, layers)))


def bench_config(name: str, backend: str, args) -> tuple:
    """(ModelConfig, longest cell in expressed genes) of preset ``name`` with ``backend``, shrunk as
    the arguments say. The encoder-decoder's decoder keeps its own backend (FAVOR+ over every gene)."""
    from pretrain.presets import preset

    p = preset(name, vocab_size=N_SPECIAL + args.n_genes, pad_token=PAD, cls_token=CLS, mask_token=MASK,
               attention=backend)
    config = p.model
    if args.shrunk:
        config = shrink_config(config, args.width_div or 1, args.max_layers)
    longest = min(p.max_genes or args.n_genes, args.max_genes or args.n_genes, args.n_genes)
    if config.value_mode == "rank":
        config = replace(config, max_rank=max(config.max_rank, longest))
    return config.validate(), longest


def skip_reason(config, backend: str, mode: str, device, bf16: bool) -> str | None:
    """Why a row does not apply (None: it does)."""
    if mode != "packed" and config.gene_set == "all":
        return "gene_set=all: every cell is the full gene set, there is nothing to pad or group"
    if mode != "packed" and config.architecture != "encoder":
        return "encoder-decoder: no padded path (its decoder runs the full gene set of every cell)"
    from pretrain.config import ATTENTION_BACKENDS

    if backend not in ATTENTION_BACKENDS:
        return f"pretrain.config offers no '{backend}' attention backend (it has {', '.join(ATTENTION_BACKENDS)})"
    if mode != "packed" and backend == "favor":
        return ("FAVOR+ has no padded fast path (its padded reference gathers the real tokens and loops per "
                "sequence), so a padded FAVOR+ row would time the reference, not padding")
    if mode != "packed" and backend in ("varlen", "flash"):
        return (f"the padded path runs torch SDPA with a key mask whatever the exact backend: measured once, as "
                f"sdpa's padded rows ({backend} applies to packed batches)")
    if backend == "varlen":
        import torch

        if device.type != "cuda":
            return "varlen_attn (torch's FlashAttention) runs on CUDA only"
        if not _has_varlen():
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
        if not bf16:
            return "varlen_attn needs bf16 (--bf16)"
    if backend == "flash":
        import importlib.util

        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed"
        if not bf16:
            return "flash-attn needs bf16 (--bf16)"
    return None


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def bench_module(config):
    """The cell model with a masked-expression loss as forward: a `PackedBatch` (packed) or a padded
    dict (``encode_padded`` -> ``mlm_head`` at the masked positions) -> mean loss per masked token."""
    import torch
    from torch import nn

    from data_pipeline.loading.batch import PackedBatch
    from pretrain.model.cell_model import CellModel
    from pretrain.objectives.losses import mlm_loss_sum

    class MLMStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = CellModel(config)

        def forward(self, batch) -> torch.Tensor:
            model = self.model
            if isinstance(batch, PackedBatch):
                prediction, where = model(batch).mlm, batch
            else:
                tokens, _ = model.encode_padded(batch["gene_ids"], batch["values"], batch["key_padding_mask"])
                prediction = model.mlm_head(tokens[batch["mlm_mask"]])  # [n_masked, C]
                if config.mlm_regresses:
                    prediction = prediction.squeeze(-1)
                # the loss reads only the targets at the masked positions: here of [B, L] flattened, in the
                # same (row-major) order as the boolean index above
                masked = torch.nonzero(batch["mlm_mask"].flatten()).flatten()
                where = SimpleNamespace(mlm_targets=batch["mlm_targets"].flatten(), masked_index=lambda: masked)
            total, count = mlm_loss_sum(prediction, where, config.mlm_regresses)
            return total / max(count, 1)

    return MLMStep()


def build(config, args, device):
    """(DeepSpeed engine, bf16, parameter count) as the trainer builds them."""
    import torch

    from pretrain.config import DeepSpeedConfig, TrainConfig
    from pretrain.train import build_engine

    torch.manual_seed(args.seed)  # the same model on every rank (DeepSpeed broadcasts it anyway)
    module = bench_module(config)
    params = sum(p.numel() for p in module.parameters())
    train = TrainConfig(deepspeed=DeepSpeedConfig(zero_stage=args.zero_stage, bf16=args.bf16))
    engine, bf16 = build_engine(train, module, device)
    return engine, bf16, params


# --- measuring a row ----------------------------------------------------------------------------------
class _OtherRankFailed(Exception):
    """Another rank's warm-up forward pass failed (this one's did not)."""


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class Memory:
    """Peak memory of a row: CUDA's allocator peak, or the process's peak resident set on CPU."""

    def __init__(self, device):
        self.device = device
        self.resettable = device.type != "cuda" and os.access("/proc/self/clear_refs", os.W_OK)

    def describe(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated, reset per row (model, optimizer state and activations)"
        if self.resettable:
            return "CPU peak resident set of the process (VmHWM), reset per row via /proc/self/clear_refs"
        return "CPU peak resident set of the process over its lifetime (ru_maxrss; not reset per row)"

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)

    def peak(self) -> int:
        import resource

        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            status = Path("/proc/self/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _agree(ok: bool, device) -> bool:
    """True when every rank says ok (no communication in a world of one)."""
    import torch
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def useful_flops(config, lengths: np.ndarray, padded_to: np.ndarray | None = None) -> float:
    """Training FLOPs of cells with ``lengths`` [n] real genes, each at its own length (exact
    attention is quadratic in it); ``padded_to`` [n]: run at those lengths instead, the
    masked-expression head still on the real masked genes only."""
    import torch

    from pretrain.model.flops import sequences_flops

    real = torch.from_numpy(np.asarray(lengths))
    run = real if padded_to is None else torch.from_numpy(np.asarray(padded_to))
    return sequences_flops(config, run, MASK_RATIO * real)


def measure(engine, warm: list, timed: list, device) -> tuple[list[float], float]:
    """Run the warm-up then the timed steps. warm, timed: model inputs.  -> (seconds per timed
    step, loss of the last step)"""
    import torch

    cuda = device.type == "cuda"
    for batch in warm:
        failure = None
        try:
            loss = engine(batch)
        except Exception as err:  # noqa: BLE001 - agreed with the other ranks, then raised
            failure = err
        if not _agree(failure is None, device):  # every rank skips backward together (ZeRO collectives)
            raise failure or _OtherRankFailed("another rank failed in a warm-up forward pass")
        engine.backward(loss)
        engine.step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = []
    for batch in timed:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        if cuda:
            end.record()
            seconds.append((start, end))
        else:
            seconds.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in seconds]
    return seconds, float(loss.detach().float().item())


# a measured row's fields (None where a row is skipped or ran out of memory)
RESULT_KEYS = ("cells_per_s", "tokens_per_s", "median_step_s", "cells_per_step", "padding_waste",
               "attention_padding_waste", "flops_over_useful", "batches_in_megabatch",
               "mfu", "mfu_measured_gemm", "tflops", "peak_memory_bytes", "per_rank_cells_per_s", "aggregate_cells_per_s", "timed_steps",
               "timed_cells_per_rank", "loss", "error")
LOCAL = ("cells", "tokens", "seconds", "median_step_s", "flops", "peak_bytes", "oom", "failed", "loss", "pool_cells",
         "pool_batches", "pool_real", "pool_slots", "pool_attn_slots", "pool_useful_flops", "pool_run_flops")


def run_row(engine, config, longest: int, mode: str, pool: np.ndarray, args, device, memory: Memory,
            rng: np.random.Generator) -> tuple[dict, str | None]:
    """Plan ``mode``'s batches of this rank's ``pool`` [n] lengths (capped at ``longest``), run and
    time them.
    -> (this rank's figures, keys LOCAL; this rank's error, if a step failed other than by running
    out of memory)"""
    import torch

    cost = config.token_cost(longest)
    batches = plan_batches(mode, pool, cost, args.token_budget, longest, rng)
    warm_idx, timed_idx = choose_steps(mode, batches, pool, args.warmup, args.timed, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    timed_lengths = np.concatenate([pool[batches[i]] for i in timed_idx])
    local = {**dict.fromkeys(LOCAL, 0.0), **padding_counts(mode, batches, pool, longest, config, cost.padded)}
    error, inputs = None, {}
    try:  # everything that touches the device: after a CUDA fault, even resetting its counters raises
        memory.reset()
        inputs = {i: model_input(mode, make_batch(pool[batches[i]], config, args.n_genes, generator), device, longest)
                  for i in dict.fromkeys(warm_idx + timed_idx)}
        seconds, loss = measure(engine, [inputs[i] for i in warm_idx], [inputs[i] for i in timed_idx], device)
        local.update(cells=len(timed_lengths), tokens=float(timed_lengths.sum()), seconds=sum(seconds),
                     median_step_s=statistics.median(seconds), flops=useful_flops(config, timed_lengths), loss=loss)
    except Exception as err:  # noqa: BLE001 - recorded in the row, so that one failure does not end a long run
        if _is_oom(err):
            local["oom"] = 1.0
        else:
            local["failed"] = 1.0
            error = f"{type(err).__name__}: {err}"
            if not isinstance(err, _OtherRankFailed):
                traceback.print_exc()
    try:
        local["peak_bytes"] = float(memory.peak())
    except Exception:  # noqa: BLE001 - a device that faulted: the row's error says why
        local["peak_bytes"] = 0.0
    del inputs
    return local, error


def device_fault(device) -> str | None:
    """Why ``device`` can run nothing more in this process, or None. A CUDA fault (an illegal
    address, a kernel's failed assert) poisons the context: every later call raises it again, so
    the rows after it are skipped with the reason rather than failing one by one."""
    import torch

    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as err:  # noqa: BLE001 - the fault itself is the answer
        return f"{type(err).__name__}: {str(err)[:300]}"
    return None


def gather(local: dict, device) -> list[dict]:
    """Every rank's LOCAL figures, in rank order (no collective in a world of one: after a CUDA
    fault, it would raise before the row that failed is written)."""
    import torch
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return [dict(local)]
    mine = torch.tensor([float(local[k]) for k in LOCAL], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [dict(zip(LOCAL, t.tolist())) for t in everyone]


def summarize(ranks: list[dict], peak_tflops: float | None, timed_steps: int, error: str | None,
              measured_tflops: float | None = None) -> dict:
    """A row's throughput fields from every rank's figures (see the module docstring); ``error``:
    this rank's; MFU over the datasheet ``peak_tflops`` and over the ``measured_tflops`` of a large
    bf16 matrix product on this device."""
    base = {**padding_figures(ranks), "peak_memory_bytes": int(max(r["peak_bytes"] for r in ranks))}
    if any(r["oom"] for r in ranks):
        return {**base, "oom": True, "error": None}
    if any(r["failed"] for r in ranks):
        failed = [i for i, r in enumerate(ranks) if r["failed"]]
        return {**base, "oom": False, "error": error or f"failed on rank(s) {failed}"}
    per_rank = [r["cells"] / r["seconds"] for r in ranks]
    tflops = [r["flops"] / r["seconds"] / 1e12 for r in ranks]
    mean_tflops = statistics.fmean(tflops)
    return {**base, "oom": False, "cells_per_s": statistics.fmean(per_rank),
            "tokens_per_s": statistics.fmean(r["tokens"] / r["seconds"] for r in ranks),
            "median_step_s": max(r["median_step_s"] for r in ranks), "tflops": mean_tflops,
            "mfu": mean_tflops / peak_tflops if peak_tflops else None,
            "mfu_measured_gemm": mean_tflops / measured_tflops if measured_tflops else None,
            "per_rank_cells_per_s": per_rank,
            "aggregate_cells_per_s": sum(r["cells"] for r in ranks) / max(r["seconds"] for r in ranks),
            "timed_steps": timed_steps, "timed_cells_per_rank": [int(r["cells"]) for r in ranks],
            "loss": statistics.fmean(r["loss"] for r in ranks), "error": None}


# --- the whole run ------------------------------------------------------------------------------------
def run_benchmark(args, write=None) -> dict:
    """Every preset x backend x mode row; ``write(settings, rows)`` (rank 0) after each row."""
    import torch
    import torch.distributed as dist

    from pretrain.distributed import init_distributed
    from pretrain.metrics import device_peak_tflops

    started = time.monotonic()
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    lengths, source = length_distribution(args.data, args.lengths_file)
    # rank-seeded; not [seed, rank], which SeedSequence (zero-padding short keys) makes the first mode's draws
    pool_all = np.random.default_rng([args.seed, rank, 0, 1]).choice(lengths, size=args.megabatch_cells)
    peak_tflops, peak_source = device_peak_tflops(device, args.peak_tflops)
    ceilings = read_ceilings(args.ceilings) or {}
    measured = ceilings.get("gemm_bf16_tflops")
    memory = Memory(device)
    rows = []
    settings = {"device": device.type, "world_size": world, "token_budget": args.token_budget,
                "megabatch_cells_per_rank": args.megabatch_cells, "warmup_steps": args.warmup,
                "timed_steps": args.timed, "zero_stage": args.zero_stage, "bf16": None,
                "shrunk": args.shrunk, "width_div": args.width_div, "max_layers": args.max_layers,
                "max_genes_cap": args.max_genes, "n_genes": args.n_genes, "mask_ratio": MASK_RATIO,
                "threads_per_rank": torch.get_num_threads() if device.type == "cpu" else None,
                "cpu_count": os.cpu_count(), "lengths": source["kind"], "length_source": source,
                "peak_tflops": peak_tflops, "peak_tflops_source": peak_source,
                "measured_gemm_tflops": measured,
                "measured_gemm_source": (f"{args.ceilings}: {ceilings.get('gemm_n')}^3 bf16 product on random data"
                                         if measured else "no --ceilings file: mfu_measured_gemm is null"),
                "memory": memory.describe(), "loss": "masked expression only", "seed": args.seed,
                "budget_s": args.budget_s, "mlflow": "off (the benchmark logs nothing to MLflow)"}

    def emit(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            print_row(row)
            if write is not None:
                write(settings, rows)

    if rank == 0:
        print(HEADER, flush=True)
    fault = None  # set when the device can run nothing more in this process
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()
    for name in args.presets:
        for backend in args.backends:
            config, longest = bench_config(name, backend, args)
            pool = np.minimum(pool_all, longest)
            engine, params = None, None
            for mode in args.modes:
                row = {"preset": name, "backend": backend, "mode": mode, "d_model": config.d_model,
                       "n_layers": config.n_layers, "n_heads": config.n_heads, "head_dim": config.attention_head_dim,
                       "favor_features": config.favor_features, "params": params, "shrunk": args.shrunk, "bf16": bf16,
                       "max_genes": longest, "world_size": world, **dict.fromkeys(RESULT_KEYS)}
                if config.architecture == "encoder_decoder":
                    row.update(decoder_d_model=config.decoder.d_model, decoder_layers=config.decoder.n_layers)
                reason = skip_reason(config, backend, mode, device, bf16) or (
                    f"the device faulted in an earlier row ({fault}); a new process is needed" if fault else None)
                over = args.budget_s is not None and time.monotonic() - started > args.budget_s
                if not reason and not _agree(not over, device):
                    reason = f"time budget: --budget-s {args.budget_s:g} s spent before this row"
                if reason:
                    emit({**row, "skipped": reason, "oom": False, "error": None})
                    continue
                if engine is None:
                    try:
                        engine, settings["bf16"], params = build(config, args, device)
                    except Exception as err:  # noqa: BLE001 - recorded; the next backend runs
                        traceback.print_exc()
                        engine = None
                        fault = None if _is_oom(err) else device_fault(device)
                        if not fault:
                            _free_memory(device)
                        emit({**row, "skipped": None, "oom": _is_oom(err), "error": f"building the engine: "
                              f"{type(err).__name__}: {str(err)[:300]}"})
                        continue
                    row.update(params=params, bf16=settings["bf16"])
                # the same cells (pool) and the same planning draws for every mode and backend
                rng = np.random.default_rng([args.seed, rank, MODES.index(mode)])
                row_started = time.monotonic()
                local, error = run_row(engine, config, longest, mode, pool, args, device, memory, rng)
                result = summarize(gather(local, device), peak_tflops, args.timed, error, measured)
                fault = fault or (device_fault(device) if result["error"] else None)
                if fault:
                    engine = None  # destroying it would touch the faulted device
                elif result["oom"] or result["error"]:  # a failed step can leave partial ZeRO state: a fresh engine
                    engine = _destroyed(engine)
                    _free_memory(device)  # after the last reference is gone, or nothing is freed
                emit({**row, **result, "skipped": None, "row_seconds": round(time.monotonic() - row_started, 1)})
            if not fault:  # (after a fault, engine is already None: nothing may touch the device)
                engine = _destroyed(engine)
                _free_memory(device)
    settings["seconds"] = round(time.monotonic() - started, 1)
    if dist.is_initialized():
        if not fault:  # a faulted device would raise it again in the barrier
            dist.barrier()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - NCCL's teardown on a faulted device: the rows are written
            if not fault:
                raise
            traceback.print_exc()
    return {"rank": rank, "settings": settings, "rows": rows, "speedups": speedups(rows)}


def _destroyed(engine) -> None:  # `engine = _destroyed(engine)`, then `_free_memory(device)`
    """Let an engine go (DeepSpeed's own references too): the caller drops its last reference."""
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    return None


def _free_memory(device) -> None:
    """Collect what no one references any more and give the GPU's cached blocks back (before the
    next engine is built, or after an OOM): models of different sizes would fragment them."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _over(rates: dict, slow: float | None, modes: tuple[str, ...]) -> dict:
    """{mode: its cells/s over ``slow``} for the ``modes`` that ran; None where either is missing."""
    return {m: rates[m] / slow if slow and rates[m] else None for m in modes if m in rates}


def speedups(rows: list[dict]) -> list[dict]:
    """Per preset x backend: cells/s of grouped_padded and packed over random_padded, of the other
    three modes over padded_to_cap (Geneformer's baseline), and every mode's padding waste. The
    padded modes are measured under ``sdpa`` only (exact attention with a key mask): a backend
    without its own baselines (``varlen``, ``flash``, ``favor``: packed only) is compared with the
    preset's, and ``baseline_backend`` names where each came from; for ``favor`` that ratio also
    holds the change from exact to linear attention. ``padded_to_cap_flops_over_useful`` (exact
    backends): what padding every cell to the cap costs in FLOPs over the cells' own, the ratio a
    FLOP-bound step's speed-up cannot pass."""
    ran = [row for row in rows if not row.get("skipped")]
    out = {}
    for row in ran:
        entry = out.setdefault((row["preset"], row["backend"]), {"preset": row["preset"], "backend": row["backend"],
                                                                 "cells_per_s": {}, "padding_waste": {}})
        entry["padding_waste"][row["mode"]] = row["padding_waste"]
        entry["cells_per_s"][row["mode"]] = row["cells_per_s"]  # None where it ran out of memory or failed
    for (preset, backend), entry in out.items():
        # the baselines: this backend's rows, else the first backend's that ran them (sdpa)
        base = {mode: next((r for r in ran if (r["preset"], r["backend"], r["mode"]) == (preset, backend, mode)),
                           next((r for r in ran if (r["preset"], r["mode"]) == (preset, mode)), None))
                for mode in ("random_padded", "padded_to_cap")}
        entry["baseline_backend"] = {mode: row["backend"] for mode, row in base.items() if row is not None}
        rates, slow = entry["cells_per_s"], {mode: (row or {}).get("cells_per_s") for mode, row in base.items()}
        entry["speedup_vs_random_padded"] = _over(rates, slow["random_padded"], ("grouped_padded", "packed"))
        if base["padded_to_cap"] is not None:
            entry["speedup_vs_padded_to_cap"] = _over(rates, slow["padded_to_cap"],
                                                      ("random_padded", "grouped_padded", "packed"))
            # a bound for exact attention only: FAVOR+ also changes the attention's cost, not just the padding
            entry["padded_to_cap_flops_over_useful"] = (base["padded_to_cap"].get("flops_over_useful")
                                                        if backend != "favor" else None)
    return list(out.values())


HEADER = (f"{'preset':<15}{'backend':<8}{'mode':<15}{'d':>5}{'L':>3}{'cells/s':>10}{'tokens/s':>11}{'step s':>8}"
          f"{'cells/st':>9}{'waste':>7}{'MFU':>7}{'MFUg':>7}{'peak MiB':>10}")  # MFUg: against the measured GEMM


def print_row(row: dict) -> None:
    head = f"{row['preset']:<15}{row['backend']:<8}{row['mode']:<15}{row['d_model']:>5}{row['n_layers']:>3}"
    if row.get("skipped"):
        print(f"{head}  skipped: {row['skipped']}", flush=True)
    elif row["oom"] or row["error"]:
        print(f"{head}  {'out of memory' if row['oom'] else 'failed: ' + row['error'][:80]}", flush=True)
    else:
        mfu = f"{row['mfu']:.3f}" if row["mfu"] is not None else "-"
        mfu_g = f"{row['mfu_measured_gemm']:.3f}" if row.get("mfu_measured_gemm") is not None else "-"
        print(f"{head}{row['cells_per_s']:>10.1f}{row['tokens_per_s']:>11.0f}{row['median_step_s']:>8.3f}"
              f"{row['cells_per_step']:>9.1f}{row['padding_waste']:>7.3f}{mfu:>7}{mfu_g:>7}"
              f"{row['peak_memory_bytes'] / 2**20:>10.0f}", flush=True)


# --- scaling: this script under torchrun with 1, 2, 4 ... ranks ---------------------------------------
def child_argv(args, result: Path) -> list[str]:
    """This run's settings for a relaunched copy (one preset / backend / mode)."""
    argv = ["--device", args.device, "--presets", *args.presets, "--backends", *args.backends, "--modes", *args.modes,
            "--token-budget", str(args.token_budget), "--megabatch-cells", str(args.megabatch_cells),
            "--n-genes", str(args.n_genes), "--warmup", str(args.warmup), "--timed", str(args.timed),
            "--zero-stage", str(args.zero_stage), "--seed", str(args.seed), "--data", str(args.data),
            "--result", str(result)]
    for flag, value in (("--width-div", args.width_div), ("--max-layers", args.max_layers),
                        ("--max-genes", args.max_genes), ("--peak-tflops", args.peak_tflops),
                        ("--lengths-file", args.lengths_file), ("--ceilings", args.ceilings)):
        if value is not None:
            argv += [flag, str(value)]
    if args.bf16 is not None:
        argv.append("--bf16" if args.bf16 else "--no-bf16")
    if args.full:
        argv.append("--full")
    if args.device == "cpu":
        argv += ["--threads", "1"]
    return argv


def run_scaling(args) -> dict:
    counts = sorted({int(n) for n in args.scaling.split(",")})
    runs, rows, settings = [], [], None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = Path(tmp) / f"ranks{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   str(Path(__file__).resolve()), *child_argv(args, out)]
            print(f"scaling: {n} rank(s): {' '.join(cmd)}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.scaling_timeout)
            if proc.returncode != 0:
                raise SystemExit(f"the {n}-rank launch failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            child = json.loads(out.read_text())
            settings = settings or {**child["settings"], "world_size": None, "world_sizes": counts}
            row = child["rows"][0]
            rows.append(row)
            runs.append({"world_size": n, "wall_s": time.perf_counter() - started, "oom": row.get("oom"),
                         "per_rank_cells_per_s": row.get("per_rank_cells_per_s"),
                         "cells_per_s_per_rank_mean": row.get("cells_per_s"),
                         "aggregate_cells_per_s": row.get("aggregate_cells_per_s")})
    single = next((r["aggregate_cells_per_s"] for r in runs if r["world_size"] == 1), None)
    for r in runs:
        r["efficiency"] = (r["aggregate_cells_per_s"] / (r["world_size"] * single)
                           if single and r["aggregate_cells_per_s"] else None)
    scaling = {"preset": args.presets[0], "backend": args.backends[0], "mode": args.modes[0],
               "launcher": "torchrun --standalone", "cpu_count": os.cpu_count(),
               "threads_per_rank": 1 if args.device == "cpu" else None,
               "efficiency": "aggregate_N / (N * aggregate_1); aggregate = all ranks' cells / the slowest rank's time",
               "runs": runs}
    for r in runs:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        print(f"ranks {r['world_size']}: aggregate {r['aggregate_cells_per_s']:.1f} cells/s, per rank "
              f"{[round(x, 1) for x in r['per_rank_cells_per_s'] or []]}, efficiency {eff}", flush=True)
    return {"settings": settings, "rows": rows, "scaling": scaling}


def default_result(args) -> Path:
    slug = "cpu" if args.device == "cpu" else device_slug()
    if args.smoke:
        return Path(tempfile.gettempdir()) / f"train_smoke_{slug}.json"
    return RESULTS / (f"train_scaling_{slug}.json" if args.scaling else f"train_{slug}.json")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write_lengths:
        write_lengths(args.data, args.write_lengths)
        return
    if args.device == "cpu":  # before torch initializes CUDA: init_distributed picks CUDA where it sees it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args = resolve_defaults(args)
    result_path = args.result or default_result(args)
    if args.scaling:
        out = run_scaling(args)
        speed = speedups(out["rows"])
    else:
        partial = {}

        def write(settings: dict, rows: list[dict]) -> None:  # rank 0, after every row
            if "file" not in partial:
                partial["file"] = ResultFile(result_path, "train", device=device_record(),
                                             versions=versions("torch", "deepspeed", "triton"), settings=settings)
            partial["file"].update(settings=settings, rows=rows, speedups=speedups(rows))

        out = run_benchmark(args, write)
        if out.pop("rank") != 0:
            return
        speed = out.pop("speedups")
    result = result_record("train", device=device_record(), versions=versions("torch", "deepspeed", "triton"),
                           settings=out["settings"], rows=out["rows"], speedups=speed, scaling=out.get("scaling"),
                           partial=False)
    write_result(result_path, result)
    for s in speed:
        ratios = ", ".join(f"{m} {v:.2f}x" for m, v in s["speedup_vs_random_padded"].items() if v is not None)
        if ratios:
            print(f"{s['preset']} / {s['backend']}: vs random_padded: {ratios}", flush=True)
        ratios = ", ".join(f"{m} {v:.2f}x" for m, v in (s.get("speedup_vs_padded_to_cap") or {}).items() if v is not None)
        if ratios:
            print(f"{s['preset']} / {s['backend']}: vs padded_to_cap: {ratios}", flush=True)


if __name__ == "__main__":
    main()
