"""Per-gene corpus statistics, built from mergeable partial results.

For every token id (genes; special tokens stay zero):

- ``nonzero_count``  cells in which the gene is nonzero                       [V] int64
- ``count_sum``      sum of raw counts                                         [V] float64
- ``cp10k_sum``      sum of normalized values ``count / total_counts * 1e4``   [V] float64
- a nonzero-median sketch of the normalized values (Geneformer's rank-value encoding divides by
  each gene's nonzero median of exactly these values; ``total_counts`` is the cell's total before
  vocabulary filtering, as Geneformer uses ``n_counts``).

The sketch is a log-linear histogram over the float32 bit pattern: a value's bucket is its
exponent and the top ``MANTISSA_BITS`` mantissa bits, so a bucket spans a relative width of at
most ``2**-MANTISSA_BITS`` and its midpoint is within ``RELATIVE_ERROR = 2**-(MANTISSA_BITS+1)``
of every value in it. Merging sketches adds bucket counts, so partial results from any number of
workers or nodes merge to exactly the single-pass sketch.

Error bound of ``nonzero_medians()``: with ``lo``/``hi`` the lower/upper middle values of a
gene's sorted nonzero normalized values (equal for an odd count), the estimate ``m`` satisfies
``lo * (1 - RELATIVE_ERROR) <= m <= hi * (1 + RELATIVE_ERROR)``; for an odd count this is a
relative error of at most 2**-8 = 0.39%. (The estimate is the midpoint of the bucket holding
the lower middle value, or, when the two middle values fall in different buckets, the mean of
the two bucket midpoints.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANTISSA_BITS = 7
RELATIVE_ERROR = 2.0 ** -(MANTISSA_BITS + 1)
_SHIFT = 23 - MANTISSA_BITS
_BUCKETS = 1 << (31 - _SHIFT)  # positive float32 values only: sign bit is always 0


def sketch_buckets(values: np.ndarray) -> np.ndarray:
    """Bucket of each positive value.  [n] float -> [n] int64 in [0, _BUCKETS)"""
    return (np.asarray(values, dtype=np.float32).view(np.int32) >> _SHIFT).astype(np.int64)


def bucket_midpoints(buckets: np.ndarray) -> np.ndarray:
    """Midpoint value of each bucket.  [n] int -> [n] float64"""
    b = np.asarray(buckets, dtype=np.int64)
    lo = (b << _SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    hi = ((b + 1) << _SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    return (lo + hi) / 2


@dataclass
class GeneStats:
    """Mergeable per-gene statistics over ``vocab_size`` tokens.

    The sketch is kept sparse: ``sketch_keys`` (sorted, unique; key = token * _BUCKETS + bucket)
    with ``sketch_counts``.
    """

    vocab_size: int
    n_cells: int = 0
    nonzero_count: np.ndarray = field(default=None)
    count_sum: np.ndarray = field(default=None)
    cp10k_sum: np.ndarray = field(default=None)
    sketch_keys: np.ndarray = field(default=None)
    sketch_counts: np.ndarray = field(default=None)
    _pending: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        v = self.vocab_size
        if self.nonzero_count is None:
            self.nonzero_count = np.zeros(v, np.int64)
        if self.count_sum is None:
            self.count_sum = np.zeros(v, np.float64)
        if self.cp10k_sum is None:
            self.cp10k_sum = np.zeros(v, np.float64)
        if self.sketch_keys is None:
            self.sketch_keys = np.zeros(0, np.int64)
            self.sketch_counts = np.zeros(0, np.int64)

    def add_cells(self, genes: np.ndarray, counts: np.ndarray, indptr: np.ndarray,
                  total_counts: np.ndarray) -> None:
        """Add a CSR block of cells: ``genes``/``counts`` [nnz], ``indptr`` [n+1],
        ``total_counts`` [n] (per cell, before vocabulary filtering)."""
        n = len(indptr) - 1
        if n == 0:
            return
        self.n_cells += n
        counts64 = counts.astype(np.float64, copy=False)
        scale = np.repeat(1e4 / np.asarray(total_counts, np.float64), np.diff(indptr))
        normalized = counts64 * scale
        v = self.vocab_size
        self.count_sum += np.bincount(genes, weights=counts64, minlength=v)
        self.cp10k_sum += np.bincount(genes, weights=normalized, minlength=v)
        self._pending.append(genes.astype(np.int64) * _BUCKETS + sketch_buckets(normalized))
        if sum(len(p) for p in self._pending) > (1 << 24):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        keys = np.sort(np.concatenate(self._pending))
        self._pending = []
        starts = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])
        counts = np.diff(np.concatenate([starts, [len(keys)]]))
        self._merge_sketch(keys[starts], counts)

    def _merge_sketch(self, keys: np.ndarray, counts: np.ndarray) -> None:
        if len(self.sketch_keys) == 0:
            self.sketch_keys, self.sketch_counts = keys, counts.astype(np.int64)
        else:
            all_keys = np.concatenate([self.sketch_keys, keys])
            all_counts = np.concatenate([self.sketch_counts, counts])
            order = np.argsort(all_keys, kind="stable")
            all_keys, all_counts = all_keys[order], all_counts[order]
            starts = np.concatenate([[0], np.flatnonzero(all_keys[1:] != all_keys[:-1]) + 1])
            self.sketch_keys = all_keys[starts]
            self.sketch_counts = np.add.reduceat(all_counts, starts)
        # nonzero counts follow from the sketch: every nonzero lands in exactly one bucket
        genes = self.sketch_keys // _BUCKETS
        self.nonzero_count = np.bincount(genes, weights=self.sketch_counts,
                                         minlength=self.vocab_size).astype(np.int64)

    def finalize(self) -> "GeneStats":
        self._flush()
        return self

    def merge(self, other: "GeneStats") -> "GeneStats":
        """Add another partial result in place (sums are added in call order: merge partials in
        a fixed order for bit-identical floats)."""
        if other.vocab_size != self.vocab_size:
            raise ValueError("cannot merge statistics over different vocabularies")
        self.finalize()
        other.finalize()
        self.n_cells += other.n_cells
        self.count_sum += other.count_sum
        self.cp10k_sum += other.cp10k_sum
        if len(other.sketch_keys):
            self._merge_sketch(other.sketch_keys, other.sketch_counts)
        return self

    def nonzero_medians(self) -> np.ndarray:
        """Estimated nonzero median of the normalized values per token (NaN where never nonzero;
        error bound in the module docstring).  [V] float64"""
        self.finalize()
        out = np.full(self.vocab_size, np.nan)
        genes = self.sketch_keys // _BUCKETS
        mids = bucket_midpoints(self.sketch_keys % _BUCKETS)
        bounds = np.searchsorted(genes, np.arange(self.vocab_size + 1))
        cum = np.cumsum(self.sketch_counts)
        for g in np.flatnonzero(self.nonzero_count):
            a, b = bounds[g], bounds[g + 1]
            before = cum[a - 1] if a else 0
            c = cum[a:b] - before
            n = c[-1]
            lo_rank, hi_rank = (n - 1) // 2, n // 2  # 0-based ranks of the middle values
            i = np.searchsorted(c, lo_rank, side="right")
            j = np.searchsorted(c, hi_rank, side="right")
            out[g] = (mids[a + i] + mids[a + j]) / 2
        return out

    # --- storage ---------------------------------------------------------------------------
    def to_npz(self, path: Path) -> None:
        self.finalize()
        with open(path, "wb") as fh:
            np.savez(fh, vocab_size=self.vocab_size, n_cells=self.n_cells,
                     count_sum=self.count_sum, cp10k_sum=self.cp10k_sum,
                     sketch_keys=self.sketch_keys, sketch_counts=self.sketch_counts)

    @classmethod
    def from_npz(cls, path: Path) -> "GeneStats":
        with np.load(path) as z:
            s = cls(int(z["vocab_size"]), int(z["n_cells"]), None, z["count_sum"].copy(),
                    z["cp10k_sum"].copy(), z["sketch_keys"].copy(), z["sketch_counts"].copy())
        s.nonzero_count = np.bincount(s.sketch_keys // _BUCKETS, weights=s.sketch_counts,
                                      minlength=s.vocab_size).astype(np.int64)
        return s

    def to_zarr(self, path: Path) -> None:
        """Write ``stats.zarr`` (zarr v3 group)."""
        import zarr

        self.finalize()
        root = zarr.open_group(str(path), mode="w")
        root.attrs.update({
            "n_cells": int(self.n_cells),
            "vocab_size": int(self.vocab_size),
            "normalized_value": "count / total_counts_before_vocabulary_filter * 1e4",
            "sketch": {"kind": "float32 log-linear histogram", "mantissa_bits": MANTISSA_BITS,
                       "buckets_per_token": _BUCKETS, "relative_error": RELATIVE_ERROR,
                       "key": "token_id * buckets_per_token + bucket"},
        })
        arrays = {
            "nonzero_count": self.nonzero_count, "count_sum": self.count_sum,
            "cp10k_sum": self.cp10k_sum, "nonzero_median": self.nonzero_medians(),
            "sketch_keys": self.sketch_keys, "sketch_counts": self.sketch_counts,
        }
        for name, arr in arrays.items():
            root.create_array(name, data=np.ascontiguousarray(arr))

    @classmethod
    def from_zarr(cls, path: Path) -> "GeneStats":
        import zarr

        root = zarr.open_group(str(path), mode="r")
        s = cls(int(root.attrs["vocab_size"]), int(root.attrs["n_cells"]),
                root["nonzero_count"][...], root["count_sum"][...], root["cp10k_sum"][...],
                root["sketch_keys"][...], root["sketch_counts"][...])
        return s
