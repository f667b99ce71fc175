"""The training loop's own overhead: steps/s of the real trainer (`pretrain.train.train`, MLflow
off) when it reads the device every step against every ``--log-every`` steps. Writes
``benchmarks/results/train_loop_<device>.json``.

    python benchmarks/bench_train_loop.py                     # CPU or CUDA (whatever torch sees), ~2 min on 2 cores
    python benchmarks/bench_train_loop.py --smoke --result /tmp/l.json   # a few steps: checks the script

Workload: a synthetic corpus (`data_pipeline.synthetic`, ``--cells`` cells over 2,000 genes,
converted once into the work folder) and `launch/configs/tiny.yaml` shrunk to a step of tens of
milliseconds on a CPU (``SMALL``: the tests' tiny model), so that what the loop does besides the
step shows. Both runs train the same ``--steps`` steps on the same cells from the same seed, in
this one process, alternating ``--repeats`` times:

- ``log_every=1``: every step's values read back and logged, metrics.json rewritten each step:
  the sync count of the loop before issue 21 (which read the counts, the contrastive loss, the
  totals and the loss on every step);
- ``log_every=N``: values stay on the device between log steps and are read in one transfer.

steps/s comes from the ``time`` the trainer stamps on each metrics record (the wall clock of the
read that produced it): over the steps after the first ``N``-step window (start-up, the first
batches and the allocator's warm-up left out), the same span in both runs. On a CPU there is no
asynchronous device to overlap with, so the difference is the host work of the reads and the
per-step logging alone; on a GPU the per-step reads also stall the launch queue.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_record, device_slug, result_record, versions, write_result  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "launch" / "configs" / "tiny.yaml"
# the training tests' tiny model: a step of tens of milliseconds on a CPU core
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.favor_features=16", "data.max_genes=32",
         "data.token_budget=1024", "data.megabatch_cells=256", "data.num_workers=0", "run.progress=false",
         "run.mlflow=false", "run.checkpoint_every=0", "schedule.warmup_steps=2"]


def make_corpus(work: Path, n_cells: int) -> Path:
    from data_pipeline.conversion.convert import convert
    from data_pipeline.conversion.plan import ConvertOptions
    from data_pipeline.corpus import Corpus
    from data_pipeline.synthetic import write_synthetic_h5ad

    corpus = work / "corpus"
    if not Corpus.is_finished(corpus):
        source = work / "cells.h5ad"
        write_synthetic_h5ad(source, n_cells, 2000, seed=0)
        convert(corpus, ConvertOptions([str(source)], label_columns=["cell_type"]), progress=False)
    return corpus


def run_loop(corpus: Path, out: Path, steps: int, log_every: int, overrides: list[str]) -> list[dict]:
    """One training run; its metrics records."""
    from pretrain.config import load_config
    from pretrain.train import train

    config = load_config(str(TINY), [*SMALL, f"data.corpus={corpus}", f"run.out={out}", f"schedule.max_steps={steps}",
                                     f"run.log_every={log_every}", *overrides])
    train(config)
    return json.loads((out / "metrics.json").read_text())


def steps_per_s(history: list[dict], first: int) -> dict:
    """Steps/s from the read time of step ``first`` to that of the last step."""
    by_step = {h["step"]: h for h in history}
    last = max(by_step)
    span_s = by_step[last]["time"] - by_step[first]["time"]
    reads = len({h["time"] for h in history if first < h["step"] <= last})
    return {"steps_per_s": (last - first) / span_s, "span_steps": last - first, "span_s": span_s, "reads": reads}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (default 120)")
    parser.add_argument("--log-every", type=int, default=10, help="the windowed run's run.log_every (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating (default 2)")
    parser.add_argument("--cells", type=int, default=2000, help="synthetic cells in the corpus (default 2000)")
    parser.add_argument("--work", help="folder for the corpus and the runs (default: a temporary one)")
    parser.add_argument("--result", help="results JSON (default benchmarks/results/train_loop_<device>.json)")
    parser.add_argument("--smoke", action="store_true", help="8 steps, log every 4, one repeat: checks the script")
    parser.add_argument("overrides", nargs="*", help="more trainer overrides, key.sub=value")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.log_every, args.repeats, args.cells = 8, 4, 1, 300
    if args.steps < 2 * args.log_every:
        parser.error(f"--steps {args.steps} leaves no span after the first window: use at least 2 x --log-every")
    import torch

    from pretrain.threads import apply_threads

    threads = apply_threads(0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        corpus = make_corpus(work, args.cells)
        rows = []
        for repeat in range(args.repeats):
            for log_every in (1, args.log_every):
                history = run_loop(corpus, work / f"run-{repeat}-log{log_every}", args.steps, log_every,
                                   args.overrides)
                rows.append({"log_every": log_every, "repeat": repeat, **steps_per_s(history, args.log_every),
                             "final_loss": history[-1]["loss"]})
                print(f"log_every={log_every} repeat {repeat}: {rows[-1]['steps_per_s']:.2f} steps/s",
                      file=sys.stderr)
        wall = time.perf_counter() - started
    every = statistics.median(r["steps_per_s"] for r in rows if r["log_every"] == 1)
    windowed = statistics.median(r["steps_per_s"] for r in rows if r["log_every"] == args.log_every)
    result = result_record(
        "train_loop", device=device_record(), versions=versions("torch", "deepspeed"),
        settings={"steps": args.steps, "log_every": args.log_every, "repeats": args.repeats, "cells": args.cells,
                  "span": f"steps {args.log_every}..{args.steps} (read times)", "config": str(TINY.name),
                  "overrides": [*SMALL, *args.overrides], "torch_threads": threads.threads,
                  "trainer_device": "cuda" if torch.cuda.is_available() else "cpu", "smoke": args.smoke},
        rows=rows,
        summary={"steps_per_s_log_every_1": every, f"steps_per_s_log_every_{args.log_every}": windowed,
                 "ratio": windowed / every},
        wall_s=round(wall, 1))
    write_result(Path(args.result) if args.result else RESULTS / f"train_loop_{device_slug()}.json", result)
    return result


if __name__ == "__main__":
    main()
