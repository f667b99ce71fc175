"""Embed the cells of an .h5ad of raw counts with an exported bundle:

    python launch/embed.py BUNDLE INPUT.h5ad --out OUT.h5ad     # the input plus obsm["X_<name>"]
    python launch/embed.py BUNDLE INPUT.h5ad --out OUT.zarr     # only the array, for very large inputs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.embed import GENE_CAPS, embed_h5ad  # noqa: E402
from pretrain.export import load_pretrained  # noqa: E402
from pretrain.threads import apply_threads  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="folder written by launch/export.py")
    parser.add_argument("input", help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--out", required=True, help="output .h5ad or .zarr")
    parser.add_argument("--name", default="scfm", help="obsm key suffix: obsm['X_<name>'] (default scfm)")
    parser.add_argument("--layer", default=None, help="take the counts from this layer instead of X")
    parser.add_argument("--min-coverage", type=float, default=0.5,
                        help="refuse inputs with a smaller share of their counts on vocabulary genes (default 0.5)")
    parser.add_argument("--gene-column", default=None,
                        help="var column holding the genes' Ensembl ids or symbols (or 'var_names'); detected if "
                             "omitted, as by `python -m data_pipeline convert`")
    parser.add_argument("--symbol-table", default=None,
                        help="symbol -> Ensembl table (CSV/TSV[.gz] or pickled dict) for symbols; its entries take "
                             "precedence over the bundle vocabulary's own symbols")
    parser.add_argument("--cap", choices=GENE_CAPS, default="auto",
                        help="genes of a long cell the model sees: none (all; the auto choice for FAVOR+ models and "
                             "models trained without data.max_genes), top (its most expressed, up to the trained "
                             "data.max_genes; auto for exact attention, whose memory grows with the square of the "
                             "length), sample (a random subset of that size, seeded by the cell: the training input)")
    parser.add_argument("--token-budget", type=int, default=16384,
                        help="tokens per batch, counted as in training: a cell of a gene_set=all or encoder-decoder "
                             "model costs the full gene set (default 16384)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: the usable cores, by affinity and cgroup quota; "
                             "an OMP_NUM_THREADS in the environment is kept)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)  # torch's default counts the machine's cores, not this process's share
    model = load_pretrained(args.bundle, device=args.device)
    report = embed_h5ad(model, args.input, args.out, name=args.name, layer=args.layer, min_coverage=args.min_coverage,
                        token_budget=args.token_budget, device=args.device, gene_column=args.gene_column,
                        symbol_table=args.symbol_table, cap=args.cap)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
