"""Loading: a corpus -> packed, masked training batches.

`loader.CellLoader` streams a `data_pipeline.corpus.Corpus` through the epoch's length-grouped
batches (`epoch_plan`, cut by `batching`: what a cell costs and the one batcher, shared with
embedding and the benchmarks), normalizes values (`normalize`; `normalize_reference` is the plain
reference it is tested against), masks and makes views (`masking`) and packs cells into a
`batch.PackedBatch`. Nothing here imports `data_pipeline.conversion` but the shard reading that
`Corpus` does for it.
"""
