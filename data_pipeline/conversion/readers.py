"""Readers for count matrices: `.h5ad`, AnnData zarr stores, 10x `matrix.mtx` folders, 10x `.h5`,
`.loom`, and TileDB-SOMA experiments (`soma_source`).

Every reader presents a file as a `Source`: cells x genes, read in row ranges as CSR, never loaded
whole where the format allows random access:

- h5ad / zarr CSR: only the row range's slice of ``indptr``/``data``/``indices`` is read.
- h5ad / zarr CSC: each row range scans the matrix column block by column block (bounded
  memory, but the whole matrix is read once per range; prefer CSR for very large files).
- h5ad / zarr dense: rows are read directly.
- 10x h5 (v2 and v3): per-cell pointers, read like CSR.
- loom: the dense genes x cells ``/matrix`` is read a column (cell) block at a time, hyperslabs
  of a bounded number of values (h5py reads whole chunks, never cell by cell).
- 10x mtx: MatrixMarket has no index: the converter builds one per file (`mtx_index`), then reads
  rows through it; without it a read is one bounded-memory pass over the file.
- SOMA experiment (a URI such as ``tiledb://`` / ``s3://``, or a local folder that is a TileDB
  group): the sparse X layer is read per row range of obs joinids (see `soma_source`).

Cell metadata is read per row range too (`Source.obs_names`, `Source.obs_values`), so a work unit
of a converter touches only its own slice of obs.

``matrix`` picks what is read in AnnData files: ``"X"`` (default), ``"raw.X"`` or
``"layers/<name>"`` (``"<name>"`` alone is taken as a layer). 10x files hold one matrix and
ignore it (so one ``--matrix`` serves a mixed set of inputs), except a 10x v2 ``.h5`` with several
genome groups, where it names the genome. SOMA experiments take a `soma_source.SomaSelection`
(measurement, X layer, obs filter) instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .buffers import Buffers
from .h5direct import DirectReader
from .mtx_index import MtxIndex, build_index, read_header, stream_rows
from .source import (  # noqa: F401 - re-exported: the names the readers share
    _DAMAGED,
    Source,
    SourceError,
    _cause,
    _to_str_array,
    _values,
    check_column_indices,
    check_row_pointers,
)

# Elements read per slice when scanning CSC or dense matrices (bounds memory per read).
_SCAN_ELEMENTS = 1 << 24


def _dense_rows(read, start: int, stop: int, n_vars: int, dtype) -> sp.csr_matrix:
    """Rows ``start:stop`` of a dense matrix as CSR, read ``read(a, b)`` -> [b - a, n_vars] at most
    `_SCAN_ELEMENTS` values at a time: a converter's chunk of cells over every gene, dense, would be
    gigabytes per worker."""
    rows_per_read = max(1, _SCAN_ELEMENTS // max(n_vars, 1))
    parts = [sp.csr_matrix(_values(np.asarray(read(a, min(a + rows_per_read, stop)))))
             for a in range(start, stop, rows_per_read)]
    if not parts:
        return sp.csr_matrix((0, n_vars), dtype=_values(np.zeros(0, dtype)).dtype)
    return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
_DEFAULT_MATRIX = (None, "", "X")


def open_h5(path: Path):
    """``h5py.File(path, "r")`` with the HDF5 filter plugins (zstd, blosc, lz4, bitshuffle, ...)
    registered: files written with them (AnnData and Cell Ranger allow any HDF5 filter) otherwise
    fail on their first compressed read. Imported here, not at module level, so that processes that
    never open an HDF5 file (the GPU side) do not need the package."""
    import h5py

    try:
        import hdf5plugin  # noqa: F401 - registers the filters with HDF5 on import
    except ImportError:  # without it, files with plugin filters fail naming the filter
        pass
    return h5py.File(path, "r")


def is_uri(path: str | Path) -> bool:
    """Whether an input is a URI (``s3://``, ``tiledb://``, ``file://`` ...) rather than a local
    path. The only URIs read are SOMA experiments (passed to tiledbsoma as given); a URI has no
    local file to stat or checksum."""
    return isinstance(path, str) and "://" in path


def is_soma(path: str | Path) -> bool:
    """Whether an input is a TileDB-SOMA experiment: a URI, or a local folder that is a TileDB
    group (holds ``__tiledb_group.tdb``)."""
    return is_uri(path) or (Path(path) / "__tiledb_group.tdb").is_file()


def pool_start_method(paths) -> str:
    """How a converter starts worker processes that read ``paths``: ``fork`` (cheap: workers
    inherit the loaded libraries and compiled kernels), or ``spawn`` when an input is a SOMA
    experiment: TileDB is not fork-safe, and a child forked after the parent has read one hangs on
    its own first read (even with a context of its own)."""
    return "spawn" if any(is_soma(p) for p in paths) else "fork"


def detect_format(path: Path) -> str:
    """One of ``h5ad``, ``zarr``, ``10x-mtx``, ``10x-h5``, ``loom``, ``soma``, from the path and a
    peek inside."""
    if path.is_dir():
        if is_soma(path):
            return "soma"
        names = {p.name for p in path.iterdir()}
        if names & {"matrix.mtx", "matrix.mtx.gz"}:
            return "10x-mtx"
        if names & {".zattrs", "zarr.json", ".zgroup"}:
            return "zarr"
        raise SourceError(f"{path}: a folder that is neither a 10x matrix.mtx(.gz) folder, an "
                          "AnnData zarr store nor a TileDB-SOMA experiment")
    if path.name.endswith(".mtx") or path.name.endswith(".mtx.gz"):
        return "10x-mtx"
    if path.suffix == ".h5ad":
        return "h5ad"
    if path.suffix == ".loom":
        return "loom"
    if path.suffix in (".h5", ".hdf5"):
        with open_h5(path) as f:
            return "h5ad" if "X" in f or "obs" in f else "10x-h5"
    raise SourceError(f"{path}: unknown input type; expected .h5ad, an AnnData .zarr store, a 10x "
                      "matrix.mtx(.gz) folder, a 10x .h5 file, a .loom file or a TileDB-SOMA "
                      "experiment (folder or URI)")


def open_source(path: str | Path, matrix: str | None = "X", soma=None, mtx_index: Path | None = None) -> Source:
    """Open ``path`` (any supported format) as a `Source`; SourceError (naming the path) if it
    cannot be read. ``soma``: the `soma_source.SomaSelection` for SOMA experiments (default:
    measurement RNA, layer raw, every cell). ``mtx_index``: a 10x mtx file's index folder
    (`TenXMtxSource`), ignored for other formats."""
    fmt = "input"
    if not is_uri(path):
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: no such file or folder")
    try:
        fmt = "soma" if is_uri(path) else detect_format(path)
        if fmt == "soma":
            from .soma_source import SomaSource  # tiledbsoma only when a SOMA input is given

            return SomaSource(path, soma)
        if fmt in ("h5ad", "zarr"):
            return AnnDataSource(path, fmt, matrix)
        if fmt == "10x-h5":
            return TenXH5Source(path, matrix)
        if fmt == "loom":
            return LoomSource(path, matrix)
        return TenXMtxSource(path, matrix, mtx_index)
    except SourceError:
        raise
    except Exception as exc:  # corrupt or truncated files surface here with their cause
        raise SourceError(f"{path}: cannot be read as {fmt} ({_cause(exc)})") from exc


def _has(root, key: str) -> bool:
    """Whether nested ``key`` ("raw/X") exists; walked part by part so that a dataset on the way
    (an ``X`` array when asking for ``X/data``) answers False instead of raising."""
    node = root
    for part in key.split("/"):
        if not _is_group(node) or part not in node:
            return False
        node = node[part]
    return True


class _Ranges:
    """Element ranges of the 1-D datasets of one h5py file, read by `h5direct.DirectReader`
    where it applies (much faster on small chunks), by h5py slicing otherwise."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY)
        self._readers = {}

    def read(self, dset, lo: int, hi: int, buffers: Buffers | None = None) -> np.ndarray:
        name = dset.name
        if name not in self._readers:
            self._readers[name] = DirectReader.open(dset, self._fd)
        reader = self._readers[name]
        if reader is None:
            return np.asarray(dset[lo:hi])
        out = buffers.get(name, hi - lo, reader.dtype) if buffers is not None else None
        return reader.read(lo, hi, out)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_elem(elem):
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(elem)


class AnnDataSource(Source):
    """An `.h5ad` file (via h5py) or an AnnData zarr store (via zarr), without anndata's loader."""

    def __init__(self, path: Path, fmt: str, matrix: str | None):
        self.path, self.format = path, fmt
        if fmt == "h5ad":
            self._root = open_h5(path)
            self._ranges = _Ranges(path)
        else:
            import zarr

            self._root = zarr.open_group(str(path), mode="r")
        try:
            self._open_matrix(matrix)
        except BaseException:
            self.close()
            raise

    def _open_matrix(self, matrix: str | None):
        root, path = self._root, self.path
        if matrix in _DEFAULT_MATRIX:
            key, var_key = "X", "var"
        elif matrix in ("raw.X", "raw/X"):
            key, var_key = "raw/X", "raw/var"
        else:
            key, var_key = f"layers/{matrix.removeprefix('layers/')}", "var"
        self.matrix = {"X": "X", "raw/X": "raw.X"}.get(key, key)
        if not _has(root, key):
            have = (["X"] if _has(root, "X") else []) + (["raw.X"] if _has(root, "raw/X") else [])
            if _has(root, "layers"):
                have += [f"layers/{k}" for k in root["layers"].keys()]
            raise SourceError(f"{path}: has no matrix '{self.matrix}'; it has {', '.join(have) or 'none'} "
                              "(choose with --matrix)")
        self._x = root[key]
        attrs = dict(self._x.attrs)
        encoding = attrs.get("encoding-type") or attrs.get("h5sparse_format", "")
        encoding = {"csr": "csr_matrix", "csc": "csc_matrix"}.get(encoding, encoding)
        if not _is_group(self._x):
            self._layout = "dense"
            if len(self._x.shape) != 2:
                raise SourceError(f"{path}: matrix '{self.matrix}' has shape {self._x.shape}, not 2-D")
            self.n_cells, self.n_vars = (int(s) for s in self._x.shape)
        elif encoding in ("csr_matrix", "csc_matrix"):
            self._layout = encoding[:3]
            shape = attrs.get("shape", attrs.get("h5sparse_shape"))
            self.n_cells, self.n_vars = (int(s) for s in shape)
            n_ptr = self.n_cells if self._layout == "csr" else self.n_vars
            if self._x["indptr"].shape[0] != n_ptr + 1:
                raise SourceError(f"{path}: matrix '{self.matrix}' is {self.n_cells} x {self.n_vars} "
                                  f"{self._layout.upper()} but its indptr has {self._x['indptr'].shape[0]} "
                                  "entries")
            # CSC column pointers are needed by every read and are only n_vars + 1 long; CSR row
            # pointers (n_cells + 1, possibly 10^8) are sliced per read instead.
            if self._layout == "csc":
                self._indptr = np.asarray(self._x["indptr"][...], dtype=np.int64)
        else:
            raise SourceError(f"{path}: matrix '{self.matrix}' has encoding '{encoding}', not a "
                              "CSR/CSC/dense count matrix")
        data = self._x if self._layout == "dense" else self._x["data"]
        self.compressed = self.format == "zarr" or getattr(data, "compression", None) is not None
        self._var_key = var_key
        self._var = None

    @property
    def var(self) -> pd.DataFrame:
        # read on first use: only planning needs it, and a wide var table costs ~50 ms per open
        if self._var is None:
            var = self._read_var(self._var_key)
            if len(var) != self.n_vars:
                raise SourceError(f"{self.path}: {self._var_key} has {len(var)} rows but the matrix "
                                  f"has {self.n_vars} columns")
            self._var = var
        return self._var

    def _read_var(self, var_key: str) -> pd.DataFrame:
        """The var index and its text columns (what gene identity is read from), decoded here:
        anndata's reader builds every column and costs several times as much per file."""
        group = self._root[var_key]
        if _is_group(group):
            index = _to_str_array(self._index(group)[...])
            columns = {name: self._column(group, name, 0, len(index)) for name in self._columns(group)
                       if _is_text(group, name)}
            return pd.DataFrame(columns, index=index)
        try:  # anndata < 0.7: a structured array
            df = _read_elem(group)
        except Exception:  # unusual encodings: fall back to the index alone
            df = pd.DataFrame(index=self._index(group)[...])
        df.index = _to_str_array(df.index.to_numpy())
        return df

    @staticmethod
    def _index(group):
        return group[group.attrs.get("_index", "_index")]

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return _to_str_array(self._index(self._root["obs"])[start:stop])

    def obs_columns(self) -> list[str]:
        return self._columns(self._root["obs"])

    @staticmethod
    def _columns(group) -> list[str]:
        """Column names of an AnnData dataframe group, in its column order."""
        index_key = group.attrs.get("_index", "_index")
        keys = [k for k in group.keys() if k != index_key and not k.startswith("__")]
        order = [str(k) for k in np.atleast_1d(group.attrs.get("column-order", [])) if str(k) in keys]
        return order + [k for k in keys if k not in order]

    def _obs_values(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._column(self._root["obs"], name, start, stop)

    def _column(self, frame, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of column ``name`` of dataframe group ``frame`` as str / None."""
        elem = frame[name]
        if _is_group(elem):
            keys = set(elem.keys())
            if {"codes", "categories"} <= keys:
                return _decode_categorical(elem["codes"][start:stop], elem["categories"][...])
            if {"values", "mask"} <= keys:  # nullable integer / boolean / string
                out = _to_str_array(elem["values"][start:stop])
                out[np.asarray(elem["mask"][start:stop], dtype=bool)] = None
                return out
            raise SourceError(f"{self.path}: column {name!r} of {frame.name} has encoding "
                              f"'{elem.attrs.get('encoding-type')}', not a column of values")
        if _has(frame, f"__categories/{name}"):  # anndata < 0.7 kept categories beside the codes
            return _decode_categorical(elem[start:stop], frame["__categories"][name][...])
        return _to_str_array(elem[start:stop])

    def _read_rows(self, start: int, stop: int, buffers: Buffers | None) -> sp.csr_matrix:
        n = stop - start
        if self._layout == "csr":
            indptr = np.asarray(self._slice("indptr", start, stop + 1), dtype=np.int64)
            check_row_pointers(indptr, self._stored_nonzeros(), self.path, start)
            lo, hi = int(indptr[0]), int(indptr[-1])
            data = _values(self._slice("data", lo, hi, buffers))
            indices = self._slice("indices", lo, hi, buffers)
            check_column_indices(indices, indptr - lo, self.n_vars, self.path, start)
            return sp.csr_matrix((data, indices, indptr - lo), shape=(n, self.n_vars))
        if self._layout == "dense":
            return _dense_rows(lambda a, b: self._x[a:b], start, stop, self.n_vars, self._x.dtype)
        return self._read_rows_csc(start, stop)

    @property
    def layout(self) -> str:
        """How the matrix is stored: "csr", "csc" (read column block by column block, whole, for any
        row range) or "dense"."""
        return self._layout

    def _row_pointers(self) -> np.ndarray | None:
        if self._layout != "csr":
            return None
        return np.asarray(self._slice("indptr", 0, self.n_cells + 1), dtype=np.int64)

    def _stored_nonzeros(self) -> int:
        return min(int(self._x["data"].shape[0]), int(self._x["indices"].shape[0]))

    def _slice(self, key: str, lo: int, hi: int, buffers: Buffers | None = None) -> np.ndarray:
        """Elements ``lo:hi`` of the matrix's 1-D array ``key``."""
        if self.format == "h5ad":
            return self._ranges.read(self._x[key], lo, hi, buffers)
        return np.asarray(self._x[key][lo:hi])

    def _read_rows_csc(self, start: int, stop: int) -> sp.csr_matrix:
        rows, cols, vals = [], [], []
        indptr = self._indptr
        col = 0
        while col < self.n_vars and start < stop:
            # a block of columns holding about _SCAN_ELEMENTS nonzeros (at least one column)
            end = int(np.searchsorted(indptr, indptr[col] + _SCAN_ELEMENTS, side="right")) - 1
            end = min(max(end, col + 1), self.n_vars)
            lo, hi = int(indptr[col]), int(indptr[end])
            r = self._slice("indices", lo, hi)
            if len(r) and (int(r.min()) < 0 or int(r.max()) >= self.n_cells):
                raise SourceError(f"{self.path}: columns {col}:{end} of the CSC matrix hold a row index "
                                  f"outside 0:{self.n_cells}; {_DAMAGED}")
            keep = (r >= start) & (r < stop)
            if keep.any():
                c = np.repeat(np.arange(col, end), np.diff(indptr[col : end + 1]))
                rows.append(r[keep] - start)
                cols.append(c[keep])
                vals.append(_values(self._slice("data", lo, hi)[keep]))
            col = end
        dtype = _values(np.zeros(0, self._x["data"].dtype)).dtype
        if not rows:
            return sp.csr_matrix((stop - start, self.n_vars), dtype=dtype)
        coo = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(stop - start, self.n_vars))
        return coo.tocsr()

    def close(self):
        if self.format == "h5ad":
            self._root.close()
            self._ranges.close()


def _decode_categorical(codes, categories) -> np.ndarray:
    """Category per code, None for code -1 (missing).  [n] object"""
    labels = np.append(_to_str_array(categories), None)  # code -1 indexes the appended None
    return labels[np.asarray(codes, dtype=np.int64)]


def _is_text(frame, name: str) -> bool:
    """Whether column ``name`` of an AnnData dataframe group holds strings (plain, categorical
    or nullable), not numbers."""
    elem = frame[name]
    if _is_group(elem):
        keys = set(elem.keys())
        values = elem["categories"] if "categories" in keys else elem["values"] if "values" in keys else None
        return values is not None and values.dtype.kind in "OSUT"
    if _has(frame, f"__categories/{name}"):
        return frame["__categories"][name].dtype.kind in "OSUT"
    return elem.dtype.kind in "OSUT"


def _is_group(obj) -> bool:
    import h5py

    if isinstance(obj, h5py.Group):
        return True
    try:
        import zarr

        return isinstance(obj, zarr.Group)
    except ImportError:  # pragma: no cover
        return False


def _var_frame(ids: np.ndarray, names: np.ndarray) -> pd.DataFrame:
    """10x gene annotation: index = feature ids (Ensembl for Cell Ranger references)."""
    return pd.DataFrame({"gene_ids": ids, "gene_symbol": names}, index=pd.Index(ids, dtype=object))


class _HDF5FileSource(Source):
    """A source held in one HDF5 file: opened in ``__init__``, closed again if ``_open`` (the
    subclass's reading of its layout) fails, so a refused file leaves no handle behind."""

    _FORMAT = ""

    def __init__(self, path: Path, matrix: str | None = None):
        self.path, self.format = path, self._FORMAT
        self._open_handles()
        try:
            self._open(matrix)
        except BaseException:
            self.close()
            raise

    def _open_handles(self):
        self._f = open_h5(self.path)

    def _open(self, matrix: str | None):
        raise NotImplementedError


class TenXH5Source(_HDF5FileSource):
    """Cell Ranger `.h5` (v3: ``matrix/`` with ``features/``; v2: one group per genome).

    The stored matrix is CSC of genes x cells, i.e. per-cell pointers: rows read like CSR.
    Only "Gene Expression" features are presented (antibody / CRISPR features are dropped).
    """

    _FORMAT = "10x-h5"

    def _open_handles(self):
        super()._open_handles()
        self._ranges = _Ranges(self.path)

    def _open(self, matrix: str | None):
        f, path = self._f, self.path
        if "matrix" in f:
            self.matrix = "matrix"
            g = f["matrix"]
            ids, names = _to_str_array(g["features/id"][...]), _to_str_array(g["features/name"][...])
            ftype = (_to_str_array(g["features/feature_type"][...]) if "feature_type" in g["features"]
                     else np.full(len(ids), "Gene Expression", dtype=object))
        else:
            import h5py

            genomes = [k for k, v in f.items() if isinstance(v, h5py.Group) and "indptr" in v]
            if not genomes:
                raise SourceError(f"{path}: not a 10x h5 (no 'matrix' group and no genome group "
                                  "with indptr)")
            if matrix in genomes:
                genome = matrix
            elif len(genomes) == 1:
                genome = genomes[0]
            else:
                raise SourceError(f"{path}: a 10x v2 .h5 with genome groups {', '.join(genomes)}; "
                                  "choose one with --matrix GENOME")
            self.matrix = genome
            g = f[genome]
            ids, names = _to_str_array(g["genes"][...]), _to_str_array(g["gene_names"][...])
            ftype = np.full(len(ids), "Gene Expression", dtype=object)
        self._g = g
        n_features, self.n_cells = (int(s) for s in g["shape"][...])
        if n_features != len(ids):
            raise SourceError(f"{path}: shape says {n_features} features but {len(ids)} are listed")
        if g["indptr"].shape[0] != self.n_cells + 1:
            raise SourceError(f"{path}: {self.n_cells} cells but indptr has {g['indptr'].shape[0]} entries")
        gex = ftype == "Gene Expression"
        # stored feature index -> presented column (-1: dropped)
        self._feature_map = np.where(gex, np.cumsum(gex) - 1, -1).astype(np.int64)
        self._all_gex = bool(gex.all())
        self.compressed = g["data"].compression is not None
        self.n_vars = int(gex.sum())
        self.var = _var_frame(ids[gex], names[gex])

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return _to_str_array(self._g["barcodes"][start:stop])

    def _row_pointers(self) -> np.ndarray:
        return np.asarray(self._ranges.read(self._g["indptr"], 0, self.n_cells + 1), dtype=np.int64)

    def _stored_nonzeros(self) -> int:
        return min(int(self._g["data"].shape[0]), int(self._g["indices"].shape[0]))

    def _read_rows(self, start: int, stop: int, buffers: Buffers | None) -> sp.csr_matrix:
        indptr = np.asarray(self._ranges.read(self._g["indptr"], start, stop + 1), dtype=np.int64)
        check_row_pointers(indptr, self._stored_nonzeros(), self.path, start)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indptr = indptr - lo
        data = _values(self._ranges.read(self._g["data"], lo, hi, buffers))
        indices = self._ranges.read(self._g["indices"], lo, hi, buffers)
        check_column_indices(indices, indptr, len(self._feature_map), self.path, start)
        if not self._all_gex:
            indices = indices.astype(np.int64)
        if not self._all_gex:
            mapped = self._feature_map[indices]
            keep = mapped >= 0
            row_of = np.repeat(np.arange(stop - start), np.diff(indptr))
            kept_per_row = np.bincount(row_of[keep], minlength=stop - start)
            data, indices = data[keep], mapped[keep]
            indptr = np.concatenate([[0], np.cumsum(kept_per_row)])
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_vars))

    def close(self):
        self._f.close()
        self._ranges.close()


