"""Expression normalization of raw-count cells, vectorized over a block of cells (CSR).

Input: cells as CSR over vocabulary tokens (``indptr`` [n+1], ascending ``genes`` [nnz], raw
``counts`` [nnz]) and each cell's ``total_counts`` [n] before vocabulary filtering (what the
corpus stores). Output: the tokens each cell is given to the model and the value of each, in the
order the model sees them. Modes (DESIGN.md, "Normalization modes"):

- ``log1p_bins`` (scBERT, CellLM): ``x = log1p(count / total * target_sum)``, then fixed bins:
  ``bin = 1 + #(edges <= x)`` capped to ``n_bins - 1``; bin 0 is left for zero expression (a
  model that also embeds zero genes uses it). Default edges 1, 2, ..., n_bins - 2: scBERT's
  ``floor(x)`` capped, shifted by one.
- ``quantile_bins`` (scGPT): per cell, edges = ``np.quantile(x, linspace(0, 1, n_bins - 1))``
  of its nonzero ``x`` and ``bin = np.digitize(x, edges)`` (1 ... n_bins - 1), exactly as
  scGPT's binning of log1p-normalized values (without its optional random tie-breaking).
- ``rank`` (Geneformer): ``v = count / total * target_sum / median[gene]``, genes without a
  median dropped, tokens sorted by descending ``v`` (ties: ascending token, i.e. stable) and
  truncated to ``max_genes``; the value is the rank (0 = highest).
- ``continuous`` (scFoundation-style): ``x`` itself, float32.

Genes are kept in ascending token order except in rank mode. ``max_genes`` caps a cell: a random
subset (order kept, from the caller's generator) except in rank mode, which keeps the top ranks.
The plain per-cell definitions these are tested against live in `normalize_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

MODES = ("log1p_bins", "quantile_bins", "rank", "continuous")


@dataclass(frozen=True)
class Normalization:
    """How cells become model input. ``medians`` (rank mode): nonzero median of
    ``count / total * target_sum`` per token, NaN where unknown (from ``stats.zarr``, which a
    CellLoader fills in when None, or a Geneformer median dictionary, see `medians_for_vocab`)."""

    mode: str = "log1p_bins"
    n_bins: int = 51
    bin_edges: tuple[float, ...] | None = None
    target_sum: float = 1e4
    max_genes: int | None = None
    medians: np.ndarray | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"normalization mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode in ("log1p_bins", "quantile_bins") and self.n_bins < 3:
            raise ValueError(f"n_bins={self.n_bins}: binned modes need at least 3 (bin 0 is zero expression)")
        if self.max_genes is not None and self.max_genes < 1:
            raise ValueError(f"max_genes={self.max_genes} must be >= 1 (or None for no cap)")

    @property
    def edges(self) -> np.ndarray:
        """Fixed bin edges of ``log1p_bins`` (ascending).  [n_bins - 2] float64"""
        if self.bin_edges is not None:
            return np.asarray(self.bin_edges, np.float64)
        return np.arange(1, self.n_bins - 1, dtype=np.float64)

    @property
    def value_dtype(self):
        return np.float32 if self.mode == "continuous" else np.int64


@dataclass
class Normalized:
    """Normalized cells as CSR in model order: ``indptr`` [n+1] int64, ``genes`` [m] int64,
    ``values`` [m] (int64 bins / ranks, or float32 for continuous)."""

    indptr: np.ndarray
    genes: np.ndarray
    values: np.ndarray


def log1p_cp10k(counts: np.ndarray, indptr: np.ndarray, total_counts: np.ndarray,
                target_sum: float = 1e4) -> np.ndarray:
    """``log1p(count / total * target_sum)`` per nonzero, float64 (the one formula every mode and
    reference uses, so that they agree bit for bit).  [nnz]"""
    per_entry_total = np.repeat(np.asarray(total_counts, np.float64), np.diff(indptr))
    return np.log1p(np.asarray(counts, np.float64) / per_entry_total * target_sum)


def normalize(norm: Normalization, indptr, genes, counts, total_counts,
              rng: np.random.Generator | None = None) -> Normalized:
    """Normalize a block of cells (see the module docstring); ``rng`` draws the random subsets of
    cells over ``max_genes`` (not needed in rank mode)."""
    indptr = np.asarray(indptr, np.int64)
    genes = np.asarray(genes, np.int64)
    if norm.mode == "rank":
        if norm.medians is None:
            raise ValueError("rank mode needs per-token nonzero medians: pass medians= (a CellLoader "
                             "takes them from the corpus's stats.zarr; see also medians_for_vocab)")
        return _rank(norm, indptr, genes, counts, total_counts)
    x = log1p_cp10k(counts, indptr, total_counts, norm.target_sum)
    if norm.mode == "log1p_bins" and norm.bin_edges is None:  # edges 1, 2, ...: counting them is floor
        values = np.minimum(np.floor(x), norm.n_bins - 2).astype(np.int64) + 1
    elif norm.mode == "log1p_bins":
        values = np.minimum(np.searchsorted(norm.edges, x, side="right") + 1, norm.n_bins - 1)
    elif norm.mode == "quantile_bins":
        values = np.empty(len(x), np.int64)
        _quantile_bins(indptr, x, np.linspace(0, 1, norm.n_bins - 1), values)
    else:
        values = x.astype(np.float32)
    if norm.max_genes is not None and np.diff(indptr).max(initial=0) > norm.max_genes:
        if rng is None:
            raise ValueError("max_genes caps cells by a random subset: pass rng=")
        keep = _random_subset(indptr, norm.max_genes, rng)
        indptr = np.concatenate([[0], np.cumsum(np.minimum(np.diff(indptr), norm.max_genes))])
        genes, values = genes[keep], values[keep]
    return Normalized(indptr, genes, values)


@njit(cache=True, nogil=True)
def _quantile_bins(indptr, x, q, out):  # pragma: no cover
    """Per cell: edges = np.quantile(x_cell, q) (numpy's default 'linear' method, its rounding
    included) and out = np.digitize(x_cell, edges)."""
    edges = np.empty(len(q), np.float64)
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        n = hi - lo
        if n == 0:
            continue
        s = np.sort(x[lo:hi])
        for k in range(len(q)):
            vi = (n - 1) * q[k]
            if vi >= n - 1:
                edges[k] = s[n - 1]
                continue
            p = np.int64(np.floor(vi))
            a, b = s[p], s[p + 1]
            t = vi - p
            d = b - a
            edges[k] = b - d * (1 - t) if t >= 0.5 else a + d * t
        for j in range(lo, hi):
            out[j] = np.searchsorted(edges, x[j], side="right")


def choose_within_cells(indptr: np.ndarray, picks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random subset of ``picks[i]`` entries of each cell ``i`` (all of them when it has
    fewer).  [nnz] bool"""
    chosen = np.empty(int(indptr[-1]), np.bool_)
    _selection_sample(np.asarray(indptr, np.int64), np.asarray(picks, np.int64), rng.random(len(chosen)), chosen)
    return chosen


