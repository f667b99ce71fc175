"""The main job end to end on a fresh machine, in a few minutes on 2 CPU cores (or a GPU):

    python launch/demo.py [--out demo] [--steps 200]

synthetic cells -> corpus (shards, manifest, statistics) -> pretraining of the tiny config
(masked bins + cell labels + gradient-cached contrastive; checkpoints; a local MLflow store) ->
export bundle -> embedding of held-out synthetic cells -> a summary of where everything is.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the wall time a user waits includes the imports (torch, deepspeed)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.conversion.convert import convert  # noqa: E402
from data_pipeline.conversion.plan import ConvertOptions  # noqa: E402
from data_pipeline.cores import usable_cores  # noqa: E402
from data_pipeline.corpus import Corpus  # noqa: E402
from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from data_pipeline.synthetic import write_synthetic_h5ad  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.embed import embed_h5ad  # noqa: E402
from pretrain.export import export_bundle, load_pretrained  # noqa: E402
from pretrain.threads import apply_threads, use_project_extension_dir  # noqa: E402
from pretrain.train import train  # noqa: E402

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
log = logging.getLogger("launch.demo")  # under "launch": setup_logging sets its level


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes (default demo)")
    parser.add_argument("--cells", type=int, default=20000, help="synthetic training cells (default 20000)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--held-out-cells", type=int, default=2000,
                        help="other synthetic cells (another seed) that the exported bundle embeds (default 2000)")
    parser.add_argument("--summary", default=None, help="also write the printed summary as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides for training, key.sub=value")
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    use_project_extension_dir()  # DeepSpeed's CPU op, built on the first run, is kept in the checkout
    omp_env = os.environ.get("OMP_NUM_THREADS")  # as the user gave it, before anything below reads it
    load = round(os.getloadavg()[0], 2)  # other work on the machine when it started: it skews the timings
    times, reused = {}, []
    clock = time.perf_counter()
    start = _STARTED if __name__ == "__main__" else clock  # imported (tests): from this call

    def lap(name: str) -> None:
        nonlocal clock
        times[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    cells, held_out = out / "cells.h5ad", out / "held_out.h5ad"
    if cells.exists() and held_out.exists():
        reused.append("synthetic cells")
    if not cells.exists():
        write_synthetic_h5ad(cells, args.cells, seed=0)
    if not held_out.exists():  # other synthetic cells (another seed) over the same genes
        write_synthetic_h5ad(held_out, args.held_out_cells, seed=1)
    lap("synthetic cells")
    corpus = out / "corpus"
    if Corpus.is_finished(corpus):
        reused.append("convert")
    else:
        convert(corpus, ConvertOptions([str(cells)], label_columns=["cell_type"]), workers=2, progress=False)
    lap("convert")
    config = load_config(str(TINY), [f"data.corpus={corpus}", f"run.out={out / 'run'}",
                                     f"schedule.max_steps={args.steps}", *args.overrides])
    threads = apply_threads(config.run.threads, config.data.num_workers)
    summary = train(config, resume="auto")
    steps_before = summary["resumed_from_step"]
    lap("pretrain")
    if steps_before >= summary["steps"]:
        reused.append("pretrain")
        # its throughput and losses below are that earlier run's, not measured now: say so
        log.info(f"demo: pretraining reused: {config.run.out} had already finished {steps_before} steps in a previous "
                 f"invocation, so no step ran now and the throughput reported is the earlier run's; use a new --out "
                 f"(or delete {config.run.out}) to measure again")
    elif steps_before:
        log.info(f"demo: pretraining resumed from step {steps_before} of an earlier invocation; the throughput "
                 f"reported mixes both")
    bundle = export_bundle(out / "run", out / "bundle")
    lap("export")
    report = embed_h5ad(load_pretrained(bundle), held_out, out / "held_out_embedded.h5ad", progress=False)
    lap("embed")
    final = summary["final"]
    record = {
        "benchmark": "demo", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["launch/demo.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": times, "wall_s": round(time.perf_counter() - start, 1),
        "reused": reused, "resumed_from_step": steps_before,
        "threads": {"torch": threads.threads, "choice": threads.reason, "OMP_NUM_THREADS": omp_env,
                    "usable_cores": usable_cores()[0], "cpu_count": os.cpu_count(), "load_avg_1min_at_start": load},
        "steps": summary["steps"], "skipped_steps": summary["skipped_steps"], "device": summary["device"],
        "final_losses": {k: round(final[k], 4) for k in ("loss", "mlm", "contrastive", "label") if k in final},
        "first_losses": _first_losses(out / "run" / "metrics.json"),
        "cells_per_s": round(final.get("cells_per_s", 0.0), 1), "tokens_per_s": round(final.get("tokens_per_s", 0.0)),
        # two views of a cell are two sequences: the model's rate, beside the cell rate above
        "sequences_per_s": round(final.get("sequences_per_s", final.get("cells_per_s", 0.0)), 1),
        "mlflow": summary["mlflow_tracking_uri"], "run": str(out / "run"), "bundle": str(bundle),
        "embedding": f"{report['out']} obsm['{report['key']}'] [{report['n_cells']}, {report['dim']}]",
    }
    print(json.dumps(record, indent=1))
    if args.summary:
        Path(args.summary).write_text(json.dumps(record, indent=1) + "\n")


def _first_losses(path: Path) -> dict:
    history = json.loads(path.read_text())
    first = history[0] if history else {}
    return {k: round(first[k], 4) for k in ("loss", "mlm", "contrastive", "label") if first.get(k) is not None}


if __name__ == "__main__":
    main()
