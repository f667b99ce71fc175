"""Expression normalization of raw-count cells, vectorized over a block of cells (CSR).

Input: cells as CSR over vocabulary tokens (``indptr`` [n+1], ascending ``genes`` [nnz], raw
``counts`` [nnz]) and each cell's ``total_counts`` [n] before vocabulary filtering (what the
corpus stores). Output: the tokens each cell is given to the model and the value of each, in the
order the model sees them. Modes (DESIGN.md, "Normalization modes"):

- ``log1p_bins`` (scBERT, CellLM): ``x = log1p(count / total * target_sum)``, then fixed bins:
  ``bin = 1 + #(edges <= x)`` capped to ``n_bins - 1``; bin 0 is left for zero expression (a
  model that also embeds zero genes uses it). Default edges 1, 2, ..., n_bins - 2.
- ``log2_floor_bins`` (scBERT exactly): ``bin = min(floor(log2(1 + count / total * target_sum)),
  n_bins - 1)``, log2 as scanpy's ``log1p(base=2)`` computes it (``log1p(y) / log(2)``);
  scBERT's preprocess.py normalizes to 1e4 and takes that log, its pretrain.py truncates to
  integers and caps at ``bin_num`` = 5 (``n_bins`` 6: values 0 ... 5). Unlike ``log1p_bins``,
  an expressed gene with ``count / total * target_sum < 1`` falls in bin 0 together with the
  unexpressed genes, as in scBERT: bin 0 then means "zero or below one count per 10k", and
  scBERT's masking skips it (`Masking.nonzero_only`). Edges 1, 2, ..., n_bins - 1 on the log2.
- ``quantile_bins`` (scGPT): per cell, edges = ``np.quantile(x, linspace(0, 1, n_bins - 1))``
  of its nonzero ``x`` and ``bin = np.digitize(x, edges)`` (1 ... n_bins - 1), exactly as
  scGPT's binning of log1p-normalized values. A value equal to several edges (in a cell, the
  genes seen once are often most of them) gets a bin drawn uniformly from that span, as scGPT's
  ``_digitize(..., side="both")`` does (``quantile_ties="random"``, the default).
  ``quantile_ties="high"`` gives them all the span's top bin (``np.digitize`` alone):
  deterministic, but then the bin tells the cell's share of tied genes, and a masked tied gene's
  bin is that per-cell number, which masked-bin prediction learns instead of expression.
- ``rank`` (Geneformer): ``v = count / total * target_sum / median[gene]``, genes without a
  median dropped, tokens sorted by descending ``v`` (ties: ascending token, i.e. stable) and
  truncated to ``max_genes``; the value is the rank (0 = highest).
- ``continuous`` (scFoundation-style): ``x`` itself, float32 (the log1p-CP10k values of the
  expressed genes: what other loaders hand out as "log1p-normalized").
- ``raw``: the raw counts of the expressed genes, float32 (counts above 2**24 rounded as float32
  rounds them): the loader as a plain sparse-row reader, for models that normalize themselves
  and for comparing loaders like for like (`benchmarks/bench_loader_peers.py`).

Genes are kept in ascending token order except in rank mode. ``max_genes`` caps a cell: a random
subset (order kept, from the caller's generator; ``cap="random"``, what training sees), or with
``cap="top"`` its most expressed genes (highest count, ties to the lower token; deterministic, for
embedding); rank mode always keeps the top ranks.
The caller's randomness is a numpy generator (training: any draw serves) or `CellSeeds` (embedding:
each cell draws from its own key, so its input does not depend on the other cells of its block).
The plain per-cell definitions these are tested against live in `normalize_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..radix import radix_sort_pairs

MODES = ("log1p_bins", "log2_floor_bins", "quantile_bins", "rank", "continuous", "raw")
CONTINUOUS_MODES = ("continuous", "raw")  # float32 values (masked with -1), not bins or ranks
FIXED_BIN_MODES = ("log1p_bins", "log2_floor_bins")  # bins from fixed edges (`Normalization.edges`)
BINNED_MODES = (*FIXED_BIN_MODES, "quantile_bins")
QUANTILE_TIES = ("high", "random")
CAPS = ("random", "top")  # how max_genes caps a cell: a uniform random subset, or its most expressed genes


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
    quantile_ties: str = "random"
    cap: str = "random"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"normalization mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode in BINNED_MODES and self.n_bins < 3:
            raise ValueError(f"n_bins={self.n_bins}: binned modes need at least 3 (bin 0 is zero expression)")
        if self.quantile_ties not in QUANTILE_TIES:
            raise ValueError(f"quantile_ties={self.quantile_ties!r} is not one of {', '.join(QUANTILE_TIES)}")
        if self.cap not in CAPS:
            raise ValueError(f"cap={self.cap!r} is not one of {', '.join(CAPS)}")
        if self.max_genes is not None and self.max_genes < 1:
            raise ValueError(f"max_genes={self.max_genes} must be >= 1 (or None for no cap)")

    @property
    def edges(self) -> np.ndarray:
        """Fixed bin edges of the fixed-bin modes (ascending), on their log scale:
        ``log1p_bins`` [n_bins - 2] (bin 1 below the first), ``log2_floor_bins`` [n_bins - 1]
        (bin 0 below the first).  float64"""
        if self.bin_edges is not None:
            return np.asarray(self.bin_edges, np.float64)
        return np.arange(1, self.n_bins - (self.mode != "log2_floor_bins"), dtype=np.float64)

    @property
    def first_bin(self) -> int:
        """The bin of an expressed gene below every edge: 1 (bin 0 kept for zeros) or, for
        scBERT's ``log2_floor_bins``, 0."""
        return 0 if self.mode == "log2_floor_bins" else 1

    @property
    def thresholds(self) -> np.ndarray:
        """`log1p_thresholds` of the edges (cached: they take a few hundred log1p calls)."""
        if "_thresholds" not in self.__dict__:
            scale = LOG2_SCALE if self.mode == "log2_floor_bins" else 1.0
            object.__setattr__(self, "_thresholds", np.sort(log1p_thresholds(self.edges, scale)))
        return self.__dict__["_thresholds"]


