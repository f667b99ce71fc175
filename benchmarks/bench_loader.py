"""Loader throughput and padding: cells/s and tokens/s per worker core for each normalization mode,
on real cells (the shared files replicated) and synthetic cells; the padding a padded layout
would carry under random batching vs length grouping vs packing; and reading the same cells
through AnnData (backed h5ad, random minibatches of rows: the common practice) as a baseline;
and what checking every block (checksum and structure, `corpus.BlockReader`) costs: the same
corpus read with and without the checks in the same run. Writes ``benchmarks/results/loader.json``.

    python benchmarks/bench_loader.py                          # ~10 min, ~3 GB of corpora
    python benchmarks/bench_loader.py --synthetic-cells 50000 --repeats 1 --workers 0   # quick
    python benchmarks/bench_loader.py --modes "rank+mask (2048)" "log1p_bins+mask+2 views" --skip-integrity \
        --result /tmp/loader_some.json                         # some modes only (not for loader.json)
    python benchmarks/bench_loader.py --integrity-only --real-cells 50000 --synthetic-cells 50000 --repeats 9
                                                               # the checks' cost only: loader_integrity.json

Corpora are converted once under ``benchmarks/data/`` (git-ignored) and reused. Each measurement
iterates one whole epoch after a warm-up epoch (kernels compiled, shards in the page cache), and
the median of ``--repeats`` epochs is reported. ``workers`` 0 makes batches in the consuming
process (one core); with W DataLoader workers the figure per worker core is the rate / W.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import DATA, real_inputs, synthetic_input  # noqa: E402
from common import cpu_device, result_record, write_result  # noqa: E402

from data_pipeline.conversion.convert import convert  # noqa: E402
from data_pipeline.conversion.plan import ConvertOptions  # noqa: E402
from data_pipeline.corpus import Corpus  # noqa: E402
from data_pipeline.loading.epoch_plan import Batching, EpochPlan  # noqa: E402
from data_pipeline.loading.loader import CellLoader  # noqa: E402
from data_pipeline.loading.masking import Masking, Views  # noqa: E402
from data_pipeline.loading.normalize import Normalization  # noqa: E402

MODES = {
    "log1p_bins+mask": dict(normalization=Normalization("log1p_bins", n_bins=51), masking=Masking()),
    **{f"quantile_bins ({ties} ties)+mask": dict(normalization=Normalization("quantile_bins", n_bins=51,
                                                                           quantile_ties=ties), masking=Masking())
       for ties in ("random", "high")},
    "rank+mask (2048)": dict(normalization=Normalization("rank", max_genes=2048), masking=Masking()),
    "continuous+mask": dict(normalization=Normalization("continuous"), masking=Masking()),
    "log1p_bins+mask+2 views": dict(normalization=Normalization("log1p_bins", n_bins=51), masking=Masking(),
                                    views=Views()),
}


# the checks cost a fixed amount per block byte: the fastest modes show their largest share
INTEGRITY_MODES = ("log1p_bins+mask", "continuous+mask")
INTEGRITY_TARGET = "block checks (checksum + structure) cost <= 5 % of loader throughput"


def corpus_of(name: str, inputs: list[Path]) -> Path:
    out = DATA / "corpora" / name
    if not Corpus.is_finished(out):
        convert(out, ConvertOptions([str(p) for p in inputs]), workers=os.cpu_count() or 1, progress=True,
                overwrite=True)
    return out


def timed_epoch(loader: CellLoader) -> tuple:
    """(seconds, cells, tokens, batches, padded tokens) of the loader's next epoch."""
    cells = tokens = batches = padded = 0
    t = time.perf_counter()
    for b in loader:
        cells += b.n_cells  # a cell of two views once
        tokens += b.n_tokens
        padded += b.padded_tokens
        batches += 1
    return time.perf_counter() - t, cells, tokens, batches, padded


