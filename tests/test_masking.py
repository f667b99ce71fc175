"""Masked positions, BERT-style replacement, and augmented views of raw counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_pipeline.loading.masking import Masking, Views, apply_masking, make_views, mask_positions
from data_pipeline.loading.normalize import choose_within_cells


def test_selection_is_uniform_over_subsets():
    indptr = np.arange(0, 4 * 30_001, 4)  # 30,000 cells of 4 entries, choose 2 of each
    chosen = choose_within_cells(indptr, np.full(30_000, 2), np.random.default_rng(0)).reshape(-1, 4)
    assert (chosen.sum(1) == 2).all()
    freq = Counter(map(tuple, chosen.astype(int)))
    assert len(freq) == 6
    for n in freq.values():  # each of the 6 pairs ~5,000 times (sd ~65)
        assert abs(n - 5000) < 300


def test_mask_counts_and_replacement_policy():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, 500)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(1, 51, indptr[-1])
    masking = Masking(ratio=0.2, mask_prob=0.7, random_prob=0.2)
    out, mlm, targets = apply_masking(masking, indptr, values, 51, (1, 51), rng)
    per_cell = np.add.reduceat(mlm, indptr[:-1])
    assert np.array_equal(per_cell, np.maximum(1, np.rint(0.2 * lengths)))
    assert np.array_equal(targets, values) and np.array_equal(out[~mlm], values[~mlm])
    is_mask = out[mlm] == 51
    assert abs(is_mask.mean() - 0.7) < 0.02
    changed = (out[mlm] != values[mlm]) & ~is_mask
    assert 0.15 < changed.mean() < 0.2  # random draws (a few land on the value itself)
    assert not mask_positions(indptr, 0.0, rng).any()
    with pytest.raises(ValueError):
        Masking(mask_prob=0.9, random_prob=0.2)


def test_scbert_masking_picks_nonzero_bins_only_and_never_draws_random_bins():
    """scBERT's pretrain.py: bin 0 is never masked (MASK_IGNORE_TOKEN_IDS = [0]), ceil(0.15 x the
    other positions) are, 90 % of them replaced by the mask token and the rest kept (no random token)."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 300, 400)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    values = np.where(rng.random(indptr[-1]) < 0.4, 0, rng.integers(1, 6, indptr[-1]))
    masking = Masking(0.15, mask_prob=0.9, random_prob=0.0, nonzero_only=True)
    out, mlm, targets = apply_masking(masking, indptr, values, 6, (1, 6), rng)
    assert not mlm[values == 0].any()
    nonzero = np.add.reduceat(values != 0, indptr[:-1]) * (lengths > 0)
    masked = np.add.reduceat(mlm, indptr[:-1]) * (lengths > 0)
    np.testing.assert_array_equal(masked, np.ceil(0.15 * nonzero))
    assert set(np.unique(out[mlm])) <= set(np.unique(values[mlm])) | {6}
    assert np.array_equal(out[mlm] == 6, out[mlm] != values[mlm])  # a masked input is the mask or itself
    assert abs((out[mlm] == 6).mean() - 0.9) < 0.02
    assert np.array_equal(targets, values) and np.array_equal(out[~mlm], values[~mlm])


def test_views_only_drop_and_thin_counts():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 200, 300)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    genes = np.concatenate([np.sort(rng.choice(5000, k, replace=False)) for k in lengths])
    counts = rng.integers(1, 30, indptr[-1])
    totals = np.add.reduceat(counts, indptr[:-1]) * 1.3
    v_ptr, v_genes, v_counts, v_totals = make_views(Views(gene_dropout=0.5, min_depth=0.2), indptr, genes, counts,
                                                    totals, rng)
    assert len(v_ptr) == 2 * len(lengths) + 1
    for i in range(len(lengths)):
        source = dict(zip(genes[indptr[i]:indptr[i + 1]], counts[indptr[i]:indptr[i + 1]]))
        for v in (2 * i, 2 * i + 1):
            g, c = v_genes[v_ptr[v]:v_ptr[v + 1]], v_counts[v_ptr[v]:v_ptr[v + 1]]
            assert len(g) >= 1 and np.all(np.diff(g) > 0) and (c >= 1).all()
            assert all(c_ <= source[g_] for g_, c_ in zip(g, c))
            assert np.isclose(v_totals[v], totals[i] * c.sum() / sum(source.values()))
    kept = v_counts.sum() / (2 * counts.sum())
    assert 0.2 < kept < 0.5  # half the genes dropped, depth ~U(0.2, 1)


def test_views_scale_non_integer_counts():
    indptr = np.array([0, 3, 5])
    counts = np.array([0.5, 2.25, 7.0, 1.5, 3.75])
    ptr, genes, kept, totals = make_views(Views(gene_dropout=0.0, min_depth=0.4), indptr, np.arange(5) + 3,
                                          counts, np.array([20.0, 10.0]), np.random.default_rng(0))
    assert kept.dtype == np.float64 and len(ptr) == 5
    for v in range(4):
        c = kept[ptr[v]:ptr[v + 1]]
        src = counts[indptr[v // 2]:indptr[v // 2 + 1]]
        ratio = c / src[np.searchsorted(np.arange(5) + 3, genes[ptr[v]:ptr[v + 1]]) - indptr[v // 2]]
        assert np.allclose(ratio, ratio[0]) and 0.4 <= ratio[0] <= 1.0  # one depth per view