# row_attrs holding gene ids, most specific first (loompy / velocyto / SCope write Accession + Gene)
_LOOM_GENE_IDS = ("Accession", "Gene")
_LOOM_CELL_IDS = ("CellID", "obs_names", "cell_id")


class LoomSource(_HDF5FileSource):
    """A `.loom` file (loom spec 2.0.1 / 3.0.0): ``/matrix`` genes x cells (dense, chunked),
    ``/row_attrs/<name>`` per gene, ``/col_attrs/<name>`` per cell, ``/layers/<name>``.

    Gene ids: ``row_attrs/Accession`` (Ensembl in velocyto / loompy files), else ``Gene``.
    Cell ids: ``col_attrs/CellID``, else the column number. ``matrix``: ``X`` (default) is
    ``/matrix``; anything else names a layer.
    """

    _FORMAT = "loom"

    def _open(self, matrix: str | None):
        f, path = self._f, self.path
        if matrix in _DEFAULT_MATRIX:
            self.matrix, key = "X", "matrix"
        else:
            name = matrix.removeprefix("layers/")
            self.matrix, key = f"layers/{name}", f"layers/{name}"
            if not _has(f, key):
                layers = list(f["layers"].keys()) if "layers" in f else []
                raise SourceError(f"{path}: no loom layer {name!r} (layers: {', '.join(layers) or 'none'}); "
                                  "pass --matrix X for /matrix or one of the layers")
        if "matrix" not in f:
            raise SourceError(f"{path}: not a loom file (no /matrix)")
        self._x = f[key]
        self.n_vars, self.n_cells = (int(s) for s in self._x.shape)
        rows = f["row_attrs"] if "row_attrs" in f else {}
        id_attr = next((a for a in _LOOM_GENE_IDS if a in rows), None)
        if id_attr is None:
            raise SourceError(f"{path}: no gene id attribute (row_attrs has "
                              f"{', '.join(rows.keys()) or 'nothing'}; expected one of "
                              f"{', '.join(_LOOM_GENE_IDS)}): add the genes' Ensembl ids as "
                              "row_attrs['Accession'] (loompy: ds.ra['Accession'] = ids)")
        ids = _to_str_array(rows[id_attr][...])
        names = _to_str_array(rows["Gene"][...]) if "Gene" in rows else ids
        if len(ids) != self.n_vars:
            raise SourceError(f"{path}: /matrix has {self.n_vars} genes but row_attrs/{id_attr} lists {len(ids)}")
        self.var = _var_frame(ids, names)
        self._cols = f["col_attrs"] if "col_attrs" in f else None
        self._cell_id = next((a for a in _LOOM_CELL_IDS if self._cols is not None and a in self._cols), None)
        self.compressed = self._x.compression is not None

    def obs_columns(self) -> list[str]:
        if self._cols is None:
            return []
        return [k for k, v in self._cols.items() if len(v.shape) == 1 and v.shape[0] == self.n_cells]

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        if self._cell_id is None:
            return np.array([str(i) for i in range(start, stop)], dtype=object)
        return _to_str_array(self._cols[self._cell_id][start:stop])

    def _obs_values(self, name: str, start: int, stop: int) -> np.ndarray:
        return _to_str_array(self._cols[name][start:stop])

    def _read_rows(self, start: int, stop: int, buffers: Buffers | None) -> sp.csr_matrix:
        # /matrix is genes x cells: each hyperslab of cells read whole, then turned to cells x genes
        return _dense_rows(lambda a, b: np.asarray(self._x[:, a:b]).T, start, stop, self.n_vars, self._x.dtype)

    def close(self):
        self._f.close()


