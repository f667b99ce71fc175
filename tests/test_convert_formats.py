"""Every input format converts to the same cells as the plain CSR .h5ad of the same matrix."""

from __future__ import annotations

import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from tests.corpus_helpers import corpus_cells, ensembl, random_counts
from tests.source_writers import write_10x_h5, write_10x_mtx, write_anndata, write_loom, write_soma

N_CELLS, N_GENES = 700, 90


@pytest.fixture(scope="module")
def matrix():
    x = random_counts(N_CELLS, N_GENES, seed=21, density=0.15)
    ids = [ensembl(i) for i in range(N_GENES)]
    return x, ids, [f"SYM{i}" for i in range(N_GENES)], [f"cell{i}" for i in range(N_CELLS)]


@pytest.fixture(scope="module")
def expected(matrix, tmp_path_factory):
    x, ids, syms, barcodes = matrix
    d = tmp_path_factory.mktemp("csr")
    path = write_anndata(d / "plain.h5ad", x, ids, syms, barcodes)
    convert(d / "c", ConvertOptions([str(path)], unit_cells=256, block_cells=64), progress=False)
    cells = corpus_cells(d / "c")
    assert len(cells) == N_CELLS
    return cells


def _write(kind: str, folder, matrix):
    x, ids, syms, barcodes = matrix
    extra = random_counts(N_CELLS, 3, seed=5)
    if kind == "10x-mtx-v3":
        return write_10x_mtx(folder / "mtx3", x, ids, syms, barcodes, version=3, extra=extra), "X"
    if kind == "10x-mtx-v2":
        return write_10x_mtx(folder / "mtx2", x, ids, syms, barcodes, version=2), "X"
    if kind == "10x-h5-v3":
        return write_10x_h5(folder / "v3.h5", x, ids, syms, barcodes, version=3, extra=extra), "X"
    if kind == "10x-h5-v2":
        return write_10x_h5(folder / "v2.h5", x, ids, syms, barcodes, version=2), "X"
    if kind == "loom":
        return write_loom(folder / "in.loom", x, ids, syms, barcodes), "X"
    if kind == "loom-layer":
        return write_loom(folder / "layer.loom", x, ids, syms, barcodes, layer="spliced"), "spliced"
    if kind == "soma":  # --matrix does not apply: the layer is --soma-layer (default raw)
        return write_soma(folder / "exp", x, ids, syms, barcodes), "X"
    layout, matrix_name, suffix = kind.split(":")
    return write_anndata(folder / f"in{suffix}", x, ids, syms, barcodes, layout=layout, matrix=matrix_name), matrix_name


KINDS = ["10x-mtx-v3", "10x-mtx-v2", "10x-h5-v3", "10x-h5-v2",
         "csc:X:.h5ad", "dense:X:.h5ad", "csr:layers/counts:.h5ad", "csc:raw.X:.h5ad",
         "csr:X:.zarr", "csc:X:.zarr", "dense:layers/counts:.zarr", "loom", "loom-layer", "soma"]


@pytest.mark.parametrize("kind", KINDS)
def test_format_converts_to_the_same_cells(kind, matrix, expected, tmp_path):
    path, matrix_name = _write(kind, tmp_path, matrix)
    manifest = convert(tmp_path / "c", ConvertOptions([str(path)], matrix=matrix_name, unit_cells=256,
                                                      block_cells=64), progress=False)
    assert manifest["accounting"]["cells_written"] == N_CELLS
    assert corpus_cells(tmp_path / "c") == expected


def test_a_long_csc_matrix_is_converted_with_a_warning_naming_the_fix(matrix, expected, tmp_path, caplog):
    """CSC has no row ranges: every chunk of rows scans the whole matrix. The cells are right, and
    a file needing more than a few scans is named with the fix (rewrite it by row)."""
    x, ids, syms, barcodes = matrix
    path = write_anndata(tmp_path / "in.h5ad", x, ids, syms, barcodes, layout="csc")
    with caplog.at_level("WARNING", logger="data_pipeline.conversion.plan"):
        convert(tmp_path / "c", ConvertOptions([str(path)], unit_cells=256, block_cells=8), progress=False)
    assert "stored by column (CSC)" in caplog.text and "6 reads of the whole matrix" in caplog.text
    assert "Rewrite it by row first" in caplog.text
    assert corpus_cells(tmp_path / "c") == expected
    caplog.clear()
    with caplog.at_level("WARNING", logger="data_pipeline.conversion.plan"):  # 1 scan: nothing to say
        convert(tmp_path / "c2", ConvertOptions([str(path)], unit_cells=1024, block_cells=64), progress=False)
    assert "CSC" not in caplog.text
