"""Cluster the cells of an .h5ad of raw counts with scHybridBERT (pretrain/downstream/hybrid.py): the
bundle's cell embedding fused with a GAT over the Exp-Mah cell graph of a VAE latent.

    python launch/cluster_cells.py BUNDLE INPUT.h5ad --out OUT.h5ad --n-clusters 8
    python launch/cluster_cells.py BUNDLE INPUT.h5ad --out OUT.h5ad --leiden-resolution 1.0 --label-column cell_type

OUT.h5ad is the input plus obs["<name>_cluster"] (and the baselines' obs["<name>_pca50_cluster"],
obs["<name>_embedding_kmeans_cluster"]), obsm["X_<name>"] (the fused representation, unit vectors),
obsm["X_<name>_view_weights"] (per cell, the fusion's weight on the embedding and on the graph) and
obsm["X_<name>_embedding"] (the bundle's cell embedding, as launch/embed.py writes it).
With --label-column the report (printed, in uns["<name>_report"], and at --report) gives ARI and
NMI of scHybridBERT and of the two baselines run alongside: communities (or k-means with
--n-clusters) on PCA-50 of log1p-CP10k, and k-means on the bundle embedding alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

if not __package__:  # run as a script from a checkout (`python launch/X.py`, `deepspeed launch/X.py`): its code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.conversion.fsio import atomic_write_json  # noqa: E402
from data_pipeline.log_setup import add_verbosity_flags, setup_logging  # noqa: E402
from pretrain.downstream.hybrid import HybridConfig, cluster_with_baselines  # noqa: E402
from pretrain.downstream.token_cells import read_token_cells  # noqa: E402
from pretrain.downstream.vae import VAEConfig  # noqa: E402
from pretrain.embed import add_cell_input_arguments, add_encoder_layer_argument, embed_counts  # noqa: E402
from pretrain.embed_output import annotated_copy, check_not_input  # noqa: E402
from pretrain.export import load_pretrained  # noqa: E402
from pretrain.threads import add_runtime_arguments, apply_threads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, v = HybridConfig(), VAEConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="folder written by launch/export.py")
    parser.add_argument("input", help=".h5ad with raw counts in X (or --layer)")
    parser.add_argument("--out", required=True, help="output .h5ad: the input plus the clusters")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--n-clusters", type=int, default=None, help="k-means with this many clusters")
    how.add_argument("--leiden-resolution", type=float, default=1.0,
                     help="without --n-clusters: communities of the 15-nearest-neighbour graph at this resolution "
                          "(Leiden when leidenalg and igraph are installed, else networkx's Louvain; default 1.0)")
    parser.add_argument("--label-column", default=None, help="obs column of known labels: report ARI and NMI")
    parser.add_argument("--name", default="schybrid", help="obs / obsm key prefix (default schybrid)")
    parser.add_argument("--report", default=None, help="also write the report to this JSON file")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seeds the VAE, the fusion, negative sampling, k-means and Louvain/Leiden (default 0)")
    parser.add_argument("--n-top-genes", type=int, default=d.n_top_genes,
                        help=f"highly variable genes for the VAE and the PCA baseline; 0: all (default {d.n_top_genes})")
    parser.add_argument("--graph-neighbors", type=int, default=d.graph_neighbors,
                        help=f"K of the Exp-Mah kNN cell graph, before pruning (default {d.graph_neighbors})")
    parser.add_argument("--sim-alpha", type=float, default=d.sim_alpha,
                        help=f"alpha of the Exp-Mah similarity Rcor ** (alpha * dM), > 0; it scales the edge weights, "
                             f"not which edges the pruned graph keeps (default {d.sim_alpha})")
    parser.add_argument("--vae-steps", type=int, default=v.steps, help=f"VAE optimizer steps (default {v.steps})")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help=f"full-batch steps training the GAT and fusion (default {d.epochs})")
    add_cell_input_arguments(parser)
    add_encoder_layer_argument(parser)
    add_runtime_arguments(parser)
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    if args.n_clusters is not None and args.n_clusters < 1:
        parser.error("--n-clusters must be at least 1")
    return args


def layer_counts(adata, layer: str | None, source: Path):
    """The matrix ``--layer`` names, as the cells were read for the embedding: X, raw.X or a layer."""
    if layer in (None, "X"):
        return adata.X
    if layer in ("raw.X", "raw/X"):
        if adata.raw is None:
            sys.exit(f"--layer {layer}: {source} has no raw; omit --layer to use X, or name one of its layers "
                     f"({', '.join(adata.layers.keys()) or 'none'})")
        return adata.raw.X
    name = layer.removeprefix("layers/")
    if name not in adata.layers:
        sys.exit(f"--layer {layer}: {source} has no such layer (layers: {', '.join(adata.layers.keys()) or 'none'}; "
                 "or X, raw.X)")
    return adata.layers[name]


def main(argv: list[str] | None = None) -> dict:
    import anndata
    import pandas as pd

    args = parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    apply_threads(args.threads)
    source, out = Path(args.input), Path(args.out)
    if out.suffix != ".h5ad":
        sys.exit(f"--out {out}: write an .h5ad (the input plus the clusters)")
    if args.report and not Path(args.report).parent.is_dir():
        sys.exit(f"--report {args.report}: the folder {Path(args.report).parent} does not exist; create it first")
    try:
        check_not_input(source, out)  # and --out's folder exists: found before the work, not after
    except ValueError as e:
        sys.exit(str(e))
    adata = anndata.read_h5ad(source)
    counts = layer_counts(adata, args.layer, source)  # before the embedding: a wrong --layer fails at once
    if args.n_clusters is not None and args.n_clusters > adata.n_obs:
        sys.exit(f"--n-clusters {args.n_clusters}: {source} has only {adata.n_obs} cells; ask for fewer clusters")
    labels = None
    if args.label_column is not None:
        if args.label_column not in adata.obs:
            sys.exit(f"{source}: no obs column {args.label_column!r} (columns: {list(adata.obs.columns)}); "
                     "pass --label-column with one of them, or omit it to cluster without scores")
        labels = adata.obs[args.label_column].to_numpy()
    model = load_pretrained(args.bundle, device=args.device)
    try:
        model.encoder.blocks_through(args.encoder_layer)  # before the cells are read
    except ValueError as e:
        sys.exit(f"--encoder-layer: {e}")
    # gene matching and the coverage check as every command reads cells; the embedding as launch/embed.py's
    cells = read_token_cells(source, model, layer=args.layer, gene_column=args.gene_column,
                             symbol_table=args.symbol_table, min_coverage=args.min_coverage)
    embedding = embed_counts(model, cells.indptr, cells.genes, cells.counts, cells.totals, args.token_budget,
                             device=args.device, encoder_layer=args.encoder_layer)
    coverage = cells.coverage[0]
    config = HybridConfig(n_top_genes=args.n_top_genes, vae=replace(VAEConfig(), steps=args.vae_steps),
                          graph_neighbors=args.graph_neighbors, sim_alpha=args.sim_alpha, epochs=args.epochs,
                          seed=args.seed)
    report, result = cluster_with_baselines(counts, embedding, labels, args.n_clusters, args.leiden_resolution, config)
    report.update(input=str(source), bundle=str(args.bundle), label_column=args.label_column, seed=args.seed,
                  encoder_layer=args.encoder_layer,
                  coverage={k: coverage[k] for k in ("mapped_genes", "input_genes", "count_fraction")})
    name = args.name
    clusters = {column: pd.Categorical(result["clusters"][method].astype(str))
                for method, column in (("schybridbert", f"{name}_cluster"), ("pca50", f"{name}_pca50_cluster"),
                                       ("embedding_kmeans", f"{name}_embedding_kmeans_cluster"))}
    # the input copied as a file with these added, as predict writes its columns (one writer of users' .h5ad)
    annotated_copy(source, out, obs=clusters,
                   obsm={f"X_{name}": result["hybrid"].fused, f"X_{name}_view_weights": result["hybrid"].view_weights,
                         f"X_{name}_embedding": embedding},
                   uns={f"{name}_report": json.dumps(report)})
    if args.report:
        atomic_write_json(args.report, report, indent=1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
