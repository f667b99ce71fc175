"""Write small test inputs in every format the readers accept, from one cells x genes matrix.

All writers take ``X`` as scipy CSR ``[n_cells, n_genes]`` of counts plus ``gene_ids`` /
``symbols`` ``[n_genes]`` and ``barcodes`` ``[n_cells]``, so a test can compare what a reader
returns with the matrix it started from.
"""

from __future__ import annotations

import gzip as gzip_module
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

EXTRA_FEATURE_TYPE = "Antibody Capture"


def _with_extra_features(X, gene_ids, symbols, extra):
    """Prepend non-gene features (Cell Ranger lists them after genes; first is the harder case
    for a reader's column map). Returns CSR [n_cells, n_extra + n_genes], ids, names, types."""
    ids, names, types = list(gene_ids), list(symbols), ["Gene Expression"] * len(gene_ids)
    if extra is None:
        return X, ids, names, types
    n_extra = extra.shape[1]
    extra_ids = [f"AB_{i}" for i in range(n_extra)]
    return (sp.hstack([extra, X], format="csr"), extra_ids + ids, extra_ids + names,
            [EXTRA_FEATURE_TYPE] * n_extra + types)


def write_10x_mtx(folder, X, gene_ids, symbols, barcodes, version=3, gzip=None, extra=None) -> Path:
    """A Cell Ranger matrix folder. v3: ``features.tsv.gz`` (id, name, feature_type),
    ``barcodes.tsv.gz``, ``matrix.mtx.gz``; v2: ``genes.tsv`` (id, name), ``barcodes.tsv``,
    ``matrix.mtx``. ``gzip=None`` compresses as Cell Ranger does for that version. ``extra``: CSR
    ``[n_cells, n_extra]`` of antibody counts, written as features a reader must drop (v3 only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gzip = (version == 3) if gzip is None else gzip
    if extra is not None and version != 3:
        raise ValueError("v2 folders have no feature_type column to mark non-gene features")
    X, ids, names, types = _with_extra_features(X, gene_ids, symbols, extra)
    suffix = ".gz" if gzip else ""

    def open_text(name):
        path = folder / (name + suffix)
        return gzip_module.open(path, "wt") if gzip else open(path, "w")

    with open_text("features.tsv" if version == 3 else "genes.tsv") as fh:
        for row in zip(ids, names, types):
            fh.write("\t".join(row if version == 3 else row[:2]) + "\n")
    with open_text("barcodes.tsv") as fh:
        fh.writelines(f"{b}\n" for b in barcodes)
    # MatrixMarket stores genes x cells, 1-based; Cell Ranger adds a metadata comment line
    coo = X.tocoo()
    field = "integer" if np.issubdtype(X.dtype, np.integer) else "real"
    with open_text("matrix.mtx") as fh:
        fh.write(f"%%MatrixMarket matrix coordinate {field} general\n")
        fh.write('%metadata_json: {"software_version": "test"}\n')
        fh.write(f"{X.shape[1]} {X.shape[0]} {coo.nnz}\n")
        fh.writelines(f"{g + 1} {c + 1} {v}\n" for c, g, v in zip(coo.row, coo.col, coo.data))
    return folder


def write_10x_h5(path, X, gene_ids, symbols, barcodes, version=3, extra=None, genome="GRCh38") -> Path:
    """A Cell Ranger ``.h5``. v3: ``matrix/`` with ``features/{id,name,feature_type,genome}``;
    v2: one group named by ``genome`` with ``genes`` and ``gene_names``. The stored matrix is
    CSC genes x cells, i.e. exactly the arrays of ``X`` as CSR cells x genes."""
    if extra is not None and version != 3:
        raise ValueError("v2 .h5 files have no feature_type to mark non-gene features")
    X, ids, names, types = _with_extra_features(sp.csr_matrix(X), gene_ids, symbols, extra)
    as_bytes = lambda values: np.array([str(v).encode() for v in values], dtype="S")  # noqa: E731
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix" if version == 3 else genome)
        g["barcodes"] = as_bytes(barcodes)
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        g["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        if version == 3:
            g["features/id"], g["features/name"] = as_bytes(ids), as_bytes(names)
            g["features/feature_type"] = as_bytes(types)
            g["features/genome"] = as_bytes([genome] * len(ids))
        else:
            g["genes"], g["gene_names"] = as_bytes(ids), as_bytes(names)
    return Path(path)


def _layout(X, layout):
    """X as stored: ``csr`` / ``csc`` (scipy) or ``dense`` (numpy)."""
    return {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda m: m.toarray()}[layout](X)


def write_anndata(path, X, gene_ids, symbols, barcodes, layout="csr", matrix="X", obs=None,
                  zarr_format=2) -> Path:
    """An ``.h5ad`` file or (path ending in ``.zarr``) an AnnData zarr store holding ``X`` at
    ``matrix`` ("X", "raw.X" or "layers/<name>") in ``layout``; var_names are the symbols and
    ``var['gene_ids']`` the ids.

    Wherever ``X`` is not the main matrix, ``.X`` holds a different matrix (x10, and for raw.X
    only the first half of the genes, as after gene filtering) so that a reader reading the
    wrong element fails the comparison. ``obs``: DataFrame of cell metadata, index = barcodes.
    """
    var = pd.DataFrame({"gene_ids": list(gene_ids)}, index=pd.Index(list(symbols)))
    obs = obs if obs is not None else pd.DataFrame(index=pd.Index(list(barcodes)))
    decoy = sp.csr_matrix(X * 10)
    if matrix == "X":
        adata = ad.AnnData(_layout(X, layout), obs=obs, var=var)
    elif matrix == "raw.X":
        adata = ad.AnnData(_layout(X, layout), obs=obs, var=var)
        adata.raw = adata
        half = X.shape[1] // 2
        adata = adata[:, :half].copy()
        adata.X = decoy[:, :half]
    elif matrix.startswith("layers/"):
        adata = ad.AnnData(decoy, obs=obs, var=var)
        adata.layers[matrix.removeprefix("layers/")] = _layout(X, layout)
    else:
        raise ValueError(f"matrix must be X, raw.X or layers/<name>, not {matrix!r}")
    path = Path(path)
    with ad.settings.override(zarr_write_format=zarr_format), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zarr/anndata notices about future defaults
        if path.suffix == ".zarr":
            adata.write_zarr(path)
        else:
            adata.write_h5ad(path)
    return path


def write_loom(path, X, gene_ids, symbols, barcodes, layer=None, id_attr="Accession") -> Path:
    """A `.loom` file in the loom spec 3.0.0 layout, written with h5py (loompy is not a project
    dependency): ``/matrix`` genes x cells, dense, chunked 64 x 64 and gzipped as loompy writes it;
    gene ids in ``row_attrs/<id_attr>`` (None: no id attribute), symbols in ``row_attrs/Gene``
    unless that is the id attribute, cell ids in ``col_attrs/CellID``. With ``layer``, X is stored
    in ``/layers/<layer>`` and ``/matrix`` holds X x 10 (a reader of the wrong one fails)."""
    import h5py

    dense = np.asarray(sp.csr_matrix(X).toarray().T, dtype=np.float32)  # genes x cells
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        kw = dict(chunks=(min(64, dense.shape[0]), min(64, dense.shape[1])), compression="gzip")
        f.create_dataset("matrix", data=dense * 10 if layer else dense, **kw)
        f.create_group("layers")
        if layer:
            f["layers"].create_dataset(layer, data=dense, **kw)
        rows, cols = f.create_group("row_attrs"), f.create_group("col_attrs")
        if id_attr is not None:
            rows.create_dataset(id_attr, data=np.array(list(gene_ids), dtype=object), dtype=strings)
        if id_attr not in (None, "Gene"):
            rows.create_dataset("Gene", data=np.array(list(symbols), dtype=object), dtype=strings)
        cols.create_dataset("CellID", data=np.array(list(barcodes), dtype=object), dtype=strings)
        f.create_group("col_graphs")
        f.create_group("row_graphs")
    return Path(path)


def write_soma(folder, X, gene_ids, symbols, barcodes, obs=None, layer="raw", measurement="RNA") -> Path:
    """A local TileDB-SOMA experiment, written by ``tiledbsoma.io.from_h5ad`` from the `.h5ad`
    `write_anndata` makes (kept beside it as ``<folder>.h5ad``): X as layer ``layer`` of
    ``measurement``, var index ``var_id`` = symbols with ``gene_ids``, obs index ``obs_id`` =
    barcodes. The Census names its layer ``raw``; from_h5ad's own default is ``data``."""
    import tiledbsoma.io

    folder = Path(folder)
    h5ad = write_anndata(folder.with_suffix(".h5ad"), X, gene_ids, symbols, barcodes, obs=obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiledbsoma's notices about its own defaults
        tiledbsoma.io.from_h5ad(str(folder), str(h5ad), measurement_name=measurement, X_layer_name=layer)
    return folder
