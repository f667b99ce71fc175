"""Masked-expression targets and augmented views, vectorized over cells stored as CSR.

``Masking``: per cell, ``round(ratio * length)`` positions (at least one) are chosen uniformly;
their targets are kept, and their inputs replaced BERT-style: by the mask id with probability
``mask_prob``, by a random id with ``random_prob``, else left as they are. The target is the
expression value (bin or continuous value) or, in rank mode, the gene token (Geneformer).

``Views``: two views of each cell for contrastive learning, from its raw counts: each gene
dropped with probability ``gene_dropout``, and reads kept with a probability drawn per view from
``[min_depth, 1]`` (binomial downsampling). Genes left with no count are dropped; a view keeps at
least its cell's highest-count gene. A view's total counts scale by the fraction of reads kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .normalize import choose_within_cells


@dataclass(frozen=True)
class Masking:
    ratio: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1

    def __post_init__(self):
        if not 0 <= self.ratio <= 1 or self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
            raise ValueError("masking needs 0 <= ratio <= 1 and mask_prob + random_prob <= 1 (both >= 0)")


@dataclass(frozen=True)
class Views:
    gene_dropout: float = 0.1
    min_depth: float = 0.5

    def __post_init__(self):
        if not 0 <= self.gene_dropout < 1 or not 0 < self.min_depth <= 1:
            raise ValueError("views need 0 <= gene_dropout < 1 and 0 < min_depth <= 1")


def mask_positions(indptr: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Which entries are masked: ``max(1, round(ratio * length))`` uniform picks per nonempty
    cell (none when ratio is 0).  [nnz] bool"""
    lengths = np.diff(indptr)
    if ratio == 0:
        return np.zeros(int(indptr[-1]), bool)
    return choose_within_cells(indptr, np.maximum(1, np.rint(ratio * lengths).astype(np.int64)), rng)


def apply_masking(masking: Masking, indptr, inputs: np.ndarray, mask_id, random_ids: tuple,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(new inputs, mlm_mask, targets)``: ``targets`` is ``inputs`` itself (unchanged;
    meaningful where ``mlm_mask``); masked inputs become ``mask_id``, or a random draw from
    ``random_ids = (low, high)`` (ints in [low, high), or floats uniform in it), or stay."""
    mlm = mask_positions(indptr, masking.ratio, rng)
    targets = inputs
    out = inputs.copy()
    where = np.flatnonzero(mlm)
    u = rng.random(len(where))
    to_mask = where[u < masking.mask_prob]
    to_random = where[(u >= masking.mask_prob) & (u < masking.mask_prob + masking.random_prob)]
    out[to_mask] = mask_id
    low, high = random_ids
    if np.issubdtype(out.dtype, np.integer):
        out[to_random] = rng.integers(low, high, len(to_random))
    else:
        out[to_random] = rng.uniform(low, high, len(to_random))
    return out, mlm, targets


def make_views(views: Views, indptr, genes, counts, total_counts, rng: np.random.Generator):
    """Two views of each cell, interleaved (view 0 of cell i is row 2i, view 1 is 2i+1): CSR
    ``(indptr [2n+1], genes, counts, total_counts [2n])`` of raw counts."""
    n = len(indptr) - 1
    lengths = np.diff(indptr)
    counts = np.asarray(counts, np.int64)
    # each view: dropout mask and downsampled counts for every entry of its cell
    rows_i, genes_out, counts_out, totals = [], [], [], []
    depth = rng.uniform(views.min_depth, 1.0, (n, 2))
    top = _argmax_per_cell(indptr, counts)
    cell = np.repeat(np.arange(n), lengths)
    for v in range(2):
        kept = rng.binomial(counts, np.repeat(depth[:, v], lengths))
        kept[rng.random(len(kept)) < views.gene_dropout] = 0
        empty = np.bincount(cell, weights=kept > 0, minlength=n) == 0
        guard = top[empty & (lengths > 0)]
        kept[guard] = np.maximum(kept[guard], 1)  # never an empty view
        keep = kept > 0
        rows_i.append(cell[keep] * 2 + v)
        genes_out.append(np.asarray(genes)[keep])
        counts_out.append(kept[keep])
        frac = np.bincount(cell, weights=kept, minlength=n) / np.maximum(np.bincount(cell, weights=counts, minlength=n), 1)
        totals.append(np.asarray(total_counts, np.float64) * frac)
    rows = np.concatenate(rows_i)
    order = np.argsort(rows, kind="stable")  # genes stay ascending within each view
    new_lengths = np.bincount(rows, minlength=2 * n)
    total = np.empty(2 * n)
    total[0::2], total[1::2] = totals
    return (np.concatenate([[0], np.cumsum(new_lengths)]), np.concatenate(genes_out)[order],
            np.concatenate(counts_out)[order], total)


def _argmax_per_cell(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Entry index of each cell's largest value (first on ties; -1 for an empty cell).  [n]"""
    n = len(indptr) - 1
    lengths = np.diff(indptr)
    cell = np.repeat(np.arange(n), lengths)
    order = np.lexsort((np.arange(len(values)), -values, cell))
    out = np.full(n, -1, np.int64)
    nonempty = lengths > 0
    out[nonempty] = order[indptr[:-1][nonempty]]
    return out
