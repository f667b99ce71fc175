"""Masked-expression targets and augmented views, vectorized over cells stored as CSR.

``Masking``: per cell, ``round(ratio * length)`` positions (at least one) are chosen uniformly;
their targets are kept, and their inputs replaced BERT-style: by the mask id with probability
``mask_prob``, by a random id with ``random_prob``, else left as they are. The target is the
expression value (bin or continuous value) or, in rank mode, the gene token (Geneformer).
With ``nonzero_only`` (scBERT) only entries whose bin is not 0 are eligible and a cell gets
``ceil(ratio * eligible)`` of them (none when it has none), as scBERT's pretrain.py does
(``MASK_IGNORE_TOKEN_IDS = [0]``, ``get_mask_subset_with_prob``); scBERT's recipe is
``Masking(0.15, mask_prob=0.9, random_prob=0.0, nonzero_only=True)`` (its ``replace_prob`` 0.9,
``RANDOM_TOKEN_PROB`` 0).

With ``ratios`` (scGPT: 0.25, 0.5, 0.75) each cell's ratio is drawn uniformly from them, from the
same generator (so a resumed loader draws the same ones); scGPT's DataCollator draws one per batch
(``get_mlm_probability``), which a loader that masks a megabatch before cutting it into batches
cannot do: per cell, every batch mixes the three ratios.

With ``zero_prob`` (scFoundation's ``zero_mask_prob`` 0.03) each unexpressed vocabulary gene of a
cell is also masked with that probability, as an extra token of input 0 and target 0
(`zero_masking`; continuous normalization only, for a model that never reads masked inputs).

``Views``: two views of each cell for contrastive learning, from its raw counts: each gene
dropped with probability ``gene_dropout``, and reads kept with a probability drawn per view from
``[min_depth, 1]`` (binomial downsampling). Genes left with no count are dropped; a view keeps at
least its cell's highest-count gene. A view's total counts scale by the fraction of reads kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .normalize import CONTINUOUS_MODES, choose_within_cells


@dataclass(frozen=True)
class Masking:
    ratio: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    nonzero_only: bool = False
    ratios: tuple[float, ...] = ()  # one drawn per cell, in place of ``ratio`` (scGPT)
    zero_prob: float = 0.0  # share of unexpressed genes masked too, as extra tokens (`zero_masking`)

    def __post_init__(self):
        if not 0 <= self.zero_prob <= 1:
            raise ValueError(f"the share of unexpressed genes masked ({self.zero_prob}) must be in [0, 1]")
        if any(not 0 <= r <= 1 for r in self.ratios):
            raise ValueError(f"mask ratios {list(self.ratios)} must each be in [0, 1]")
        if not 0 <= self.ratio <= 1 or self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
            raise ValueError("masking needs 0 <= ratio <= 1 and mask_prob + random_prob <= 1 (both >= 0)")


@dataclass(frozen=True)
class Views:
    gene_dropout: float = 0.1
    min_depth: float = 0.5

    def __post_init__(self):
        if not 0 <= self.gene_dropout < 1 or not 0 < self.min_depth <= 1:
            raise ValueError("views need 0 <= gene_dropout < 1 and 0 < min_depth <= 1")


def mask_positions(indptr: np.ndarray, ratio, rng: np.random.Generator) -> np.ndarray:
    """Which entries are masked: ``max(1, round(ratio * length))`` uniform picks per nonempty
    cell (none when ratio is 0).  ratio: a float, or one per cell [n_cells].  [nnz] bool"""
    lengths = np.diff(indptr)
    if np.ndim(ratio) == 0 and ratio == 0:
        return np.zeros(int(indptr[-1]), bool)
    picks = np.maximum(1, np.rint(ratio * lengths).astype(np.int64))
    return choose_within_cells(indptr, np.where(np.asarray(ratio) == 0, 0, picks), rng)  # ratio 0 drawn for a cell


def mask_nonzero_positions(indptr: np.ndarray, values: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """scBERT's choice: ``ceil(ratio * k)`` uniform picks among the ``k`` entries of each cell whose
    value is not 0.  [nnz] bool"""
    eligible = np.flatnonzero(np.asarray(values) != 0)
    per_cell = np.diff(np.searchsorted(eligible, np.asarray(indptr, np.int64)))
    sub_ptr = np.concatenate([[0], np.cumsum(per_cell)])
    mlm = np.zeros(len(values), bool)
    mlm[eligible[choose_within_cells(sub_ptr, np.ceil(ratio * per_cell).astype(np.int64), rng)]] = True
    return mlm


def apply_masking(masking: Masking, indptr, inputs: np.ndarray, mask_id, random_ids: tuple,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(new inputs, mlm_mask, targets)``: ``targets`` is ``inputs`` itself (unchanged;
    meaningful where ``mlm_mask``); masked inputs become ``mask_id``, or a random draw from
    ``random_ids = (low, high)`` (ints in [low, high), or floats uniform in it), or stay."""
    ratio = masking.ratio
    if masking.ratios:
        ratio = np.asarray(masking.ratios, np.float64)[rng.integers(0, len(masking.ratios), len(indptr) - 1)]
    if masking.nonzero_only:
        mlm = mask_nonzero_positions(indptr, inputs, ratio, rng)
    else:
        mlm = mask_positions(indptr, ratio, rng)
    targets = inputs
    out = inputs.copy()
    where = np.flatnonzero(mlm)
    u = rng.random(len(where))
    # the masked entries in order: u < mask_prob -> mask_id, u in [mask_prob, mask_prob + random_prob)
    # -> the next random draw, else kept; written in one pass (`_replace`)
    n_random = int(np.count_nonzero((u >= masking.mask_prob) & (u < masking.mask_prob + masking.random_prob)))
    low, high = random_ids
    if np.issubdtype(out.dtype, np.integer):
        random = rng.integers(low, high, n_random).astype(out.dtype, copy=False)
    else:
        random = rng.uniform(low, high, n_random).astype(out.dtype, copy=False)
    _replace(out, where, u, masking.mask_prob, masking.mask_prob + masking.random_prob,
             out.dtype.type(mask_id), random)
    return out, mlm, targets


