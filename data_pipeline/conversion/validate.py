"""Which cells of a row range are kept, and why the others are skipped.

Every cell read ends in exactly one bucket: written, or skipped for the first reason that applies,
in this order (the accounting in ``manifest.json`` uses these names):

- ``not_finite``        a NaN or inf value
- ``negative``          a negative value
- ``non_integer``       a fractional value where raw counts are expected (file passed the
                        file-level check, so this is a stray cell, not a normalized matrix)
- ``empty``             no positive value at all
- ``below_min_genes``   fewer than ``--min-genes`` vocabulary genes with a positive count
- ``count_overflow``    a count (after summing duplicate gene columns) above 2^32 - 1, which the
                        corpus's uint32 counts cannot hold (not raw counts, or a damaged value)
- ``unreadable_rows``   rows of a file that could not be read (a damaged chunk, an index out of
                        range) with ``--skip-bad-files``; without it the conversion stops there

Per source, the manifest adds ``file_refused`` (every cell of a file refused whole) and
``excluded_by_filter`` (cells of a SOMA experiment that ``--soma-filter`` left out: never read,
counted so that the accounting covers every cell of the experiment).

A whole file that looks normalized (fractional values in its first rows), or whose first rows hold
a fractional value in many of their cells, is refused before any work starts
(`check_integer_counts`), because silently skipping those cells would hide the mistake.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

SKIP_REASONS = ("not_finite", "negative", "non_integer", "empty", "below_min_genes", "count_overflow",
                "unreadable_rows")

# Rows sampled per file by the file-level integer check: the first _SAMPLE_ROWS, or fewer when
# they already hold _SAMPLE_NONZEROS values (dense rows make a long read, of compressed chunks).
_SAMPLE_ROWS = 2000
_SAMPLE_NONZEROS = 200_000


def row_flags(x: sp.csr_matrix, integer_counts: bool) -> np.ndarray:
    """Index into SKIP_REASONS per row for the checks that do not depend on the vocabulary, -1
    where the row passes them.  ``x``: [n, n_vars] -> [n] int8

    The plain numpy reference of the compiled `rowkernels` (the converter runs those)."""
    n = x.shape[0]
    reason = np.full(n, -1, np.int8)
    data = x.data
    row_of = np.repeat(np.arange(n), np.diff(x.indptr))

    def mark(bad_entries: np.ndarray, code: int) -> None:
        if bad_entries.any():
            rows = np.zeros(n, bool)
            rows[row_of[bad_entries]] = True
            reason[rows & (reason < 0)] = code

    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        mark(~finite, 0)
        mark(finite & (data < 0), 1)
        if integer_counts:
            mark(finite & (data != np.rint(data)), 2)
    elif data.dtype.kind == "i":
        mark(data < 0, 1)
    positive_rows = np.zeros(n, bool)
    positive_rows[row_of[data > 0]] = True
    reason[~positive_rows & (reason < 0)] = 3
    return reason


# A file is taken as non-integer (and refused) when more than this fraction of the nonzeros in its
# first rows is fractional (a normalized matrix is ~100% fractional, while a stray bad cell in a count
# matrix is skipped and counted as ``non_integer`` instead) ...
NORMALIZED_FRACTION = 0.01
# ... or when more than this fraction of those rows' cells holds a fractional value (a few fractions
# in most cells, as multi-mapper EM counts have, would skip most cells as ``non_integer``)
FRACTIONAL_CELLS = 0.1


def check_integer_counts(sample: sp.csr_matrix) -> tuple[float, float, float]:
    """In a sample of rows: the fraction of finite nonzeros that are fractional, the fraction of
    cells holding at least one, and the largest finite value.  ``sample``: [n, n_vars]"""
    data = sample.data
    if data.dtype.kind != "f" or data.size == 0:
        return 0.0, 0.0, float(data.max()) if data.size else 0.0
    kept = np.isfinite(data) & (data != 0)
    if not kept.any():
        return 0.0, 0.0, 0.0
    values = data[kept]
    fractional = values != np.rint(values)
    rows = np.repeat(np.arange(sample.shape[0]), np.diff(sample.indptr))[kept]
    cells = np.unique(rows[fractional]).size / max(sample.shape[0], 1)
    return float(fractional.mean()), float(cells), float(values.max())


def looks_integer(frac: float, cells: float) -> bool:
    """Whether `check_integer_counts`'s fractions leave a file taken as integer counts."""
    return frac <= NORMALIZED_FRACTION and cells <= FRACTIONAL_CELLS


def sample_rows(n_cells: int, row_pointers: np.ndarray | None = None) -> tuple[int, int]:
    """Row range ``[a, b)`` the file-level checks read (``row_pointers``: CSR [n_cells+1], if known)."""
    b = min(n_cells, _SAMPLE_ROWS)
    if row_pointers is not None and b > 1:
        b = min(b, max(1, int(np.searchsorted(row_pointers, row_pointers[0] + _SAMPLE_NONZEROS))))
    return 0, b


def non_integer_message(path, frac: float, cells: float, max_value: float, matrix: str, alternatives: list[str]) -> str:
    alt = f"; this file also has {', '.join(alternatives)} (choose with --matrix)" if alternatives else ""
    if frac <= NORMALIZED_FRACTION:  # mostly integers, a few fractions in many cells: not a normalized matrix
        return (f"{path}: matrix '{matrix}' holds a few fractional values in {cells:.0%} of the cells of its first "
                f"rows ({frac:.1%} of their nonzeros; e.g. multi-mapper EM counts): each such cell would be skipped "
                f"as non_integer. Round the counts first, pass integer counts{alt}, or --allow-non-integer to store "
                "the values as float32")
    looks = ("looks log-normalized (log1p of normalized counts)" if max_value < 30
             else "looks normalized or scaled")
    return (f"{path}: matrix '{matrix}' holds non-integer values ({frac:.0%} of nonzeros in the first "
            f"rows are fractional, max {max_value:.3g}): it {looks}, not raw counts. Pass the raw "
            f"counts{alt}, or --allow-non-integer to store the values as float32")
