"""Embed the cells of an .h5ad of raw counts with an exported bundle:

    python launch/embed.py BUNDLE INPUT.h5ad --out OUT.h5ad     # the input plus obsm["X_<name>"]
    python launch/embed.py BUNDLE INPUT.h5ad --out OUT.zarr     # AnnData zarr: obs, var, obsm; no copy of X

Both open with anndata (`read_h5ad` / `read_zarr`); scanpy takes `use_rep="X_<name>"`. The input is
read --chunk-cells rows at a time and the embedding written as it comes: inputs larger than memory
embed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from pretrain.embed import GENE_CAPS, add_cell_input_arguments, add_encoder_layer_argument, embed_h5ad  # noqa: E402
from pretrain.export import load_pretrained  # noqa: E402
from pretrain.threads import add_runtime_arguments, apply_threads  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="folder written by launch/export.py")
    parser.add_argument("input", help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--out", required=True, help="output .h5ad or .zarr")
    parser.add_argument("--name", default="scfm", help="obsm key suffix: obsm['X_<name>'] (default scfm)")
    add_cell_input_arguments(parser)
    parser.add_argument("--chunk-cells", type=int, default=8192,
                        help="cells read and embedded at a time: memory grows with this many cells' counts "
                             "(default 8192)")
    parser.add_argument("--cap", choices=GENE_CAPS, default="auto",
                        help="genes of a long cell the model sees: none (all; the auto choice for FAVOR+ models and "
                             "models trained without data.max_genes), top (its most expressed, up to the trained "
                             "data.max_genes; auto for exact attention, whose memory grows with the square of the "
                             "length), sample (a random subset of that size, seeded by the cell: the training input)")
    add_encoder_layer_argument(parser)
    add_runtime_arguments(parser)
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    apply_threads(args.threads)  # torch's default counts the machine's cores, not this process's share
    try:  # a bundle, input or option refused: one line naming the fix, as export and predict say it
        model = load_pretrained(args.bundle, device=args.device)
        report = embed_h5ad(model, args.input, args.out, name=args.name, layer=args.layer,
                            min_coverage=args.min_coverage, token_budget=args.token_budget, device=args.device,
                            gene_column=args.gene_column, symbol_table=args.symbol_table, cap=args.cap,
                            chunk_cells=args.chunk_cells, encoder_layer=args.encoder_layer)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
