"""A stable LSD radix sort of (non-negative integer key, value) pairs, compiled (numba): shared by
the converter's row kernels (tokens of a row) and the loader's rank mode (a cell's genes by
value)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def radix_sort_pairs(keys, vals, n, tmp_k, tmp_v, key_bits):  # pragma: no cover
    """Sort ``keys[:n]`` (non-negative ints below ``2**key_bits``) ascending, carrying ``vals``,
    stable (equal keys keep their order); ``tmp_k``/``tmp_v`` are scratch of at least ``n``.
    8 bits a pass; a pass whose byte is the same for every key moves nothing and is skipped."""
    counts = np.empty(257, np.int64)
    shift = 0
    passes = 0
    src_k, src_v, dst_k, dst_v = keys, vals, tmp_k, tmp_v
    while shift < key_bits:
        counts[:] = 0
        for i in range(n):
            counts[((src_k[i] >> shift) & 255) + 1] += 1
        if n == 0 or counts[((src_k[0] >> shift) & 255) + 1] == n:
            shift += 8
            continue
        for b in range(256):
            counts[b + 1] += counts[b]
        for i in range(n):
            b = (src_k[i] >> shift) & 255
            dst_k[counts[b]] = src_k[i]
            dst_v[counts[b]] = src_v[i]
            counts[b] += 1
        src_k, src_v, dst_k, dst_v = dst_k, dst_v, src_k, src_v
        shift += 8
        passes += 1
    if passes % 2:  # the sorted run ended in the scratch arrays
        keys[:n] = tmp_k[:n]
        vals[:n] = tmp_v[:n]
