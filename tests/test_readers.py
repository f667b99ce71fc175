"""Every reader against the matrix it was written from, plus the failure modes a converter meets."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipeline.conversion import readers
from data_pipeline.conversion.buffers import Buffers
from data_pipeline.conversion.readers import SourceError, open_source
from tests.source_writers import write_10x_h5, write_10x_mtx, write_anndata, write_loom

N_CELLS, N_GENES = 23, 11
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# empty ranges at both ends, a last row, the whole matrix, and ranges that cut mid-way
RANGES = [(0, 0), (0, 5), (5, 17), (17, 23), (22, 23), (23, 23), (0, N_CELLS)]


@pytest.fixture(scope="module")
def counts():
    """(X CSR [23, 11] int32 with an all-zero cell and an all-zero gene, gene_ids [11],
    symbols [11], barcodes [23])."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, size=(N_CELLS, N_GENES)) * (rng.random((N_CELLS, N_GENES)) < 0.4)
    dense[7] = 0
    dense[:, 3] = 0
    X = sp.csr_matrix(dense.astype(np.int32))
    gene_ids = np.array([f"ENSG{i:011d}" for i in range(N_GENES)], dtype=object)
    symbols = np.array([f"GENE{chr(65 + i)}" for i in range(N_GENES)], dtype=object)
    symbols[5] = "NA"  # a real gene symbol (and pandas' default missing-value marker)
    barcodes = np.array([f"AAAC{i:04d}-1" for i in range(N_CELLS)], dtype=object)
    return X, gene_ids, symbols, barcodes


def _obs(barcodes) -> pd.DataFrame:
    """Cell metadata of every kind anndata stores, with missing values.  [n_cells rows]"""
    n = len(barcodes)
    i = np.arange(n)
    return pd.DataFrame({
        "cell_type": pd.Categorical([None if k % 5 == 0 else ["T", "B", "NK"][k % 3] for k in i]),
        "donor": [f"d{k}" for k in i],                                 # unique: stays strings
        "n_counts": np.where(i % 4 == 1, np.nan, i * 1.5),             # 0.0, nan, 3.0, 4.5, ...
        "batch": i % 2,
        # stored as values + mask
        "score": pd.array([None if k % 6 == 2 else k for k in i], dtype="Int64"),
        "flag": pd.array([None if k % 7 == 3 else k % 2 == 0 for k in i], dtype="boolean"),
        # anndata writes repeated strings as a categorical (code -1 where missing)
        "note": pd.array([None if k % 8 == 4 else f"n{k % 3}" for k in i], dtype="string"),
    }, index=pd.Index(list(barcodes)))


def _expected_strings(series: pd.Series) -> list:
    out = []
    for v in series.astype(object):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v))
    return out


def _anndata_case(layout="csr", matrix="X", suffix=".h5ad", zarr_format=2):
    def write(tmp, X, ids, syms, bcs):
        path = write_anndata(tmp / f"a{suffix}", X, ids, syms, bcs, layout=layout, matrix=matrix,
                             zarr_format=zarr_format)
        return path, matrix
    return write


def _tenx_case(writer, **kw):
    def write(tmp, X, ids, syms, bcs):
        target = tmp / ("m" if writer is write_10x_mtx else "m.h5")
        return writer(target, X, ids, syms, bcs, **kw), "X"
    return write


