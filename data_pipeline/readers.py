"""Readers for count matrices: `.h5ad`, AnnData zarr stores, 10x `matrix.mtx` folders, 10x `.h5`.

Every reader presents a file as a `Source`: cells x genes, read in row ranges as CSR, never loaded
whole where the format allows random access:

- h5ad / zarr CSR: only the row range's slice of ``data``/``indices`` is read.
- h5ad / zarr CSC: each row range scans the matrix column block by column block (bounded
  memory, but the whole matrix is read once per range; prefer CSR for very large files).
- h5ad / zarr dense: rows are read directly.
- 10x h5 (v2 and v3): per-cell pointers, read like CSR.
- 10x mtx: MatrixMarket has no index, so the file is parsed once, whole, when first read.

``matrix`` picks what is read in AnnData files: ``"X"`` (default), ``"raw.X"`` or
``"layers/<name>"`` (``"<name>"`` alone is taken as a layer).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

# Elements read per slice when scanning CSC or dense matrices (bounds memory per read).
_SCAN_ELEMENTS = 1 << 24


class SourceError(ValueError):
    """A source file that cannot be read as asked; the message says what to change."""


def detect_format(path: Path) -> str:
    """One of ``h5ad``, ``zarr``, ``10x-mtx``, ``10x-h5``, from the path and a peek inside."""
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if names & {"matrix.mtx", "matrix.mtx.gz"}:
            return "10x-mtx"
        if names & {".zattrs", "zarr.json", ".zgroup"}:
            return "zarr"
        raise SourceError(f"{path}: a folder that is neither a 10x matrix.mtx(.gz) folder nor an "
                          "AnnData zarr store")
    if path.name.endswith(".mtx") or path.name.endswith(".mtx.gz"):
        return "10x-mtx"
    if path.suffix == ".h5ad":
        return "h5ad"
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return "h5ad" if "X" in f else "10x-h5"
    raise SourceError(f"{path}: unknown input type; expected .h5ad, an AnnData .zarr store, a 10x "
                      "matrix.mtx(.gz) folder or a 10x .h5 file")


def open_source(path: str | Path, matrix: str = "X") -> "Source":
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    fmt = detect_format(path)
    try:
        if fmt in ("h5ad", "zarr"):
            return AnnDataSource(path, fmt, matrix)
        if fmt == "10x-h5":
            return TenXH5Source(path)
        return TenXMtxSource(path)
    except SourceError:
        raise
    except Exception as exc:  # corrupt or truncated files surface here with their cause
        raise SourceError(f"{path}: cannot be read as {fmt} ({type(exc).__name__}: {exc})") from exc


class Source:
    """A cells x genes count matrix read in row ranges.

    Attributes: ``path``, ``format``, ``matrix`` (what is read), ``n_cells``, ``n_vars``,
    ``var`` (DataFrame indexed by var names, with the file's gene annotation columns).
    """

    path: Path
    format: str
    matrix: str
    n_cells: int
    n_vars: int
    var: pd.DataFrame

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR ``[stop-start, n_vars]`` (source dtype; may hold explicit
        zeros; indices sorted or not, as stored)."""
        raise NotImplementedError

    def obs_names(self) -> np.ndarray:
        """Cell ids ``[n_cells]`` as str."""
        raise NotImplementedError

    def obs_columns(self) -> list[str]:
        return []

    def obs_column(self, name: str) -> pd.Series:
        """An obs column as a pandas Series ``[n_cells]``."""
        raise KeyError(name)

    def close(self):
        pass


def _read_dataframe_index(group) -> np.ndarray:
    index_key = group.attrs.get("_index", "_index")
    values = group[index_key][...]
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


class AnnDataSource(Source):
    """An `.h5ad` file (via h5py) or an AnnData zarr store (via zarr), without anndata's loader."""

    def __init__(self, path: Path, fmt: str, matrix: str):
        self.path, self.format = path, fmt
        if fmt == "h5ad":
            import h5py

            self._root = h5py.File(path, "r")
        else:
            import zarr

            self._root = zarr.open_group(str(path), mode="r")
        root = self._root
        if matrix in ("X", "", None):
            key, var_key = "X", "var"
        elif matrix in ("raw.X", "raw/X"):
            key, var_key = "raw/X", "raw/var"
        else:
            name = matrix.removeprefix("layers/")
            key, var_key = f"layers/{name}", "var"
        if key not in root:
            have = ["X"] + (["raw.X"] if "raw" in root and "X" in root["raw"] else [])
            if "layers" in root:
                have += [f"layers/{k}" for k in root["layers"].keys()]
            raise SourceError(f"{path}: has no matrix '{matrix}'; it has {', '.join(have)} "
                              "(choose with --matrix)")
        self.matrix = {"X": "X", "raw/X": "raw.X"}.get(key, key)
        self._x = root[key]
        attrs = dict(self._x.attrs)
        encoding = attrs.get("encoding-type") or attrs.get("h5sparse_format", "")
        encoding = {"csr": "csr_matrix", "csc": "csc_matrix"}.get(encoding, encoding)
        if hasattr(self._x, "shape") and not _is_group(self._x):
            self._layout = "dense"
            self.n_cells, self.n_vars = (int(s) for s in self._x.shape)
        elif encoding in ("csr_matrix", "csc_matrix"):
            self._layout = encoding[:3]
            shape = attrs.get("shape", attrs.get("h5sparse_shape"))
            self.n_cells, self.n_vars = (int(s) for s in shape)
            self._indptr = np.asarray(self._x["indptr"][...], dtype=np.int64)
        else:
            raise SourceError(f"{path}: matrix '{self.matrix}' has encoding '{encoding}', not a "
                              "CSR/CSC/dense count matrix")
        self.var = self._read_var(var_key)
        if len(self.var) != self.n_vars:
            raise SourceError(f"{path}: {var_key} has {len(self.var)} rows but the matrix has "
                              f"{self.n_vars} columns")

    def _read_var(self, var_key: str) -> pd.DataFrame:
        from anndata.io import read_elem

        group = self._root[var_key]
        try:
            df = read_elem(group)
        except Exception:  # unusual encodings: fall back to the index alone
            df = pd.DataFrame(index=_read_dataframe_index(group))
        df.index = df.index.astype(str)
        return df

    def obs_names(self) -> np.ndarray:
        return _read_dataframe_index(self._root["obs"])

    def obs_columns(self) -> list[str]:
        group = self._root["obs"]
        index_key = group.attrs.get("_index", "_index")
        return [k for k in group.keys() if k != index_key and not k.startswith("__")]

    def obs_column(self, name: str) -> pd.Series:
        from anndata.io import read_elem

        group = self._root["obs"]
        if name not in group:
            raise KeyError(name)
        return pd.Series(read_elem(group[name]))

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        n = stop - start
        if self._layout == "csr":
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            data = np.asarray(self._x["data"][lo:hi])
            indices = np.asarray(self._x["indices"][lo:hi])
            return sp.csr_matrix((data, indices, self._indptr[start : stop + 1] - lo),
                                 shape=(n, self.n_vars))
        if self._layout == "dense":
            rows_per_read = max(1, _SCAN_ELEMENTS // max(self.n_vars, 1))
            parts = [sp.csr_matrix(np.asarray(self._x[s : min(s + rows_per_read, stop)]))
                     for s in range(start, stop, rows_per_read)]
            return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        return self._read_rows_csc(start, stop)

    def _read_rows_csc(self, start: int, stop: int) -> sp.csr_matrix:
        rows, cols, vals = [], [], []
        indptr = self._indptr
        col = 0
        while col < self.n_vars:
            # a block of columns holding about _SCAN_ELEMENTS nonzeros
            end = int(np.searchsorted(indptr, indptr[col] + _SCAN_ELEMENTS, side="right")) - 1
            end = min(max(end, col + 1), self.n_vars)
            lo, hi = int(indptr[col]), int(indptr[end])
            r = np.asarray(self._x["indices"][lo:hi])
            keep = (r >= start) & (r < stop)
            if keep.any():
                c = np.repeat(np.arange(col, end), np.diff(indptr[col : end + 1]))
                rows.append(r[keep] - start)
                cols.append(c[keep])
                vals.append(np.asarray(self._x["data"][lo:hi])[keep])
            col = end
        dtype = self._x["data"].dtype
        if not rows:
            return sp.csr_matrix((stop - start, self.n_vars), dtype=dtype)
        coo = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(stop - start, self.n_vars))
        return coo.tocsr()

    def close(self):
        if self.format == "h5ad":
            self._root.close()


def _is_group(obj) -> bool:
    import h5py

    if isinstance(obj, h5py.Group):
        return True
    try:
        import zarr

        return isinstance(obj, zarr.Group)
    except ImportError:  # pragma: no cover
        return False


def _decode(values) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


class TenXH5Source(Source):
    """Cell Ranger `.h5` (v3: ``matrix/`` with ``features/``; v2: one group per genome).

    The stored matrix is CSC of genes x cells, i.e. per-cell pointers: rows read like CSR.
    Only "Gene Expression" features are presented (antibody / CRISPR features are dropped).
    """

    def __init__(self, path: Path):
        import h5py

        self.path, self.format, self.matrix = path, "10x-h5", "matrix"
        self._f = h5py.File(path, "r")
        if "matrix" in self._f:
            g = self._f["matrix"]
            ids, names = _decode(g["features/id"][...]), _decode(g["features/name"][...])
            ftype = (_decode(g["features/feature_type"][...]) if "feature_type" in g["features"]
                     else np.full(len(ids), "Gene Expression", dtype=object))
        else:
            groups = [k for k in self._f.keys() if isinstance(self._f[k], h5py.Group) and "indptr" in self._f[k]]
            if not groups:
                raise SourceError(f"{path}: not a 10x h5 (no 'matrix' group and no genome group "
                                  "with indptr)")
            g = self._f[groups[0]]
            ids, names = _decode(g["genes"][...]), _decode(g["gene_names"][...])
            ftype = np.full(len(ids), "Gene Expression", dtype=object)
        self._g = g
        n_features, self.n_cells = (int(s) for s in g["shape"][...])
        self._indptr = np.asarray(g["indptr"][...], dtype=np.int64)
        gex = ftype == "Gene Expression"
        # map stored feature index -> presented column (-1: dropped)
        self._feature_map = np.where(gex, np.cumsum(gex) - 1, -1).astype(np.int64)
        self._all_gex = bool(gex.all())
        self.n_vars = int(gex.sum())
        self.var = pd.DataFrame({"gene_ids": ids[gex], "gene_symbol": names[gex]}, index=ids[gex])
        self._barcodes = g["barcodes"]
        if n_features != len(ids):
            raise SourceError(f"{path}: shape says {n_features} features but {len(ids)} are listed")

    def obs_names(self) -> np.ndarray:
        return _decode(self._barcodes[...])

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        data = np.asarray(self._g["data"][lo:hi])
        indices = np.asarray(self._g["indices"][lo:hi], dtype=np.int64)
        indptr = self._indptr[start : stop + 1] - lo
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


class TenXMtxSource(Source):
    """A 10x folder: ``matrix.mtx(.gz)`` (genes x cells) with ``features.tsv.gz`` (v3) or
    ``genes.tsv`` (v2) and ``barcodes.tsv(.gz)``. Parsed whole on first read (no index in mtx)."""

    def __init__(self, path: Path):
        self.format, self.matrix = "10x-mtx", "matrix.mtx"
        folder = path if path.is_dir() else path.parent
        self.path = folder

        def find(*names):
            for n in names:
                if (folder / n).exists():
                    return folder / n
            return None

        self._mtx = find("matrix.mtx.gz", "matrix.mtx")
        feats = find("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
        barcodes = find("barcodes.tsv.gz", "barcodes.tsv")
        if self._mtx is None or feats is None or barcodes is None:
            raise SourceError(f"{folder}: a 10x folder needs matrix.mtx(.gz), features.tsv.gz or "
                              "genes.tsv, and barcodes.tsv(.gz)")
        table = pd.read_csv(feats, sep="\t", header=None, dtype=str)
        ids = table[0].to_numpy(dtype=object)
        names = table[1].to_numpy(dtype=object) if table.shape[1] > 1 else ids
        ftype = (table[2].to_numpy(dtype=object) if table.shape[1] > 2
                 else np.full(len(ids), "Gene Expression", dtype=object))
        gex = ftype == "Gene Expression"
        self._feature_map = np.where(gex, np.cumsum(gex) - 1, -1).astype(np.int64)
        self._barcodes = pd.read_csv(barcodes, sep="\t", header=None, dtype=str)[0].to_numpy(dtype=object)
        n_features, n_cells = self._read_header()
        if n_features != len(ids) or n_cells != len(self._barcodes):
            raise SourceError(f"{folder}: matrix.mtx is {n_features} x {n_cells} but the folder "
                              f"lists {len(ids)} features and {len(self._barcodes)} barcodes")
        self.n_cells, self.n_vars = n_cells, int(gex.sum())
        self.var = pd.DataFrame({"gene_ids": ids[gex], "gene_symbol": names[gex]}, index=ids[gex])
        self._csr: sp.csr_matrix | None = None

    def _open(self):
        return gzip.open(self._mtx, "rb") if self._mtx.suffix == ".gz" else open(self._mtx, "rb")

    def _read_header(self) -> tuple[int, int]:
        with self._open() as fh:
            first = fh.readline().decode()
            if not first.startswith("%%MatrixMarket matrix coordinate"):
                raise SourceError(f"{self._mtx}: not a MatrixMarket coordinate file")
            self._field = first.split()[3]
            line = fh.readline()
            while line.startswith(b"%"):
                line = fh.readline()
            rows, cols, _ = (int(x) for x in line.split())
        return rows, cols

    def _load(self) -> sp.csr_matrix:
        if self._csr is None:
            dtype = np.float64 if self._field in ("real", "double") else np.int64
            entries = pd.read_csv(self._mtx, sep=r"\s+", comment="%", header=None, skiprows=1,
                                  dtype={0: np.int64, 1: np.int64, 2: dtype}, engine="c")
            entries = entries.iloc[1:] if len(entries) and entries.shape[1] == 3 else entries
            genes = self._feature_map[entries[0].to_numpy() - 1]
            cells = entries[1].to_numpy() - 1
            vals = entries[2].to_numpy()
            keep = genes >= 0
            self._csr = sp.csr_matrix((vals[keep], (cells[keep], genes[keep])),
                                      shape=(self.n_cells, self.n_vars))
        return self._csr

    def obs_names(self) -> np.ndarray:
        return self._barcodes

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        return self._load()[start:stop]
