"""Conversion: count matrices (h5ad, AnnData-zarr, 10x) -> a sharded corpus.

The plan (`plan`: inputs, gene mapping through `vocab` and `gene_ids`, checks in `validate`),
the readers (`readers`, `h5direct`), the per-row work of a worker (`rowkernels`, `buffers`),
the statistics (`stats`), the shard format (`shards`, `arrayfile`), the atomic and
locked file writes (`fsio`), and `convert` / `merge`, which run them. The finished folder is
read and its manifest written only through `data_pipeline.corpus.Corpus`.
"""
