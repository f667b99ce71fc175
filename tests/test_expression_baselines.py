"""The classical baselines (`pretrain.downstream.expression`) against direct computations on
fresh random counts: log1p-CP10k, scanpy's seurat-flavour highly variable genes, PCA."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pretrain.downstream.expression import highly_variable_genes, hvg_expression, log1p_cp10k, pca


def random_counts(seed: int, n: int = 300, g: int = 400) -> np.ndarray:
    """Negative-binomial-like counts: genes of varied means, a quarter of them overdispersed."""
    rng = np.random.default_rng(seed)
    means = rng.lognormal(-1.0, 1.5, g)
    shape = np.where(rng.random(g) < 0.25, 0.3, 20.0)
    rates = rng.gamma(shape, means / shape, size=(n, g))
    counts = rng.poisson(rates)
    counts[:, rng.choice(g, 5, replace=False)] = 0  # unexpressed genes: no dispersion
    return counts


def test_log1p_cp10k_is_the_formula():
    counts = random_counts(0)
    got = log1p_cp10k(sp.csr_matrix(counts)).toarray()
    totals = counts.sum(1, keepdims=True)
    np.testing.assert_allclose(got, np.log1p(counts / np.maximum(totals, 1) * 1e4), rtol=1e-12)
    mixed = sp.csr_matrix(counts, dtype=np.int32)  # as anndata reads some files: int64 indptr, int32 indices
    mixed.indptr, mixed.indices = mixed.indptr.astype(np.int64), mixed.indices.astype(np.int32)
    np.testing.assert_allclose(log1p_cp10k(mixed).toarray(), got, rtol=1e-12)
    other = np.full(len(counts), 1e5)
    np.testing.assert_allclose(log1p_cp10k(counts, totals=other).toarray(), np.log1p(counts / 1e5 * 1e4), rtol=1e-12)


def seurat_reference(log_x: np.ndarray, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Scanpy's seurat flavour written out gene by gene and bin by bin (pandas' cut: equal-width
    bins over [min, max], the lowest edge moved down by 0.1 % of the range, right-closed)."""
    x = np.expm1(log_x)
    g = x.shape[1]
    mean = x.mean(0)
    var = x.var(0, ddof=1)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    disp, logmean = np.log(disp), np.log1p(mean)
    edges = np.linspace(logmean.min(), logmean.max(), n_bins + 1)
    edges[0] -= (logmean.max() - logmean.min()) * 0.001
    which = [next(b for b in range(n_bins) if edges[b] < m <= edges[b + 1]) for m in logmean]
    z = np.full(g, np.nan)
    for b in range(n_bins):
        members = [j for j in range(g) if which[j] == b]
        values = np.array([disp[j] for j in members if not np.isnan(disp[j])])
        for j in members:
            if len(members) == 1:
                z[j] = 1.0 if not np.isnan(disp[j]) else np.nan
            elif len(values) > 1:
                z[j] = (disp[j] - values.mean()) / values.std(ddof=1)
    valid = sorted(z[~np.isnan(z)], reverse=True)
    cutoff = valid[min(n_top, len(valid)) - 1]
    return np.array([j for j in range(g) if (0.0 if np.isnan(z[j]) else z[j]) >= cutoff])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_top", [50, 200])
def test_highly_variable_genes_equal_the_seurat_flavour(seed, n_top):
    log_x = log1p_cp10k(random_counts(seed))
    got = highly_variable_genes(log_x, n_top=n_top)
    np.testing.assert_array_equal(got, seurat_reference(log_x.toarray(), n_top))
    assert len(got) >= n_top  # more where several genes tie at the cut-off (single-gene bins all have z = 1)


def test_highly_variable_genes_find_the_overdispersed_genes():
    rng = np.random.default_rng(5)
    n, g = 400, 300
    means = rng.lognormal(0.0, 1.0, g)
    planted = rng.choice(g, 30, replace=False)
    shape = np.full(g, 50.0)
    shape[planted] = 0.2
    counts = rng.poisson(rng.gamma(shape, means / shape, size=(n, g)))
    got = highly_variable_genes(log1p_cp10k(counts), n_top=30)
    assert len(set(got) & set(planted)) >= 25


def test_pca_is_centred_and_capped_by_the_shape():
    x = np.random.default_rng(1).normal(size=(40, 12)) + 5.0
    out = pca(x, 50)
    assert out.shape == (40, 12) and out.dtype == np.float32 and pca(x[:8], 50).shape == (8, 7)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    centred = x - x.mean(0)
    np.testing.assert_allclose(np.sort(out.var(0, ddof=1))[::-1], np.sort(np.linalg.svd(centred, compute_uv=False) ** 2
                                                               / (len(x) - 1))[::-1][:12], rtol=1e-4)


def test_hvg_expression_keeps_the_highly_variable_genes_of_log1p_cp10k():
    counts = random_counts(3)
    log_x = log1p_cp10k(counts).toarray()
    got = hvg_expression(sp.csr_matrix(counts), 100)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, log_x[:, seurat_reference(log_x, 100)], rtol=1e-6)
    # asked for as many genes as there are, or none: every gene, unexpressed ones included (nothing to rank)
    for n_top in (0, counts.shape[1]):
        np.testing.assert_allclose(hvg_expression(counts, n_top), log_x, rtol=1e-6)