@njit(cache=True, nogil=True)
def _selection_sample(indptr, picks, u, chosen):  # pragma: no cover
    """Knuth's selection sampling (Algorithm S): one pass, one uniform per entry; entry j of a
    cell is taken with probability (still needed) / (still left), which makes every subset of the
    asked size equally likely."""
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        need = min(picks[i], hi - lo)
        for j in range(lo, hi):
            take = u[j] * (hi - j) < need
            chosen[j] = take
            need -= take


def _random_subset(indptr: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Entry positions keeping a uniform random ``cap`` of each cell's entries (all of a cell with
    at most ``cap``), in their original order.  [sum(min(len, cap))]"""
    return np.flatnonzero(choose_within_cells(indptr, np.full(len(indptr) - 1, cap), rng))


def _rank(norm: Normalization, indptr, genes, counts, total_counts) -> Normalized:
    medians = norm.medians[genes]
    known = np.isfinite(medians) & (medians > 0)
    per_entry_total = np.repeat(np.asarray(total_counts, np.float64), np.diff(indptr))
    v = np.asarray(counts, np.float64) / per_entry_total * norm.target_sum / np.where(known, medians, 1.0)
    cell = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    keep = np.flatnonzero(known)
    # by cell, then descending value, then ascending token (the entries' order: stable)
    order = keep[np.lexsort((-v[keep], cell[keep]))]
    lengths = np.bincount(cell[keep], minlength=len(indptr) - 1)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    rank = np.arange(len(order)) - np.repeat(starts[:-1], lengths)
    if norm.max_genes is not None:
        top = rank < norm.max_genes
        order, rank = order[top], rank[top]
        lengths = np.minimum(lengths, norm.max_genes)
    return Normalized(np.concatenate([[0], np.cumsum(lengths)]), genes[order], rank)


def medians_for_vocab(ensembl_ids: list[str], medians_by_id: dict[str, float]) -> np.ndarray:
    """Per-token medians from an Ensembl id -> median mapping (e.g. Geneformer's median
    dictionary), NaN for tokens it does not list.  [len(ensembl_ids)] float64"""
    return np.array([float(medians_by_id.get(g, np.nan)) for g in ensembl_ids], np.float64)
