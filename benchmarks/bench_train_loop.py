"""The training loop's own overhead: steps/s of the real trainer (`pretrain.train.train`, MLflow
off, each run in a fresh process) when it reads the device every step against every
``--log-every`` steps. Writes
``benchmarks/results/train_loop_<device>.json``.

    python benchmarks/bench_train_loop.py                     # CPU or CUDA (whatever torch sees), ~2 min on 2 cores
    python benchmarks/bench_train_loop.py --baseline 7262005  # and the trainer of that commit, before issue 21
    python benchmarks/bench_train_loop.py --smoke --result /tmp/l.json   # a few steps: checks the script

Workload: a synthetic corpus (`data_pipeline.synthetic`, ``--cells`` cells over 2,000 genes,
converted once into the work folder) and `launch/configs/tiny.yaml` shrunk to a step of tens of
milliseconds on a CPU (``SMALL``: the tests' tiny model), so that what the loop does besides the
step shows. Both runs train the same ``--steps`` steps on the same cells from the same seed, each
in a process of its own (one process accumulates what earlier engines leave behind and slows
down), alternating ``--repeats`` times:

- ``log_every=1``: every step's values read back and logged:
  the sync count of the loop before issue 21 (which read the counts, the contrastive loss, the
  totals and the loss on every step);
- ``log_every=N``: values stay on the device between log steps and are read in one transfer.

``--baseline REF`` adds a third run per repeat: the trainer of commit ``REF`` (`git archive`d into
the work folder, run in a subprocess on the same corpus and settings), whose loop read the device
several times every step whatever ``run.log_every`` says; its records get their ``time`` from a
wrapper of its `RunLog.record`, called after each step's sync (the same wrapper leaves this
trainer's own read times alone).

steps/s comes from the ``time`` the trainer stamps on each metrics record (the wall clock of the
read that produced it): over the steps after the first ``N``-step window (start-up, the first
batches and the allocator's warm-up left out), the same span in every run. On a CPU there is no
asynchronous device to overlap with, so the difference is the host work of the reads and the
per-step logging alone; on a GPU the per-step reads also stall the launch queue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_record, device_slug, result_record, versions, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "launch" / "configs" / "tiny.yaml"
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


# one training run in a fresh process, on a checkout (this one or the baseline's); a trainer from
# before the records had a read time gets it from a wrapper of RunLog.record (called after each
# step's sync there)
DRIVER = """
import runpy, sys, time
from pretrain import metrics
record = metrics.RunLog.record
def stamped(self, step_metrics, log):
    step_metrics.setdefault("time", time.time())
    record(self, step_metrics, log)
