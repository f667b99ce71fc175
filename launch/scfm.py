"""Every job of scfm-pretrain as one command: ``scfm COMMAND [ARGS ...]``.

    scfm convert cells.h5ad --out corpus        scfm pretrain --config tiny data.corpus=corpus run.out=run
    scfm export run --out bundle                scfm embed bundle cells.h5ad --out embedded.h5ad
    scfm demo --out demo                        (all of it on synthetic cells, in minutes on a CPU)

Multi-GPU or multi-node pretraining and fine-tuning run under DeepSpeed's launcher:
``deepspeed --module launch.pretrain --config ...`` (installed) or ``deepspeed launch/pretrain.py ...``
(a checkout).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one line for `scfm --help`). Each subcommand is an existing entry point's
# `main` given the rest of the command line: the data commands are data_pipeline.cli's subcommands,
# the others the modules of launch/ (each also runs as a script and with `python -m`).
DATA = "data_pipeline.cli"
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": (DATA, "count matrices (.h5ad, AnnData zarr, 10x, loom, TileDB-SOMA) -> sparse webdataset corpus (resumable)"),
    "merge": (DATA, "finish a multi-node conversion: shards, statistics, manifest"),
    "verify": (DATA, "re-read every shard of a corpus; check checksums and accounting"),
    "inspect": (DATA, "a corpus summary: cells, tokens, genes per cell, sources"),
    "to-h5ad": (DATA, "write a corpus's cells back as an .h5ad"),
    "synthetic": (DATA, "write a synthetic count matrix (.h5ad) for demos and tests"),
    "pretrain": ("launch.pretrain", "pretrain a model on a corpus (one process; multi-GPU: deepspeed)"),
    "export": ("launch.export", "a run's checkpoint -> a bundle that loads without DeepSpeed"),
    "embed": ("launch.embed", "embed the cells of an .h5ad with a bundle (obsm['X_scfm'])"),
    "finetune": ("launch.finetune", "fine-tune a bundle for cell-type annotation"),
    "predict": ("launch.predict", "annotate cells with a fine-tuned bundle"),
    "cluster": ("launch.cluster_cells", "cluster cells (scHybridBERT) with a bundle"),
    "demo": ("launch.demo", "the whole job on synthetic cells: convert, pretrain, export, embed"),
}


def build_parser() -> argparse.ArgumentParser:
    table = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="scfm", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog=f"commands:\n{table}\n\n`scfm COMMAND --help` shows a command's arguments.")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    module_name = COMMANDS[args.command][0]
    module = importlib.import_module(module_name)  # only the chosen command's imports are paid
    if module_name == DATA:
        result = module.main([args.command, *args.args], prog="scfm")
    else:
        # the launch parsers take their name from sys.argv[0]: make usage and errors say `scfm embed`
        sys.argv[0] = f"scfm {args.command}"
        result = module.main(args.args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
