"""Fine-tune a bundle for cell-type annotation (a classification head on the cell embedding):

    python launch/finetune.py BUNDLE cells.h5ad [more.h5ad ...] --label-column cell_type --out RUN
    python launch/finetune.py BUNDLE cells.h5ad --label-column cell_type --mode full --encoder-lr-scale 0.1 --out RUN
    python launch/finetune.py BUNDLE train.h5ad --validation held_out.h5ad --label-column cell_type --out RUN

RUN gets checkpoint.pt (each epoch; rerunning the same command resumes), bundle/ (the fine-tuned
bundle: `python launch/predict.py RUN/bundle cells.h5ad --out annotated.h5ad`), report.json and
confusion.png. One process on one device (DeepSpeed multi-GPU fine-tuning is not implemented).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import FinetuneConfig  # noqa: E402
from pretrain.downstream.finetune import finetune  # noqa: E402
from pretrain.threads import add_runtime_arguments, apply_threads  # noqa: E402


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `FinetuneConfig` field (--field-name), its help and default from the field."""
    for f in fields(FinetuneConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default {default})"
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind.startswith("list"):
            parser.add_argument(flag, type=int, nargs="*", default=default, help=text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=default, help=text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="folder written by launch/export.py (or a fine-tuned bundle)")
    parser.add_argument("inputs", nargs="+", help=".h5ad files of raw counts with the labels in obs")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt, bundle/, report.json, confusion.png; "
                                                     "rerunning into it resumes")
    parser.add_argument("--validation", default=None,
                        help="labelled .h5ad of validation cells (default: a stratified --val-fraction of the inputs)")
    config_arguments(parser)
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_threads(args.threads)
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    try:
        report = finetune(args.bundle, args.inputs, args.out, config, validation=args.validation, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps({k: report[k] for k in ("macro_f1", "accuracy", "unassigned", "best_epoch", "epochs_run",
                                             "n_train", "n_val")}, indent=1))


if __name__ == "__main__":
    main()