@dataclass
class Normalized:
    """Normalized cells as CSR in model order: ``indptr`` [n+1] int64, ``genes`` [m] int64,
    ``values`` [m] (int64 bins / ranks, or float32 for continuous)."""

    indptr: np.ndarray
    genes: np.ndarray
    values: np.ndarray


def log1p_cp10k(counts: np.ndarray, indptr: np.ndarray, total_counts: np.ndarray,
                target_sum: float = 1e4) -> np.ndarray:
    """``log1p(count / total * target_sum)`` per nonzero, float64: the one formula every mode and
    reference uses, so that they agree bit for bit (the compiled kernels below compute it with
    the same operations and the same libm ``log1p``).  [nnz]"""
    per_entry_total = np.repeat(np.asarray(total_counts, np.float64), np.diff(indptr))
    return np.log1p(np.asarray(counts, np.float64) / per_entry_total * target_sum)


_SMALL_COUNTS = 64  # integer counts below this get their bin or value from a per-cell table


def log1p_cp10k_float32(counts: np.ndarray, indptr: np.ndarray, total_counts: np.ndarray,
                        target_sum: float = 1e4) -> np.ndarray:
    """`log1p_cp10k` as float32, equal to it entry for entry with far fewer logarithms: in a cell the
    value depends only on the count, so small integer counts (most entries) take it from a per-cell
    table of ``np.log1p(c / total * target_sum)`` for c < `_SMALL_COUNTS` (the same float64
    operations on the same numbers), and only the other entries take a log1p each.  [nnz]"""
    indptr = np.asarray(indptr, np.int64)
    totals = np.asarray(total_counts, np.float64)
    table = np.log1p(np.arange(_SMALL_COUNTS, dtype=np.float64) / totals[:, None] * target_sum).astype(np.float32)
    out = np.empty(int(indptr[-1]), np.float32)
    rest = np.empty(len(out), np.int64)
    n_rest = _from_count_table(indptr, counts, table, out, rest)
    if n_rest:
        rest = rest[:n_rest]
        cell = np.searchsorted(indptr, rest, side="right") - 1
        out[rest] = np.log1p(np.asarray(counts[rest], np.float64) / totals[cell] * target_sum).astype(np.float32)
    return out


