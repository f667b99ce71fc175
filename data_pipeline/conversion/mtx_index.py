"""10x MatrixMarket files (``matrix.mtx(.gz)``: genes x cells, 1-based coordinates) read with
bounded memory, and the on-disk CSR index the converter reads them through.

MatrixMarket has no index: any entry of a cell may sit anywhere in the file. Parsing it whole
(pandas, ``scipy.io.mmread``) holds about 24 bytes per entry in every process that reads it: a
100,000-cell file of 3,000 expressed genes per cell is 7 GB, once per converter worker. Here:

- `stream_rows`: one pass over the file in chunks of ``chunk`` entries, keeping a row range's
  cells (the converter's plan reads its sample so). Memory: one chunk and the range.
- `build_index`: one parsing pass writing the entries as binary (cell, gene, value) columns and
  counting each cell's entries, then a pass over those columns putting each entry at its cell's
  place in a CSR copy (cells x genes): ``indptr.npy``, ``indices.npy``, ``data.npy`` and
  ``index.json`` in a folder, renamed into place whole (its presence means it is complete).
  Memory: the per-cell counts and one chunk.
- `MtxIndex`: that folder memory-mapped; a row range is two slices.

Both check the file as they go: entries past the declared size, and fewer or more entries than
the size line promises (a truncated file), are a `SourceError` naming the file. Rows come out as
the whole-file parse gives them (duplicate entries summed, gene columns sorted): the tests hold
both to ``scipy.io.mmread``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .fsio import commit, fsync_tree, temp_path
from .source import SourceError

CHUNK_ENTRIES = 1 << 21  # entries parsed at a time: ~50 MB of parsed columns
INDEX_VERSION = 1


@dataclass(frozen=True)
class MtxHeader:
    """What the banner and size line say: ``field`` (integer, real, double, pattern), the shape
    (``n_features`` x ``n_cells``: genes are rows), ``nnz`` entries, and ``lines`` before the first
    entry."""

    path: Path
    field: str
    n_features: int
    n_cells: int
    nnz: int
    lines: int

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.field in ("real", "double") else np.int64)


def _open(path: Path):
    import gzip

    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_header(path: Path) -> MtxHeader:
    """The header of ``path``; SourceError unless it is a coordinate file of general counts."""
    with _open(path) as fh:
        banner = fh.readline().decode(errors="replace").split()
        if len(banner) < 5 or banner[0].lower() != "%%matrixmarket" or banner[2].lower() != "coordinate":
            raise SourceError(f"{path}: not a MatrixMarket coordinate file")
        field, symmetry = banner[3].lower(), banner[4].lower()
        if field not in ("integer", "real", "double", "pattern") or symmetry != "general":
            raise SourceError(f"{path}: MatrixMarket '{field} {symmetry}' is not supported "
                              "(expected 'integer general' or 'real general' counts)")
        lines = 1
        line = fh.readline()
        while line.startswith(b"%") or not line.strip():
            if not line:
                raise SourceError(f"{path}: no size line after the MatrixMarket header")
            lines += 1
            line = fh.readline()
        try:
            rows, cols, nnz = (int(x) for x in line.split())
        except ValueError:
            raise SourceError(f"{path}: the size line {line.decode(errors='replace').strip()!r} is not "
                              "'rows columns entries'") from None
    return MtxHeader(path, field, rows, cols, nnz, lines + 1)


def _entries(header: MtxHeader, chunk: int):
    """The file's entries in chunks: (gene rows [m] int64, cell columns [m] int64, values [m]), both
    0-based, checked against the declared size; SourceError at the end unless exactly ``nnz``."""
    n_cols = 2 if header.field == "pattern" else 3
    seen = 0
    if header.nnz:  # no entries: pandas finds no columns to parse
        dtype = {0: np.int64, 1: np.int64, 2: header.value_dtype} if n_cols == 3 else np.int64
        with pd.read_csv(header.path, sep=r"\s+", header=None, skiprows=header.lines, comment="%",
                         usecols=range(n_cols), engine="c", dtype=dtype, chunksize=chunk) as reader:
            for frame in reader:
                genes, cells = frame[0].to_numpy() - 1, frame[1].to_numpy() - 1
                if len(frame) and (genes.min() < 0 or cells.min() < 0 or genes.max() >= header.n_features
                                   or cells.max() >= header.n_cells):
                    raise SourceError(f"{header.path}: entry indices outside the declared size (MatrixMarket "
                                      "is 1-based)")
                values = frame[2].to_numpy() if n_cols == 3 else np.ones(len(frame), np.int64)
                seen += len(frame)
                yield genes, cells, values
    if seen != header.nnz:
        raise SourceError(f"{header.path}: the size line promises {header.nnz} entries but {seen} were read "
                          "(truncated file?)")


def stream_rows(header: MtxHeader, feature_map: np.ndarray, n_vars: int, start: int, stop: int,
                chunk: int = CHUNK_ENTRIES) -> sp.csr_matrix:
    """Cells ``start:stop`` as CSR [stop - start, n_vars] in one pass over the file (every entry is
    read and checked). ``feature_map`` [n_features]: each feature's column, -1 to drop it (a
    feature that is not gene expression)."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for genes, cells, values in _entries(header, chunk):
        cols = feature_map[genes]
        keep = (cells >= start) & (cells < stop) & (cols >= 0)
        parts.append((cells[keep] - start, cols[keep], values[keep]))
    rows, cols, values = (np.concatenate([p[k] for p in parts]) if parts else
                          np.zeros(0, header.value_dtype if k == 2 else np.int64) for k in range(3))
    return sp.csr_matrix((values, (rows, cols)), shape=(stop - start, n_vars))


