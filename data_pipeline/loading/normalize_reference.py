"""Plain per-cell definitions of the normalization modes: one cell at a time, written as the
original models describe them. `normalize` must equal these (``tests/test_normalize.py``).

Each takes one cell's ascending ``genes`` [k], raw ``counts`` [k] and its ``total`` (counts
before vocabulary filtering), and returns ``(genes, values)`` in model order.
"""

from __future__ import annotations

import numpy as np


def _log1p_cp10k(counts, total: float, target_sum: float) -> np.ndarray:
    # the same float64 operations, in the same order, as normalize.log1p_cp10k
    return np.log1p(np.asarray(counts, np.float64) / np.float64(total) * target_sum)


def log1p_bins(genes, counts, total, edges, n_bins, target_sum=1e4):
    """scBERT: log1p(CP10k), bin = floor-like position among fixed edges; 0 left for zeros."""
    x = _log1p_cp10k(counts, total, target_sum)
    out = []
    for v in x:
        b = 1 + sum(1 for e in edges if e <= v)
        out.append(min(b, n_bins - 1))
    return np.asarray(genes), np.array(out, np.int64)


def log2_floor_bins(genes, counts, total, n_bins, target_sum=1e4):
    """scBERT's bins as its code computes them: preprocess.py's ``normalize_total(target_sum=1e4)``
    and ``log1p(base=2)`` (scanpy: ``np.log1p(x) / np.log(2)``), then pretrain.py's integer cast
    (a floor, values being >= 0) capped at ``bin_num`` = ``n_bins - 1``. Low expressed genes get 0."""
    x = _log1p_cp10k(counts, total, target_sum) / np.log(2)
    return np.asarray(genes), np.minimum(np.floor(x), n_bins - 1).astype(np.int64)


def quantile_bins(genes, counts, total, n_bins, target_sum=1e4, uniforms=None):
    """scGPT's binning of a cell's nonzero log1p(CP10k) values (``preprocess.binning``); with
    ``uniforms`` (one U[0, 1) draw per gene) its random tie-breaking (``_digitize(side="both")``)."""
    x = _log1p_cp10k(counts, total, target_sum)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    high = np.digitize(x, edges)
    if uniforms is None:
        return np.asarray(genes), high.astype(np.int64)
    low = np.digitize(x, edges, right=True)
    return np.asarray(genes), np.ceil(np.asarray(uniforms) * (low - high) + high).astype(np.int64)


def continuous(genes, counts, total, target_sum=1e4):
    return np.asarray(genes), _log1p_cp10k(counts, total, target_sum).astype(np.float32)


def raw(genes, counts, total):
    """The counts themselves, as float32 (``total`` unused: no normalization)."""
    return np.asarray(genes), np.asarray(counts).astype(np.float32)


def rank_value(genes, counts, total, medians, max_len, target_sum=1e4):
    """Geneformer's rank-value encoding (``tokenizer.tokenize_cell``): normalize by total counts
    and by each gene's nonzero median, keep genes with a median, sort descending, truncate.
    Ties go to the lower token (Geneformer's unstable argsort leaves them unspecified)."""
    genes = np.asarray(genes)
    med = np.asarray(medians)[genes]
    keep = np.isfinite(med) & (med > 0)
    genes = genes[keep]
    v = np.asarray(counts, np.float64)[keep] / np.float64(total) * target_sum / med[keep]
    order = sorted(range(len(genes)), key=lambda i: (-v[i], genes[i]))[:max_len]
    return genes[order], np.arange(len(order), dtype=np.int64)