metrics.RunLog.record = stamped
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def baseline_tree(ref: str, work: Path) -> Path:
    """The files of commit ``ref`` of this repository, unpacked under ``work``."""
    tree = work / f"baseline-{ref}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def run_trainer(tree: Path, corpus: Path, out: Path, steps: int, log_every: int,
                overrides: list[str]) -> tuple[list[dict], str]:
    """One training run of the trainer in ``tree``: its metrics records and its thread choice."""
    config = tree / "launch" / "configs" / "tiny.yaml"
    args = [*SMALL, f"data.corpus={corpus}", f"run.out={out}", f"schedule.max_steps={steps}",
            f"run.log_every={log_every}", *overrides]
    # a world of its own: not this process's (init_distributed exported its rank and port)
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    # the tree first, then what the caller had (the GPU suite's carried wheels: deepspeed is there)
    env = {**{k: v for k, v in os.environ.items() if k not in launcher},
           "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)}
    # launch/pretrain.py as a user runs it (its thread choice included), the wrapper in place
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tree / "launch" / "pretrain.py"), "--config", str(config),
                           *args], cwd=out.parent,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the trainer of {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    threads = next((line for line in proc.stderr.splitlines() if line.startswith("torch threads")), "?")
    return json.loads((out / "metrics.json").read_text()), threads


def steps_per_s(history: list[dict], first: int) -> dict:
    """Steps/s from the read time of step ``first`` to that of the last step."""
    by_step = {h["step"]: h for h in history}
    last = max(by_step)
    span_s = by_step[last]["time"] - by_step[first]["time"]
    reads = len({h["time"] for h in history if first < h["step"] <= last})
    return {"steps_per_s": (last - first) / span_s, "span_steps": last - first, "span_s": span_s, "reads": reads}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (default 120)")
    parser.add_argument("--log-every", type=int, default=10, help="the windowed run's run.log_every (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating (default 2)")
    parser.add_argument("--cells", type=int, default=2000, help="synthetic cells in the corpus (default 2000)")
    parser.add_argument("--corpus", help="a finished corpus to train on instead of the synthetic one (the GPU suite "
                        "passes benchmarks/gpu_inputs/gpu_test_corpus: making one needs anndata, which the GPU image lacks)")
    parser.add_argument("--work", help="folder for the corpus and the runs (default: a temporary one)")
    parser.add_argument("--result", help="results JSON (default benchmarks/results/train_loop_<device>.json)")
    parser.add_argument("--baseline", metavar="REF", help="also time the trainer of this commit (e.g. the one before "
                        "issue 21's loop), in a subprocess")
    parser.add_argument("--smoke", action="store_true", help="8 steps, log every 4, one repeat: checks the script")
    parser.add_argument("overrides", nargs="*", help="more trainer overrides, key.sub=value")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser_ = parser()
    args = parser_.parse_args(argv)
    if args.smoke:
        args.steps, args.log_every, args.repeats, args.cells = 8, 4, 1, 300
    if args.steps < 2 * args.log_every:
        parser_.error(f"--steps {args.steps} leaves no span after the first window: use at least 2 x --log-every")
    import torch

    path = Path(args.result) if args.result else RESULTS / f"train_loop_{device_slug()}.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        started, load_at_start = time.perf_counter(), os.getloadavg()[0]
        corpus = Path(args.corpus).resolve() if args.corpus else make_corpus(work, args.cells)  # runs cd elsewhere
        tree = baseline_tree(args.baseline, work) if args.baseline else None
        kinds = [("this", 1), ("this", args.log_every)] + ([(args.baseline, args.log_every)] if tree else [])
        rows = []
        for repeat in range(args.repeats):
            for code, log_every in kinds:
                out = work / f"run-{repeat}-{code}-log{log_every}"
                history, threads = run_trainer(REPO if code == "this" else tree, corpus, out, args.steps,
                                               log_every, args.overrides)
                rows.append({"code": code, "log_every": log_every, "repeat": repeat,
                             **steps_per_s(history, args.log_every), "final_loss": history[-1]["loss"]})
                print(f"{code} log_every={log_every} repeat {repeat}: {rows[-1]['steps_per_s']:.2f} steps/s",
                      file=sys.stderr)
                # each run's row at once: a time limit (the GPU suite's) keeps the runs that finished
                write_result(path, result_record("train_loop", device=device_record(), rows=rows, partial=True),
                             quiet=True)
        wall = time.perf_counter() - started

    def measured(code: str, log_every: int) -> list[float]:
        return [r["steps_per_s"] for r in rows if (r["code"], r["log_every"]) == (code, log_every)]

    def median(code: str, log_every: int) -> float | None:
        found = measured(code, log_every)
        return statistics.median(found) if found else None

    # the noise to read the medians against: a shared machine's repeats differ by more than the loop's cost
    spread = {f"{code} log_every={n}": [min(measured(code, n)), max(measured(code, n))] for code, n in kinds}

    every, windowed, before = median("this", 1), median("this", args.log_every), median(args.baseline, args.log_every)

    def paired(code: str, log_every: int) -> float:
        """Median over repeats of the windowed run's steps/s over the other's of the same repeat
        (runs next to each other in time share the machine's load more than runs far apart)."""
        this = {r["repeat"]: r["steps_per_s"] for r in rows if (r["code"], r["log_every"]) == ("this", args.log_every)}
        return statistics.median(this[r["repeat"]] / r["steps_per_s"] for r in rows
                                 if (r["code"], r["log_every"]) == (code, log_every))

    result = result_record(
        "train_loop", device=device_record(), versions=versions("torch", "deepspeed"),
        settings={"steps": args.steps, "log_every": args.log_every, "repeats": args.repeats,
                  "cells": args.corpus or args.cells,
                  "span": f"steps {args.log_every}..{args.steps} (read times)", "config": str(TINY.name),
                  "overrides": [*SMALL, *args.overrides], "threads": threads,
                  "trainer_device": "cuda" if torch.cuda.is_available() else "cpu", "smoke": args.smoke,
                  "baseline": args.baseline},
        rows=rows,
        summary={"steps_per_s_log_every_1": every, f"steps_per_s_log_every_{args.log_every}": windowed,
                 "ratio": windowed / every, "paired_ratio": paired("this", 1), "min_max": spread,
                 **({f"steps_per_s_baseline_{args.baseline}": before, "ratio_to_baseline": windowed / before,
                     "paired_ratio_to_baseline": paired(args.baseline, args.log_every)} if before else {})},
        load_avg_1min={"start": load_at_start, "end": os.getloadavg()[0]}, wall_s=round(wall, 1))
    write_result(path, result)
    return result


if __name__ == "__main__":
    main()