def _read_tsv_column_table(path: Path) -> pd.DataFrame:
    # every field as a literal string: a gene called "NA" or "nan" must not become NaN
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:  # an empty file (a folder of no cells): no rows, one column
        return pd.DataFrame({0: pd.Series([], dtype=object)})


class TenXMtxSource(Source):
    """A 10x folder: ``matrix.mtx(.gz)`` (genes x cells) with ``features.tsv.gz`` (v3) or
    ``genes.tsv`` (v2) and ``barcodes.tsv(.gz)``. MatrixMarket has no index (`mtx_index`): with
    ``index`` (a `build_index` folder, which the converter builds once per file before it reads
    rows) rows are read through it; without, each read is one pass over the whole file, in
    bounded memory."""

    def __init__(self, path: Path, matrix: str | None = None, index: Path | None = None):
        self.format, self.matrix = "10x-mtx", "matrix.mtx"
        folder = path if path.is_dir() else path.parent
        self.path = folder

        def find(*names):
            return next((folder / n for n in names if (folder / n).exists()), None)

        self._mtx = find("matrix.mtx.gz", "matrix.mtx")
        feats = find("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
        barcodes = find("barcodes.tsv.gz", "barcodes.tsv")
        if self._mtx is None or feats is None or barcodes is None:
            raise SourceError(f"{folder}: a 10x folder needs matrix.mtx(.gz), features.tsv.gz or "
                              "genes.tsv, and barcodes.tsv(.gz)")
        table = _read_tsv_column_table(feats)
        ids = table[0].to_numpy(dtype=object)
        names = table[1].to_numpy(dtype=object) if table.shape[1] > 1 else ids
        ftype = (table[2].to_numpy(dtype=object) if table.shape[1] > 2
                 else np.full(len(ids), "Gene Expression", dtype=object))
        gex = ftype == "Gene Expression"
        self._feature_map = np.where(gex, np.cumsum(gex) - 1, -1).astype(np.int64)
        self._barcodes = _read_tsv_column_table(barcodes)[0].to_numpy(dtype=object)
        self._header = read_header(self._mtx)
        if self._header.n_features != len(ids) or self._header.n_cells != len(self._barcodes):
            raise SourceError(f"{folder}: matrix.mtx is {self._header.n_features} x {self._header.n_cells} but the "
                              f"folder lists {len(ids)} features and {len(self._barcodes)} barcodes")
        self.n_cells, self.n_vars = self._header.n_cells, int(gex.sum())
        self.var = _var_frame(ids[gex], names[gex])
        self._index = None if index is None else MtxIndex(index, self._header, self.n_vars)
        self.compressed = self._index is None  # through the index a read is two slices of a memory map

    def build_index(self, folder: Path) -> int:
        """Write the file's CSR index to ``folder`` (`mtx_index.build_index`: SourceError for a
        fault of the file, OSError for one of writing the index); -> the entries it holds."""
        return build_index(self._header, self._feature_map, self.n_vars, folder)

    def _read_rows(self, start: int, stop: int, buffers: Buffers | None) -> sp.csr_matrix:
        if self._index is not None:
            return self._index.rows(start, stop)
        return stream_rows(self._header, self._feature_map, self.n_vars, start, stop)

    def _obs_names(self, start: int, stop: int) -> np.ndarray:
        return self._barcodes[start:stop].copy()