@njit(cache=True, nogil=True)
def _from_count_table(indptr, counts, table, out, rest):  # pragma: no cover
    """``out[j] = table[cell of j, counts[j]]`` where the count is a small integer; the positions of
    the other entries to ``rest``.  -> how many of those"""
    m = 0
    small = table.shape[1]
    for i in range(len(indptr) - 1):
        for j in range(indptr[i], indptr[i + 1]):
            c = counts[j]
            if c == np.floor(c) and 0 <= c < small:
                out[j] = table[i, np.int64(c)]
            else:
                rest[m] = j
                m += 1
    return m


# scanpy's log1p(base=2) divides the natural log1p by np.log(2) (scBERT's preprocess.py uses it)
LOG2_SCALE = float(np.log(2.0))


def log1p_thresholds(edges: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """For each edge e, the smallest float64 y with ``np.log1p(y) / scale >= e``, so that counting
    edges below log1p(y) / scale is counting thresholds below y: bins without computing a logarithm
    per value, equal to binning ``np.log1p(y) / scale`` (found with np.log1p itself, whatever its
    last-bit rounding on this machine). ``scale`` 1: natural log; `LOG2_SCALE`: log2 as scanpy
    computes it.  [len(edges)]"""
    out = np.empty(len(edges))
    for k, e in enumerate(np.asarray(edges, np.float64)):
        if e <= 0:  # every positive value is above
            out[k] = -np.inf
            continue
        y = np.expm1(e * scale)
        while np.log1p(y) / scale >= e:
            y = np.nextafter(y, -np.inf)
        while np.log1p(y) / scale < e:
            y = np.nextafter(y, np.inf)
        out[k] = y
    return out




@njit(cache=True, nogil=True)
def _threshold_bins(indptr, counts, totals, target_sum, thresholds, first, top, out):  # pragma: no cover
    """``min(first + #(thresholds <= count / total * target_sum), top)`` per entry (thresholds ascending;
    the division and product are the float64 operations of `log1p_cp10k`). In a cell the bin
    depends only on the count, so small integer counts (most of them) look it up in a table
    filled on first use: no division and no unpredictable threshold loop per entry."""
    n_thr = len(thresholds)
    table = np.empty(_SMALL_COUNTS, np.int64)
    for i in range(len(indptr) - 1):
        t = totals[i]
        table[:] = -1
        for j in range(indptr[i], indptr[i + 1]):
            c = counts[j]
            small = c == np.floor(c) and 0 <= c < _SMALL_COUNTS
            if small:
                b = table[np.int64(c)]
                if b >= 0:
                    out[j] = b
                    continue
            y = np.float64(c) / t * target_sum
            b = 0
            while b < n_thr and y >= thresholds[b]:
                b += 1
            b = min(b + first, top)
            if small:
                table[np.int64(c)] = b
            out[j] = b


class CellSeeds:
    """Per-cell randomness: cell ``i`` draws from a generator seeded by ``keys[i]`` alone, so it gets
    the same gene subset and tie bins in any block, at any position (what an embedding needs: a
    cell's embedding must not depend on the other cells of its file). Slower than one generator per
    block (a generator per cell, ~10 us), which is why training draws from one."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, np.uint64)

    def uniforms(self, per_cell: np.ndarray, stream: int) -> np.ndarray:
        out = np.empty(int(np.sum(per_cell)))
        start = 0
        for key, n in zip(self.keys.tolist(), np.asarray(per_cell).tolist()):
            if n:
                out[start:start + n] = np.random.default_rng([stream, key]).random(n)
                start += n
        return out


# CellSeeds' streams: a cell's tie draws and its subset draws are independent
_TIES, _SUBSET = 0, 1


def _uniforms(rng, per_cell: np.ndarray, stream: int) -> np.ndarray:
    """U[0, 1) draws, ``per_cell[i]`` for cell ``i``, laid out cell after cell."""
    if isinstance(rng, CellSeeds):
        return rng.uniforms(per_cell, stream)
    return rng.random(int(np.sum(per_cell)))


def normalize(norm: Normalization, indptr, genes, counts, total_counts,
              rng: np.random.Generator | CellSeeds | None = None) -> Normalized:
    """Normalize a block of cells (see the module docstring); ``rng`` draws the random subsets of
    cells over ``max_genes`` and random quantile ties (not needed in rank mode)."""
    indptr = np.asarray(indptr, np.int64)
    genes = np.asarray(genes, np.int64)
    if norm.mode == "rank":
        if norm.medians is None:
            raise ValueError("rank mode needs per-token nonzero medians: pass medians= (a CellLoader "
                             "takes them from the corpus's stats.zarr; see also medians_for_vocab)")
        return _rank(norm, indptr, genes, counts, total_counts)
    if norm.mode in FIXED_BIN_MODES:
        values = np.empty(int(indptr[-1]), np.int64)
        _threshold_bins(indptr, counts, np.asarray(total_counts, np.float64), norm.target_sum, norm.thresholds,
                        norm.first_bin, norm.n_bins - 1, values)
        return _capped(norm, indptr, genes, values, counts, rng)
    if norm.mode == "raw":
        return _capped(norm, indptr, genes, np.asarray(counts).astype(np.float32), counts, rng)
    if norm.mode == "continuous":
        return _capped(norm, indptr, genes, log1p_cp10k_float32(counts, indptr, total_counts, norm.target_sum), counts,
                       rng)
    x = log1p_cp10k(counts, indptr, total_counts, norm.target_sum)
    if norm.mode == "quantile_bins":
        ties = norm.quantile_ties == "random"
        values, lowest = np.empty(len(x), np.int64), np.empty(len(x) if ties else 0, np.int64)
        _quantile_bins(indptr, x, counts, np.linspace(0, 1, norm.n_bins - 1), values, lowest)
        if ties:
            if rng is None:
                raise ValueError("quantile_ties='random' draws the bins of tied values: pass rng=")
            # scGPT's ceil(high - u * (high - left)) with u ~ U[0, 1): uniform over lowest ... values
            values -= np.floor(_uniforms(rng, np.diff(indptr), _TIES) * (values - lowest + 1)).astype(np.int64)
    return _capped(norm, indptr, genes, values, counts, rng)


def quantile_tie_spans(norm: Normalization, indptr, genes, counts, total_counts) -> Normalized:
    """quantile_bins with random ties: how many bins each value's bin is drawn from (1 where the
    value equals at most one edge), for the entries `normalize` returns (a cap must be
    deterministic: ``cap="top"`` or none). No predictor of a masked bin can be right more often
    than 1/span on average, so the mean of 1/span over masked entries is the ceiling of
    masked-bin accuracy.  -> Normalized with int64 spans as values"""
    if norm.mode != "quantile_bins":
        raise ValueError(f"tie spans belong to quantile_bins, not {norm.mode}")
    indptr = np.asarray(indptr, np.int64)
    x = log1p_cp10k(counts, indptr, total_counts, norm.target_sum)
    high, lowest = np.empty(len(x), np.int64), np.empty(len(x), np.int64)
    _quantile_bins(indptr, x, counts, np.linspace(0, 1, norm.n_bins - 1), high, lowest)
    return _capped(norm, indptr, np.asarray(genes, np.int64), high - lowest + 1, counts, None)


def _capped(norm: Normalization, indptr, genes, values, counts, rng) -> Normalized:
    if norm.max_genes is not None and np.diff(indptr).max(initial=0) > norm.max_genes:
        if norm.cap == "top":
            keep = top_subset(indptr, counts, norm.max_genes)
        elif rng is None:
            raise ValueError("max_genes caps cells by a random subset: pass rng= (or cap='top')")
        else:
            keep = _random_subset(indptr, norm.max_genes, rng)
        indptr = np.concatenate([[0], np.cumsum(np.minimum(np.diff(indptr), norm.max_genes))])
        genes, values = genes[keep], values[keep]
    return Normalized(indptr, genes, values)


@njit(cache=True, nogil=True)
def _quantile_edges(s, q, edges):  # pragma: no cover
    """np.quantile(s, q) of ascending ``s`` (numpy's default 'linear' method, its rounding included)."""
    n = len(s)
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


_SORT_BUCKETS = 256  # integer counts below this are ordered by a counting sort


@njit(cache=True, nogil=True)
def _tie_low(edges, v, high):  # pragma: no cover
    """The lowest bin of the span of ``edges`` equal to ``v`` (``high``, its digitize bin, when v
    equals at most one edge)."""
    return min(np.searchsorted(edges, v, side="left") + 1, high)


@njit(cache=True, nogil=True)
def _quantile_bins(indptr, x, counts, q, out, lowest):  # pragma: no cover
    """Per cell: edges = np.quantile(x_cell, q), out = np.digitize(x_cell, edges) and, unless
    ``lowest`` is empty, lowest = the lowest bin of the span of edges equal to x (out when x equals
    at most one edge).

    In a cell, x grows with the count, so ordering x is ordering integer counts: a counting sort
    for the small ones (most), a sort for the rest, and one digitize per distinct small count.
    Non-integer counts take a plain sort."""
    edges = np.empty(len(q), np.float64)
    hist = np.zeros(_SORT_BUCKETS, np.int64)
    x_of = np.empty(_SORT_BUCKETS, np.float64)
    bin_of = np.empty(_SORT_BUCKETS, np.int64)
    low_of = np.empty(_SORT_BUCKETS, np.int64)
    spans = len(lowest) > 0
    for i in range(len(indptr) - 1):
        lo, hi = indptr[i], indptr[i + 1]
        n = hi - lo
        if n == 0:
            continue
        integer = True
        for j in range(lo, hi):
            c = counts[j]
            if c != np.floor(c) or c < 0:
                integer = False
                break
        if not integer:
            s = np.sort(x[lo:hi])
            _quantile_edges(s, q, edges)
            for j in range(lo, hi):
                out[j] = np.searchsorted(edges, x[j], side="right")
                if spans:
                    lowest[j] = _tie_low(edges, x[j], out[j])
            continue
        big = 0
        for j in range(lo, hi):
            c = np.int64(counts[j])
            if c < _SORT_BUCKETS:
                hist[c] += 1
                x_of[c] = x[j]
            else:
                big += 1
        large = np.empty(big, np.float64)
        b = 0
        for j in range(lo, hi):
            if counts[j] >= _SORT_BUCKETS:
                large[b] = x[j]
                b += 1
        large.sort()
        s = np.empty(n, np.float64)
        o = 0
        for c in range(_SORT_BUCKETS):
            for _ in range(hist[c]):
                s[o] = x_of[c]
                o += 1
        s[o:] = large
        _quantile_edges(s, q, edges)
        for c in range(_SORT_BUCKETS):
            if hist[c]:
                bin_of[c] = np.searchsorted(edges, x_of[c], side="right")
                if spans:
                    low_of[c] = _tie_low(edges, x_of[c], bin_of[c])
                hist[c] = 0
        for j in range(lo, hi):
            c = np.int64(counts[j])
            out[j] = bin_of[c] if c < _SORT_BUCKETS else np.searchsorted(edges, x[j], side="right")
            if spans:
                lowest[j] = low_of[c] if c < _SORT_BUCKETS else _tie_low(edges, x[j], out[j])


def choose_within_cells(indptr: np.ndarray, picks: np.ndarray, rng: np.random.Generator | CellSeeds) -> np.ndarray:
    """A uniformly random subset of ``picks[i]`` entries of each cell ``i`` (all of them when it has
    fewer).  [nnz] bool"""
    indptr = np.asarray(indptr, np.int64)
    picks = np.minimum(np.asarray(picks, np.int64), np.diff(indptr))
    chosen = np.zeros(int(indptr[-1]), np.bool_)
    _floyd_sample(indptr, picks, _uniforms(rng, picks, _SUBSET), chosen)
    return chosen


@njit(cache=True, nogil=True)
def _floyd_sample(indptr, picks, u, chosen):  # pragma: no cover
    """Floyd's sampling per cell: k draws give a uniform k-subset of the cell's n entries (for j
    in n-k..n-1 take a uniform t in [0, j]; if t is taken already, take j), so random numbers are
    needed only for the picks, not for every entry."""
    d = 0
    for i in range(len(indptr) - 1):
        lo, n, k = indptr[i], indptr[i + 1] - indptr[i], picks[i]
        for j in range(n - k, n):
            t = min(np.int64(u[d] * (j + 1)), j)
            d += 1
            if chosen[lo + t]:
                chosen[lo + j] = True
            else:
                chosen[lo + t] = True


def _random_subset(indptr: np.ndarray, cap: int, rng: np.random.Generator | CellSeeds) -> np.ndarray:
    """Entry positions keeping a uniform random ``cap`` of each cell's entries (all of a cell with
    at most ``cap``), in their original order.  [sum(min(len, cap))]"""
    return np.flatnonzero(choose_within_cells(indptr, np.full(len(indptr) - 1, cap), rng))


def top_subset(indptr: np.ndarray, counts: np.ndarray, cap: int) -> np.ndarray:
    """Entry positions keeping each cell's ``cap`` highest counts (ties: the earlier entry, i.e. the
    lower token), in their original order.  [sum(min(len, cap))]"""
    lengths = np.diff(indptr)
    cell = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(cell))
    order = np.lexsort((position, -np.asarray(counts, np.float64), cell))  # cells stay in order
    return np.sort(order[position - np.asarray(indptr, np.int64)[cell] < cap])


