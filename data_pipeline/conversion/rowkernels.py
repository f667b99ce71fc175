"""Compiled per-row work of a conversion unit: validate, map columns to tokens, sort, sum.

These are the fast paths of the converter (numba); the plain references they are tested against
are `validate.row_flags` plus scipy's ``csr_matrix(...).sum_duplicates()`` (see
``tests/test_rowkernels.py``). One pass over a row range does what the reference does in a
dozen numpy passes, which is what makes >= 20,000 cells/s per core reachable.

Reason codes are indices into `validate.SKIP_REASONS` (-1: written).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from ..radix import radix_sort_pairs
from .buffers import Buffers
from .stats import PARTITION_BITS

_NOT_FINITE, _NEGATIVE, _NON_INTEGER, _EMPTY, _BELOW_MIN_GENES, _COUNT_OVERFLOW = 0, 1, 2, 3, 4, 5


_IS_NOT_FINITE, _IS_NEGATIVE, _IS_FRACTIONAL, _IS_POSITIVE = 1, 2, 4, 8


@njit(cache=True, nogil=True, inline="always")
def _value_flags(v, check_finite, check_integer):
    """Bits of ``_IS_*`` for one float64 value. Integer data (``check_finite`` false) cannot be
    non-finite or fractional: only its sign is checked."""
    flags = 0
    if check_finite:
        if not np.isfinite(v):
            flags |= _IS_NOT_FINITE
        elif check_integer and v != np.floor(v):
            flags |= _IS_FRACTIONAL
    if v < 0:
        flags |= _IS_NEGATIVE
    elif v > 0:
        flags |= _IS_POSITIVE
    return flags


@njit(cache=True, nogil=True, inline="always")
def _reason_of(flags):
    """First skip reason of a row's OR-ed value flags, or -1."""
    if flags & _IS_NOT_FINITE:
        return _NOT_FINITE
    if flags & _IS_NEGATIVE:
        return _NEGATIVE
    if flags & _IS_FRACTIONAL:
        return _NON_INTEGER
    if not flags & _IS_POSITIVE:
        return _EMPTY
    return -1


def scan_counts(x, integer_counts: bool, slot_of: np.ndarray, cells_per_gene: np.ndarray) -> None:
    """Python entry of `scan_rows` for a CSR matrix ``x``: float data gets the finite (and, for
    counts, integer) checks; integer data cannot fail them."""
    float_input = x.data.dtype.kind == "f"
    scan_rows(np.asarray(x.indptr, np.int64), x.indices, x.data, float_input,
              float_input and integer_counts, np.asarray(slot_of, np.int64), cells_per_gene)


@njit(cache=True, nogil=True)
def scan_rows(indptr, indices, data, check_finite, check_integer, slot_of, cells_per_gene):
    """Add to ``cells_per_gene`` [n_genes] the cells with a positive value of each gene, over rows
    passing the value checks (the input of a vocabulary built from the corpus; ``check_finite``:
    float data). ``slot_of`` [n_vars]: each column's gene (-1: none); a cell counts once per gene
    however many of its columns hold that gene (their counts are summed when converted)."""
    counted_in = np.full(len(cells_per_gene), -1, np.int64)  # the row that last counted each gene
    for r in range(len(indptr) - 1):
        lo, hi = indptr[r], indptr[r + 1]
        # one pass, counting as if the row passes; the rare row that fails is taken back out
        flags = 0
        for j in range(lo, hi):
            v = np.float64(data[j])
            flags |= _value_flags(v, check_finite, check_integer)
            g = slot_of[indices[j]]
            if v > 0 and g >= 0 and counted_in[g] != r:
                cells_per_gene[g] += 1
                counted_in[g] = r
        if _reason_of(flags) >= 0:
            for j in range(lo, hi):
                g = slot_of[indices[j]]
                if g >= 0 and counted_in[g] == r:
                    cells_per_gene[g] -= 1
                    counted_in[g] = -1


