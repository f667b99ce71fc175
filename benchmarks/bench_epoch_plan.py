"""The epoch plan at scale: what planning an epoch costs a loader's process and each of its
DataLoader workers, with the plan's batch counts shared by the loader (now) and with every worker
computing the whole plan itself (before; still the path of ``EpochPlan`` without ``batch_counts``).
Writes ``benchmarks/results/epoch_plan_cpu.json``.

    python benchmarks/bench_epoch_plan.py                       # 1M, 4M, 10M cells, ~2 min
    python benchmarks/bench_epoch_plan.py --cells 1000000 --repeats 1      # quick
    # the code of another commit (before the plan was shared), as the baseline in the JSON:
    git archive COMMIT | tar -x -C /tmp/old && cp benchmarks/bench_epoch_plan.py /tmp/old/benchmarks/
    python /tmp/old/benchmarks/bench_epoch_plan.py --out /tmp/old.json
    python benchmarks/bench_epoch_plan.py --baseline /tmp/old.json --baseline-commit COMMIT

No corpus is converted: a corpus index of N cells in blocks of 1,024 (the converter's default) is
built in memory, with genes per cell drawn log-normal (median ~1,100, capped at the token budget),
the loader's default batching (16,384 tokens, megabatches of 8,192 cells). For each layout (world
size x workers per rank):

- ``loader_process``: the loader's own process, which computes the plan for ``len()``: full plan
  construction (the batch counts: a sort and cut of every megabatch).
- ``worker_whole_plan`` / ``worker_shared_plan``: each DataLoader worker of rank 0 (``streams``),
  forked from a process holding the index and the costs (as the loader's are): the whole plan
  computed there, or rebuilt from the shared batch counts, then its stream's megabatches made one
  after another as the loader takes them. Peak RSS added while planning (``VmHWM`` reset at the
  start, minus ``VmRSS`` there) and RSS after; ``seconds`` and ``peak_rss_added_mb``: the
  slowest worker's and the most any added.
- ``per_rank_cpu_s``: planning time of one rank per epoch, loader process + all its workers.

Times are medians of ``--repeats``; each worker measurement runs in a fresh forked process. On
code whose ``EpochPlan`` takes no ``batch_counts`` only the whole-plan path is measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, cpu_device, result_record, versions, write_result  # noqa: E402

from data_pipeline.corpus import BlockTable  # noqa: E402
from data_pipeline.loading.epoch_plan import Batching, EpochPlan  # noqa: E402

BLOCK_CELLS = 1024
BATCHING = Batching()  # 16,384 tokens, megabatches of 8,192 cells
LAYOUTS = [(1, 2), (8, 2)]  # (world size, workers per rank)


def synthetic_index(n: int, seed: int = 0) -> tuple[BlockTable, np.ndarray]:
    """A corpus index of ``n`` cells in blocks of `BLOCK_CELLS` and their token costs.  [N] int32"""
    n_blocks = -(-n // BLOCK_CELLS)
    first = np.minimum(np.arange(n_blocks + 1, dtype=np.int64) * BLOCK_CELLS, n)
    zeros = np.zeros(n_blocks, np.int64)
    table = BlockTable(("corpus-0.tar",), zeros, zeros, np.ones(n_blocks, np.int64), first)
    lengths = np.random.default_rng(seed).lognormal(7.0, 0.7, n)
    return table, np.clip(lengths, 1, BATCHING.token_budget).astype(np.int32)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _worker(conn, table, cost, world_size, workers, counts, stream):
    """In a forked child: plan as the loader worker of ``stream`` (of rank 0); send seconds and RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    shared = {} if counts is None else {"batch_counts": counts}
    plan = EpochPlan(table, cost, BATCHING, 0, 0, world_size, workers, **shared)
    t1 = time.perf_counter()
    # as the loader takes them: one at a time where the plan makes them so (else the stream's list)
    megabatches = getattr(plan, "iter_stream_megabatches", plan.stream_megabatches)(stream)
    cells = sum(len(m.cells) for m in megabatches)
    t2 = time.perf_counter()
    conn.send({"plan_s": t1 - t0, "stream_s": t2 - t1, "seconds": t2 - t0,
               "peak_rss_added_mb": (_status_kb("VmHWM") - rss0) / 1024, "rss_after_mb": _status_kb("VmRSS") / 1024,
               "stream_cells": int(cells)})
    conn.close()


