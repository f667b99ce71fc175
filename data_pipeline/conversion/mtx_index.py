"""10x MatrixMarket files (``matrix.mtx(.gz)``: genes x cells, 1-based coordinates) read with
bounded memory, and the on-disk CSR index the converter reads them through.

MatrixMarket has no index: any entry of a cell may sit anywhere in the file. Parsing it whole
holds the file in every process that reads it: about 60 bytes per entry with pandas, 27 with
``scipy.io.mmread`` (benchmarks/bench_mtx.py: 3.2 and 1.5 GB for 56 M entries), so a 100,000-cell
file of 3,000 expressed genes per cell is 18 GB once per converter worker. Here:

- `stream_rows`: one pass over the file in chunks of ``chunk`` entries, keeping a row range's
  cells (the converter's plan reads its sample so). Memory: one chunk and the range.
- `build_index`: one parsing pass counting each cell's entries and appending them, as binary
  (cell, gene, value) records, to the bucket file of their cell range; then one bucket at a time
  sorted by cell and appended to a CSR copy (cells x genes): ``indptr.npy``, ``indices.npy``,
  ``data.npy`` and ``index.json`` in a folder, renamed into place whole (its presence means it is
  complete). Every write is sequential, whatever order the file's entries come in. Memory: the
  per-cell counts, one chunk and one bucket (`BUCKET_ENTRIES`, larger past `MAX_BUCKETS` of
  them). Disk: 12 bytes per entry, 16 more while it is built.
- `MtxIndex`: that folder; a row range is two positioned reads.

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
from .source import _DAMAGED, SourceError

CHUNK_ENTRIES = 1 << 20  # entries parsed at a time: ~25 MB of parsed columns
BUCKET_ENTRIES = 1 << 22  # entries sorted at a time in the second pass: 64 MB of (cell, gene, count) records
MAX_BUCKETS = 256  # bucket files open at once in the first pass (larger files get larger buckets)
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


def _entries(header: MtxHeader, feature_map: np.ndarray, chunk: int):
    """The file's entries in chunks, those of features ``feature_map`` drops left out: (cells [m]
    int64, gene columns [m] int64, values [m]), 0-based, checked against the declared size;
    SourceError at the end unless exactly ``nnz`` were read, and for any line that does not parse
    (naming the file: a read error is the input's, never the index's). ``feature_map``
    [n_features]: each feature's column, -1 to drop it (a feature that is not gene expression)."""
    n_cols = 2 if header.field == "pattern" else 3
    seen = 0
    if header.nnz:  # no entries: pandas finds no columns to parse
        dtype = {0: np.int64, 1: np.int64, 2: header.value_dtype} if n_cols == 3 else np.int64
        try:
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
                    cols = feature_map[genes]
                    keep = cols >= 0
                    yield cells[keep], cols[keep], values[keep]
        except (ValueError, OSError, EOFError) as exc:  # a bad line, a damaged gzip stream, an I/O error
            if isinstance(exc, SourceError):
                raise
            raise SourceError(f"{header.path}: cannot parse the MatrixMarket entries after entry {seen} "
                              f"({type(exc).__name__}: {exc}); {_DAMAGED}") from exc
    if seen != header.nnz:
        raise SourceError(f"{header.path}: the size line promises {header.nnz} entries but {seen} were read "
                          "(truncated file?)")