@njit(cache=True, nogil=True)
def _replace(out, where, u, mask_below, random_below, mask_id, random):  # pragma: no cover
    r = 0
    for k in range(len(where)):
        if u[k] < mask_below:
            out[where[k]] = mask_id
        elif u[k] < random_below:
            out[where[k]] = random[r]
            r += 1


def mask_for_mode(masking: Masking, mode: str, n_bins: int, indptr, genes: np.ndarray, values: np.ndarray,
                  mask_token: int, gene_tokens: tuple[int, int], rng: np.random.Generator):
    """Masked expression in each normalization ``mode``'s convention: rank mode masks and predicts
    the gene token (Geneformer; random draws from ``gene_tokens = (first, end)``); continuous and raw mask
    the value with -1; bins mask with the extra bin ``n_bins`` and draw random bins in [1, n_bins).
    -> (genes, values, mlm_mask, targets), inputs after masking."""
    if masking.nonzero_only and mode not in ("log1p_bins", "log2_floor_bins", "quantile_bins"):
        raise ValueError(f"masking nonzero_only (scBERT) skips bin 0, which normalization {mode} does not have: "
                         "use a binned normalization or set data.mask_nonzero_only=false")
    if mode == "rank":
        genes, mlm, targets = apply_masking(masking, indptr, genes, mask_token, gene_tokens, rng)
    elif mode in CONTINUOUS_MODES:
        values, mlm, targets = apply_masking(masking, indptr, values, -1.0, (0.0, float(values.max(initial=1.0))), rng)
    else:
        values, mlm, targets = apply_masking(masking, indptr, values, n_bins, (1, n_bins), rng)
    return genes, values, mlm, targets


def make_views(views: Views, indptr, genes, counts, total_counts, rng: np.random.Generator):
    """Two views of each cell, interleaved (view 0 of cell i is row 2i, view 1 is 2i+1): CSR
    ``(indptr [2n+1], genes, counts, total_counts [2n])`` of raw counts. Integer counts are
    thinned binomially; float ones (a corpus converted with --allow-non-integer) are scaled by
    the view's depth instead."""
    n = len(indptr) - 1
    indptr = np.asarray(indptr, np.int64)
    counts = np.asarray(counts)
    depth = rng.uniform(views.min_depth, 1.0, (n, 2))
    integer = np.issubdtype(counts.dtype, np.integer)
    if not integer:
        counts = counts.astype(np.float64, copy=False)
    out_ptr = np.empty(2 * n + 1, np.int64)
    out_genes = np.empty(2 * int(indptr[-1]), np.asarray(genes).dtype)
    out_counts = np.empty(2 * int(indptr[-1]), np.int64 if integer else np.float64)
    kept_sum = np.empty(2 * n)
    source_sum = np.empty(n)
    uniforms = rng.random(2 * int(indptr[-1]))
    _views(indptr, genes, counts, integer, depth, views.gene_dropout, uniforms, int(rng.integers(1 << 62)), out_ptr,
           out_genes, out_counts, kept_sum, source_sum)
    m = out_ptr[-1]
    if not integer:  # float sums as numpy adds them (integer ones are exact in any order)
        source_sum = np.add.reduceat(counts, indptr[:-1]) if n and indptr[-1] else np.zeros(n)
    source_sum = np.where(np.diff(indptr) > 0, source_sum, 1.0)
    total = np.repeat(np.asarray(total_counts, np.float64), 2) * kept_sum / np.repeat(source_sum, 2)
    return out_ptr, out_genes[:m], out_counts[:m], total


