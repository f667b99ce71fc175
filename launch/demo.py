"""The main job end to end on a fresh machine, in a few minutes on 2 CPU cores (or a GPU):

    python launch/demo.py [--out demo] [--steps 200]

synthetic cells -> corpus (shards, manifest, statistics) -> pretraining of the tiny config
(masked bins + cell labels + gradient-cached contrastive; checkpoints; a local MLflow store) ->
export bundle -> embedding of held-out synthetic cells -> a summary of where everything is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.convert import convert  # noqa: E402
from data_pipeline.plan import ConvertOptions  # noqa: E402
from data_pipeline.synthetic import write_synthetic_h5ad  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.embed import embed_h5ad  # noqa: E402
from pretrain.export import export_bundle, load_pretrained  # noqa: E402
from pretrain.train import train  # noqa: E402

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes (default demo)")
    parser.add_argument("--cells", type=int, default=20000, help="synthetic training cells (default 20000)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--summary", default=None, help="also write the printed summary as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides for training, key.sub=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        times[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    cells, held_out = out / "cells.h5ad", out / "held_out.h5ad"
    if not cells.exists():
        write_synthetic_h5ad(cells, args.cells, seed=0)
    if not held_out.exists():  # other synthetic cells (another seed) over the same genes
        write_synthetic_h5ad(held_out, 2000, seed=1)
    lap("synthetic cells")
    corpus = out / "corpus"
    if not (corpus / "manifest.json").exists():
        convert(corpus, ConvertOptions([str(cells)], label_columns=["cell_type"]), workers=2, progress=False)
    lap("convert")
    config = load_config(str(TINY), [f"data.corpus={corpus}", f"run.out={out / 'run'}",
                                     f"schedule.max_steps={args.steps}", *args.overrides])
    summary = train(config, resume="auto")
    lap("pretrain")
    bundle = export_bundle(out / "run", out / "bundle")
    lap("export")
    report = embed_h5ad(load_pretrained(bundle), held_out, out / "held_out_embedded.h5ad", progress=False)
    lap("embed")
    final = summary["final"]
    record = {
        "benchmark": "demo", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["launch/demo.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": times,
        "steps": summary["steps"], "skipped_steps": summary["skipped_steps"], "device": summary["device"],
        "final_losses": {k: round(final[k], 4) for k in ("loss", "mlm", "contrastive", "label") if k in final},
        "first_losses": _first_losses(out / "run" / "metrics.json"),
        "cells_per_s": round(final.get("cells_per_s", 0.0), 1), "tokens_per_s": round(final.get("tokens_per_s", 0.0)),
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