def in_forked_worker(table, cost, world_size, workers, counts, stream) -> dict:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(child, table, cost, world_size, workers, counts, stream))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def _median(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 4) if isinstance(rows[0][k], float) else rows[0][k]
            for k in rows[0]}


def rank_workers(table, cost, world_size: int, workers: int, counts, repeats: int) -> dict:
    """Each of rank 0's workers (medians over repeats), the slowest's seconds, the most RSS added."""
    streams = [_median([in_forked_worker(table, cost, world_size, workers, counts, w) for _ in range(repeats)])
               for w in range(workers)]
    return {"seconds": max(r["seconds"] for r in streams), "seconds_all": round(sum(r["seconds"] for r in streams), 4),
            "peak_rss_added_mb": max(r["peak_rss_added_mb"] for r in streams), "streams": streams}


def measure(n: int, repeats: int) -> list[dict]:
    table, cost = synthetic_index(n)
    sharing = "batch_counts" in inspect.signature(EpochPlan).parameters
    out = []
    for world_size, workers in LAYOUTS:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = EpochPlan(table, cost, BATCHING, 0, 0, world_size, workers)
            seconds.append(time.perf_counter() - t0)
        main = statistics.median(seconds)
        before = rank_workers(table, cost, world_size, workers, None, repeats)
        now = rank_workers(table, cost, world_size, workers, plan.batch_counts, repeats) if sharing else None
        row = {"cells": n, "blocks": len(table), "world_size": world_size, "workers_per_rank": workers,
               "megabatches": plan.n_megabatches, "batches_per_stream": plan.batches_per_stream,
               "loader_process": {"plan_s": round(main, 4)},
               "worker_whole_plan": before}
        line = (f"{n:>11,} cells, {world_size} x {workers}: loader {main:.3f} s; worker computing the whole plan "
                f"{before['seconds']:.3f} s (+{before['peak_rss_added_mb']:.0f} MB peak)")
        if now is not None:
            row.update(worker_shared_plan=now,
                       per_rank_cpu_s={"whole_plan_in_every_worker": round(main + before["seconds_all"], 3),
                                       "shared_plan": round(main + now["seconds_all"], 3)},
                       full_plans_per_rank_epoch={"whole_plan_in_every_worker": 1 + workers, "shared_plan": 1})
            line += (f", from the shared counts {now['seconds']:.3f} s (+{now['peak_rss_added_mb']:.0f} MB peak); "
                     f"per rank {row['per_rank_cpu_s']}")
        print(line, file=sys.stderr)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[1_000_000, 4_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "epoch_plan_cpu.json")
    ap.add_argument("--baseline", type=Path, help="a JSON this script wrote on other code, kept as 'baseline'")
    ap.add_argument("--baseline-commit", help="the commit whose code wrote --baseline")
    args = ap.parse_args()
    load_before = os.getloadavg()
    table, cost = synthetic_index(100_000)  # compiled kernels loaded before anything is timed
    EpochPlan(table, cost, BATCHING, 0, 0, 1, 1).stream_megabatches(0)
    rows = [row for n in args.cells for row in measure(n, args.repeats)]
    write_result(args.out, result_record(
        "epoch_plan", device=cpu_device(), versions=versions("numpy", "numba"),
        config={"block_cells": BLOCK_CELLS, "token_budget": BATCHING.token_budget,
                "megabatch_cells": BATCHING.megabatch_cells, "lengths": "lognormal(7.0, 0.7) clipped to the budget",
                "repeats": args.repeats},
        load_average_1min={"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        rows=rows,
        **({"baseline": {"commit": args.baseline_commit, **{k: v for k, v in json.loads(args.baseline.read_text())
                                                              .items() if k in ("date", "load_average_1min", "rows")}}}
           if args.baseline else {})))


if __name__ == "__main__":
    main()
