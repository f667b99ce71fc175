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



# --- reference: make_views as it was before its kernel was tuned ---------------------------------

from numba import njit  # noqa: E402


def _make_views_reference(views: Views, indptr, genes, counts, total_counts, rng: np.random.Generator):
    """`make_views` before its kernel was tuned (per-entry branches, rows built on first use), kept
    as the reference its output must equal bit for bit. Two views of each cell, interleaved (view 0 of cell i is row 2i, view 1 is 2i+1): CSR
    ``(indptr [2n+1], genes, counts, total_counts [2n])`` of raw counts. Integer counts are
    thinned binomially; float ones (a corpus converted with --allow-non-integer) are scaled by
    the view's depth instead."""
    n = len(indptr) - 1
    indptr = np.asarray(indptr, np.int64)
    depth = rng.uniform(views.min_depth, 1.0, (n, 2))
    out_ptr = np.empty(2 * n + 1, np.int64)
    out_genes = np.empty(2 * int(indptr[-1]), np.asarray(genes).dtype)
    out_counts = np.empty(2 * int(indptr[-1]), np.float64)
    kept_sum = np.empty(2 * n)
    integer = np.issubdtype(np.asarray(counts).dtype, np.integer)
    uniforms = rng.random(2 * int(indptr[-1]))
    _views_reference(indptr, genes, np.asarray(counts, np.float64), integer, depth, views.gene_dropout, uniforms,
           int(rng.integers(1 << 62)), out_ptr, out_genes, out_counts, kept_sum)
    m = out_ptr[-1]
    source_sum = np.add.reduceat(np.asarray(counts, np.float64), indptr[:-1]) if n and indptr[-1] else np.zeros(n)
    source_sum = np.where(np.diff(indptr) > 0, source_sum, 1.0)
    total = np.repeat(np.asarray(total_counts, np.float64), 2) * kept_sum / np.repeat(source_sum, 2)
    return out_ptr, out_genes[:m], (out_counts[:m].astype(np.int64) if integer else out_counts[:m]), total


_REF_TABLE_COUNTS = 32  # counts up to this are drawn from a per-cell table with one uniform


@njit(cache=True, nogil=True)
def _views_reference(indptr, genes, counts, integer, depth, dropout, uniforms, seed, out_ptr, out_genes, out_counts,
           kept_sum):  # pragma: no cover
    """Per cell and view: drop each gene with probability ``dropout``, else thin its count to
    Binomial(count, depth); keep the genes left with a count (at least the cell's first
    highest-count gene), in order. ``uniforms`` [2 nnz] from the caller's generator; counts above
    ``_REF_TABLE_COUNTS`` use numba's binomial, seeded with ``seed``: reproducible.

    Dropout and thinning together give count k with probability ``d [k=0] + (1-d) pmf(k)``; for
    counts up to ``_REF_TABLE_COUNTS`` (nearly all) that distribution's CDF is tabulated per cell and
    view, a row when its count first occurs, so an entry costs one uniform and a short walk."""
    np.random.seed(seed)
    cdf = np.empty((_REF_TABLE_COUNTS + 1, _REF_TABLE_COUNTS + 1))
    ready = np.zeros(_REF_TABLE_COUNTS + 1, np.bool_)
    o = 0
    d = 0
    out_ptr[0] = 0
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        top = lo
        for j in range(lo, hi):
            if counts[j] > counts[top]:
                top = j
        for v in range(2):
            p = depth[i, v]
            q = 1.0 - p
            ratio = p / q if q > 0 else 0.0
            ready[:] = False
            start = o
            total = 0.0
            for j in range(lo, hi):
                c = counts[j]
                u = uniforms[d]
                d += 1
                if integer and c <= _REF_TABLE_COUNTS:
                    ci = np.int64(c)
                    if not ready[ci]:
                        pmf = q ** ci
                        acc = 0.0
                        for k in range(ci):
                            acc += pmf
                            cdf[ci, k] = dropout + (1.0 - dropout) * acc
                            pmf = pmf * (ci - k) / (k + 1) * ratio if q > 0 else (1.0 if k + 1 == ci else 0.0)
                        cdf[ci, ci] = 1.0
                        ready[ci] = True
                    k = 0
                    while k < ci and u >= cdf[ci, k]:
                        k += 1
                    kept = np.float64(k)
                elif u < dropout:
                    kept = 0.0
                elif integer:
                    kept = np.float64(np.random.binomial(np.int64(c), p))
                else:  # counts of a non-integer corpus are scaled
                    kept = c * p
                if kept > 0:
                    out_genes[o] = genes[j]
                    out_counts[o] = kept
                    total += kept
                    o += 1
            if o == start and hi > lo:  # never an empty view
                out_genes[o] = genes[top]
                out_counts[o] = 1.0 if integer else counts[top] * p
                total += out_counts[o]
                o += 1
            kept_sum[2 * i + v] = total
            out_ptr[2 * i + v + 1] = o


@pytest.mark.parametrize("seed", range(6))
def test_views_equal_the_reference_kernel(seed):
    """The tuned views kernel (CDF rows of a cell's counts built together, branch-free draws for
    counts up to 4, output written unconditionally) gives the reference's views bit for bit, on
    integer counts (small ones from the table, large ones from the binomial), non-integer counts,
    empty cells, no dropout and full depth; and leaves the generator where the reference does."""
    rng = np.random.default_rng(500 + seed)
    lengths = rng.integers(0, 400, 80)
    lengths[:3] = [0, 1, 2]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    genes = np.concatenate([np.sort(rng.choice(6000, k, replace=False)) for k in lengths]).astype(np.int64) + 3
    counts = np.where(rng.random(len(genes)) < 0.8, rng.integers(1, 8, len(genes)), rng.integers(1, 200, len(genes)))
    counts = counts.astype([np.uint16, np.uint32, np.int64][seed % 3])
    if seed == 5:
        counts = counts * 0.5 + 0.25
    totals = np.add.reduceat(counts.astype(np.float64), indptr[:-1]) * 1.2 + 1
    views = [Views(), Views(gene_dropout=0.0, min_depth=0.3), Views(gene_dropout=0.5, min_depth=1.0),
             Views(gene_dropout=0.2, min_depth=0.05)][seed % 4]
    got_rng, want_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    got = make_views(views, indptr, genes, counts, totals, got_rng)
    want = _make_views_reference(views, indptr, genes, counts, totals, want_rng)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    assert got_rng.random() == want_rng.random()
