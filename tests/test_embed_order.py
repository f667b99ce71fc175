"""A cell's embedding depends on the cell alone, not on the other cells of its file (issue 20,
point 5): real PBMC cells (../shared/data; skipped without it), most with more genes than the
model's cap, embedded from a file and from the same file with its rows shuffled (and cut into
other chunks): every cell gets the same embedding. The model is a randomly initialized tiny one,
the normalization caps cells at 64 genes (a random subset, drawn per cell)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig
from pretrain.embed import embed_h5ad
from pretrain.model import CellModel

CAP = 64
N_CELLS = 240


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    source = SHARED_DATA / "h5ad" / "mudan_pbmcA.h5ad"
    if not source.is_file():
        pytest.skip("../shared/data is not present (real-data tests run where it is)")
    full = ad.read_h5ad(source)
    genes = full.var["ensembl_id"]
    keep = (genes.notna() & (genes.astype(str) != "") & ~genes.duplicated()).to_numpy()
    subset = full[:N_CELLS, keep].copy()
    folder = tmp_path_factory.mktemp("cells")
    subset.write_h5ad(folder / "cells.h5ad")
    return folder / "cells.h5ad", subset


def _model(cells_var, mode: str) -> CellModel:
    vocab = Vocabulary.from_genes(list(cells_var["ensembl_id"]), list(cells_var["gene_symbol"]))
    torch.manual_seed(0)
    model = CellModel(ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa",
                                  n_bins=11, dropout=0.0)).eval()
    model.normalization = Normalization(mode=mode, n_bins=11, max_genes=CAP, quantile_ties="random")
    model.vocab = vocab
    return model


@pytest.mark.parametrize("mode", ["log1p_bins", "quantile_bins"])
def test_shuffling_the_file_leaves_every_cells_embedding_unchanged(cells, mode, tmp_path):
    path, subset = cells
    assert (np.diff(subset.X.indptr) > CAP).mean() > 0.9  # nearly every cell is capped: a random subset
    model = _model(subset.var, mode)
    order = np.random.default_rng(1).permutation(N_CELLS)
    shuffled = tmp_path / "shuffled.h5ad"
    subset[order].copy().write_h5ad(shuffled)
    embed_h5ad(model, path, tmp_path / "a.h5ad", progress=False, chunk_cells=100, token_budget=4096, cap="sample")
    embed_h5ad(model, shuffled, tmp_path / "b.h5ad", progress=False, chunk_cells=64, token_budget=1024,
               cap="sample")
    a, b = ad.read_h5ad(tmp_path / "a.h5ad").obsm["X_scfm"], ad.read_h5ad(tmp_path / "b.h5ad").obsm["X_scfm"]
    assert np.isfinite(a).all() and np.abs(a - a[0]).max() > 1e-3  # cells differ
    np.testing.assert_allclose(b, a[order], rtol=0, atol=1e-5)
    # and embedding the same file twice gives the same embeddings (no draw from a global generator)
    embed_h5ad(model, path, tmp_path / "c.h5ad", progress=False, chunk_cells=100, token_budget=4096, cap="sample")
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "c.h5ad").obsm["X_scfm"], a)


def test_embedding_caps_choose_the_genes_the_model_sees(cells):
    """``auto``: an exact-attention model with a trained cap sees each cell's most expressed genes up
    to it; a FAVOR+ model, every gene. ``none`` equals a model without a cap; ``sample`` differs
    from ``top``."""
    from pretrain.embed import embed_counts, embedding_normalization, gene_tokens, token_csr

    _, subset = cells
    model = _model(subset.var, "log1p_bins")
    tokens, _ = gene_tokens(subset.var, model.vocab, "cells")
    csr = token_csr(subset.X[:40], tokens, model.config.vocab_size)
    assert embedding_normalization(model).cap == "top" and embedding_normalization(model).max_genes == CAP
    assert embedding_normalization(model, "none").max_genes is None
    top, sample, none = (embed_counts(model, *csr, cap=c) for c in ("top", "sample", "none"))
    np.testing.assert_array_equal(embed_counts(model, *csr), top)
    assert np.abs(top - sample).max() > 1e-4 and np.abs(top - none).max() > 1e-4
    uncapped = _model(subset.var, "log1p_bins")
    uncapped.load_state_dict(model.state_dict())
    uncapped.normalization = Normalization(mode="log1p_bins", n_bins=11)
    np.testing.assert_allclose(embed_counts(uncapped, *csr, cap="top"), none, rtol=0, atol=1e-6)
    favor = CellModel(ModelConfig(vocab_size=model.config.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                  attention="favor", favor_features=16, n_bins=11, dropout=0.0))
    favor.normalization = model.normalization
    assert embedding_normalization(favor).max_genes is None
    with pytest.raises(ValueError, match="not one of"):
        embedding_normalization(model, "all")