CASES = {
    "h5ad-csr": _anndata_case("csr"),
    "h5ad-csc": _anndata_case("csc"),
    "h5ad-dense": _anndata_case("dense"),
    "h5ad-layer": _anndata_case("csr", "layers/counts"),
    "h5ad-layer-csc": _anndata_case("csc", "layers/counts"),
    "h5ad-raw": _anndata_case("csr", "raw.X"),
    "zarr2-csr": _anndata_case("csr", suffix=".zarr"),
    "zarr3-csr": _anndata_case("csr", suffix=".zarr", zarr_format=3),
    "zarr3-csc": _anndata_case("csc", suffix=".zarr", zarr_format=3),
    "zarr3-dense": _anndata_case("dense", suffix=".zarr", zarr_format=3),
    "zarr3-layer": _anndata_case("csr", "layers/counts", suffix=".zarr", zarr_format=3),
    "zarr2-raw": _anndata_case("csr", "raw.X", suffix=".zarr"),
    "mtx-v3": _tenx_case(write_10x_mtx, version=3),
    "mtx-v3-plain": _tenx_case(write_10x_mtx, version=3, gzip=False),
    "mtx-v2": _tenx_case(write_10x_mtx, version=2),
    "h5-v3": _tenx_case(write_10x_h5, version=3),
    "h5-v2": _tenx_case(write_10x_h5, version=2),
    "loom": lambda tmp, X, ids, syms, bcs: (write_loom(tmp / "l.loom", X, ids, syms, bcs), "X"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_read_rows_equal_written_matrix(case, counts, tmp_path):
    X, ids, syms, bcs = counts
    path, matrix = CASES[case](tmp_path, X, ids, syms, bcs)
    with open_source(path, matrix=matrix) as src:
        assert (src.n_cells, src.n_vars) == X.shape
        buffers = Buffers()
        for a, b in RANGES:
            got = src.read_rows(a, b)
            assert isinstance(got, sp.csr_matrix) and got.shape == (b - a, N_GENES)
            np.testing.assert_array_equal(got.toarray(), X[a:b].toarray(), err_msg=f"rows {a}:{b}")
            reused = src.read_rows(a, b, buffers)  # arrays kept from the previous range's read
            np.testing.assert_array_equal(reused.toarray(), X[a:b].toarray(), err_msg=f"rows {a}:{b}")
        np.testing.assert_array_equal(src.obs_names(), bcs)
        np.testing.assert_array_equal(src.obs_names(20, 23), bcs[20:23])
        assert len(src.obs_names(4, 4)) == 0
        if src.format.startswith("10x") or src.format == "loom":  # genes indexed by their ids
            np.testing.assert_array_equal(src.var.index, ids)
            np.testing.assert_array_equal(src.var["gene_symbol"], syms)
            assert src.format == "loom" or src.obs_columns() == []
        else:
            np.testing.assert_array_equal(src.var.index, syms)
            np.testing.assert_array_equal(src.var["gene_ids"], ids)


def test_buffer_views_are_kept_by_scipy():
    """csr_matrix copies a view of less than half its base; Buffers never hands one out."""
    b = Buffers()
    b.get("x", 1000, np.float32)
    small = b.get("x", 300, np.float32)
    small[:] = 1
    m = sp.csr_matrix((small, np.arange(300, dtype=np.int32) % 5, np.array([0, 300])), shape=(1, 5))
    assert np.shares_memory(m.data, small)
    assert np.shares_memory(b.get("x", 200, np.float32), small)  # reused while >= half
    assert not np.shares_memory(b.get("x", 301, np.float32), small)  # grown


@pytest.mark.parametrize("case", ["h5ad-csc", "h5ad-dense", "zarr3-csc", "loom"])
def test_block_scans_cross_block_boundaries(case, counts, tmp_path, monkeypatch):
    """CSC, dense and loom reads go block by block; tiny blocks make every range cross several."""
    monkeypatch.setattr(readers, "_SCAN_ELEMENTS", 5)
    X, ids, syms, bcs = counts
    path, matrix = CASES[case](tmp_path, X, ids, syms, bcs)
    with open_source(path, matrix=matrix) as src:
        if case == "loom":  # the bound is under one cell's genes: every read is one cell
            reads, matrix_x = [], src._x
            src._x = type("Recorded", (), {"__getitem__": lambda _, k: reads.append(matrix_x[k].size) or matrix_x[k],
                                            "dtype": matrix_x.dtype})()
        for a, b in RANGES:
            np.testing.assert_array_equal(src.read_rows(a, b).toarray(), X[a:b].toarray())
        if case == "loom":
            assert reads and max(reads) <= N_GENES and sum(reads) == sum(b - a for a, b in RANGES) * N_GENES


@pytest.mark.parametrize("writer", [write_10x_mtx, write_10x_h5])
def test_10x_non_gene_features_are_dropped(writer, counts, tmp_path):
    X, ids, syms, bcs = counts
    antibodies = sp.csr_matrix(np.arange(N_CELLS * 3).reshape(N_CELLS, 3) + 100)
    path = writer(tmp_path / ("m" if writer is write_10x_mtx else "m.h5"), X, ids, syms, bcs,
                  extra=antibodies)
    with open_source(path) as src:
        assert src.n_vars == N_GENES
        np.testing.assert_array_equal(src.var.index, ids)
        for a, b in RANGES:
            np.testing.assert_array_equal(src.read_rows(a, b).toarray(), X[a:b].toarray())


@pytest.mark.parametrize("suffix,zarr_format", [(".h5ad", 2), (".zarr", 2), (".zarr", 3)])
def test_obs_values_slices(suffix, zarr_format, counts, tmp_path):
    X, ids, syms, bcs = counts
    obs = _obs(bcs)
    path = write_anndata(tmp_path / f"o{suffix}", X, ids, syms, bcs, obs=obs, zarr_format=zarr_format)
    with open_source(path) as src:
        assert src.obs_columns() == list(obs.columns)
        for name in obs.columns:
            expected = _expected_strings(obs[name])
            for a, b in [(0, N_CELLS), (3, 11), (22, 23), (5, 5)]:
                got = src.obs_values(name, a, b)
                assert got.dtype == object and got.shape == (b - a,)
                assert list(got) == expected[a:b], f"{name}[{a}:{b}]"
        assert src.obs_values("n_counts", 2, 3)[0] == "3"     # 3.0 -> "3"
        assert src.obs_values("n_counts", 3, 4)[0] == "4.5"
        assert src.obs_values("n_counts", 1, 2)[0] is None
        with pytest.raises(KeyError, match="cell_type"):       # the message lists what exists
            src.obs_values("celltype")


def test_categorical_obs_reads_only_the_codes_slice(counts, tmp_path, monkeypatch):
    """A work unit must not read a whole obs column: record the slices asked of codes."""
    X, ids, syms, bcs = counts
    path = write_anndata(tmp_path / "o.h5ad", X, ids, syms, bcs, obs=_obs(bcs))
    asked = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kw):
        if self.name.endswith("cell_type/codes"):
            asked.append(key)
        return real_getitem(self, key, *args, **kw)

    with open_source(path) as src:
        monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
        src.obs_values("cell_type", 4, 9)
    assert asked == [slice(4, 9)]


def test_tenx_sources_have_no_obs_columns(counts, tmp_path):
    X, ids, syms, bcs = counts
    with open_source(write_10x_h5(tmp_path / "m.h5", X, ids, syms, bcs)) as src:
        assert src.obs_columns() == []
        with pytest.raises(KeyError):
            src.obs_values("cell_type")


def test_row_range_outside_the_matrix_is_refused(counts, tmp_path):
    X, ids, syms, bcs = counts
    with open_source(write_anndata(tmp_path / "a.h5ad", X, ids, syms, bcs)) as src:
        for a, b in [(-1, 3), (5, 4), (0, N_CELLS + 1)]:
            with pytest.raises(IndexError):
                src.read_rows(a, b)


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_missing_matrix_names_what_exists(suffix, counts, tmp_path):
    X, ids, syms, bcs = counts
    path = write_anndata(tmp_path / f"a{suffix}", X, ids, syms, bcs, matrix="layers/counts")
    with pytest.raises(SourceError, match=r"no matrix 'layers/spliced'.*X, layers/counts.*--matrix"):
        open_source(path, matrix="spliced")
    with pytest.raises(SourceError, match="no matrix 'raw.X'"):
        open_source(path, matrix="raw.X")
    with open_source(path, matrix="counts") as src:  # a bare name is taken as a layer
        assert src.matrix == "layers/counts"


def test_10x_files_ignore_the_anndata_matrix_choice(counts, tmp_path):
    """One --matrix serves a mixed set of inputs: 10x files have only their one matrix."""
    X, ids, syms, bcs = counts
    with open_source(write_10x_mtx(tmp_path / "m", X, ids, syms, bcs), matrix="layers/counts") as src:
        np.testing.assert_array_equal(src.read_rows(0, N_CELLS).toarray(), X.toarray())


def test_10x_h5_v2_with_two_genomes_asks_which(counts, tmp_path):
    X, ids, syms, bcs = counts
    path = write_10x_h5(tmp_path / "m.h5", X, ids, syms, bcs, version=2, genome="GRCh38")
    with h5py.File(path, "a") as f:
        f.copy("GRCh38", "mm10")
    with pytest.raises(SourceError, match="GRCh38, mm10.*--matrix"):
        open_source(path)
    with open_source(path, matrix="mm10") as src:
        np.testing.assert_array_equal(src.read_rows(0, N_CELLS).toarray(), X.toarray())


def test_garbage_h5ad_names_the_path(tmp_path):
    path = tmp_path / "x.h5ad"
    path.write_bytes(b"this is not an HDF5 file\n" * 100)
    with pytest.raises(SourceError, match=str(path)):
        open_source(path)


@pytest.mark.parametrize("which", ["written", "real"])
def test_truncated_h5ad_names_the_path(which, tmp_path):
    if which == "real":
        whole = SHARED_DATA / "h5ad" / "cider_baron_pancreas350.h5ad"
        if not whole.exists():
            pytest.skip(f"{whole} not present")
    else:
        rng = np.random.default_rng(1)
        X = sp.random(400, 300, density=0.2, format="csr", random_state=rng, dtype=np.float32)
        whole = write_anndata(tmp_path / "whole.h5ad", X, [f"ENSG{i:011d}" for i in range(300)],
                              [f"S{i}" for i in range(300)], [f"c{i}" for i in range(400)])
    data = whole.read_bytes()
    for keep in (4096, len(data) // 2, len(data) - 100):
        cut = tmp_path / f"cut{keep}.h5ad"
        cut.write_bytes(data[:keep])
        with pytest.raises(SourceError, match=str(cut)):
            with open_source(cut) as src:
                src.read_rows(0, src.n_cells)


def test_read_failures_deep_in_a_file_name_the_path(counts, tmp_path, monkeypatch):
    """A corrupt chunk found only when rows are read surfaces as SourceError, not OSError."""
    X, ids, syms, bcs = counts
    path = write_anndata(tmp_path / "a.h5ad", X, ids, syms, bcs)

    def broken(self, start, stop, buffers):
        raise OSError("Can't read data (inflate() failed)")

    with open_source(path) as src:
        monkeypatch.setattr(type(src), "_read_rows", broken)
        with pytest.raises(SourceError, match=rf"{path}: cannot read rows 2:5 .*inflate"):
            src.read_rows(2, 5)


def test_truncated_mtx_is_refused(counts, tmp_path):
    X, ids, syms, bcs = counts
    folder = write_10x_mtx(tmp_path / "m", X, ids, syms, bcs, version=2)
    lines = (folder / "matrix.mtx").read_text().splitlines(keepends=True)
    (folder / "matrix.mtx").write_text("".join(lines[:-3]))
    with open_source(folder) as src, pytest.raises(SourceError, match="truncated"):
        src.read_rows(0, 1)


def test_folder_of_neither_format_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="neither a 10x"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing.h5ad")


def _real_h5ad_files():
    folder = SHARED_DATA / "h5ad"
    files = sorted(folder.glob("*.h5ad")) if folder.is_dir() else []
    return [pytest.param(p, id=p.stem) for p in files] or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"{folder} not present"))]