_TABLE_COUNTS = 32  # counts up to this are drawn from a per-cell table with one uniform


@njit(cache=True, nogil=True)
def _views(indptr, genes, counts, integer, depth, dropout, uniforms, seed, out_ptr, out_genes, out_counts,
           kept_sum, source_sum):  # pragma: no cover
    """Per cell and view: drop each gene with probability ``dropout``, else thin its count to
    Binomial(count, depth); keep the genes left with a count (at least the cell's first
    highest-count gene), in order. ``uniforms`` [2 nnz] from the caller's generator; counts above
    ``_TABLE_COUNTS`` use numba's binomial, seeded with ``seed``: reproducible. ``source_sum``:
    each cell's count sum (as float64; integer counts only).

    Dropout and thinning together give count k with probability ``d [k=0] + (1-d) pmf(k)``; for
    counts up to ``_TABLE_COUNTS`` (nearly all) that distribution's CDF is tabulated per cell and
    view, the rows of the counts the cell has (all rows stepped together: each row's recurrence is
    a chain of dependent divisions), so an entry costs one uniform and a short walk. Counts up to 4
    (most entries) take no branch on their draw: the kept count is how many of the row's first 4
    entries the uniform reaches (the row is nondecreasing; its entries from the count on are 1,
    above any uniform), and every entry is written at the output's end, which moves on only when
    the entry keeps a count."""
    np.random.seed(seed)
    cdf = np.ones((_TABLE_COUNTS + 1, _TABLE_COUNTS + 1))
    row_of = np.empty(_TABLE_COUNTS + 1, np.int64)  # the small counts present in the cell, ascending
    seen = np.zeros(_TABLE_COUNTS + 1, np.bool_)
    pmf = np.empty(_TABLE_COUNTS + 1)
    acc = np.empty(_TABLE_COUNTS + 1)
    o = 0
    d = 0
    out_ptr[0] = 0
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        top = lo
        s = 0.0
        for j in range(lo, hi):
            c = counts[j]
            if c > counts[top]:
                top = j
            s += np.float64(c)
            if integer and c <= _TABLE_COUNTS:
                seen[np.int64(c)] = True
        source_sum[i] = s
        rows = 0
        for c in range(_TABLE_COUNTS + 1):
            if seen[c]:
                row_of[rows] = c
                rows += 1
                seen[c] = False
        for v in range(2):
            p = depth[i, v]
            q = 1.0 - p
            ratio = p / q if q > 0 else 0.0
            # the CDF rows of the counts present: the recurrence of each row is one chain of
            # dependent operations; stepping all rows together lets them overlap
            for r in range(rows):
                pmf[r] = q ** row_of[r]
                acc[r] = 0.0
                cdf[row_of[r], row_of[r]] = 1.0
            first = 0
            for k in range(row_of[rows - 1] if rows else 0):
                while row_of[first] <= k:
                    first += 1
                for r in range(first, rows):
                    ci = row_of[r]
                    acc[r] += pmf[r]
                    cdf[ci, k] = dropout + (1.0 - dropout) * acc[r]
                    pmf[r] = pmf[r] * (ci - k) / (k + 1) * ratio if q > 0 else (1.0 if k + 1 == ci else 0.0)
            start = o
            total = 0.0
            for j in range(lo, hi):
                c = counts[j]
                u = uniforms[d]
                d += 1
                if integer and c <= _TABLE_COUNTS:
                    ci = np.int64(c)
                    if ci <= 4:  # u < 1 <= cdf[ci, t] for t >= ci: count the entries u passes, no branch
                        k = (np.int64(u >= cdf[ci, 0]) + np.int64(u >= cdf[ci, 1]) + np.int64(u >= cdf[ci, 2])
                             + np.int64(u >= cdf[ci, 3]))
                    else:
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
                out_genes[o] = genes[j]
                out_counts[o] = kept
                total += kept
                o += kept > 0
            if o == start and hi > lo:  # never an empty view
                out_genes[o] = genes[top]
                out_counts[o] = 1.0 if integer else counts[top] * p
                total += out_counts[o]
                o += 1
            kept_sum[2 * i + v] = total
            out_ptr[2 * i + v + 1] = o
