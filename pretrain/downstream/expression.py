"""The classical single-cell representations every downstream result is compared with: log1p of
counts per 10k, highly variable genes (scanpy's ``flavor="seurat"``), PCA. Scanpy's default
pipeline is these steps; they are written here (numpy, scipy, pandas, scikit-learn) so that the
baselines need no scanpy install, and tested against a direct computation.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def log1p_cp10k(counts, target_sum: float = 1e4, totals: np.ndarray | None = None) -> sp.csr_matrix:
    """log1p(count / total * target_sum) per cell; ``totals`` [n] (default: the row sums, i.e. over
    the genes given).  counts [n, g] (sparse or dense) -> CSR float64 [n, g]"""
    x = sp.csr_matrix(counts, dtype=np.float64)
    if totals is None:
        totals = np.asarray(x.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags(target_sum / np.maximum(np.asarray(totals, np.float64), 1)) @ x)
    x.data = np.log1p(x.data)
    return x


def highly_variable_genes(log_x, n_top: int = 2000, n_bins: int = 20) -> np.ndarray:
    """Scanpy's ``highly_variable_genes(flavor="seurat", n_top_genes=n_top)`` on log1p data: per
    gene the mean and dispersion (variance / mean, ddof 1) of expm1(x), logs of both, dispersions
    z-scored within ``n_bins`` equal-width bins of log mean (a bin of one gene: z = 1), the genes
    with z at or above the ``n_top``-th highest (ties at the cut-off all kept, as scanpy keeps them;
    a zero-dispersion gene counts as z = 0).  log_x [n, g] -> ascending gene indices"""
    import pandas as pd

    x = sp.csr_matrix(log_x, dtype=np.float64)
    x.data = np.expm1(x.data)
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = (np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2) * n / max(n - 1, 1)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    frame = pd.DataFrame({"mean": np.log1p(mean), "dispersion": np.log(dispersion)})
    frame["bin"] = pd.cut(frame["mean"], bins=n_bins)
    grouped = frame.groupby("bin", observed=False)["dispersion"]
    bin_mean, bin_std = grouped.mean(), grouped.std(ddof=1)
    single = bin_std.isnull()  # one gene in its bin: scanpy sets its z to 1
    bin_std[single], bin_mean[single] = bin_mean[single], 0
    z = ((frame["dispersion"].to_numpy() - bin_mean[frame["bin"]].to_numpy())
         / bin_std[frame["bin"]].to_numpy())
    valid = np.sort(z[~np.isnan(z)])[::-1]
    if not len(valid):
        return np.zeros(0, np.int64)
    cutoff = valid[min(n_top, len(valid)) - 1]  # as scanpy: every gene at the cut-off is kept
    return np.flatnonzero(np.nan_to_num(z) >= cutoff)


def hvg_expression(counts, n_top_genes: int = 2000) -> np.ndarray:
    """log1p-CP10k over all of a cell's genes, kept for the ``n_top_genes`` highly variable ones (every
    gene when 0 or not fewer than the genes given).  counts [n, g] -> float32 [n, HVG]"""
    x = log1p_cp10k(counts)
    genes = highly_variable_genes(x, n_top_genes) if 0 < n_top_genes < x.shape[1] else slice(None)
    return x[:, genes].toarray().astype(np.float32)


def pca(x, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of centred (not scaled) features, scanpy's default.  x [n, g] -> float32 [n, min(k, n - 1, g)]"""
    from sklearn.decomposition import PCA

    dense = x.toarray() if sp.issparse(x) else np.asarray(x, np.float64)
    k = min(n_components, dense.shape[0] - 1, dense.shape[1])  # centred: n cells span n - 1 directions
    return PCA(n_components=k, random_state=seed).fit_transform(dense).astype(np.float32)