@intrinsic
def _trailing_zeros(typingctx, x):  # pragma: no cover
    """Index of the lowest set bit of a nonzero uint64 (one instruction)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@njit(cache=True, nogil=True, inline="always")
def _bitmap_add(seen, dense, t, v):
    """Add ``v`` to token ``t``'s sum in ``dense``, setting its bit in ``seen`` (the first value
    sets the sum: ``dense`` is not cleared between rows)."""
    w = t >> 6
    bit = np.uint64(1) << np.uint64(t & 63)
    if seen[w] & bit:
        dense[t] += v
    else:
        seen[w] |= bit
        dense[t] = v


@njit(cache=True, nogil=True, inline="always")
def _bitmap_emit(seen, dense, w0, w1, emit, out_tokens, out_values, pos, largest):
    """Walk and clear the bitmap words ``w0..w1``; with ``emit``, write each set token and its
    sum at ``pos`` on, ascending. Returns ``(pos, largest sum)``."""
    one = np.uint64(1)
    for w in range(w0, w1 + 1):
        x = seen[w]
        seen[w] = 0
        if emit:
            while x:
                t = (w << 6) + np.int64(_trailing_zeros(x))
                x &= x - one
                acc = dense[t]
                largest = max(largest, acc)
                out_tokens[pos] = t
                out_values[pos] = acc
                pos += 1
    return pos, largest


@njit(cache=True, nogil=True)
def map_rows(indptr, indices, data, colmap, check_finite, check_integer, min_genes, max_value, key_bits,
             n_tokens, part_bits, reason, total_counts, out_indptr, out_tokens, out_values, part_counts):
    """Validate rows, map source columns to tokens, sort tokens, sum duplicate tokens.

    In:  CSR ``indptr`` [n+1], ``indices``/``data`` [nnz] (any numeric dtype; ``check_finite``
         false for integer data, which cannot be non-finite or fractional), ``colmap``
         [n_vars] token per column (-1: dropped; all < ``n_tokens``); a row with a summed value
         above ``max_value`` (what the output dtype holds) is skipped as ``count_overflow``.
         Out (preallocated):
         ``reason`` [n] int8, ``total_counts`` [n] f64 (row sum before vocabulary filtering),
         and the written rows as CSR ``out_indptr`` [n+1], ``out_tokens`` [nnz] (the
         vocabulary's token dtype), ``out_values`` [nnz] (uint32 for counts, float32 otherwise);
         ``part_counts`` [n_parts] (zeroed by the caller) gets the written tokens per
         ``token >> part_bits`` (what `stats.GeneStats.add_cells` needs to lay out its pairs).
    Returns (rows written, largest summed value written); the written arrays are
    ``out_*[:written(+1)]``.

    A row whose tokens come out of ``colmap`` ascending (a source in vocabulary order) needs no
    sort. Otherwise, when its tokens span few 64-token words for its length, it is ordered
    through a bitmap over the tokens (set a bit per token, then walk the set bits: summing
    duplicates on the way), else by a radix sort; both give the same rows.
    """
    n = len(indptr) - 1
    longest = 0
    for r in range(n):
        longest = max(longest, indptr[r + 1] - indptr[r])
    keys = np.empty(longest, np.int64)
    vals = np.empty(longest, np.float64)
    tmp_k = np.empty(longest, np.int64)
    tmp_v = np.empty(longest, np.float64)
    seen = np.zeros((n_tokens + 63) >> 6, np.uint64)  # all zero between rows
    dense = np.empty(n_tokens, np.float64)
    written = 0
    pos = 0
    largest = 0.0
    out_indptr[0] = 0
    for r in range(n):
        lo, hi = indptr[r], indptr[r + 1]
        # one pass: the row's value checks, and its mapped positive entries
        total = 0.0
        flags = 0
        m = 0
        ordered = True
        prev = -1
        tmin = n_tokens
        tmax = -1
        for j in range(lo, hi):
            v = np.float64(data[j])
            total += v
            flags |= _value_flags(v, check_finite, check_integer)
            if v > 0:
                t = colmap[indices[j]]
                if t >= 0:
                    keys[m] = t
                    vals[m] = v
                    if t <= prev:
                        ordered = False
                    prev = t
                    tmin = min(tmin, t)
                    tmax = max(tmax, t)
                    m += 1
        total_counts[r] = total
        code = _reason_of(flags)
        if code >= 0:
            reason[r] = code
            continue
        start = pos
        row_largest = 0.0
        if ordered:  # strictly ascending: no duplicates either
            for i in range(m):
                out_tokens[pos + i] = keys[i]
                out_values[pos + i] = vals[i]
                row_largest = max(row_largest, vals[i])
            pos += m
        elif (tmax >> 6) - (tmin >> 6) < 4 * m + 16:
            for i in range(m):
                _bitmap_add(seen, dense, keys[i], vals[i])
            pos, row_largest = _bitmap_emit(seen, dense, tmin >> 6, tmax >> 6, True, out_tokens, out_values,
                                            pos, row_largest)
        else:
            radix_sort_pairs(keys, vals, m, tmp_k, tmp_v, key_bits)
            # sum runs of one token (several source columns of one gene) in float64, then store
            i = 0
            while i < m:
                t = keys[i]
                acc = vals[i]
                i += 1
                while i < m and keys[i] == t:
                    acc += vals[i]
                    i += 1
                row_largest = max(row_largest, acc)
                out_tokens[pos] = t
                out_values[pos] = acc
                pos += 1
        code = _kept_row_reason(pos - start, min_genes, row_largest, max_value)
        if code >= 0:
            reason[r] = code
            pos = start
            continue
        largest = max(largest, row_largest)
        for i in range(start, pos):
            part_counts[np.int64(out_tokens[i]) >> part_bits] += 1
        reason[r] = -1
        written += 1
        out_indptr[written] = pos
    return written, largest


@njit(cache=True, nogil=True)
def map_rows_scattered(indptr, indices, data, colmap, check_finite, check_integer, min_genes, max_value,
                       n_tokens, part_bits, reason, total_counts, out_indptr, out_tokens, out_values,
                       part_counts):
    """`map_rows` for a source whose columns are not in vocabulary order (most real files: genes
    by chromosome position, the vocabulary by Ensembl id), where nearly every row needs sorting.
    Each mapped entry goes straight into a bitmap over the tokens (duplicates summed in source
    order, as `map_rows` does), and the row is emitted by walking the set bits: no per-row key
    array, no sort. Same arguments (without ``key_bits``), outputs and return value."""
    n = len(indptr) - 1
    seen = np.zeros((n_tokens + 63) >> 6, np.uint64)  # all zero between rows
    dense = np.empty(n_tokens, np.float64)
    written = 0
    pos = 0
    largest = 0.0
    out_indptr[0] = 0
    for r in range(n):
        lo, hi = indptr[r], indptr[r + 1]
        total = 0.0
        flags = 0
        wmin = len(seen)
        wmax = -1
        for j in range(lo, hi):
            v = np.float64(data[j])
            total += v
            flags |= _value_flags(v, check_finite, check_integer)
            if v > 0:
                t = colmap[indices[j]]
                if t >= 0:
                    _bitmap_add(seen, dense, t, v)
                    wmin = min(wmin, t >> 6)
                    wmax = max(wmax, t >> 6)
        total_counts[r] = total
        code = _reason_of(flags)
        start = pos
        # emit the row (or, for a skipped row, just clear its bits)
        pos, row_largest = _bitmap_emit(seen, dense, wmin, wmax, code < 0, out_tokens, out_values, pos, 0.0)
        if code >= 0:
            reason[r] = code
            continue
        code = _kept_row_reason(pos - start, min_genes, row_largest, max_value)
        if code >= 0:
            reason[r] = code
            pos = start
            continue
        largest = max(largest, row_largest)
        for i in range(start, pos):
            part_counts[np.int64(out_tokens[i]) >> part_bits] += 1
        reason[r] = -1
        written += 1
        out_indptr[written] = pos
    return written, largest


@njit(cache=True, nogil=True, inline="always")
def _kept_row_reason(n_genes, min_genes, row_largest, max_value):
    """Skip reason of a row that passed the value checks, from its mapped genes and largest
    summed value, or -1 (written)."""
    if n_genes < min_genes:
        return _BELOW_MIN_GENES
    if row_largest > max_value:
        return _COUNT_OVERFLOW
    return -1


def columns_in_token_order(colmap: np.ndarray) -> bool:
    """Whether the mapped columns of ``colmap`` (-1: dropped) have strictly ascending tokens,
    so that every row comes out sorted as read (`map_rows`; else `map_rows_scattered`)."""
    mapped = colmap[colmap >= 0]
    return bool(np.all(mapped[1:] > mapped[:-1]))


_UINT32_MAX = float(np.iinfo(np.uint32).max)


class Rows(NamedTuple):
    """What `convert_rows` gives: ``reason`` [n] int8 (-1: written), ``total_counts`` [n] f64,
    the written rows as CSR ``indptr`` [w+1] int64, ``tokens``/``values`` [nnz'], and
    ``partition_counts`` [ceil(n_tokens / 2**partition_bits)] (tokens per partition)."""

    reason: np.ndarray
    total_counts: np.ndarray
    indptr: np.ndarray
    tokens: np.ndarray
    values: np.ndarray
    partition_counts: np.ndarray


def convert_rows(indptr, indices, data, colmap, integer_counts: bool, min_genes: int, token_dtype,
                 buffers: Buffers | None = None, partition_bits: int = PARTITION_BITS) -> Rows:
    """Python entry of `map_rows`: allocates the outputs, trims them, narrows the counts.

    ``values`` come out uint16 when every count fits, else uint32; float32 for non-integer input.
    A cell with a count (after summing duplicate genes) above uint32 is skipped as
    ``count_overflow``: one such cell must not stop a conversion of millions.
    With ``buffers``, the outputs are views of its arrays, valid until the next call with the
    same buffers.
    """
    buf = buffers if buffers is not None else Buffers()
    n = len(indptr) - 1
    nnz = len(data)
    token_dtype = np.dtype(token_dtype)
    reason = buf.get("reason", n, np.int8)
    total = buf.get("total_counts", n, np.float64)
    out_indptr = buf.get("indptr", n + 1, np.int64)
    out_tokens = buf.get("tokens", nnz, token_dtype)
    out_values = buf.get("values", nnz, np.uint32 if integer_counts else np.float32)
    colmap = np.asarray(colmap, np.int32)
    n_tokens = int(colmap.max()) + 1 if len(colmap) else 0
    part_counts = buf.get("partition_counts", (n_tokens >> partition_bits) + 1, np.int64)
    part_counts[:] = 0
    float_input = np.asarray(data).dtype.kind == "f"
    checks = (float_input, integer_counts and float_input, min_genes, _UINT32_MAX if integer_counts else np.inf)
    outputs = (reason, total, out_indptr, out_tokens, out_values, part_counts)
    indptr = np.asarray(indptr, np.int64)
    if columns_in_token_order(colmap):
        w, largest = map_rows(indptr, indices, data, colmap, *checks, token_dtype.itemsize * 8, n_tokens,
                              partition_bits, *outputs)
    else:
        w, largest = map_rows_scattered(indptr, indices, data, colmap, *checks, n_tokens, partition_bits,
                                        *outputs)
    end = out_indptr[w]
    values = out_values[:end]
    if integer_counts and largest <= np.iinfo(np.uint16).max:
        narrow = buf.get("values16", end, np.uint16)
        np.copyto(narrow, values, casting="unsafe")
        values = narrow
    return Rows(reason, total, out_indptr[: w + 1], out_tokens[:end], values, part_counts)
