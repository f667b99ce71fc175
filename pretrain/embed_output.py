"""The files `embed` writes: the one owner of the embedding outputs' layout.

Both are AnnData files written with anndata's own element writer (`anndata.io.write_elem`), so
`anndata.read_h5ad` / `anndata.read_zarr` open them and scanpy takes ``use_rep="X_<name>"``:

- ``.h5ad``: the input file copied as it is (X, layers, raw, obs, var, uns, ...: what the user
  had, so that their scanpy session goes on from it) plus ``obsm["X_<name>"]``. The copy is a
  file copy, so X never passes through memory whatever its size.
- ``.zarr``: an AnnData zarr store without X (for inputs too large to duplicate): the input's
  obs and var and ``obsm["X_<name>"]``, chunked by cells.

`annotated_copy` writes fine-tuning's predictions the same way (the input copied, obs columns,
obsm and uns entries added).

The embedding is written as it is computed, a row range at a time (`EmbeddingWriter.write`), so
memory holds one chunk of it, not ``n_cells x d``. Outputs are written beside their final name and
renamed when complete: a killed embed leaves no half-written file under the name asked for.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from anndata.io import read_elem, write_elem

from data_pipeline.conversion.fsio import commit, fsync_file, output_temp

OUTPUT_SUFFIXES = (".h5ad", ".zarr")
# rows per stored chunk: at most this many bytes of float32 per chunk (zarr reads whole chunks)
_CHUNK_BYTES = 4 << 20


def check_output(source: str | Path, out: str | Path, key: str) -> None:
    """Refuse an output this module cannot write (before any work is done)."""
    source, out = Path(source), Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: write .h5ad (the input plus obsm['{key}']) or .zarr (an AnnData zarr store "
                         f"of obs, var and obsm['{key}'], without X)")
    check_not_input(source, out)


def check_not_input(source: str | Path, out: str | Path) -> None:
    """Refuse an output that is the input (it is read while the output is written), or an .h5ad
    whose folder does not exist (found before the cells are embedded, not after)."""
    source, out = Path(source), Path(out)
    if not out.parent.is_dir() and out.suffix != ".zarr":  # (a zarr store makes its parent folders)
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the input: name another file (the input is read while the output is "
                         "written)")


def chunk_rows(chunk_cells: int, dim: int) -> int:
    """Rows per stored chunk: ``chunk_cells`` (the rows written at a time) halved until a chunk
    holds at most `_CHUNK_BYTES`, so that writes stay aligned with chunks."""
    rows = max(1, chunk_cells)
    while rows > 1 and rows * dim * 4 > _CHUNK_BYTES and rows % 2 == 0:
        rows //= 2
    return rows


class EmbeddingWriter:
    """Writes ``obsm["X_<name>"]`` ``[n_cells, dim]`` float32 of input ``source`` (an .h5ad) into
    ``out`` (.h5ad or .zarr, see the module), a row range at a time, in row order.

    ``with EmbeddingWriter(...) as w: w.write(rows)`` ... ; the output gets its name when the
    block ends without an error (`commit`)."""

    def __init__(self, source: str | Path, out: str | Path, key: str, n_cells: int, dim: int, chunk_cells: int):
        check_output(source, out, key)
        self.source, self.out, self.key = Path(source), Path(out), key
        self.n_cells, self.dim, self.rows = n_cells, dim, chunk_rows(min(chunk_cells, max(n_cells, 1)), dim)
        self.tmp = output_temp(self.out)  # this process's own: two embeds to one --out do not share one
        self.written = 0
        self._array = None
        self._file = self._open_h5ad() if self.out.suffix == ".h5ad" else self._open_zarr()

    def _open_h5ad(self):
        import h5py

        shutil.copyfile(self.source, self.tmp)
        f = h5py.File(self.tmp, "r+")
        if "obsm" not in f:
            write_elem(f, "obsm", {})
        if self.key in f["obsm"]:  # embedded before: replaced
            del f["obsm"][self.key]
        return f

    def _open_zarr(self):
        import anndata
        import zarr

        from data_pipeline.conversion.readers import open_h5

        with open_h5(self.source) as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
        root = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)  # v2: read by every anndata >= 0.8
        write_elem(root, "/", anndata.AnnData(obs=obs, var=var))
        return root

    def write(self, rows: np.ndarray) -> None:
        """The next ``len(rows)`` cells' embeddings (``[k, dim]``)."""
        rows = np.asarray(rows, np.float32)
        a, b = self.written, self.written + len(rows)
        if self._array is None:
            # the first rows through anndata's writer (it records the element's encoding); the rest appended
            kw = {"chunks": (self.rows, self.dim)}
            if self.out.suffix == ".h5ad":
                kw["maxshape"] = (None, self.dim)
            write_elem(self._file["obsm"], self.key, rows, dataset_kwargs=kw if len(rows) else {})
            self._array = self._file["obsm"][self.key]
        else:
            self._array.resize((b, self.dim))
            self._array[a:b] = rows
        self.written = b

    def commit(self) -> None:
        """Close the output and give it its name."""
        if self.written != self.n_cells:
            raise RuntimeError(f"{self.out}: {self.written} of {self.n_cells} cells embedded")
        if self._array is None:
            self.write(np.zeros((0, self.dim), np.float32))
        if self.out.suffix == ".h5ad":
            self._file.close()
            fsync_file(self.tmp)
        else:
            import zarr

            zarr.consolidate_metadata(str(self.tmp))  # what anndata.read_zarr opens quickest
        _remove(self.out)
        commit(self.tmp, self.out)

    def abort(self) -> None:
        if self.out.suffix == ".h5ad":
            self._file.close()
        _remove(self.tmp)

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.commit()
        else:
            self.abort()


def annotated_copy(source: str | Path, out: str | Path, obs: dict, obsm: dict, uns: dict) -> None:
    """``out``: the .h5ad ``source`` copied as a file (X never passes through memory) with the
    ``obs`` columns (each [n_cells]), ``obsm`` arrays and ``uns`` entries added or replaced;
    written beside its name and renamed when whole (fsync'd)."""
    import h5py

    source, out = Path(source), Path(out)
    check_not_input(source, out)
    tmp = output_temp(out)
    with h5py.File(source, "r") as f:
        current = isinstance(f.get("obs"), h5py.Group) and f["obs"].attrs.get("encoding-type") == "dataframe"
    try:
        if current:
            shutil.copyfile(source, tmp)
            with h5py.File(tmp, "r+") as f:
                table = read_elem(f["obs"])
                for name, values in obs.items():
                    table[name] = values
                del f["obs"]
                write_elem(f, "obs", table)
                for group, entries in (("obsm", obsm), ("uns", uns)):
                    if group not in f:
                        write_elem(f, group, {})
                    for name, value in entries.items():
                        if name in f[group]:
                            del f[group][name]
                        write_elem(f[group], name, value)
        else:  # anndata < 0.7's layout (obs a compound dataset): read whole, written in today's
            import anndata

            adata = anndata.read_h5ad(source)
            for name, values in obs.items():
                adata.obs[name] = values
            adata.obsm.update(obsm)
            adata.uns.update(uns)
            adata.write_h5ad(tmp)
        fsync_file(tmp)
        commit(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