@pytest.mark.parametrize("path", _real_h5ad_files())
def test_real_h5ad_rows_and_obs_match_anndata(path):
    import anndata as ad

    adata = ad.read_h5ad(path)
    X = sp.csr_matrix(adata.X)
    with open_source(path) as src:
        assert (src.n_cells, src.n_vars) == adata.shape
        np.testing.assert_array_equal(src.var.index, adata.var_names.astype(str))
        bounds = [0, src.n_cells // 3, src.n_cells // 3 + 1, src.n_cells]
        for a, b in zip(bounds[:-1], bounds[1:]):
            got = src.read_rows(a, b)
            assert got.shape == (b - a, src.n_vars) and (got != X[a:b]).nnz == 0
            np.testing.assert_array_equal(src.obs_names(a, b), adata.obs_names[a:b].astype(str))
            for name in adata.obs.columns:
                assert list(src.obs_values(name, a, b)) == _expected_strings(adata.obs[name])[a:b]


@pytest.mark.parametrize("n_cells", [0, 4])
def test_10x_folder_without_entries_reads_as_empty_cells(n_cells, tmp_path):
    """A matrix.mtx whose size line says 0 entries (every cell empty), or a folder of no cells at all
    (empty barcodes.tsv), reads as such instead of failing in pandas ("No columns to parse")."""
    folder = write_10x_mtx(tmp_path / "tenx", sp.csr_matrix((n_cells, 3), dtype=np.int32),
                           [f"ENSG{i:011d}" for i in range(3)], ["A", "B", "C"], [f"c{i}" for i in range(n_cells)],
                           version=2)
    with open_source(folder) as src:
        assert (src.n_cells, src.n_vars) == (n_cells, 3)
        rows = sp.csr_matrix(src.read_rows(0, n_cells))
        assert rows.shape == (n_cells, 3) and rows.nnz == 0
