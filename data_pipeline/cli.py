"""``python -m data_pipeline COMMAND``: convert, merge, verify, inspect, to-h5ad, synthetic."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time

from .conversion.plan import ConvertError, ConvertOptions
from .cores import usable_cores
from .log_setup import add_verbosity_flags, setup_logging

log = logging.getLogger(__name__)


def _size(text: str) -> int:
    """'256M', '1G', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _columns(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _node_from_env(args) -> tuple[int, int]:
    """--num-nodes/--node-rank, else a SLURM array's task id and count."""
    if args.num_nodes is not None or args.node_rank is not None:
        return args.num_nodes or 1, args.node_rank or 0
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        env = os.environ
        first, stride = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        count, rank = int(env["SLURM_ARRAY_TASK_COUNT"]), (int(env["SLURM_ARRAY_TASK_ID"]) - first) // stride
        # an array of independent conversions (one input and output per task) would otherwise wait
        # for "other nodes" that convert something else
        log.info(f"SLURM array task {env['SLURM_ARRAY_TASK_ID']}: node {rank} of {count} sharing this "
                 "conversion (an array of independent conversions: pass --num-nodes 1)")
        return count, rank
    return 1, 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Single-cell count matrices -> sparse webdataset corpus.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert count matrices into a corpus (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("inputs", nargs="+", help=".h5ad files, AnnData .zarr stores, 10x matrix.mtx folders, 10x .h5 files, .loom files, "
                   "TileDB-SOMA experiments (a local experiment folder, or a URI: tiledb://, s3://, file:// ...)")
    c.add_argument("--out", required=True, help="corpus folder to create (or resume)")
    c.add_argument("--matrix", default="X", help="what to read from AnnData inputs: X, raw.X or layers/NAME (.loom: X or a layer NAME)")
    c.add_argument("--soma-measurement", default="RNA", help="SOMA experiments: the measurement to read")
    c.add_argument("--soma-layer", default="raw", help="SOMA experiments: the X layer (raw counts) to read")
    c.add_argument("--soma-filter", help="SOMA experiments: obs value filter choosing the cells, e.g. "
                   "\"is_primary_data == True and disease == 'normal'\" (default: every cell; the others "
                   "are counted as skipped, excluded_by_filter)")
    c.add_argument("--gene-column", help="var column holding gene ids (or 'var_names'); detected if omitted")
    c.add_argument("--symbol-table", help="symbol -> Ensembl table (CSV/TSV[.gz] or pickled dict) for inputs named by symbols")
    c.add_argument("--vocab", help="use this vocabulary (our vocab.tsv or a Geneformer token dictionary .pkl) instead of building one")
    c.add_argument("--min-cells-per-gene", type=int, default=1, help="built vocabulary: keep genes positive in at least N cells")
    c.add_argument("--min-genes", type=int, default=1, help="skip cells with fewer vocabulary genes")
    c.add_argument("--allow-non-integer", action="store_true", help="keep non-integer (normalized) input as float32 instead of refusing it")
    c.add_argument("--label-columns", type=_columns, default=[], help="comma-separated obs columns to carry as labels")
    c.add_argument("--block-cells", type=int, default=1024, help="cells per webdataset sample")
    c.add_argument("--unit-cells", type=int, default=1 << 17, help="most cells per work unit = shard (a multiple of --block-cells)")
    c.add_argument("--shard-size", type=_size, default=64 << 20, help="target shard size (e.g. 64M); a shard is one work unit")
    c.add_argument("--skip-bad-files", action="store_true", help="count unusable input files as skipped instead of stopping")
    c.add_argument("--workers", type=int, default=usable_cores()[0],
                   help="worker processes (default: the cores this process may use, its affinity mask capped by a "
                        "cgroup CPU quota)")
    c.add_argument("--num-nodes", type=int, help="nodes sharing this conversion (default: SLURM array size, else 1)")
    c.add_argument("--node-rank", type=int, help="this node's rank (default: SLURM array index, else 0)")
    c.add_argument("--wait", type=float, default=86400,
                   help="multi-node: seconds to wait for the other nodes' mtx indexes and gene scans (a node that "
                        "failed or was killed stops the wait sooner)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing corpus or unfinished conversion in --out")
    c.add_argument("--keep-work", action="store_true", help="keep the .work folder of per-unit results")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = sub.add_parser("merge", help="build shards, stats and manifest after a multi-node conversion")
    m.add_argument("corpus")
    m.add_argument("--workers", type=int, default=usable_cores()[0],
                   help="threads merging the statistics (default: the cores this process may use)")
    m.add_argument("--keep-work", action="store_true")
    m.add_argument("--no-progress", action="store_true")

    v = sub.add_parser("verify", help="re-read every shard (of a folder or URL); check checksums and accounting")
    v.add_argument("corpus", help="a corpus folder, or its URL (https://, s3://, gs://: streamed from the store)")

    i = sub.add_parser("inspect", help="summary: cells, tokens, genes/cell histogram, sources, coverage")
    i.add_argument("corpus")

    h = sub.add_parser("to-h5ad", help="write corpus cells back as AnnData")
    h.add_argument("corpus")
    h.add_argument("--out", required=True, help="output .h5ad")
    h.add_argument("--limit", type=int, help="only the first N cells")

    s = sub.add_parser("synthetic", help="write a synthetic count matrix (.h5ad) for demos and tests",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output .h5ad (--preset atlas: a folder of .h5ad files)")
    s.add_argument("--preset", choices=("default", "atlas"), default="default",
                   help="atlas: 20 cell types of 5 tissues fitted to real files (depth, genes per cell up to "
                        "~8,000, 28,000 genes), written as many files (see data_pipeline/synthetic_atlas.py)")
    s.add_argument("--cells-per-file", type=int, default=250_000, help="--preset atlas: cells per .h5ad file")
    s.add_argument("--cells", type=int, default=10000)
    s.add_argument("--genes", type=int, default=20000, help="genes (--preset default)")
    s.add_argument("--cell-types", type=int, default=8, help="cell types (--preset default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    for command in sub.choices.values():  # -v/-q after the command, where its other flags go
        add_verbosity_flags(command)
    return p


def _convert(args) -> int:
    from .conversion.convert import convert
    from .conversion.merge import format_report

    options = ConvertOptions(
        inputs=args.inputs, matrix=args.matrix, gene_column=args.gene_column,
        symbol_table=args.symbol_table, vocab=args.vocab, min_cells_per_gene=args.min_cells_per_gene,
        min_genes=args.min_genes, allow_non_integer=args.allow_non_integer,
        label_columns=args.label_columns, block_cells=args.block_cells, unit_cells=args.unit_cells,
        shard_bytes=args.shard_size, skip_bad_files=args.skip_bad_files,
        soma_measurement=args.soma_measurement, soma_layer=args.soma_layer, soma_filter=args.soma_filter)
    num_nodes, node_rank = _node_from_env(args)
    t0 = time.perf_counter()
    timings = {}
    manifest = convert(args.out, options, workers=args.workers, num_nodes=num_nodes, node_rank=node_rank,
                       overwrite=args.overwrite, progress=not args.no_progress,
                       keep_work=args.keep_work, wait_s=args.wait, timings=timings)
    if manifest is None:
        log.info(f"node {node_rank}/{num_nodes}: units done; when every node has finished run "
                 f"`python -m data_pipeline merge {args.out}`")
        return 0
    log.info(format_report(manifest))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    log.info(f"done in {time.perf_counter() - t0:.1f} s ({stages}): {args.out}")
    return 0


def main(argv=None, prog: str | None = None) -> int:
    """``prog``: the command name usage lines show (default: the program's own, e.g. ``scfm-data``;
    ``scfm`` runs these commands as its subcommands)."""
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from .conversion.readers import SourceError
    from .conversion.vocab import VocabError
    from .corpus import CorpusError

    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "merge":
            from .conversion.merge import format_report, merge_corpus

            log.info(format_report(merge_corpus(args.corpus, keep_work=args.keep_work,
                                                progress=not args.no_progress, workers=args.workers)))
            return 0
        if args.command == "verify":
            from .corpus import verify

            problems = verify(args.corpus)
            for line in problems:
                print(f"BAD {line}", file=sys.stderr)
            if problems:
                return 1
            print(f"{args.corpus}: OK")
            return 0
        if args.command == "inspect":
            from .corpus import summary

            print(summary(args.corpus))
            return 0
        if args.command == "to-h5ad":
            from .corpus import to_h5ad

            n = to_h5ad(args.corpus, args.out, args.limit)
            log.info(f"wrote {n:,} cells to {args.out}")
            return 0
        if args.command == "synthetic" and args.preset == "atlas":
            from .synthetic_atlas import write_atlas

            try:
                info = write_atlas(args.out, args.cells, args.cells_per_file, args.seed, progress=not args.no_progress)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            log.info(f"wrote {args.out}: {len(info['files'])} files, {args.cells:,} cells")
            return 0
        if args.command == "synthetic":
            from .synthetic import write_synthetic_h5ad

            info = write_synthetic_h5ad(args.out, args.cells, n_genes=args.genes,
                                        n_cell_types=args.cell_types, seed=args.seed,
                                        progress=not args.no_progress)
            log.info(f"wrote {args.out}: {info}")
            return 0
    except (ConvertError, SourceError, CorpusError, VocabError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        print(f"error: {exc.strerror} while writing{f' {exc.filename}' if exc.filename else ''}: free "
              "disk space (or raise the quota) and rerun the same command; a conversion resumes from "
              "the work units it finished", file=sys.stderr)
        return 2
    return 2
