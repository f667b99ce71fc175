"""Hostile or damaged inputs: each is a clear error naming the file (and rows), or, with
--skip-bad-files, a counted skip; never a crash or a silently wrong count."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.merge import merge_corpus
from data_pipeline.conversion.plan import ConvertError, ConvertOptions
from data_pipeline.conversion.readers import SourceError
from data_pipeline.corpus import summary, verify
from tests.corpus_helpers import corpus_cells, ensembl, random_counts, write_h5ad

REPO = Path(__file__).resolve().parents[1]
N_GENES = 20
# More rows than the plan's sample of a file (2000): damage after it is met only while converting.
N_ROWS = 2100
BAD_ROW = 2050
SMALL_UNITS = {"block_cells": 64, "unit_cells": 1024}  # chunks of 1024 rows: the last is 2048:2100


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True)


def _vocab_file(path: Path, gene_ids) -> Path:
    path.write_text("token_id\tensembl_id\tsymbol\n0\t<pad>\t<pad>\n1\t<cls>\t<cls>\n2\t<mask>\t<mask>\n"
                    + "".join(f"{i + 3}\t{g}\tS\n" for i, g in enumerate(gene_ids)))
    return path


def _expected_cells(x: sp.csr_matrix, rows) -> dict:
    return {(0, r): {ensembl(int(c)): int(v) for c, v in zip(x[r].indices, x[r].data)} for r in rows}


@pytest.mark.parametrize("bad_index", [N_GENES, -1], ids=["past_last_gene", "negative"])
def test_gene_index_out_of_range_is_named_or_skipped(tmp_path, bad_index):
    x = random_counts(N_ROWS, N_GENES, seed=1)
    path = write_h5ad(tmp_path / "damaged.h5ad", x)
    with h5py.File(path, "r+") as f:
        f["X/indices"][x.indptr[BAD_ROW]] = bad_index
    with pytest.raises(SourceError, match=rf"damaged.h5ad: rows 2048:2100: row {BAD_ROW} has gene column "
                                          rf"{bad_index}, outside the matrix's {N_GENES} columns"):
        convert(tmp_path / "c", ConvertOptions([str(path)], **SMALL_UNITS), progress=False)
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], skip_bad_files=True, **SMALL_UNITS),
                       progress=False)
    acc = manifest["accounting"]
    assert acc["cells_skipped"]["unreadable_rows"] == N_ROWS - 2048 and acc["cells_written"] == 2048
    assert acc["balanced"] and "row 2050" in manifest["sources"][0]["read_errors"][0]
    assert corpus_cells(tmp_path / "c2") == _expected_cells(x, range(2048))  # nothing misplaced
    assert verify(tmp_path / "c2") == []


@pytest.mark.parametrize("fmt", ["zarr", "10x-h5"])
def test_gene_index_out_of_range_in_other_csr_formats(tmp_path, fmt):
    from tests.source_writers import write_10x_h5, write_anndata

    x = random_counts(N_ROWS, N_GENES, seed=13)
    ids, barcodes = [ensembl(i) for i in range(N_GENES)], [f"cell{i}" for i in range(N_ROWS)]
    if fmt == "zarr":
        import zarr

        path = write_anndata(tmp_path / "damaged.zarr", x, ids, [f"S{i}" for i in ids], barcodes)
        zarr.open_group(str(path), mode="r+")["X/indices"][x.indptr[BAD_ROW]] = N_GENES
    else:
        path = write_10x_h5(tmp_path / "damaged.h5", x, ids, ids, barcodes)
        with h5py.File(path, "r+") as f:
            f["matrix/indices"][x.indptr[BAD_ROW]] = -1
    with pytest.raises(SourceError, match=rf"{path.name}: rows 2048:2100: row {BAD_ROW} has gene column"):
        convert(tmp_path / "c", ConvertOptions([str(path)], **SMALL_UNITS), progress=False)
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], skip_bad_files=True, **SMALL_UNITS),
                       progress=False)
    assert manifest["accounting"]["cells_skipped"]["unreadable_rows"] == N_ROWS - 2048
    assert manifest["accounting"]["balanced"]


def test_damaged_gene_index_with_two_workers_is_a_clean_error(tmp_path):
    x = random_counts(N_ROWS, N_GENES, seed=2)
    path = write_h5ad(tmp_path / "damaged.h5ad", x)
    with h5py.File(path, "r+") as f:
        f["X/indices"][x.indptr[BAD_ROW]] = 10 ** 9  # far out of bounds: read past the gene map
    r = _cli("convert", str(path), "--out", str(tmp_path / "c"), "--workers", "2", "--block-cells", "64",
             "--unit-cells", "1024")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error: " in r.stderr and f"damaged.h5ad: rows 2048:2100: row {BAD_ROW}" in r.stderr


@pytest.mark.parametrize("damage", ["decreasing", "past_the_data", "negative_start"])
def test_damaged_row_index_refuses_the_file(tmp_path, damage):
    x = random_counts(N_ROWS, N_GENES, seed=3)
    good = write_h5ad(tmp_path / "good.h5ad", random_counts(50, N_GENES, seed=4))
    path = write_h5ad(tmp_path / "damaged.h5ad", x)
    with h5py.File(path, "r+") as f:
        ptr = f["X/indptr"]
        if damage == "decreasing":
            ptr[BAD_ROW] = ptr[BAD_ROW + 1] + 5
        elif damage == "past_the_data":
            ptr[N_ROWS] = x.nnz + 100
        else:
            ptr[0] = -3
    message = {"decreasing": f"decreases at row {BAD_ROW}",
               "past_the_data": f"points to entry {x.nnz + 100} but only {x.nnz} are stored",
               "negative_start": "starts at -3"}[damage]
    with pytest.raises(ConvertError, match=rf"damaged.h5ad: rows 0:{N_ROWS}: the row index \(indptr\) {message}"):
        convert(tmp_path / "c", ConvertOptions([str(good), str(path)], **SMALL_UNITS), progress=False)
    manifest = convert(tmp_path / "c2", ConvertOptions([str(good), str(path)], skip_bad_files=True,
                                                       **SMALL_UNITS), progress=False)
    assert manifest["sources"][1]["cells_skipped"] == {"file_refused": N_ROWS}
    assert manifest["accounting"]["cells_written"] == 50 and manifest["accounting"]["balanced"]


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_float16_counts_are_read(tmp_path, layout):
    x = random_counts(40, N_GENES, seed=5)
    path = write_h5ad(tmp_path / "half.h5ad", x.astype(np.float32) if layout == "sparse" else x.toarray())
    with h5py.File(path, "r+") as f:  # scipy and anndata refuse float16 sparse: rewrite in place
        key = "X/data" if layout == "sparse" else "X"
        values = f[key][...]
        attrs = dict(f[key].attrs)
        del f[key]
        f.create_dataset(key, data=values.astype(np.float16))
        f[key].attrs.update(attrs)
    manifest = convert(tmp_path / "c", ConvertOptions([str(path)]), progress=False)
    assert manifest["accounting"]["cells_written"] == 40
    assert corpus_cells(tmp_path / "c") == _expected_cells(x, range(40))


def test_a_count_above_uint32_skips_that_cell_only(tmp_path):
    x = random_counts(30, N_GENES, seed=6).astype(np.float64).toarray()
    x[7, 3] = 5e9
    path = write_h5ad(tmp_path / "huge.h5ad", sp.csr_matrix(x))
    with pytest.raises(ConvertError, match=r"huge.h5ad row 7 \(cell 'huge-cell7'\): a count above 2\^32"):
        convert(tmp_path / "c", ConvertOptions([str(path)]), progress=False)
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], skip_bad_files=True), progress=False)
    assert manifest["accounting"]["cells_skipped"]["count_overflow"] == 1
    assert manifest["accounting"]["cells_written"] == 29 and manifest["accounting"]["balanced"]


def _plugin_compressed(path: Path, x: sp.csr_matrix, filter_name: str) -> Path:
    """An h5ad whose X arrays use an HDF5 filter that needs a plugin (zstd or blosc)."""
    import hdf5plugin

    write_h5ad(path, x)
    compression = hdf5plugin.Zstd() if filter_name == "zstd" else hdf5plugin.Blosc(cname="lz4")
    with h5py.File(path, "r+") as f:
        for key in ("data", "indices", "indptr"):
            values = f["X"][key][...]
            del f["X"][key]
            f["X"].create_dataset(key, data=values, chunks=(max(1, min(len(values), 64)),), **compression)
    return path


def test_plugin_filters_convert_and_unreadable_files_are_clean_errors(tmp_path):
    """In a fresh process (the test's own import of hdf5plugin must not help the converter)."""
    x = random_counts(60, N_GENES, seed=7)
    zstd = _plugin_compressed(tmp_path / "zstd.h5ad", x, "zstd")
    blosc = _plugin_compressed(tmp_path / "blosc.h5ad", x, "blosc")
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0garbage" * 200)
    r = _cli("convert", str(zstd), str(blosc), "--out", str(tmp_path / "c"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    cells = corpus_cells(tmp_path / "c")
    expected = _expected_cells(x, range(60))
    assert {k[1]: v for k, v in cells.items() if k[0] == 0} == {r: v for (_, r), v in expected.items()}
    assert {k[1]: v for k, v in cells.items() if k[0] == 1} == {r: v for (_, r), v in expected.items()}
    r = _cli("convert", str(zstd), str(garbage), "--out", str(tmp_path / "c2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error: " in r.stderr
    assert "garbage.h5ad" in r.stderr and "--skip-bad-files" in r.stderr
    r = _cli("convert", str(zstd), str(garbage), "--out", str(tmp_path / "c3"), "--skip-bad-files")
    assert r.returncode == 0, r.stderr
    assert "garbage.h5ad: REFUSED" in r.stderr and "cells read 60 = written 60" in r.stderr


def test_without_the_plugins_the_error_says_what_to_install(tmp_path):
    zstd = _plugin_compressed(tmp_path / "zstd.h5ad", random_counts(10, N_GENES, seed=14), "zstd")
    code = ("import sys; sys.modules['hdf5plugin'] = None  # as if not installed\n"
            "from data_pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "convert", str(zstd), "--out", str(tmp_path / "c"),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "zstd.h5ad: cannot read" in r.stderr and "needs a plugin" in r.stderr and "hdf5plugin" in r.stderr


def test_a_refused_pickle_is_an_error_line_before_planning(tmp_path):
    hostile = tmp_path / "tokens.pkl"
    hostile.write_bytes(pickle.dumps(OrderedDict([("ENSG00000000003", 0)])))
    not_pickle = tmp_path / "symbols.pkl"
    not_pickle.write_bytes(b"this is no pickle")
    missing_input = tmp_path / "not_yet_there.h5ad"
    with pytest.raises(ConvertError, match=r"--vocab: .*tokens.pkl: cannot be read .*refusing to unpickle"):
        convert(tmp_path / "c", ConvertOptions([str(missing_input)], vocab=str(hostile)), progress=False)
    assert not (tmp_path / "c").exists()  # failed before planning (the input is not even there)
    path = write_h5ad(tmp_path / "a.h5ad", random_counts(10, N_GENES, seed=8))
    r = _cli("convert", str(path), "--out", str(tmp_path / "c2"), "--symbol-table", str(not_pickle))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error: --symbol-table: " in r.stderr and "symbols.pkl: cannot be read" in r.stderr
    r = _cli("convert", str(path), "--out", str(tmp_path / "c3"), "--vocab", str(hostile))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "tokens.pkl" in r.stderr, r.stderr


def test_no_cell_left_refuses_to_write_a_corpus(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad", random_counts(25, N_GENES, seed=9))
    vocab = _vocab_file(tmp_path / "vocab.tsv", [f"ENSMUSG{i:011d}" for i in range(5)])  # shares no gene
    with pytest.raises(ConvertError, match=r"no cell is left to write, so no corpus was written: read 25 "
                                           r"cells, skipped below_min_genes 25.*--vocab"):
        convert(tmp_path / "c", ConvertOptions([str(path)], vocab=str(vocab)), progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()
    # multi-node: the nodes finish their units; the merge, where the manifest is written, refuses
    options = ConvertOptions([str(path)], vocab=str(vocab), block_cells=8, unit_cells=8, shard_bytes=64)
    for rank in (0, 1):
        assert convert(tmp_path / "m", options, num_nodes=2, node_rank=rank, progress=False) is None
    with pytest.raises(ConvertError, match="no cell is left to write"):
        merge_corpus(tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_inspect_copes_with_a_source_without_counts(tmp_path):
    good = write_h5ad(tmp_path / "good.h5ad", random_counts(20, N_GENES, seed=10))
    zeros = write_h5ad(tmp_path / "zeros.h5ad", sp.csr_matrix((15, N_GENES), dtype=np.int32))
    manifest = convert(tmp_path / "c", ConvertOptions([str(good), str(zeros)]), progress=False)
    assert manifest["sources"][1]["fraction_counts_in_vocab"] is None
    text = summary(tmp_path / "c")
    assert "zeros.h5ad (h5ad, X): 0/15 cells" in text and "counts in vocab n/a" in text


def test_mixed_species_vocabulary_warns_and_inspect_counts_prefixes(tmp_path, caplog, capsys):
    human = write_h5ad(tmp_path / "human.h5ad", random_counts(20, 12, seed=11, density=0.9))
    mouse = write_h5ad(tmp_path / "mouse.h5ad", random_counts(20, 8, seed=12, density=0.9),
                       gene_ids=[f"ENSMUSG{i:011d}" for i in range(8)])
    convert(tmp_path / "c", ConvertOptions([str(human), str(mouse)]), progress=False)
    # a warning through the library's logger (the CLI shows it as "warning: ..."), nothing printed
    (said,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert said.name == "data_pipeline.conversion.convert"
    assert said.getMessage().startswith("the vocabulary mixes genes of 2 species (ENSG 12, ENSMUSG 8")
    assert capsys.readouterr() == ("", "")
    text = summary(tmp_path / "c")
    assert "vocabulary genes by id prefix: ENSG 12, ENSMUSG 8" in text and "mixes genes of 2 species" in text
    caplog.clear()
    convert(tmp_path / "c2", ConvertOptions([str(human)]), progress=False)
    assert not any("mixes" in r.getMessage() for r in caplog.records)
    assert "vocabulary genes by id prefix: ENSG 12" in summary(tmp_path / "c2")


def test_loom_without_gene_ids_names_the_attribute_to_add(tmp_path):
    from data_pipeline.conversion.readers import open_source
    from tests.source_writers import write_loom

    x = random_counts(20, 6, seed=3)
    path = write_loom(tmp_path / "noids.loom", x, [ensembl(i) for i in range(6)],
                      [f"S{i}" for i in range(6)], [f"c{i}" for i in range(20)], id_attr=None)
    with pytest.raises(SourceError, match=r"noids.loom: no gene id attribute.*row_attrs\['Accession'\]"):
        open_source(path)