def stream_rows(header: MtxHeader, feature_map: np.ndarray, n_vars: int, start: int, stop: int,
                chunk: int = CHUNK_ENTRIES) -> sp.csr_matrix:
    """Cells ``start:stop`` as CSR [stop - start, n_vars] in one pass over the file (every entry is
    read and checked; ``feature_map`` as `_entries` takes it)."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for cells, cols, values in _entries(header, feature_map, chunk):
        keep = (cells >= start) & (cells < stop)
        parts.append((cells[keep] - start, cols[keep], values[keep]))
    rows, cols, values = (np.concatenate([p[k] for p in parts]) if parts else
                          np.zeros(0, header.value_dtype if k == 2 else np.int64) for k in range(3))
    return sp.csr_matrix((values, (rows, cols)), shape=(stop - start, n_vars))


def build_index(header: MtxHeader, feature_map: np.ndarray, n_vars: int, folder: Path,
                chunk: int = CHUNK_ENTRIES, bucket: int = BUCKET_ENTRIES) -> int:
    """Write the CSR index of the file to ``folder`` (see the module docstring); -> the entries it
    holds (those of gene features). Nothing is left
    under ``folder``'s name unless it is complete. A temp folder left by a killed build is
    `fsio.remove_stale_temps`' to delete. SourceError for a fault of the file; OSError for one of
    writing (a full disk: the error names the folder and the space the build needs)."""
    folder = Path(folder)
    tmp = temp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        entries = _build(header, feature_map, n_vars, tmp, chunk, bucket)
        fsync_tree(tmp)
        commit(tmp, folder)
        return entries
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        need = header.nnz * (16 + 12)  # a (cell, gene, value) record per entry while building, then the index
        raise OSError(exc.errno, f"{exc.strerror or exc} (indexing {header.path} needs about {need / 2**30:.1f} "
                                 "GiB free while it runs, half of it after)", str(folder)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(header: MtxHeader, feature_map: np.ndarray, n_vars: int, tmp: Path, chunk: int, bucket: int) -> int:
    """Pass 1 parses the file, counting each cell's entries and appending every kept entry to the
    bucket file of its cell range (about ``bucket`` entries each); pass 2 sorts one bucket at a time
    by cell (stable: a cell's entries keep the file's order) and appends it to ``indices.npy`` /
    ``data.npy``. A bucket's cells are contiguous, so both passes write sequentially whatever the
    file's entry order (by cell, by gene, or none)."""
    if max(header.n_cells, n_vars) >= 2 ** 31:
        raise SourceError(f"{header.path}: {header.n_cells} cells x {n_vars} genes: the index keeps cell and gene "
                          "numbers as int32; split the file")
    n_buckets = min(MAX_BUCKETS, max(1, -(-header.nnz // bucket)))
    cells_per_bucket = max(1, -(-header.n_cells // n_buckets))
    n_buckets = max(1, -(-header.n_cells // cells_per_bucket))
    record = np.dtype([("cell", np.int32), ("col", np.int32), ("value", header.value_dtype)])
    paths = [tmp / f"bucket{b:06d}.bin" for b in range(n_buckets)]
    counts = np.zeros(header.n_cells, np.int64)
    handles = [open(path, "wb") for path in paths]
    try:
        for cells, cols, values in _entries(header, feature_map, chunk):
            counts += np.bincount(cells, minlength=header.n_cells)
            rec = np.empty(len(cells), record)
            rec["cell"], rec["col"], rec["value"] = cells, cols, values
            which = cells // cells_per_bucket
            order = np.argsort(which, kind="stable")
            rec, which = rec[order], which[order]
            bounds = np.searchsorted(which, np.arange(n_buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                rec[bounds[b]:bounds[b + 1]].tofile(handles[b])
    finally:
        for fh in handles:
            fh.close()

    indptr = np.zeros(header.n_cells + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    np.save(tmp / "indptr.npy", indptr)
    kept = int(indptr[-1])
    with open(tmp / "indices.npy", "wb") as fi, open(tmp / "data.npy", "wb") as fd:
        for fh, dtype in ((fi, np.dtype(np.int32)), (fd, header.value_dtype)):
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": (kept,)})
        base = fi.tell()
        for b, path in enumerate(paths):
            rec = np.fromfile(path, record)
            path.unlink()
            order = np.argsort(rec["cell"], kind="stable")
            rec["col"][order].tofile(fi)
            rec["value"][order].tofile(fd)
            del rec, order
            last = min(header.n_cells, (b + 1) * cells_per_bucket)
            if fi.tell() - base != 4 * indptr[last]:
                raise SourceError(f"{header.path}: the index's entries do not add up to its cells' counts "
                                  "(the file changed while it was read?); rerun")
    (tmp / "index.json").write_text(json.dumps({
        "version": INDEX_VERSION, "source": str(header.path), "source_bytes": os.path.getsize(header.path),
        "n_cells": header.n_cells, "n_vars": n_vars, "entries": kept, "field": header.field}))
    return kept


class MtxIndex:
    """A `build_index` folder: rows as CSR, each range read with two positioned reads (not a
    memory map, whose pages would count as the reader's memory as it goes through the file)."""

    def __init__(self, folder: Path, header: MtxHeader, n_vars: int):
        folder = Path(folder)
        if not folder.is_dir():
            raise SourceError(f"{folder}: no index of {header.path}; rerun the conversion (its index stage builds it)")
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
