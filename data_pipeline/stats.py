"""Per-gene corpus statistics, built from mergeable partial results.

For every token id (genes; special tokens stay zero):

- ``nonzero_count``  cells in which the gene is nonzero                       [V] int64
- ``count_sum``      sum of raw counts                                         [V] float64
- ``cp10k_sum``      sum of normalized values ``count / total_counts * 1e4``   [V] float64
- a nonzero-median sketch of the normalized values (Geneformer's rank-value encoding divides by
  each gene's nonzero median of exactly these values; ``total_counts`` is the cell's total before
  vocabulary filtering, as Geneformer uses ``n_counts``).

Explicit zeros in the input CSR are skipped (they are neither counted in ``nonzero_count`` nor
put in the sketch); negative or non-finite counts, out-of-range token ids and non-positive
``total_counts`` of a cell with nonzero counts are rejected with ``ValueError`` before anything
is changed.

The normalized value is computed in float64 as ``count * (1e4 / total_counts)`` and rounded to
float32 for the sketch. The sketch is a log-linear histogram over the float32 bit pattern: a
value's bucket is its exponent and the top ``MANTISSA_BITS`` mantissa bits, so a bucket spans
``[2**e * (1 + k/2**MANTISSA_BITS), 2**e * (1 + (k+1)/2**MANTISSA_BITS))`` and its midpoint is
within ``RELATIVE_ERROR = 2**-(MANTISSA_BITS+1)`` (relative) of every value in it (the worst case
is the lower edge of the ``k = 0`` bucket). Merging sketches adds bucket counts, so partial
results from any number of workers or nodes merge to exactly the single-pass sketch, in any
order. ``nonzero_count`` is exact; ``count_sum``/``cp10k_sum`` are accumulated per gene in cell
order, so they are bit-identical however cells are split into ``add_cells`` calls, and depend
only on the grouping (order) of ``merge`` calls beyond that.

Error bound of ``nonzero_medians()``: let ``lo``/``hi`` be the lower/upper middle values of a
gene's sorted nonzero normalized values (equal for an odd count; the exact median is
``(lo + hi) / 2`` as ``np.median`` defines it for an even count). The estimate is
``(mid(bucket(lo)) + mid(bucket(hi))) / 2`` (the midpoint of the one bucket when both middle
values share it). Each midpoint is within a relative ``RELATIVE_ERROR`` of its value and both
values are positive, so the mean of the two midpoints is within a relative ``RELATIVE_ERROR`` of
``(lo + hi) / 2`` too: for odd and even counts alike,

    |estimate - median| <= RELATIVE_ERROR * median          (2**-8 = 0.39%)

where the values are the float32-rounded normalized values. Against the median of the exact
(float64) normalized values, add float32 rounding (rounding is monotone, so it keeps the middle
ranks): the relative error is at most ``RELATIVE_ERROR + 2**-23``. This holds for values in the
normal float32 range (>= 2**-126, i.e. always for real ``count / total * 1e4``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

MANTISSA_BITS = 7
RELATIVE_ERROR = 2.0 ** -(MANTISSA_BITS + 1)
_SHIFT = 23 - MANTISSA_BITS
_BUCKETS = 1 << (31 - _SHIFT)  # positive float32 values only: sign bit is always 0

# Pending (token, value) pairs are folded into the sparse sketch once there are at least
# max(_FLUSH_MIN, len(sketch)) of them: the fold is linear in the pending pairs plus the sketch,
# so this keeps its amortized cost per nonzero bounded while pending memory stays <= ~8 B/nonzero.
_FLUSH_MIN = 1 << 23
# Hard cap of pending pairs (per-flush counters are int32); larger blocks are added in pieces.
_PENDING_MAX = 1 << 30

_FLT32_MAX = float(np.finfo(np.float32).max)

_ERRORS = {
    1: "indptr must be non-decreasing, start >= 0 and end <= len(genes)",
    2: "token id out of range [0, vocab_size)",
    3: "counts must be finite and >= 0",
    4: "total_counts must be finite and > 0 for a cell with nonzero counts",
    5: "normalized value count / total_counts * 1e4 overflows float32",
}


def sketch_buckets(values: np.ndarray) -> np.ndarray:
    """Bucket of each positive value.  [n] float -> [n] int64 in [0, _BUCKETS)"""
    return (np.asarray(values, dtype=np.float32).view(np.int32) >> _SHIFT).astype(np.int64)


def bucket_midpoints(buckets: np.ndarray) -> np.ndarray:
    """Midpoint value of each bucket.  [n] int -> [n] float64"""
    b = np.asarray(buckets, dtype=np.int64)
    lo = (b << _SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    hi = ((b + 1) << _SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    return (lo + hi) / 2


# --- numba kernels -------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _check_block(genes, counts, indptr, total_counts, vocab_size):  # pragma: no cover - numba
    """0 if the block is valid, else an error code of ``_ERRORS``.  Reads only."""
    n = len(indptr) - 1
    if indptr[0] < 0 or indptr[n] > len(genes):
        return 1
    for i in range(n):
        a = indptr[i]
        b = indptr[i + 1]
        if a > b:
            return 1
        gmin = np.int64(0)
        gmax = np.int64(0)
        bad = False
        cmax = 0.0
        for j in range(a, b):
            g = np.int64(genes[j])
            gmin = min(gmin, g)
            gmax = max(gmax, g)
            c = np.float64(counts[j])
            bad |= not (c >= 0.0)  # also catches NaN
            cmax = max(cmax, c)
        if gmin < 0 or gmax >= vocab_size:
            return 2
        if bad or cmax == np.inf:
            return 3
        if cmax > 0.0:
            t = np.float64(total_counts[i])
            if not (t > 0.0) or t == np.inf:
                return 4
            if cmax * (1e4 / t) > _FLT32_MAX:  # would round to float32 inf (or close to it)
                return 5
    return 0


@intrinsic
def _f32_bits(typingctx, x):  # pragma: no cover - numba
    """Bit pattern of a float32 as int32 (a register bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(cache=True, nogil=True)
def _add_block(genes, counts, indptr, total_counts, nonzero_count, count_sum, cp10k_sum,
               pend_genes, pend_buckets, n_pending):  # pragma: no cover - numba
    """Accumulate a validated block; append its (token, bucket) pairs to the pending buffers
    from ``n_pending`` on.  Returns the new number of pending pairs."""
    p = n_pending
    for i in range(len(indptr) - 1):
        a = indptr[i]
        b = indptr[i + 1]
        if a == b:
            continue
        scale = 1e4 / np.float64(total_counts[i])
        for j in range(a, b):
            c = np.float64(counts[j])
            if c == 0.0:
                continue
            g = genes[j]
            v = c * scale
            count_sum[g] += c
            cp10k_sum[g] += v
            nonzero_count[g] += 1
            pend_genes[p] = g
            pend_buckets[p] = _f32_bits(np.float32(v)) >> _SHIFT
            p += 1
    return p


@njit(cache=True, nogil=True)
def _insertion_sort(a, s, e):  # pragma: no cover - numba
    for i in range(s + 1, e):
        x = a[i]
        j = i - 1
        while j >= s and a[j] > x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


_PART_BITS = 8  # tokens per partition of the two-level counting sort: 2**_PART_BITS
_PART_MASK = (1 << _PART_BITS) - 1
_BUCKET_MASK = _BUCKETS - 1
_DENSE_FACTOR = 16  # per token: dense histogram if bucket range < _DENSE_FACTOR * n + 256


@njit(cache=True, nogil=True)
def _pending_to_sketch(pend_genes, pend_buckets, part, n, vocab_size):  # pragma: no cover - numba
    """Sorted unique sketch keys and their counts of ``n`` pending (token, bucket) pairs.

    Two-level counting sort (cache friendly: few write streams per pass): by token partition
    (``token >> _PART_BITS``) into ``part`` (entries ``(token & _PART_MASK) << 15 | bucket``),
    then within each partition by token. Per token, the buckets are counted in a local dense
    histogram when their range is small against their number, else sorted. The pending buffers
    and ``part`` are scratch afterwards (``pend_genes`` is reused for per-key counts).
    """
    n_parts = (vocab_size + _PART_MASK) >> _PART_BITS
    pstart = np.zeros(n_parts + 1, np.int64)
    for i in range(n):
        pstart[(pend_genes[i] >> _PART_BITS) + 1] += 1
    for q in range(n_parts):
        pstart[q + 1] += pstart[q]
    ppos = pstart[:n_parts].copy()
    for i in range(n):
        g = pend_genes[i]
        q = g >> _PART_BITS
        part[ppos[q]] = np.uint32(((g & _PART_MASK) << 15) | pend_buckets[i])
        ppos[q] += 1

    scratch = pend_buckets  # free now: buckets of one partition, grouped by token
    ucounts = pend_genes  # free now: counts of the unique keys, beside them in ``part``
    n_unique = ppos  # reuse: unique keys per partition
    gstart = np.zeros((1 << _PART_BITS) + 1, np.int64)
    gpos = np.zeros(1 << _PART_BITS, np.int64)
    hist = np.zeros(_BUCKETS, np.int32)
    total = 0
    for q in range(n_parts):
        ps = pstart[q]
        pe = pstart[q + 1]
        gstart[:] = 0
        for i in range(ps, pe):
            gstart[(part[i] >> 15) + 1] += 1
        gstart[0] = ps
        for t in range(1 << _PART_BITS):
            gstart[t + 1] += gstart[t]
        gpos[:] = gstart[:-1]
        for i in range(ps, pe):
            x = part[i]
            t = x >> 15
            scratch[gpos[t]] = x & _BUCKET_MASK
            gpos[t] += 1
        k = ps  # unique keys are written back over the (consumed) partition
        for t in range(1 << _PART_BITS):
            s = gstart[t]
            e = gstart[t + 1]
            m = e - s
            if m == 0:
                continue
            tkey = np.uint32(t << 15)
            if m == 1:
                part[k] = tkey | scratch[s]
                ucounts[k] = 1
                k += 1
                continue
            lo = scratch[s]
            hi = lo
            for j in range(s + 1, e):
                b = scratch[j]
                lo = min(lo, b)
                hi = max(hi, b)
            if np.int64(hi) - np.int64(lo) < _DENSE_FACTOR * m + 256:
                for j in range(s, e):
                    hist[scratch[j]] += 1
                # branchless emission (about half the buckets are empty: branches mispredict);
                # the slots written past the last nonzero bucket are overwritten later or unused
                for b in range(np.int64(lo), np.int64(hi) + 1):
                    c = hist[b]
                    part[k] = tkey | b
                    ucounts[k] = c
                    hist[b] = 0
                    k += c != 0
            else:
                if m <= 32:
                    _insertion_sort(scratch, s, e)
                else:
                    scratch[s:e].sort()
                j = s
                while j < e:
                    b = scratch[j]
                    r = j + 1
                    while r < e and scratch[r] == b:
                        r += 1
                    part[k] = tkey | b
                    ucounts[k] = r - j
                    k += 1
                    j = r
        n_unique[q] = k - ps
        total += k - ps

    keys = np.empty(total, np.int64)
    kcounts = np.empty(total, np.int64)
    o = 0
    for q in range(n_parts):
        ps = pstart[q]
        base = np.int64(q) << _PART_BITS
        for i in range(ps, ps + n_unique[q]):
            x = part[i]
            keys[o] = (base + (x >> 15)) * _BUCKETS + (x & _BUCKET_MASK)
            kcounts[o] = ucounts[i]
            o += 1
    return keys, kcounts


@njit(cache=True, nogil=True)
def _merge_sorted(k1, c1, k2, c2):  # pragma: no cover - numba
    """Merge two sorted unique sparse (key, count) lists, adding counts of equal keys."""
    n1 = len(k1)
    n2 = len(k2)
    i = 0
    j = 0
    common = 0
    while i < n1 and j < n2:
        a = k1[i]
        b = k2[j]
        common += a == b
        i += a <= b
        j += b <= a
    m = n1 + n2 - common
    keys = np.empty(m, np.int64)
    counts = np.empty(m, np.int64)
    i = 0
    j = 0
    q = 0
    while i < n1 and j < n2:
        a = k1[i]
        b = k2[j]
        if a < b:
            keys[q] = a
            counts[q] = c1[i]
            i += 1
        elif b < a:
            keys[q] = b
            counts[q] = c2[j]
            j += 1
        else:
            keys[q] = a
            counts[q] = c1[i] + c2[j]
            i += 1
            j += 1
        q += 1
    while i < n1:
        keys[q] = k1[i]
        counts[q] = c1[i]
        i += 1
        q += 1
    while j < n2:
        keys[q] = k2[j]
        counts[q] = c2[j]
        j += 1
        q += 1
    return keys, counts


def _nonzero_count_from_sketch(keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    out = np.zeros(vocab_size, np.int64)
    np.add.at(out, keys // _BUCKETS, counts)  # exact integer sum (bincount would go via float64)
    return out


class _Workspace:
    """Pending (token, bucket) buffers plus the sort buffer of one ``GeneStats``.

    Freshly allocated memory is expensive (page faults cost more than the passes over it), so a
    finalized ``GeneStats`` gives its workspace back to a small process-wide pool and the next
    one (e.g. the next work unit of a converter worker) reuses it.
    """

    _pool: list = []
    _lock = threading.Lock()
    POOL_SIZE = 2  # workspaces kept
    POOL_MAX_CAPACITY = 1 << 25  # entries (10 B each); larger ones are freed

    def __init__(self):
        self.genes = np.empty(0, np.int32)
        self.buckets = np.empty(0, np.uint16)
        self.part = np.empty(0, np.uint32)

    @classmethod
    def take(cls) -> _Workspace:
        with cls._lock:
            if cls._pool:
                return cls._pool.pop()
        return cls()

    def give_back(self) -> None:
        if len(self.genes) > self.POOL_MAX_CAPACITY:
            return
        with self._lock:
            if len(self._pool) < self.POOL_SIZE:
                self._pool.append(self)

    def reserve(self, size: int, keep: int) -> None:
        cap = len(self.genes)
        if size <= cap:
            return
        new_cap = max(size, min(2 * cap, _PENDING_MAX), 1 << 16)
        genes = np.empty(new_cap, np.int32)
        buckets = np.empty(new_cap, np.uint16)
        genes[:keep] = self.genes[:keep]
        buckets[:keep] = self.buckets[:keep]
        self.genes, self.buckets = genes, buckets

    def part_buffer(self) -> np.ndarray:
        if len(self.part) < len(self.genes):
            self.part = np.empty(len(self.genes), np.uint32)
        return self.part


# --- statistics ----------------------------------------------------------------------------------

@dataclass
class GeneStats:
    """Mergeable per-gene statistics over ``vocab_size`` tokens.

    The sketch is kept sparse: ``sketch_keys`` (sorted, unique; key = token * _BUCKETS + bucket)
    with ``sketch_counts``. ``add_cells`` buffers values; the sketch arrays are up to date after
    ``finalize()`` (which ``merge``, ``nonzero_medians`` and the writers call).
    """

    vocab_size: int
    n_cells: int = 0
    nonzero_count: np.ndarray = field(default=None)
    count_sum: np.ndarray = field(default=None)
    cp10k_sum: np.ndarray = field(default=None)
    sketch_keys: np.ndarray = field(default=None)
    sketch_counts: np.ndarray = field(default=None)
    _ws: _Workspace | None = field(default=None, init=False, repr=False)
    _n_pending: int = field(default=0, init=False, repr=False)

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
        self.nonzero_count = np.ascontiguousarray(self.nonzero_count, np.int64)
        self.count_sum = np.ascontiguousarray(self.count_sum, np.float64)
        self.cp10k_sum = np.ascontiguousarray(self.cp10k_sum, np.float64)
        self.sketch_keys = np.ascontiguousarray(self.sketch_keys, np.int64)
        self.sketch_counts = np.ascontiguousarray(self.sketch_counts, np.int64)

    def add_cells(self, genes: np.ndarray, counts: np.ndarray, indptr: np.ndarray,
                  total_counts: np.ndarray) -> None:
        """Add a CSR block of cells: ``genes``/``counts`` [nnz], ``indptr`` [n+1],
        ``total_counts`` [n] (per cell, before vocabulary filtering).

        The block is validated before anything is changed (``ValueError``, see module doc)."""
        genes = np.asarray(genes)
        counts = np.asarray(counts)
        indptr = np.asarray(indptr)
        total_counts = np.asarray(total_counts)
        n = len(indptr) - 1
        if n <= 0:
            return
        if genes.ndim != 1 or counts.shape != genes.shape or total_counts.shape != (n,):
            raise ValueError("add_cells: genes/counts must be [nnz] and total_counts [n_cells]")
        if genes.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
            raise ValueError("add_cells: genes and indptr must be integer arrays")
        if counts.dtype.kind not in "iuf" or total_counts.dtype.kind not in "iuf":
            raise ValueError("add_cells: counts and total_counts must be numeric")
        err = _check_block(genes, counts, indptr, total_counts, self.vocab_size)
        if err:
            raise ValueError(f"add_cells: {_ERRORS[err]}")
        nnz = int(indptr[-1] - indptr[0])
        if nnz > _PENDING_MAX:  # rare: add in pieces so the pending buffer stays bounded
            if n == 1:
                raise ValueError("add_cells: a single cell with more than 2**30 entries")
            cut = int(np.searchsorted(indptr, indptr[0] + _PENDING_MAX, side="right")) - 1
            cut = max(cut, 1)
            self.add_cells(genes, counts, indptr[:cut + 1], total_counts[:cut])
            self.add_cells(genes, counts, indptr[cut:], total_counts[cut:])
            return
        if self._n_pending + nnz > _PENDING_MAX:
            self._flush()
        self._reserve(self._n_pending + nnz)
        ws = self._ws
        self._n_pending = int(_add_block(genes, counts, indptr, total_counts, self.nonzero_count,
                                         self.count_sum, self.cp10k_sum, ws.genes, ws.buckets,
                                         self._n_pending))
        self.n_cells += n
        if self._n_pending >= max(_FLUSH_MIN, len(self.sketch_keys)):
            self._flush()

    def _reserve(self, size: int) -> None:
        if self._ws is None:
            self._ws = _Workspace.take()
        self._ws.reserve(size, self._n_pending)

    def _flush(self, release: bool = False) -> None:
        n = self._n_pending
        if n:
            ws = self._ws
            keys, counts = _pending_to_sketch(ws.genes, ws.buckets, ws.part_buffer(), n,
                                              self.vocab_size)
            self._n_pending = 0
            self._merge_sketch(keys, counts)
        if release and self._ws is not None:
            self._ws.give_back()
            self._ws = None

    def _merge_sketch(self, keys: np.ndarray, counts: np.ndarray) -> None:
        if len(self.sketch_keys) == 0:
            self.sketch_keys, self.sketch_counts = keys, counts
        elif len(keys):
            self.sketch_keys, self.sketch_counts = _merge_sorted(
                self.sketch_keys, self.sketch_counts,
                np.ascontiguousarray(keys, np.int64), np.ascontiguousarray(counts, np.int64))

    def finalize(self) -> GeneStats:
        self._flush(release=True)
        return self

    def merge(self, other: GeneStats) -> GeneStats:
        """Add another partial result in place (sums are added in call order: merge partials in
        a fixed order for bit-identical floats; the sketch and counts are exact in any order)."""
        if other.vocab_size != self.vocab_size:
            raise ValueError("cannot merge statistics over different vocabularies")
        self.finalize()
        other.finalize()
        self.n_cells += other.n_cells
        self.nonzero_count += other.nonzero_count
        self.count_sum += other.count_sum
        self.cp10k_sum += other.cp10k_sum
        self._merge_sketch(other.sketch_keys, other.sketch_counts)
        return self

    def nonzero_medians(self) -> np.ndarray:
        """Estimated nonzero median of the normalized values per token (NaN where never nonzero;
        error bound in the module docstring).  [V] float64"""
        self.finalize()
        out = np.full(self.vocab_size, np.nan)
        keys, counts = self.sketch_keys, self.sketch_counts
        if len(keys) == 0:
            return out
        genes = keys // _BUCKETS
        starts = np.flatnonzero(np.concatenate([[True], genes[1:] != genes[:-1]]))
        cum = np.cumsum(counts)
        before = np.concatenate([[0], cum[starts[1:] - 1]])  # values of earlier tokens
        total = np.concatenate([cum[starts[1:] - 1], cum[-1:]]) - before
        # 0-based ranks of the two middle values -> index of the sketch entry holding each
        i = np.searchsorted(cum, before + (total - 1) // 2, side="right")
        j = np.searchsorted(cum, before + total // 2, side="right")
        mids = bucket_midpoints(keys % _BUCKETS)
        out[genes[starts]] = (mids[i] + mids[j]) / 2
        return out

    # --- storage ---------------------------------------------------------------------------
    def to_npz(self, path: Path) -> None:
        self.finalize()
        with open(path, "wb") as fh:
            np.savez(fh, vocab_size=self.vocab_size, n_cells=self.n_cells,
                     count_sum=self.count_sum, cp10k_sum=self.cp10k_sum,
                     sketch_keys=self.sketch_keys, sketch_counts=self.sketch_counts)

    @classmethod
    def from_npz(cls, path: Path) -> GeneStats:
        with np.load(path) as z:
            s = cls(int(z["vocab_size"]), int(z["n_cells"]), None, z["count_sum"].copy(),
                    z["cp10k_sum"].copy(), z["sketch_keys"].copy(), z["sketch_counts"].copy())
        s.nonzero_count = _nonzero_count_from_sketch(s.sketch_keys, s.sketch_counts, s.vocab_size)
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
    def from_zarr(cls, path: Path) -> GeneStats:
        import zarr

        root = zarr.open_group(str(path), mode="r")
        s = cls(int(root.attrs["vocab_size"]), int(root.attrs["n_cells"]),
                root["nonzero_count"][...], root["count_sum"][...], root["cp10k_sum"][...],
                root["sketch_keys"][...], root["sketch_counts"][...])
        return s
