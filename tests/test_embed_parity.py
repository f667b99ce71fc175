"""What `scfm embed` feeds the model for a cell of an .h5ad is what the training loader fed it for
the same cell of the corpus converted from that file: the genes mapped to the same tokens, the same
total count, the same values. Two owners compute it (the converter + loader, and the embed path),
so drift between them (a gene mapped otherwise, a total over other genes, a stored zero read as an
expressed gene) changes every embedding without failing any test of either side alone."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.conversion.vocab import read_vocab
from data_pipeline.corpus import Corpus
from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig
from pretrain.embed import gene_tokens, model_input, open_cells, token_csr
from pretrain.export import write_bundle
from pretrain.model import CellModel
from tests.corpus_helpers import random_counts, write_h5ad


@pytest.mark.parametrize("mode", ["log1p_bins", "continuous"])
def test_embedding_input_is_the_training_input(tmp_path, mode):
    rng = np.random.default_rng()
    x = random_counts(150, 80, seed=int(rng.integers(1 << 30)), density=0.15)
    x.data[rng.random(x.nnz) < 0.1] = 0  # stored zeros: not expressed genes on either side
    x.data[np.flatnonzero(x.data)[:1]] = 0  # at least one
    source = write_h5ad(tmp_path / "cells.h5ad", x)
    out = tmp_path / "corpus"
    convert(out, ConvertOptions([str(source)], block_cells=32, unit_cells=64), workers=1, progress=False)
    corpus = Corpus(out)
    norm = Normalization(mode=mode, n_bins=7)  # no cap: every expressed gene on both sides

    # training: one epoch of the loader, masking off, by corpus cell
    loader = CellLoader(corpus, normalization=norm, masking=None,
                        batching=Batching(token_budget=4096, megabatch_cells=64))
    trained = {}
    for batch in loader:
        cu = batch.cu_seqlens.tolist()
        for s, cell in enumerate(batch.cell_index.tolist()):
            trained[cell] = (batch.gene_ids[cu[s]:cu[s + 1]].numpy(), batch.values[cu[s]:cu[s + 1]].numpy())
    row_of, total_of = {}, {}
    for first, block in corpus.iter_blocks():
        for i in range(block.n_cells):
            row_of[first + i] = int(block.source_row[i])
            total_of[first + i] = float(block.total_counts[i])
    assert set(trained) == set(row_of) and len(trained) == x.shape[0]

    # embedding: a bundle of that corpus's vocabulary and normalization, the .h5ad read as embed reads it
    vocab = read_vocab(corpus.vocab_path)
    config = ModelConfig(vocab_size=len(vocab), d_model=16, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         value_mode="continuous" if mode == "continuous" else "bins")
    bundle = write_bundle(tmp_path / "bundle", CellModel.initial(config, seed=0).state_dict(), config,
                          corpus.vocab_path.read_bytes(), norm, "# card\n")
    model = CellModel.from_pretrained(bundle)
    with open_cells(source) as cells:
        tokens, _ = gene_tokens(cells.var, model.vocab, str(source))
        indptr, genes, counts, totals = token_csr(cells.read_rows(0, cells.n_cells), tokens, config.vocab_size)
    embedded, _ = model_input(model, indptr, genes, counts, totals, cap="none")

    for cell, (train_genes, train_values) in trained.items():
        r = row_of[cell]
        lo, hi = embedded.indptr[r], embedded.indptr[r + 1]
        np.testing.assert_array_equal(embedded.genes[lo:hi], train_genes, err_msg=f"cell {cell} (row {r})")
        np.testing.assert_allclose(embedded.values[lo:hi], train_values, rtol=1e-6, err_msg=f"cell {cell} (row {r})")
        assert totals[r] == pytest.approx(total_of[cell])
