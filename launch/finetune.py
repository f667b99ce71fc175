"""Fine-tune a bundle for cell-type annotation (a classification head on the cell embedding):

    python launch/finetune.py BUNDLE cells.h5ad [more.h5ad ...] --label-column cell_type --out RUN
    python launch/finetune.py BUNDLE cells.h5ad --label-column cell_type --mode full --encoder-lr-scale 0.1 --out RUN
    python launch/finetune.py BUNDLE train.h5ad --validation held_out.h5ad --label-column cell_type --out RUN

Data-parallel under DeepSpeed (the pretraining engine and checkpoints; --deepspeed.zero_stage,
--deepspeed.bf16, --deepspeed.gradient_clipping as the `deepspeed.*` keys of pretraining):

    deepspeed --num_gpus 8 launch/finetune.py BUNDLE cells.h5ad --label-column cell_type --mode full --out RUN
    torchrun --nproc_per_node 8 launch/finetune.py ...   (on CPUs: gloo, fp32)

RUN gets a checkpoint each epoch (checkpoint.pt in one process; checkpoints/step-NNNNNNNN under a
launcher), and rerunning the same command resumes from it exactly (`--resume auto` of pretraining
is what a rerun does); bundle/ (the fine-tuned bundle: `python launch/predict.py RUN/bundle
cells.h5ad --out annotated.h5ad`), report.json and confusion.png, written by rank 0. --batch-size
is the global batch, split over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from pretrain.config import DeepSpeedConfig, FinetuneConfig  # noqa: E402
from pretrain.downstream.finetune import finetune  # noqa: E402
from pretrain.threads import add_runtime_arguments, apply_threads, use_project_extension_dir  # noqa: E402

# the `deepspeed.*` keys fine-tuning takes (chunks_per_step: one batch per step, --batch-size is global);
# zero_stage, bf16 and overrides act under a launcher only, gradient_clipping in one process too
DEEPSPEED_FLAGS = ("zero_stage", "bf16", "gradient_clipping", "overrides")
# where fine-tuning's meaning differs from pretraining's help text
DEEPSPEED_HELP = {"zero_stage": "ZeRO stage 0-2 (3 is refused: the head and a cell encoder fit on one device)"}


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `FinetuneConfig` field (--field-name), its help and default from the field; the
    `DeepSpeedConfig` fields under their config keys (--deepspeed.zero_stage)."""
    for f in fields(FinetuneConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        if f.name == "deepspeed":
            for sub in fields(DeepSpeedConfig):
                if sub.name not in DEEPSPEED_FLAGS:
                    continue
                _add(parser, f"--deepspeed.{sub.name}", str(sub.type), DEEPSPEED_HELP.get(sub.name, sub.metadata["help"]),
                     getattr(default, sub.name))
        else:
            _add(parser, "--" + f.name.replace("_", "-"), str(f.type), f.metadata["help"], default)


def _add(parser: argparse.ArgumentParser, flag: str, kind: str, help_text: str, default) -> None:
    text = f"{help_text} (default {default})"
    kind = kind.replace(" | None", "")
    if kind == "dict":
        parser.add_argument(flag, type=json.loads, default=default, help=text + " (JSON)")
    elif kind == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    elif kind.startswith("list"):
        parser.add_argument(flag, type=int, nargs="*", default=default, help=text)
    else:
        parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=default, help=text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="folder written by launch/export.py (or a fine-tuned bundle)")
    parser.add_argument("inputs", nargs="+", help=".h5ad files of raw counts with the labels in obs")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt (checkpoints/ under a launcher), bundle/, "
                                                     "report.json, confusion.png; rerunning into it resumes")
    parser.add_argument("--validation", default=None,
                        help="labelled .h5ad of validation cells (default: a stratified --val-fraction of the inputs)")
    config_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # set by a launcher
    setup_logging(args.verbose, args.quiet, rank)
    apply_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if f.name != "deepspeed"}
    deepspeed = {name: getattr(args, f"deepspeed.{name}") for name in DEEPSPEED_FLAGS}
    config = FinetuneConfig(**values, deepspeed=DeepSpeedConfig(**deepspeed))
    use_project_extension_dir()  # before DeepSpeed builds its CPU op (it imports lazily)
    try:
        report = finetune(args.bundle, args.inputs, args.out, config, validation=args.validation, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    if rank == 0:
        print(json.dumps({k: report[k] for k in ("macro_f1", "accuracy", "unassigned", "best_epoch", "epochs_run",
                                                 "n_train", "n_val")}, indent=1))


if __name__ == "__main__":
    main()
