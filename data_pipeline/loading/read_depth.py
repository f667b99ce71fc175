"""Read-depth-aware pretraining (xTrimoGene / scFoundation's "RDA"): the model sees a cell at a
lower read depth and reconstructs it at its original depth.

With probability ``probability`` a cell (of at least ``min_total`` counts) is downsampled: a rate
``g ~ Beta(a, b)`` is drawn for the cell, and each of its counts c is thinned to
``Binomial(c, g)``, so that a count is beta-binomial, ``BetaBinomial(c, a, b)``. The counts
outside the vocabulary (the corpus stores each cell's total before vocabulary filtering) are
thinned with the same rate, so the input's total S is the downsampled cell's total, and T (the
stored total) stays the raw cell's. The model's input is the downsampled cell normalized by S;
its masked-expression targets are the original cell normalized by T; genes that lost every read
stay in the input with value 0 (the encoder-decoder's encoder skips them; they can be masked and
predicted like any other).

The released scFoundation code (biomap-research/scFoundation) holds no pretraining data
pipeline: the scheme and its defaults (probability 0.5, Beta(2, 2), cells over 1,000 counts) are
the paper's Methods ("hierarchical Bayesian downsampling") as read here, not checked against code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Downsampling:
    probability: float = 0.5
    beta_a: float = 2.0
    beta_b: float = 2.0
    min_total: float = 1000.0

    def __post_init__(self):
        if not 0 <= self.probability <= 1 or self.beta_a <= 0 or self.beta_b <= 0 or self.min_total < 0:
            raise ValueError(f"read-depth downsampling needs 0 <= probability <= 1, beta a and b > 0 and "
                             f"min_total >= 0 (got {self})")


def downsample(spec: Downsampling, indptr: np.ndarray, counts: np.ndarray, total_counts: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell at a lower depth, with probability ``spec.probability``: CSR ``counts`` [nnz] of n
    cells (``indptr`` [n+1]) and their totals [n] -> (counts [nnz], same entries, zeros where a
    gene lost every read; totals S [n]; rate [n], 1 where a cell was kept as it is). Integer
    counts are thinned binomially; float ones (a corpus converted with --allow-non-integer) are
    scaled by the rate."""
    indptr = np.asarray(indptr, np.int64)
    totals = np.asarray(total_counts, np.float64)
    n = len(indptr) - 1
    chosen = (rng.random(n) < spec.probability) & (totals >= spec.min_total)
    rate = np.where(chosen, rng.beta(spec.beta_a, spec.beta_b, n), 1.0)
    lengths = np.diff(indptr)
    per_entry = np.repeat(rate, lengths)
    counts = np.asarray(counts)
    if np.issubdtype(counts.dtype, np.integer):
        entries = np.repeat(chosen, lengths)
        thinned = counts.copy()
        thinned[entries] = rng.binomial(counts[entries].astype(np.int64), per_entry[entries])
        cell_of_entry = np.repeat(np.arange(n), lengths)

        def sums(x: np.ndarray) -> np.ndarray:  # per cell; a cell without entries sums to 0
            return np.bincount(cell_of_entry, weights=x.astype(np.float64), minlength=n)

        # the reads on genes outside the vocabulary, thinned at the cell's rate too
        outside = np.maximum(np.rint(totals - sums(counts)), 0).astype(np.int64)
        new_totals = sums(thinned) + np.where(chosen, rng.binomial(outside, rate), outside)
    else:
        thinned = (counts * per_entry).astype(counts.dtype)
        new_totals = totals * rate
    # a cell thinned to no reads at all keeps one, so that its normalization is defined
    new_totals = np.where(chosen, np.maximum(new_totals, 1.0), totals)
    return thinned, new_totals, rate