def build_index(header: MtxHeader, feature_map: np.ndarray, n_vars: int, folder: Path,
                chunk: int = CHUNK_ENTRIES) -> None:
    """Write the CSR index of the file to ``folder`` (see the module docstring); nothing is left
    under ``folder``'s name unless it is complete. A temp folder left by a killed build is
    `fsio.remove_stale_temps`' to delete."""
    folder = Path(folder)
    tmp = temp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(header, feature_map, n_vars, tmp, chunk)
        fsync_tree(tmp)
        commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(header: MtxHeader, feature_map: np.ndarray, n_vars: int, tmp: Path, chunk: int) -> None:
    counts = np.zeros(header.n_cells, np.int64)
    columns = {"cells": np.int32, "cols": np.int32, "values": header.value_dtype}
    kept = 0
    handles = {name: open(tmp / f"{name}.bin", "wb") for name in columns}
    try:
        for genes, cells, values in _entries(header, chunk):
            cols = feature_map[genes]
            keep = cols >= 0
            cells, cols, values = cells[keep], cols[keep], values[keep]
            counts += np.bincount(cells, minlength=header.n_cells)
            kept += len(cells)
            for name, part in (("cells", cells), ("cols", cols), ("values", values)):
                np.ascontiguousarray(part, columns[name]).tofile(handles[name])
    finally:
        for fh in handles.values():
            fh.close()

    indptr = np.zeros(header.n_cells + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    np.save(tmp / "indptr.npy", indptr)
    for name, dtype in (("indices", np.int32), ("data", header.value_dtype)):
        np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, (kept,)).flush()
    cursor = indptr[:-1].copy()  # where each cell's next entry goes
    handles = {name: open(tmp / f"{name}.bin", "rb") for name in columns}
    try:
        for a in range(0, kept, chunk):
            n = min(chunk, kept - a)
            cells, cols, values = (np.fromfile(handles[k], columns[k], n) for k in ("cells", "cols", "values"))
            order = np.argsort(cells, kind="stable")  # a cell's entries keep the file's order
            sorted_cells = cells[order]
            first = np.empty(n, bool)
            first[:1] = True
            np.not_equal(sorted_cells[1:], sorted_cells[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            sizes = np.diff(np.append(starts, n))
            dest = cursor[sorted_cells] + (np.arange(n) - np.repeat(starts, sizes))
            # mapped per chunk: the pages a chunk writes leave this process with it (mapped whole, every
            # page written would count as this process's memory until the end)
            for name, part in (("indices", cols), ("data", values)):
                out = np.load(tmp / f"{name}.npy", mmap_mode="r+")
                out[dest] = part[order]
                del out
            cursor[sorted_cells[starts]] += sizes
    finally:
        for fh in handles.values():
            fh.close()
    if not np.array_equal(cursor, indptr[1:]):  # the binary columns changed under us: never expected
        raise SourceError(f"{header.path}: the index's entries do not add up to its cells' counts; rerun")
    for name in columns:
        (tmp / f"{name}.bin").unlink()
    (tmp / "index.json").write_text(json.dumps({
        "version": INDEX_VERSION, "source": str(header.path), "source_bytes": os.path.getsize(header.path),
        "n_cells": header.n_cells, "n_vars": n_vars, "entries": kept, "field": header.field}))


class MtxIndex:
    """A `build_index` folder: rows as CSR, each range read with two positioned reads (not a
    memory map, whose pages would count as the reader's memory as it goes through the file)."""

    def __init__(self, folder: Path, header: MtxHeader, n_vars: int):
        folder = Path(folder)
        try:
            meta = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{folder}: not a complete index of {header.path} ({exc}); delete the folder and "
                              "rerun (it is rebuilt)") from None
        want = {"version": INDEX_VERSION, "n_cells": header.n_cells, "n_vars": n_vars, "field": header.field,
                "source_bytes": os.path.getsize(header.path)}
        differ = sorted(k for k, v in want.items() if meta.get(k) != v)
        if differ:
            raise SourceError(f"{folder}: an index of another file than {header.path} ({', '.join(differ)} differ); "
                              "delete the folder and rerun (it is rebuilt)")
        self.folder, self.n_vars = folder, n_vars
        self.indptr = np.load(folder / "indptr.npy")
        self._arrays = {name: _npy_layout(folder / f"{name}.npy") for name in ("indices", "data")}

    def _read(self, name: str, a: int, b: int) -> np.ndarray:
        path, offset, dtype = self._arrays[name]
        return np.fromfile(path, dtype, b - a, offset=offset + a * dtype.itemsize)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as CSR [stop - start, n_vars], duplicates summed, columns sorted."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        x = sp.csr_matrix((self._read("data", a, b), self._read("indices", a, b), self.indptr[start:stop + 1] - a),
                          shape=(stop - start, self.n_vars))
        x.sum_duplicates()
        return x


def _npy_layout(path: Path) -> tuple[Path, int, np.dtype]:
    """(path, byte offset of the data, dtype) of a one-dimensional C-order ``.npy`` file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
        if len(shape) != 1:
            raise SourceError(f"{path}: not a one-dimensional array; delete the index folder and rerun")
        return path, fh.tell(), dtype
