"""Data pipeline: raw count matrices -> sparse webdataset corpus -> packed batches.

Two halves: `data_pipeline.conversion` (count matrices -> a corpus folder) and
`data_pipeline.loading` (a corpus -> packed, masked batches), joined by `data_pipeline.corpus`,
the one reader of a corpus folder. The names a training script needs are importable from here:
``from data_pipeline import Corpus, CellLoader, Batching, TokenCost, Masking, Views, Normalization, PackedBatch``.

Commands: ``python -m data_pipeline {convert,merge,verify,inspect,to-h5ad,synthetic}``.
"""

from importlib import import_module

# imported on first use: the converter's CLI never pays for torch
_EXPORTS = {"Corpus": "corpus", "CellLoader": "loading.loader", "Batching": "loading.epoch_plan",
            "Masking": "loading.masking", "Views": "loading.masking", "Normalization": "loading.normalize",
            "PackedBatch": "loading.batch", "TokenCost": "loading.batching"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
