"""What every reader presents: `Source` (a cells x genes count matrix read in row ranges),
`SourceError`, and the checks and value conversions the readers share.

Below both `readers` (the file formats, `open_source`) and `soma_source` (TileDB-SOMA
experiments), so that neither imports the other's module to get them; `readers` re-exports
these names.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .buffers import Buffers


class SourceError(ValueError):
    """A source file that cannot be read as asked; the message says what to change."""


def _cause(exc: Exception) -> str:
    """A low-level read failure for people; HDF5's own words for a missing filter plugin
    ("can't open directory (.../plugin)") do not say what to install."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and ("plugin" in text or "filter" in text):
        text += ("; the file is compressed with an HDF5 filter that needs a plugin: install the "
                 "project's requirements (hdf5plugin)")
    return text


class Source:
    """A cells x genes count matrix read in row ranges.

    Attributes: ``path``, ``format``, ``matrix`` (what is read), ``n_cells``, ``n_vars``,
    ``cells_excluded`` (left out by a SOMA obs filter),
    ``var`` (DataFrame indexed by var names, with the file's gene annotation columns),
    ``compressed`` (reading costs decompression or parsing, so a second pass should not re-read).
    Subclasses implement ``_read_rows``; the public methods check ranges and turn low-level
    read failures (a corrupt chunk deep in a file) into SourceError naming the file.
    """

    path: Path | str  # str: a URI
    format: str
    matrix: str
    n_cells: int
    n_vars: int
    var: pd.DataFrame
    compressed: bool = True
    # cells of the input that a reader-side selection left out (a SOMA obs filter): not rows of
    # this Source; the converter counts them as skipped, ``excluded_by_filter``
    cells_excluded: int = 0

    def read_rows(self, start: int, stop: int, buffers: Buffers | None = None) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR ``[stop-start, n_vars]`` (source dtype; may hold explicit
        zeros; indices sorted or not, as stored). With ``buffers``, the matrix's arrays may be
        views of its arrays, valid until they are next used (a converter's chunk loop)."""
        start, stop = self._range(start, stop)
        with self._reading(f"rows {start}:{stop}"):
            return self._read_rows(start, stop, buffers)

    def obs_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Cell ids of rows ``start:stop``: object array of str ``[stop-start]``."""
        start, stop = self._range(start, stop)
        with self._reading(f"obs names {start}:{stop}"):
            return self._obs_names(start, stop)

    def obs_columns(self) -> list[str]:
        """Names of the per-cell metadata columns (empty for 10x files)."""
        return []

    def row_pointers(self) -> np.ndarray | None:
        """Stored nonzeros before each row, ``[n_cells + 1]`` int64, where the format keeps them
        (CSR-like layouts); None otherwise. Used to cut work units of even size. SourceError if
        they are not a valid CSR row index (see `check_row_pointers`)."""
        with self._reading("indptr"):
            pointers = self._row_pointers()
        if pointers is not None:
            check_row_pointers(pointers, self._stored_nonzeros(), self.path, 0)
        return pointers

    def _row_pointers(self) -> np.ndarray | None:
        return None

    def _stored_nonzeros(self) -> int:
        """Length of the stored ``data``/``indices`` arrays (CSR-like layouts)."""
        raise NotImplementedError

    def obs_values(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Column ``name`` of obs for rows ``start:stop``: object array ``[stop-start]`` of str,
        None where missing. Numbers become their str() (integral floats without ".0").
        KeyError if there is no such column."""
        if name not in self.obs_columns():
            raise KeyError(f"{self.path}: no obs column {name!r} (columns: "
                           f"{', '.join(self.obs_columns()) or 'none'})")
        start, stop = self._range(start, stop)
        with self._reading(f"obs[{name!r}] {start}:{stop}"):
            return self._obs_values(name, start, stop)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_rows(self, start: int, stop: int, buffers: Buffers | None) -> sp.csr_matrix:
        raise NotImplementedError

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _obs_values(self, name: str, start: int, stop: int) -> np.ndarray:
        raise KeyError(name)

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_cells if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= self.n_cells:
            raise IndexError(f"{self.path}: row range {start}:{stop} is outside 0:{self.n_cells}")
        return start, stop

    @contextmanager
    def _reading(self, what: str):
        try:
            yield
        except (SourceError, KeyError):
            raise
        except Exception as exc:
            raise SourceError(f"{self.path}: cannot read {what} ({_cause(exc)})") from exc


_DAMAGED = ("the file is damaged or was written wrongly: rewrite it from its origin, or pass "
            "--skip-bad-files to count these cells as skipped")


def check_row_pointers(indptr: np.ndarray, n_stored: int, path: Path, start: int) -> None:
    """SourceError unless CSR row pointers ``indptr`` [n+1] (of rows ``start``:``start+n``) start
    at >= 0, never decrease and stay within the ``n_stored`` stored entries: the compiled row
    kernels trust them, so a bad one would read out of bounds (a crash) or misplace counts."""
    if not len(indptr):
        return
    stop = start + len(indptr) - 1
    where = f"{path}: rows {start}:{stop}"
    if indptr[0] < 0:
        raise SourceError(f"{where}: the row index (indptr) starts at {int(indptr[0])}, below 0; {_DAMAGED}")
    steps = np.diff(indptr)
    if len(steps) and steps.min() < 0:
        r = int(np.argmax(steps < 0))
        raise SourceError(f"{where}: the row index (indptr) decreases at row {start + r} ({int(indptr[r])} -> "
                          f"{int(indptr[r + 1])}); {_DAMAGED}")
    if indptr[-1] > n_stored:
        raise SourceError(f"{where}: the row index (indptr) points to entry {int(indptr[-1])} but only "
                          f"{n_stored} are stored; {_DAMAGED}")


def check_column_indices(indices: np.ndarray, indptr: np.ndarray, n_cols: int, path: Path, start: int) -> None:
    """SourceError unless every column index of CSR rows ``start``: (``indptr`` relative to
    ``indices``) is in ``[0, n_cols)``; one vectorized pass (min and max) when they are. A negative
    index would otherwise be credited to the last gene and one >= n_cols read past the gene map."""
    if not len(indices):
        return
    low = int(indices.min()) if indices.dtype.kind == "i" else 0
    high = int(indices.max())
    if low >= 0 and high < n_cols:
        return
    bad = int(np.argmax((indices < 0) | (indices >= n_cols)))
    row = int(np.searchsorted(indptr, bad, side="right")) - 1
    raise SourceError(f"{path}: rows {start}:{start + len(indptr) - 1}: row {start + row} has gene column "
                      f"{int(indices[bad])}, outside the matrix's {n_cols} columns; {_DAMAGED}")


def _values(values: np.ndarray) -> np.ndarray:
    """Stored matrix values as the row kernels take them: float16 (neither scipy.sparse nor numba
    handles it) as float32, which holds every float16 exactly; anything else unchanged."""
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _to_str_array(values) -> np.ndarray:
    """Values of any stored dtype -> object array of str, None for NaN / None.  [n]"""
    values = np.asarray(values)
    kind = values.dtype.kind
    if kind in "iu":
        return np.array([str(v) for v in values.tolist()], dtype=object)
    if kind == "f":
        # numpy scalars keep their own precision in str(): float32 0.1 prints "0.1", not 0.1000000015
        return np.array([None if v != v else str(int(v)) if float(v).is_integer() else str(v)
                         for v in values], dtype=object)
    if kind == "S" or (kind == "O" and values.size and all(type(v) is bytes for v in values)):
        try:  # vectorized decode of the common case: ASCII bytes (h5py variable-length strings)
            return values.astype("S").astype("U").astype(object)
        except (UnicodeDecodeError, UnicodeEncodeError, TypeError, ValueError):
            pass
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values.tolist()):
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, float):
            v = None if v != v else str(int(v)) if v.is_integer() else str(v)
        out[i] = v if v is None or isinstance(v, str) else str(v)
    return out
