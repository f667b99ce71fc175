"""Per-gene corpus statistics, built from mergeable partial results.

For every token id (genes; special tokens stay zero):

- ``nonzero_count``  cells in which the gene is nonzero                       [V] int64
- ``count_sum``      sum of raw counts                                         [V] float64
- ``cp10k_sum``      sum of normalized values ``count / total_counts * 1e4``   [V] float64
- a nonzero-median sketch of the normalized values (Geneformer's rank-value encoding divides by
  each gene's nonzero median of exactly these values; ``total_counts`` is the cell's total before
  vocabulary filtering, as Geneformer uses ``n_counts``).

Explicit zeros in the input CSR are skipped (they are neither counted in ``nonzero_count`` nor
put in the sketch); negative or non-finite counts, out-of-range token ids, a bad ``indptr`` and
non-positive ``total_counts`` of a cell with nonzero counts are rejected with ``ValueError``,
leaving the statistics as they were.

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

where the values are the float32-rounded normalized values. Against the median of the float64
normalized values (as ``np.median`` gives it), add the float32 rounding (at most 2**-24 relative;
rounding is monotone, so it keeps the middle ranks): the relative error is at most
``RELATIVE_ERROR + 2**-23``. The bound is tight (a value on the lower edge of a ``k = 0`` bucket
is off by exactly ``RELATIVE_ERROR``) and holds for values between 2**-126 and 2**127 (normal
float32, below the last bucket), i.e. always for ``count / total_counts * 1e4``.

``add_cells`` validates, adds the sums and buffers the values (numba kernels, releasing the GIL);
the sketch and ``nonzero_count`` are brought up to date by folds (see the tuning notes below),
the last one at ``finalize()``. Measured: about 10 ns per nonzero for add_cells + finalize of a
16,384-cell block with ~1,450 nonzeros per cell over 40,000 tokens (2-core EPYC VM).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from .arrayfile import read_arrays, write_arrays
from .buffers import Buffers

MANTISSA_BITS = 7
RELATIVE_ERROR = 2.0 ** -(MANTISSA_BITS + 1)
_SHIFT = 23 - MANTISSA_BITS
_BUCKETS = 1 << (31 - _SHIFT)  # positive float32 values only: sign bit is always 0

# --- tuning ------------------------------------------------------------------------------------
# ``add_cells`` validates a block, adds its sums, and appends its (token, bucket) pairs to a
# pending buffer, already partitioned by token range (2**_PART_BITS consecutive tokens per
# partition: few write streams, cache friendly), each as ``(token & _PART_MASK) << 15 | bucket``
# (uint32). A fold turns the pending pairs into the sparse sketch, merged with the existing
# sketch in the same pass: per partition, a counting sort by token; per token, a dense histogram
# over its bucket range (or a sort of its buckets when that range is wide against their number).
# Folds run at ``finalize()`` and once there are max(_FLUSH_MIN, _FLUSH_RATIO * len(sketch))
# pending pairs: a fold costs time linear in pending pairs plus sketch size, so its amortized
# cost per nonzero stays bounded, while pending memory (4 B a pair) stays about the sketch's
# (16 B a key).
_PART_BITS = 10
PARTITION_BITS = _PART_BITS
_PART_MASK = (1 << _PART_BITS) - 1
_BUCKET_MASK = _BUCKETS - 1
_FLUSH_MIN = 1 << 25
_FLUSH_RATIO = 4
_PENDING_MAX = 1 << 30  # hard cap of pending pairs (a fold runs before more are added)
# Blocks larger than this many entries are validated and added piece by piece (each piece is
# still in cache for its second pass); the sums are restored if a later piece is invalid.
_PIECE = 1 << 18
# Per token and fold: dense histogram when the bucket range is below
# _DENSE_FACTOR * (pending values + old sketch entries) + _DENSE_SLACK, else sort.
_DENSE_FACTOR = 16
_DENSE_SLACK = 256
# Per-partition counting in the validation pass uses this many interleaved counter copies, so
# that consecutive tokens of one partition (a cell's tokens are sorted) do not form a chain of
# dependent increments of one counter.
_LANES = 4

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


# --- numba kernels (excluded from coverage: compiled) ---------------------------------------------

@intrinsic
def _f32_bits(typingctx, x):  # pragma: no cover
    """Bit pattern of a float32 as int32 (a register bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(cache=True, nogil=True)
def _check_cells(genes, counts, indptr, total_counts, c0, c1, vocab_size, base):  # pragma: no cover
    """Validate cells [c0, c1) of a block (reads only) and plan where their pairs go.

    Returns ``(error, pos)``: ``error`` 0 or a code of ``_ERRORS``; ``pos`` [n_parts + 1] the
    first pending slot of each partition's pairs, from ``base`` on (``pos[-1]``: the end).
    """
    n_parts = (vocab_size + _PART_MASK) >> _PART_BITS
    cnt = np.zeros((n_parts, _LANES), np.int64)
    pos = np.zeros(n_parts + 1, np.int64)
    for i in range(c0, c1):
        a = indptr[i]
        b = indptr[i + 1]
        if a > b or a < 0 or b > len(genes):
            return 1, pos
        bad = False
        cmax = 0.0
        for j in range(a, b):
            g = np.int64(genes[j])
            if g < 0 or g >= vocab_size:
                return 2, pos
            c = np.float64(counts[j])
            bad |= not (c >= 0.0)  # also catches NaN
            cmax = max(cmax, c)
            cnt[g >> _PART_BITS, j & (_LANES - 1)] += c != 0.0
        if bad or cmax == np.inf:
            return 3, pos
        if cmax > 0.0:
            t = np.float64(total_counts[i])
            if not (t > 0.0) or t == np.inf:
                return 4, pos
            if cmax * (1e4 / t) > _FLT32_MAX:  # would round to float32 inf (or close to it)
                return 5, pos
    pos[0] = base
    for q in range(n_parts):
        pos[q + 1] = pos[q] + cnt[q].sum()
    return 0, pos


@njit(cache=True, nogil=True)
def _add_cells(genes, counts, indptr, total_counts, c0, c1, count_sum, cp10k_sum, pending,
               pos):  # pragma: no cover
    """Add validated cells [c0, c1): sums (per token in cell order), and their (token, bucket)
    pairs into ``pending`` at the slots planned by ``_check_cells`` (``pos`` is advanced).
    Explicit zero counts are skipped."""
    for i in range(c0, c1):
        a = indptr[i]
        b = indptr[i + 1]
        if a == b:
            continue
        scale = 1e4 / np.float64(total_counts[i])
        # the slot of the current partition is kept in a register while consecutive tokens stay
        # in it (a cell's tokens are sorted, so they do for long runs)
        q_cur = 0
        slot = pos[0]
        for j in range(a, b):
            c = np.float64(counts[j])
            if c == 0.0:
                continue
            g = np.int64(genes[j])
            v = c * scale
            count_sum[g] += c
            cp10k_sum[g] += v
            q = g >> _PART_BITS
            if q != q_cur:
                pos[q_cur] = slot
                slot = pos[q]
                q_cur = q
            pending[slot] = ((g & _PART_MASK) << 15) | (_f32_bits(np.float32(v)) >> _SHIFT)
            slot += 1
        pos[q_cur] = slot


@njit(cache=True, nogil=True)
def _insertion_sort(a, s, e):  # pragma: no cover
    for i in range(s + 1, e):
        x = a[i]
        j = i - 1
        while j >= s and a[j] > x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


@njit(cache=True, nogil=True)
def _fold(pending, chunks, vocab_size, nonzero_count, old_keys, old_counts, scratch, hist,
          keys, counts):  # pragma: no cover
    """The sketch of the old sketch plus the pending pairs (and the pairs' per-token numbers
    added to ``nonzero_count``).

    ``chunks`` [n_chunks, n_parts + 1]: where each partition's pairs of each added piece are.
    ``scratch`` (uint16) holds at least the pairs of the largest partition; ``hist`` (int64,
    [_BUCKETS]) is all zero on entry and exit. The result goes to ``keys``/``counts``, sized for
    the worst case (old entries plus pending pairs, all distinct); returns its length.
    """
    n_parts = (vocab_size + _PART_MASK) >> _PART_BITS
    n_chunks = chunks.shape[0]
    T = 1 << _PART_BITS
    n_old = len(old_keys)
    tstart = np.zeros(T + 1, np.int64)
    tpos = np.zeros(T, np.int64)
    big = np.int64(1) << 62
    o = 0  # output position
    p = 0  # old sketch position
    for q in range(n_parts):
        # counting sort of this partition's buckets by token, into scratch
        tstart[:] = 0
        for c in range(n_chunks):
            for i in range(chunks[c, q], chunks[c, q + 1]):
                tstart[(pending[i] >> 15) + 1] += 1
        for t in range(T):
            tstart[t + 1] += tstart[t]
        tpos[:] = tstart[:T]
        for c in range(n_chunks):
            for i in range(chunks[c, q], chunks[c, q + 1]):
                x = pending[i]
                t = x >> 15
                scratch[tpos[t]] = x & _BUCKET_MASK
                tpos[t] += 1
        for t in range(min(T, vocab_size - (q << _PART_BITS))):
            g = (np.int64(q) << _PART_BITS) + t
            gkey = g * _BUCKETS
            s = tstart[t]
            e = tstart[t + 1]
            m = e - s
            oa = p  # this token's entries of the old sketch: [oa, p)
            while p < n_old and old_keys[p] < gkey + _BUCKETS:
                p += 1
            if m == 0:
                for i in range(oa, p):
                    keys[o] = old_keys[i]
                    counts[o] = old_counts[i]
                    o += 1
                continue
            nonzero_count[g] += m
            # histogram first (its bucket range is found on the way); undone if too sparse
            lo = np.int64(_BUCKET_MASK)
            hi = np.int64(0)
            for j in range(s, e):
                b = np.int64(scratch[j])
                hist[b] += 1
                lo = min(lo, b)
                hi = max(hi, b)
            if p > oa:
                lo = min(lo, old_keys[oa] - gkey)
                hi = max(hi, old_keys[p - 1] - gkey)
            if hi - lo < _DENSE_FACTOR * (m + p - oa) + _DENSE_SLACK:
                for i in range(oa, p):
                    hist[old_keys[i] - gkey] += old_counts[i]
                # branch-free emission (many buckets are empty: branches would mispredict): a
                # slot written for an empty bucket is overwritten by the next nonzero one (the
                # last bucket, hi, is not empty unless an old count is 0: one spare slot)
                for b in range(lo, hi + 1):
                    k = hist[b]
                    keys[o] = gkey + b
                    counts[o] = k
                    hist[b] = 0
                    o += k != 0
            else:  # few values over a wide range: sort them, merge with the old entries
                for j in range(s, e):
                    hist[scratch[j]] = 0
                if m <= 32:
                    _insertion_sort(scratch, s, e)
                else:
                    scratch[s:e].sort()
                j = s
                i = oa
                while j < e or i < p:
                    nb = np.int64(scratch[j]) if j < e else big
                    ob = old_keys[i] - gkey if i < p else big
                    b = min(nb, ob)
                    k = 0
                    while j < e and scratch[j] == b:
                        k += 1
                        j += 1
                    if ob == b:
                        k += old_counts[i]
                        i += 1
                    keys[o] = gkey + b
                    counts[o] = k
                    o += 1
    return o


@njit(cache=True, nogil=True)
def _merge_into(k1, c1, k2, c2, keys, counts):  # pragma: no cover
    """Merge two sorted unique sparse (key, count) lists into ``keys``/``counts`` (room for both),
    adding the counts of equal keys; returns the merged length."""
    n1 = len(k1)
    n2 = len(k2)
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
    return q


def _merge_sorted(k1, c1, k2, c2):
    """Merge two sorted unique sparse (key, count) lists, adding the counts of equal keys.
    (Large arrays are allocated by numpy, which asks for transparent huge pages: far fewer page
    faults than numba's allocator.)"""
    keys = np.empty(len(k1) + len(k2), np.int64)
    counts = np.empty(len(k1) + len(k2), np.int64)
    m = _merge_into(k1, c1, k2, c2, keys, counts)
    return keys[:m], counts[:m]


@njit(cache=True, nogil=True)
def _widen_ranges(keys, lo, hi):  # pragma: no cover
    """Widen each token's bucket range [lo, hi] to the buckets of sketch ``keys``."""
    for i in range(len(keys)):
        k = np.int64(keys[i])
        g = k // _BUCKETS
        b = k - g * _BUCKETS
        lo[g] = min(lo[g], b)
        hi[g] = max(hi[g], b)


@njit(cache=True, nogil=True)
def _add_dense(keys, counts, lo, offset, dense):  # pragma: no cover
    for i in range(len(keys)):
        k = np.int64(keys[i])
        g = k // _BUCKETS
        dense[offset[g] + k - g * _BUCKETS - lo[g]] += counts[i]


@njit(cache=True, nogil=True)
def _dense_to_sparse(dense, lo, offset, keys, counts):  # pragma: no cover
    """The nonzero entries of the dense per-token windows as sorted sparse keys; returns how many."""
    o = 0
    for g in range(len(lo)):
        for j in range(offset[g], offset[g + 1]):
            if dense[j]:
                keys[o] = g * _BUCKETS + lo[g] + j - offset[g]
                counts[o] = dense[j]
                o += 1
    return o


# Dense windows larger than this many buckets in all are merged pairwise instead (memory).
_DENSE_MERGE_MAX = 1 << 27


def _token_splits(offset: np.ndarray, parts: int) -> np.ndarray:
    """Token boundaries ``[k+1]`` (0 ... vocab_size, k <= parts) cutting the dense windows
    (``offset``: [vocab_size+1] window starts) into about equal contiguous parts."""
    cuts = np.searchsorted(offset, np.linspace(0, offset[-1], parts + 1)[1:-1])
    return np.unique(np.concatenate([[0], cuts, [len(offset) - 1]]))


def merge_partials(paths: list[Path], vocab_size: int, on_each=lambda n: None,
                   threads: int = 1) -> GeneStats:
    """Sum partial results written by `GeneStats.save_partial` (e.g. one per conversion unit).

    A first pass reads only each partial's small arrays (sums, per-token bucket ranges), a second
    adds every partial's sketch into dense per-token windows: each sketch is read once, and the
    work is linear in the partials' entries, where merging sparse sketches pairwise re-merges
    the growing result. ``threads`` add disjoint token ranges of each sketch at once (the result
    does not depend on their number). Sums are added in ``paths`` order. Falls back to pairwise
    merging when the windows would exceed ``_DENSE_MERGE_MAX`` buckets."""
    total = GeneStats(vocab_size)
    lo = np.full(vocab_size, _BUCKETS, np.int64)
    hi = np.full(vocab_size, -1, np.int64)
    for path in paths:
        head, a = _read_partial(path, vocab_size, ("count_sum", "cp10k_sum", "bucket_lo", "bucket_hi"))
        total.n_cells += head["n_cells"]
        total.count_sum += a["count_sum"]
        total.cp10k_sum += a["cp10k_sum"]
        np.minimum(lo, a["bucket_lo"], out=lo)
        np.maximum(hi, a["bucket_hi"], out=hi)
    width = np.maximum(hi - lo + 1, 0)
    offset = np.concatenate([[0], np.cumsum(width)])
    if offset[-1] > _DENSE_MERGE_MAX:
        return _merge_pairwise(paths, vocab_size, on_each)
    dense = np.zeros(offset[-1], np.int64)
    names = ("sketch_keys", "sketch_counts")
    first_keys = _token_splits(offset, max(1, threads)) * _BUCKETS  # sketch keys sort by token
    # the next partial is read (by the disk, in a thread) while this one is added
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(max(1, threads)) as adders:
        ahead = reader.submit(_read_partial, paths[0], vocab_size, names, 0) if paths else None
        for i in range(len(paths)):
            _, a = ahead.result()
            if i + 1 < len(paths):
                ahead = reader.submit(_read_partial, paths[i + 1], vocab_size, names, (i + 1) % 2)
            keys, counts = a["sketch_keys"], a["sketch_counts"]
            # any monotone cuts are race-free (one key, one dense element); clipped to the
            # keys' narrow type so that numpy does not compare them as float64
            cuts = np.searchsorted(keys, np.minimum(first_keys, np.iinfo(keys.dtype).max).astype(keys.dtype))
            cuts[0], cuts[-1] = 0, len(keys)
            for done in [adders.submit(_add_dense, keys[p:q], counts[p:q], lo, offset, dense)
                         for p, q in zip(cuts[:-1], cuts[1:]) if q > p]:
                done.result()
            on_each(1)
    n = int(np.count_nonzero(dense))
    total.sketch_keys = np.empty(n, np.int64)
    total.sketch_counts = np.empty(n, np.int64)
    _dense_to_sparse(dense, lo, offset, total.sketch_keys, total.sketch_counts)
    total.nonzero_count = _nonzero_count_from_sketch(total.sketch_keys, total.sketch_counts, vocab_size)
    return total


def _narrowest(a: np.ndarray) -> np.ndarray:
    """Non-negative integers in the narrowest of uint16 / uint32 / int64 that holds them."""
    top = int(a.max()) if a.size else 0
    return a.astype(np.uint16 if top < 1 << 16 else np.uint32 if top < 1 << 32 else np.int64)


_PARTIAL_MAGIC = b"GENESTATS1\n"  # an `arrayfile` of sums, bucket ranges and the sketch


def _read_partial(path: Path, vocab_size: int, names, slot: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {name: array}) of a partial file for the arrays named, read direct (the
    converter writes partials with `fsio.StreamWriter`): views of buffer ``slot``, which the
    next call with that slot reuses, so copy what is kept."""
    head, arrays = read_arrays(path, _PARTIAL_MAGIC, names, direct=True, slot=slot)
    if head["vocab_size"] != vocab_size:
        raise ValueError(f"{path}: statistics over {head['vocab_size']} tokens, expected {vocab_size}")
    return head, arrays


def _merge_pairwise(paths: list[Path], vocab_size: int, on_each) -> GeneStats:
    """Merge partials like a binary counter: each takes part in O(log n) merges, at most
    O(log n) partials are held, and the fixed order keeps the result reproducible."""
    stack: list[tuple[int, GeneStats]] = []  # (number of partials merged, partial)
    for path in paths:
        size, part = 1, GeneStats.load_partial(path, vocab_size)
        on_each(1)
        while stack and stack[-1][0] == size:
            part = stack.pop()[1].merge(part)
            size *= 2
        stack.append((size, part))
    total = GeneStats(vocab_size)
    for _, part in stack:
        total.merge(part)
    return total


def _nonzero_count_from_sketch(keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per-token sum of the sketch counts (exact, int64; keys sorted)."""
    out = np.zeros(vocab_size, np.int64)
    if len(keys):
        genes = keys // _BUCKETS
        starts = np.flatnonzero(np.concatenate([[True], genes[1:] != genes[:-1]]))
        out[genes[starts]] = np.add.reduceat(counts, starts)
    return out


class _Workspace:
    """Pending pairs and fold buffers of one ``GeneStats``, reused: freshly allocated memory is
    expensive (its page faults cost more than the passes over it).

    A finalized ``GeneStats`` gives its workspace back to a small process-wide pool, and the
    next one (e.g. the next work unit of a converter worker) takes it from there.
    """

    _pool: list = []
    _lock = threading.Lock()
    POOL_SIZE = 2  # workspaces kept
    POOL_MAX_CAPACITY = 1 << 26  # pending pairs (4 B each); larger workspaces are freed

    def __init__(self):
        self.pending = np.empty(0, np.uint32)
        self.scratch = np.empty(0, np.uint16)
        self.hist = np.zeros(_BUCKETS, np.int64)  # all zero between folds
        # a fold reads the sketch the previous fold wrote: outputs alternate between two sets
        self.folds = (Buffers(), Buffers())
        self.turn = 0

    def fold_output(self, cap: int) -> tuple[np.ndarray, np.ndarray]:
        out = self.folds[self.turn]
        self.turn ^= 1
        return out.get("keys", cap, np.int64), out.get("counts", cap, np.int64)

    def fold_buffers(self) -> list[np.ndarray]:
        return [a for out in self.folds for a in out.held()]

    @classmethod
    def take(cls) -> _Workspace:
        with cls._lock:
            if cls._pool:
                return cls._pool.pop()
        return cls()

    def give_back(self) -> None:
        if len(self.pending) > self.POOL_MAX_CAPACITY:
            return
        with self._lock:
            if len(self._pool) < self.POOL_SIZE:
                self._pool.append(self)

    def reserve(self, size: int, keep: int) -> None:
        """Room for ``size`` pending pairs, keeping the first ``keep``."""
        cap = len(self.pending)
        if size > cap:
            new = np.empty(max(size, min(2 * cap, _PENDING_MAX), 1 << 16), np.uint32)
            new[:keep] = self.pending[:keep]
            self.pending = new

    def scratch_for(self, largest_partition: int) -> np.ndarray:
        if len(self.scratch) < largest_partition:
            self.scratch = np.empty(max(largest_partition, 2 * len(self.scratch)), np.uint16)
        return self.scratch


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
    _chunks: list = field(default_factory=list, init=False, repr=False)

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
                  total_counts: np.ndarray, partition_counts: np.ndarray | None = None) -> None:
        """Add a CSR block of cells: ``genes``/``counts`` [nnz], ``indptr`` [n+1],
        ``total_counts`` [n] (per cell, before vocabulary filtering).

        An invalid block raises ``ValueError`` and leaves the statistics as they were (see the
        module doc; blocks of more than 2**30 entries are added as several blocks).

        ``partition_counts`` [ceil(vocab_size / 2**PARTITION_BITS)]: the block's nonzero counts
        per partition of token ids (``token >> PARTITION_BITS``), from a producer that guarantees
        a valid block (the converter's row kernel, whose output passes every check by
        construction): the validation pass, which also counts these, is skipped."""
        if partition_counts is not None and len(indptr) > 1:
            self._add_trusted(genes, counts, indptr, total_counts, partition_counts)
            return
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
        if indptr[0] < 0 or indptr[-1] > len(genes) or np.any(indptr[1:] < indptr[:-1]):
            raise ValueError(f"add_cells: {_ERRORS[1]}")
        nnz = int(indptr[-1] - indptr[0])
        if nnz > _PENDING_MAX:
            if n == 1:
                raise ValueError("add_cells: a single cell with more than 2**30 entries")
            cut = max(1, int(np.searchsorted(indptr, indptr[0] + _PENDING_MAX, "right")) - 1)
            self.add_cells(genes, counts, indptr[:cut + 1], total_counts[:cut])
            self.add_cells(genes, counts, indptr[cut:], total_counts[cut:])
            return
        if self._n_pending + nnz > _PENDING_MAX:
            self._flush()
        if self._ws is None:
            self._ws = _Workspace.take()

        # pieces of about _PIECE entries (whole cells): each is validated, then added while it
        # is still in cache; after a first piece, an invalid one rolls the block back
        if nnz <= _PIECE:
            cuts = [0, n]
        else:
            targets = indptr[0] + np.arange(_PIECE, nnz, _PIECE)
            cuts = np.unique(np.concatenate([[0], np.searchsorted(indptr, targets), [n]]))
            cuts = [int(c) for c in cuts]
        rollback = None
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            err, pos = _check_cells(genes, counts, indptr, total_counts, c0, c1,
                                    self.vocab_size, self._n_pending)
            if err:
                if rollback is not None:
                    self.count_sum[:], self.cp10k_sum[:], self._n_pending, n_chunks = rollback
                    del self._chunks[n_chunks:]
                raise ValueError(f"add_cells: {_ERRORS[err]}")
            if rollback is None and c1 < n:
                rollback = (self.count_sum.copy(), self.cp10k_sum.copy(), self._n_pending,
                            len(self._chunks))
            end = int(pos[-1])
            self._ws.reserve(end, self._n_pending)
            self._chunks.append(pos.copy())
            _add_cells(genes, counts, indptr, total_counts, c0, c1, self.count_sum,
                       self.cp10k_sum, self._ws.pending, pos)
            self._n_pending = end
        self.n_cells += n
        if self._n_pending >= max(_FLUSH_MIN, _FLUSH_RATIO * len(self.sketch_keys)):
            self._flush()

    def _add_trusted(self, genes, counts, indptr, total_counts, partition_counts) -> None:
        n_parts = (self.vocab_size + _PART_MASK) >> _PART_BITS
        k = min(len(partition_counts), n_parts)
        if np.any(partition_counts[k:]):
            raise ValueError(f"add_cells: {_ERRORS[2]}")
        nnz = int(np.sum(partition_counts[:k]))
        if nnz > _PENDING_MAX:
            raise ValueError("add_cells: a trusted block of more than 2**30 entries")
        if self._n_pending + nnz > _PENDING_MAX:
            self._flush()
        if self._ws is None:
            self._ws = _Workspace.take()
        pos = np.full(n_parts + 1, self._n_pending, np.int64)
        pos[1 : k + 1] += np.cumsum(partition_counts[:k])
        pos[k + 1 :] = pos[k]
        end = int(pos[-1])
        self._ws.reserve(end, self._n_pending)
        self._chunks.append(pos.copy())
        _add_cells(genes, counts, indptr, total_counts, 0, len(indptr) - 1, self.count_sum,
                   self.cp10k_sum, self._ws.pending, pos)
        self._n_pending = end
        self.n_cells += len(indptr) - 1
        if self._n_pending >= max(_FLUSH_MIN, _FLUSH_RATIO * len(self.sketch_keys)):
            self._flush()

    def _flush(self, release: bool = False) -> None:
        if self._chunks:
            chunks = np.stack(self._chunks)
            largest = int(np.diff(chunks, axis=1).sum(axis=0).max())
            ws = self._ws
            # sized for the worst case (all distinct); the tail past the result is never touched
            cap = len(self.sketch_keys) + self._n_pending + 1  # +1: see the branch-free emission
            keys, counts = ws.fold_output(cap)
            m = _fold(ws.pending, chunks, self.vocab_size, self.nonzero_count, self.sketch_keys,
                      self.sketch_counts, ws.scratch_for(largest), ws.hist, keys, counts)
            self.sketch_keys, self.sketch_counts = keys[:m], counts[:m]
            self._chunks = []
            self._n_pending = 0
        if release and self._ws is not None:
            # the sketch may live in the workspace's fold buffers, which the next owner reuses
            if any(np.shares_memory(self.sketch_keys, b) for b in self._ws.fold_buffers()):
                self.sketch_keys, self.sketch_counts = self.sketch_keys.copy(), self.sketch_counts.copy()
            self._ws.give_back()
            self._ws = None

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
        if len(other.sketch_keys):
            self.sketch_keys, self.sketch_counts = _merge_sorted(
                self.sketch_keys, self.sketch_counts, other.sketch_keys, other.sketch_counts)
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
        out[genes[starts]] = (bucket_midpoints(keys[i] % _BUCKETS) + bucket_midpoints(keys[j] % _BUCKETS)) / 2
        return out

    # --- storage ---------------------------------------------------------------------------
    def save_partial(self, file) -> None:
        """Write this partial result for `merge_partials` (``file``: a path or an open binary
        file). Sketch keys and counts are stored in the narrowest unsigned type that holds them (a
        unit's sketch is ~10 bytes per nonzero otherwise), and the sketch arrays of this object
        are left in those types: saving is the last use of a partial."""
        self._flush()

        lo = np.full(self.vocab_size, _BUCKETS, np.int32)
        hi = np.full(self.vocab_size, -1, np.int32)
        _widen_ranges(self.sketch_keys, lo, hi)
        # narrowed copies: the workspace buffers holding the sketch go back to the pool uncopied
        self.sketch_keys, self.sketch_counts = _narrowest(self.sketch_keys), _narrowest(self.sketch_counts)
        self._flush(release=True)
        arrays = {"count_sum": self.count_sum, "cp10k_sum": self.cp10k_sum, "bucket_lo": lo,
                  "bucket_hi": hi, "sketch_keys": self.sketch_keys, "sketch_counts": self.sketch_counts}
        with open(file, "wb") if isinstance(file, (str, Path)) else nullcontext(file) as fh:
            write_arrays(fh, _PARTIAL_MAGIC, arrays, vocab_size=self.vocab_size, n_cells=self.n_cells)

    @classmethod
    def load_partial(cls, path: Path, vocab_size: int) -> GeneStats:
        head, a = _read_partial(path, vocab_size, ("count_sum", "cp10k_sum", "sketch_keys", "sketch_counts"))
        s = cls(vocab_size, head["n_cells"], None, a["count_sum"].copy(), a["cp10k_sum"].copy(),
                a["sketch_keys"].astype(np.int64), a["sketch_counts"].astype(np.int64))
        s.nonzero_count = _nonzero_count_from_sketch(s.sketch_keys, s.sketch_counts, s.vocab_size)
        return s

    def to_zarr(self, path: Path) -> None:
        """Write ``stats.zarr`` (zarr v3 group)."""
        import zarr
        from zarr.codecs import BloscCodec

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
            "sketch_keys": _narrowest(self.sketch_keys), "sketch_counts": _narrowest(self.sketch_counts),
        }
        # one chunk per array, blosc-lz4 with byte shuffle: smaller than zarr's default chunks of
        # zstd and several times faster to write (readers take whole arrays anyway)
        codec = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        for name, arr in arrays.items():
            root.create_array(name, data=np.ascontiguousarray(arr), chunks=(max(len(arr), 1),), compressors=codec)

    @staticmethod
    def read_nonzero_medians(path: Path) -> np.ndarray:
        """The ``nonzero_medians()`` that `to_zarr` stored: one array read, instead of loading the
        sketch (tens of millions of entries at a million cells) and computing them again."""
        import zarr

        root = zarr.open_group(str(path), mode="r")
        if "nonzero_median" not in root:  # written by a converter that did not store them
            return GeneStats.from_zarr(path).nonzero_medians()
        return root["nonzero_median"][...]

    @classmethod
    def from_zarr(cls, path: Path) -> GeneStats:
        import zarr

        root = zarr.open_group(str(path), mode="r")
        s = cls(int(root.attrs["vocab_size"]), int(root.attrs["n_cells"]),
                root["nonzero_count"][...], root["count_sum"][...], root["cp10k_sum"][...],
                root["sketch_keys"][...].astype(np.int64), root["sketch_counts"][...].astype(np.int64))
        return s
