"""scGPT's recipe pieces against direct computations on fresh random inputs: the value MLP over
bin indices, the squared error on masked bins, the per-cell mask ratios 0.25 / 0.5 / 0.75, and the
MVC / GEPC prediction from the cell embedding (bowang-lab/scGPT scgpt/model/model.py,
scgpt/loss.py, scgpt/data_collator.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.loading.masking import Masking, apply_masking
from pretrain.config import ObjectiveConfig, load_config
from pretrain.model import CellModel
from pretrain.model.embeddings import BinValueMLP
from pretrain.objectives import PretrainModule, full_batch_loss, mlm_loss_sum
from tests.model_helpers import generative_reference, one_thread, random_batch, seeded, small_config  # noqa: F401 (autouse fixtures)

SCGPT = dict(bin_embedding="mlp", bin_loss="mse", mvc_head=True, pooling="cls")


def test_bin_value_mlp_is_scgpts_formula_with_the_mask_bin_as_minus_one():
    n_bins, d = 7, 16
    mlp = BinValueMLP(d, mask_bin=n_bins).double()
    bins = torch.randint(0, n_bins + 1, (40,))
    bins[:2] = n_bins
    v = torch.where(bins == n_bins, -1.0, bins.double())[:, None]
    w1, b1, w2, b2 = mlp.linear1.weight, mlp.linear1.bias, mlp.linear2.weight, mlp.linear2.bias
    h = torch.relu(v @ w1.T + b1) @ w2.T + b2
    expected = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = expected * mlp.norm.weight + mlp.norm.bias
    torch.testing.assert_close(mlp(bins), expected, rtol=0, atol=1e-12)


def test_a_fresh_model_gives_different_bins_different_embeddings():
    """With the model's zero-bias init relu(w v) would be proportional to v and the LayerNorm would
    map every nonzero bin to one vector: the MLP keeps torch's default init, as scGPT's."""
    model = CellModel(small_config(**SCGPT))
    out = model.value_embedding(torch.arange(1, 7))
    assert torch.cdist(out, out).triu(1)[torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)].min() > 1e-3


def test_mse_bin_loss_regresses_the_bin_index():
    model = CellModel(small_config(**SCGPT)).double()
    batch = random_batch([5, 9, 3], seed=2)
    out = model(batch)
    assert out.mlm.shape == (int(batch.mlm_mask.sum()),)
    total, count = mlm_loss_sum(out.mlm, batch, model.config.mlm_regresses)
    expected = ((out.mlm - batch.mlm_targets[batch.mlm_mask].double()) ** 2).sum()
    assert count == int(batch.mlm_mask.sum())
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=0)  # the loss is taken in float32


def test_mvc_predicts_each_masked_gene_from_its_cell_embedding():
    model = CellModel(small_config(**SCGPT)).double()
    batch = random_batch([4, 11, 1, 6], seed=3)
    out = model(batch)
    cu = batch.cu_seqlens.tolist()
    expected = []
    for cell, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        for t in range(a, b):
            if batch.mlm_mask[t]:
                e = model.gene_embedding.weight[batch.gene_ids[t]]
                q = model.mvc_query[0]
                query = torch.sigmoid(q.weight @ e + q.bias)
                expected.append((model.mvc_weight.weight @ query) @ out.cells[cell])
    torch.testing.assert_close(out.mvc, torch.stack(expected), rtol=0, atol=1e-12)


def test_full_batch_loss_adds_the_weighted_mvc_error_over_masked_positions():
    objectives = ObjectiveConfig(mlm_weight=1.0, mvc_weight=0.7)
    module = PretrainModule(CellModel(small_config(**SCGPT)).double(), objectives)
    chunks = [random_batch([5, 9], seed=4), random_batch([7], seed=5)]
    loss = full_batch_loss(module, [chunks], objectives, step_seed=3)
    mlm = mvc = n = 0.0
    for chunk in chunks:
        out = module.model(chunk)
        target = chunk.mlm_targets[chunk.mlm_mask].double()
        mlm, mvc, n = mlm + ((out.mlm - target) ** 2).sum(), mvc + ((out.mvc - target) ** 2).sum(), n + len(target)
    torch.testing.assert_close(loss.double(), (mlm + 0.7 * mvc) / n, rtol=1e-6, atol=0)


def test_mask_ratios_are_drawn_per_cell_from_the_list():
    lengths = np.full(300, 40)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    values = np.random.default_rng(0).integers(1, 51, int(indptr[-1]))
    masking = Masking(mask_prob=1.0, random_prob=0.0, ratios=(0.25, 0.5, 0.75))
    out, mlm, _ = apply_masking(masking, indptr, values, 51, (1, 51), np.random.default_rng(1))
    per_cell = np.add.reduceat(mlm, indptr[:-1])
    assert set(per_cell.tolist()) == {10, 20, 30}
    assert (out[mlm] == 51).all() and (out[~mlm] == values[~mlm]).all()
    again = apply_masking(masking, indptr, values, 51, (1, 51), np.random.default_rng(1))[1]
    assert np.array_equal(mlm, again)  # drawn from the loader's seeded generator: a resume sees the same
    # a ratio of 0 in the list masks nothing in the cells that draw it (it masked one gene)
    with_zero = Masking(mask_prob=1.0, random_prob=0.0, ratios=(0.0, 0.5))
    mlm = apply_masking(with_zero, indptr, values, 51, (1, 51), np.random.default_rng(2))[1]
    assert set(np.add.reduceat(mlm, indptr[:-1]).tolist()) == {0, 20}


def test_scgpt_preset_and_its_refusals():
    config = load_config(overrides=["preset=scgpt"])
    m = config.model
    assert (m.bin_embedding, m.bin_loss, m.mvc_head, config.objectives.mvc_weight) == ("mlp", "mse", True, 1.0)
    assert config.input_masking().ratios == (0.25, 0.5, 0.75)
    with pytest.raises(ValueError, match="model.mvc_head=true"):
        load_config(overrides=["objectives.mvc_weight=1"])
    with pytest.raises(ValueError, match="model.bin_loss"):
        load_config(overrides=["model.bin_loss=l1"])
    with pytest.raises(ValueError, match="mask ratios"):
        load_config(overrides=["data.mask_ratios=[0.5, 1.5]"])


def test_generative_sdpa_equals_attention_under_an_explicit_mask_matrix():
    """Per sequence, softmax(q k^T / sqrt(D)) restricted by M[i, j] = known[j] or i == j (float64)."""
    from pretrain.model.attention import sdpa

    g = torch.Generator().manual_seed(7)
    lengths = [1, 6, 3, 9]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    t, h, d = int(cu[-1]), 2, 4
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    known = torch.rand(t, generator=g) < 0.5
    out = sdpa(q, k, v, cu, max(lengths), known=known)
    torch.testing.assert_close(out, generative_reference(q, k, v, cu, known), rtol=0, atol=1e-12)


def test_generative_model_keeps_unknown_genes_apart_and_refuses_other_backends():
    """Known genes (and <cls>) never see a masked gene; a masked gene sees no other masked gene."""
    model = CellModel(small_config(attention="sdpa", attention_mask="generative")).double()
    batch = random_batch([12, 7], seed=8)
    masked = batch.mlm_mask.nonzero().flatten()
    assert len(masked) >= 2
    out = model(batch)
    changed = random_batch([12, 7], seed=8)
    changed.gene_ids[masked[1:]] = 3 + (changed.gene_ids[masked[1:]] - 2) % 61  # other genes at the others
    out2 = model(changed)
    torch.testing.assert_close(out2.tokens[~batch.mlm_mask], out.tokens[~batch.mlm_mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(out2.cells, out.cells, rtol=0, atol=1e-12)
    torch.testing.assert_close(out2.tokens[masked[0]], out.tokens[masked[0]], rtol=0, atol=1e-12)
    assert not torch.allclose(out2.tokens[masked[1]], out.tokens[masked[1]])
    full = CellModel(small_config(attention="sdpa")).double()
    assert not torch.allclose(full(changed).cells, full(batch).cells)  # without the mask they do see them
    with pytest.raises(ValueError, match="model.attention=sdpa, flash or varlen"):
        small_config(attention="favor", attention_mask="generative").validate()
    for backend in ("flash", "varlen"):  # the two-pass kernels (tests/test_attention_backends.py)
        small_config(attention=backend, attention_mask="generative").validate()