def _rank(norm: Normalization, indptr, genes, counts, total_counts) -> Normalized:
    cap = norm.max_genes if norm.max_genes is not None else 1 << 62
    out_ptr = np.empty(len(indptr), np.int64)
    out_genes = np.empty(len(genes), np.int64)
    ranks = np.empty(len(genes), np.int64)
    m = _rank_cells(indptr, genes, counts, np.asarray(total_counts, np.float64), np.asarray(norm.medians, np.float64),
                    float(norm.target_sum), cap, out_ptr, out_genes, ranks)
    return Normalized(out_ptr, out_genes[:m], ranks[:m])


_INSERTION_SORT = 48  # a bucket of at most this many keys is finished by insertion sort, a larger one by radix


@njit(cache=True, nogil=True)
def _insertion_sort_pairs(keys, vals, lo, hi):  # pragma: no cover
    """Stable insertion sort of ``keys[lo:hi]`` ascending, carrying ``vals``."""
    for i in range(lo + 1, hi):
        k, v = keys[i], vals[i]
        j = i - 1
        while j >= lo and keys[j] > k:
            keys[j + 1] = keys[j]
            vals[j + 1] = vals[j]
            j -= 1
        keys[j + 1] = k
        vals[j + 1] = v


@njit(cache=True, nogil=True)
def _rank_cells(indptr, genes, counts, totals, medians, target_sum, cap, out_ptr, out_genes, ranks):  # pragma: no cover
    """Per cell: ``v = count / total * target_sum / median[gene]`` of its genes with a median
    (finite, > 0), sorted by descending ``v``, ties in entry order (ascending token), the first
    ``cap``: tokens to ``out_genes``, ranks to ``ranks``, cells' starts to ``out_ptr``.  -> entries

    Descending v is ascending ``int64 max - bits(v)`` (a positive double's bits order like its
    value). A cell's keys are sorted stably in one counting pass into buckets of their leading bits
    (about one bucket per key: the bits of a double grow with its logarithm, so buckets spread over
    the cell's range of magnitudes), then each bucket by insertion sort, or by radix sort when it
    is large: the same order as one stable sort of the whole cell, in far fewer passes than a
    64-bit radix sort."""
    longest = 0
    for i in range(len(indptr) - 1):
        longest = max(longest, indptr[i + 1] - indptr[i])
    value = np.empty(max(longest, 1), np.float64)
    bits = value.view(np.int64)
    keys = np.empty(longest, np.int64)
    entries = np.empty(longest, np.int64)
    sorted_k = np.empty(longest, np.int64)
    sorted_e = np.empty(longest, np.int64)
    n_buckets = 1
    while n_buckets < longest:
        n_buckets *= 2
    n_buckets = min(n_buckets, 4096)
    hist = np.empty(n_buckets + 1, np.int64)
    top = np.iinfo(np.int64).max
    out_ptr[0] = 0
    o = 0
    for c in range(len(indptr) - 1):
        t = totals[c]
        n = 0
        for j in range(indptr[c], indptr[c + 1]):
            med = medians[genes[j]]
            if np.isfinite(med) and med > 0:
                value[n] = np.float64(counts[j]) / t * target_sum / med
                entries[n] = j
                n += 1
        if n <= _INSERTION_SORT:
            for r in range(n):
                keys[r] = top - bits[r]
            _insertion_sort_pairs(keys, entries, 0, n)
            se = entries
        else:
            kmin, kmax = top, 0
            for r in range(n):
                k = top - bits[r]
                keys[r] = k
                kmin = min(kmin, k)
                kmax = max(kmax, k)
            nb = 1
            while nb < n and nb < n_buckets:
                nb *= 2
            span = kmax - kmin
            shift = 0
            while (span >> shift) >= nb:
                shift += 1
            hist[: nb + 1] = 0
            for r in range(n):
                hist[((keys[r] - kmin) >> shift) + 1] += 1
            for b in range(nb):
                hist[b + 1] += hist[b]
            for r in range(n):
                b = (keys[r] - kmin) >> shift
                sorted_k[hist[b]] = keys[r]
                sorted_e[hist[b]] = entries[r]
                hist[b] += 1
            lo = 0  # hist[b] is now the end of bucket b
            for b in range(nb):
                hi = hist[b]
                if hi - lo <= _INSERTION_SORT:
                    _insertion_sort_pairs(sorted_k, sorted_e, lo, hi)
                else:  # keys, entries: scratch
                    radix_sort_pairs(sorted_k[lo:hi], sorted_e[lo:hi], hi - lo, keys[lo:hi], entries[lo:hi], 64)
                lo = hi
            se = sorted_e
        for r in range(min(n, cap)):
            out_genes[o] = genes[se[r]]
            ranks[o] = r
            o += 1
        out_ptr[c + 1] = o
    return o


def medians_for_vocab(ensembl_ids: list[str], medians_by_id: dict[str, float]) -> np.ndarray:
    """Per-token medians from an Ensembl id -> median mapping (e.g. Geneformer's median
    dictionary), NaN for tokens it does not list.  [len(ensembl_ids)] float64"""
    return np.array([float(medians_by_id.get(g, np.nan)) for g in ensembl_ids], np.float64)