def epoch_rate(corpus: Path, mode: dict, workers: int, batching: Batching, repeats: int) -> dict:
    loader = CellLoader(corpus, batching=batching, num_workers=workers, seed=0, **mode)
    for _ in loader:  # warm-up epoch
        pass
    runs = [timed_epoch(loader) for _ in range(repeats)]
    seconds, cells, tokens, batches, padded = sorted(runs)[(len(runs) - 1) // 2]
    per_core = max(workers, 1)
    return {"workers": workers, "seconds": round(seconds, 3), "cells": cells, "tokens": tokens, "batches": batches,
            "cells_per_s": round(cells / seconds), "tokens_per_s": round(tokens / seconds),
            "cells_per_s_per_worker_core": round(cells / seconds / per_core),
            "tokens_per_s_per_worker_core": round(tokens / seconds / per_core),
            "padded_layout_waste": round(1 - tokens / padded, 4), "packed_waste": 0.0,
            "seconds_of_each_run": [round(r[0], 3) for r in runs]}


def integrity_cost(corpus: Path, mode_name: str, workers: int, batching: Batching, repeats: int) -> dict:
    """Loader throughput with every block checked (as users run it) and without the checks (a
    switch for this measurement only), on the same corpus in the same process: epochs of the two
    alternate (which goes first alternates too), so load from other processes hits both alike.
    ``cost``: 1 - (median checked rate / median unchecked rate), from wall time and, without
    workers (all the work in this process), from this process's CPU time, which other processes
    on a shared machine disturb far less; ``paired_cost``: the median over repeats of the same
    for the two epochs run back to back."""
    mode = MODES[mode_name]
    loaders = {}
    for checked in (True, False):
        loader = CellLoader(corpus, batching=batching, num_workers=workers, seed=0, **mode)
        loader.spec.check_blocks = checked  # before the first epoch starts the workers
        for _ in loader:  # warm-up epoch
            pass
        loaders[checked] = loader
    wall, cpu = {True: [], False: []}, {True: [], False: []}
    for r in range(repeats):
        for checked in ((True, False) if r % 2 == 0 else (False, True)):
            c = time.process_time()
            t, cells, tokens, *_ = timed_epoch(loaders[checked])
            wall[checked].append(t)
            cpu[checked].append(time.process_time() - c)

    def cost(seconds: dict) -> dict:
        on, off = float(np.median(seconds[True])), float(np.median(seconds[False]))
        paired = np.median([1 - b / a for a, b in zip(seconds[True], seconds[False])])
        return {"cells_per_s_checked": round(cells / on), "cells_per_s_unchecked": round(cells / off),
                "cost": round(1 - off / on, 4), "paired_cost": round(float(paired), 4),
                "seconds_checked": [round(x, 3) for x in seconds[True]],
                "seconds_unchecked": [round(x, 3) for x in seconds[False]]}

    return {"mode": mode_name, "workers": workers, "repeats": repeats, "cells": cells, "tokens": tokens,
            "checksums": Corpus(corpus).block_table().checksum is not None,
            "wall": cost(wall), "cpu": cost(cpu) if workers == 0 else None,
            "reads": block_check_share(loaders[True], float(np.median(cpu[True] if workers == 0 else wall[True])),
                                       repeats)}


def block_check_share(loader: CellLoader, epoch_seconds: float, repeats: int) -> dict:
    """The checks timed alone, which run-to-run noise of whole epochs (several %) cannot blur:
    every block read ``repeats`` times with and without them (CPU time, alternating), the
    difference scaled to the blocks one epoch reads (blocks at megabatch edges are read twice)
    and put against ``epoch_seconds`` (a checked epoch)."""
    from data_pipeline.corpus import BlockReader

    spec = loader.spec
    plan = spec.plan(0)
    reads = sum(len(plan.blocks_of(k)) for k in range(plan.n_megabatches))
    seconds = {True: [], False: []}
    readers = {checked: BlockReader(spec.corpus, spec.table, checked) for checked in (True, False)}
    for r in range(repeats + 1):
        for checked in ((True, False) if r % 2 == 0 else (False, True)):
            t = time.process_time()
            for b in range(len(spec.table)):
                readers[checked].read(b)
            if r:  # the first pass warms the page cache
                seconds[checked].append(time.process_time() - t)
    for reader in readers.values():
        reader.close()
    extra = (float(np.median(seconds[True])) - float(np.median(seconds[False]))) * reads / len(spec.table)
    return {"blocks": len(spec.table), "block_reads_per_epoch": reads,
            "seconds_per_pass_checked": round(float(np.median(seconds[True])), 4),
            "seconds_per_pass_unchecked": round(float(np.median(seconds[False])), 4),
            "check_seconds_per_epoch": round(extra, 4), "share_of_checked_epoch": round(extra / epoch_seconds, 4)}


def padding_waste(corpus: Path, batching: Batching, seed: int = 0) -> dict:
    """Share of a padded ``[B, max_len]`` layout that is padding: random batches (cells in random
    order, as many per batch as length-grouped batches hold on average) vs length-grouped batches
    (this loader's plan) vs packed (none)."""
    c = Corpus(corpus)
    lengths = c.cell_lengths().astype(np.int64)
    plan = EpochPlan(c.block_table(), lengths, batching, seed, 0, 1, 1)
    grouped_tokens = grouped_slots = n_batches = 0
    for m in plan.stream_megabatches(0):
        for j in range(m.n_batches):
            cell_lengths = lengths[m.cells[m.bounds[j]:m.bounds[j + 1]]]
            grouped_tokens += cell_lengths.sum()
            grouped_slots += len(cell_lengths) * cell_lengths.max()
            n_batches += 1
    per_batch = max(1, round(len(lengths) / n_batches))
    shuffled = np.random.default_rng(seed).permutation(lengths)
    usable = len(shuffled) // per_batch * per_batch
    rand = shuffled[:usable].reshape(-1, per_batch)
    return {"cells_per_batch": per_batch, "token_budget": batching.token_budget,
            "random_batches_padded": round(1 - rand.sum() / (rand.max(1).sum() * per_batch), 4),
            "length_grouped_padded": round(1 - grouped_tokens / grouped_slots, 4),
            "packed": 0.0,
            "padded_slots_random_over_grouped": round(float(rand.max(1).sum() * per_batch / usable) /
                                                      (grouped_slots / len(lengths)), 2)}


def anndata_baseline(files: list[Path], batch_cells: int, seconds: float = 20.0, seed: int = 0) -> dict:
    """Random minibatches of rows from backed h5ad files (``adata.X[sorted random rows]``), raw
    counts only: no normalization, masking or packing."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    backed = [ad.read_h5ad(f, backed="r") for f in files]
    sizes = np.array([a.n_obs for a in backed])
    cells = nnz = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        a = backed[rng.choice(len(backed), p=sizes / sizes.sum())]
        rows = np.sort(rng.choice(a.n_obs, min(batch_cells, a.n_obs), replace=False))
        x = a.X[rows]
        cells += x.shape[0]
        nnz += x.nnz
    dt = time.perf_counter() - t
    for a in backed:
        a.file.close()
    return {"batch_cells": batch_cells, "cells_per_s": round(cells / dt), "nonzeros_per_s": round(nnz / dt),
            "what": "anndata backed='r', X[sorted random rows], raw counts"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-cells", type=int, default=200_000)
    ap.add_argument("--synthetic-cells", type=int, default=100_000)
    ap.add_argument("--workers", type=int, nargs="+", default=sorted({0, os.cpu_count() or 1}))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--token-budget", type=int, default=65_536)
    ap.add_argument("--megabatch-cells", type=int, default=8192)
    ap.add_argument("--integrity-repeats", type=int, default=7,
                    help="epochs with and without the block checks, alternating (their cost is a few %%: noise "
                         "needs repeats)")
    ap.add_argument("--integrity-only", action="store_true",
                    help="measure only what the block checks cost (default result: loader_integrity.json)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), metavar="MODE",
                    help="time only these modes (default all: %(choices)s); a run of some modes leaves out the "
                    "AnnData baseline unless log1p_bins+mask is among them")
    ap.add_argument("--skip-integrity", action="store_true", help="leave out the block checks' cost")
    ap.add_argument("--result", type=Path, default=None, help="default benchmarks/results/loader.json, or "
                    "loader_integrity.json with --integrity-only")
    args = ap.parse_args()
    results = REPO / "benchmarks" / "results"
    if args.result is None and not args.integrity_only and set(args.modes) != set(MODES):
        ap.error("--modes times some modes only: pass --result (loader.json holds runs of every mode)")
    args.result = args.result or results / ("loader_integrity.json" if args.integrity_only else "loader.json")
    batching = Batching(token_budget=args.token_budget, megabatch_cells=args.megabatch_cells)

    datasets = []
    real = real_inputs(args.real_cells, None) if args.real_cells else []
    if real:
        datasets.append(("real_replicated", corpus_of(f"real-{args.real_cells}", real), real))
    elif args.real_cells:
        print("../shared/data is absent: skipping the real-data measurement", file=sys.stderr)
    if args.synthetic_cells:
        syn = synthetic_input(args.synthetic_cells)
        datasets.append(("synthetic", corpus_of(f"synthetic-{args.synthetic_cells}", [syn]), [syn]))

    import torch

    header = dict(device=cpu_device(),
                  versions={"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
                  batching={"token_budget": batching.token_budget, "megabatch_cells": batching.megabatch_cells})
    integrity = []
    load_before = os.getloadavg()  # the checks' cost is a few %: say how busy the machine was
    for name, corpus, _ in ([] if args.skip_integrity and not args.integrity_only else datasets):
        for mode_name in INTEGRITY_MODES:
            for w in args.workers:
                r = {"dataset": name, "corpus_cells": Corpus(corpus).n_cells,
                     **integrity_cost(corpus, mode_name, w, batching, args.integrity_repeats)}
                print(json.dumps(r), file=sys.stderr)
                integrity.append(r)
    if args.integrity_only:
        write_result(args.result, result_record("loader_integrity", **header, target=INTEGRITY_TARGET,
                                                load_average={"before": load_before, "after": os.getloadavg()},
                                                integrity_check=integrity))
        return

    runs, padding, baseline = [], {}, {}
    for name, corpus, files in datasets:
        padding[name] = padding_waste(corpus, batching)
        for mode_name, mode in MODES.items():
            if mode_name not in args.modes:
                continue
            for w in args.workers:
                r = {"dataset": name, "mode": mode_name, "corpus_cells": Corpus(corpus).n_cells,
                     **epoch_rate(corpus, mode, w, batching, args.repeats)}
                print(json.dumps(r), file=sys.stderr)
                runs.append(r)
        if "log1p_bins+mask" not in args.modes:
            continue
        baseline[name] = anndata_baseline(files, padding[name]["cells_per_batch"])
        ours = next(r for r in runs if r["dataset"] == name and r["mode"] == "log1p_bins+mask" and r["workers"] == 0)
        baseline[name]["loader_log1p_bins_mask_over_anndata"] = round(ours["cells_per_s"] / baseline[name]["cells_per_s"], 2)
        print(json.dumps({"padding": padding[name], "anndata": baseline[name]}), file=sys.stderr)

    result = result_record(
        "loader", **header,
        target=">= 50,000 cells/s per worker core in log1p_cp10k-bins mode with masking; zero padding packed; "
               + INTEGRITY_TARGET,
        runs=runs, padding_waste=padding, anndata_baseline=baseline, integrity_check=integrity,
    )
    write_result(args.result, result)


if __name__ == "__main__":
    main()
