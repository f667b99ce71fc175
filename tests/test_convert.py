"""Conversion: round trip on real files, accounting of bad cells, refused files, formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertError, ConvertOptions, group_pieces, source_pieces
from data_pipeline.conversion.vocab import SPECIAL_TOKENS, read_vocab, strip_version
from data_pipeline.corpus import verify
from tests.conftest import REFUSED_FILE, real_h5ad_files
from tests.corpus_helpers import corpus_cells, ensembl, random_counts, write_h5ad

REPO = Path(__file__).resolve().parents[1]


def _expected_matrix(path: Path, vocab) -> sp.csr_matrix:
    """Plain reference: each nonzero's column -> its gene (var 'ensembl_id', else var_names) ->
    its token; genes outside the vocabulary dropped; duplicates summed.  [n_cells, V]"""
    a = ad.read_h5ad(path)
    ids = a.var["ensembl_id"].astype(str) if "ensembl_id" in a.var else a.var.index.astype(str)
    token = np.array([vocab.index.get(strip_version(g), -1) for g in ids])
    x = sp.coo_matrix(a.X)
    keep = (token[x.col] >= 0) & (x.data > 0)
    return sp.csr_matrix((x.data[keep].astype(np.int64), (x.row[keep], token[x.col[keep]])),
                         shape=(a.n_obs, len(vocab)))


def _corpus_matrix(corpus: Path, source: int, n_rows: int, vocab_size: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """The corpus cells of one source placed at their source rows, and which rows were written."""
    from data_pipeline.corpus import Corpus

    rows, cols, vals, written = [], [], [], np.zeros(n_rows, bool)
    for _, b in Corpus(corpus).iter_blocks():
        if b.source == source:
            rows.append(np.repeat(b.source_row, np.diff(b.indptr)))
            cols.append(b.genes.astype(np.int64))
            vals.append(b.counts.astype(np.int64))
            assert not written[b.source_row].any(), "a cell written twice"
            written[b.source_row] = True
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n_rows, vocab_size))
    return m, written


def test_round_trip_real_files(shared_data, tmp_path):
    """Every nonzero of every written cell equals the source value after gene mapping, and the
    cells not written are exactly those the accounting counts as skipped."""
    files = real_h5ad_files()
    out = tmp_path / "corpus"
    manifest = convert(out, ConvertOptions([str(f) for f in files], unit_cells=4096, block_cells=512,
                                           shard_bytes=8 << 20), workers=2, progress=False)
    vocab = read_vocab(out / "vocab.tsv")
    assert manifest["accounting"]["balanced"]
    assert manifest["totals"]["n_shards"] > 1
    for s, path in enumerate(files):
        expect = _expected_matrix(path, vocab)
        got, written = _corpus_matrix(out, s, expect.shape[0], len(vocab))
        assert (got != expect).nnz == 0, path.name
        # a cell is skipped exactly when it has no vocabulary gene (min_genes = 1; counts are clean)
        np.testing.assert_array_equal(written, np.diff(expect.indptr) > 0)
        rep = manifest["sources"][s]
        assert rep["cells_read"] == expect.shape[0]
        assert rep["cells_written"] == written.sum()
        assert sum(rep["cells_skipped"].values()) == (~written).sum()
        assert rep["fraction_counts_in_vocab"] > 0.5
    assert manifest["accounting"]["cells_written"] == manifest["totals"]["n_cells"]


def test_cell_metadata_and_labels(shared_data, tmp_path):
    files = [shared_data / "h5ad" / "muscat_kang_se.h5ad", shared_data / "h5ad" / "harmony_kang_ctrl_stim.h5ad"]
    out = tmp_path / "corpus"
    manifest = convert(out, ConvertOptions([str(f) for f in files], label_columns=["cluster_id", "condition"]),
                       progress=False)
    cols = {c["name"]: c["categories"] for c in manifest["label_columns"]}
    assert len(cols["cluster_id"]) == 8 and sorted(cols["condition"]) == ["ctrl", "stim"]
    assert manifest["sources"][0]["label_columns_missing"] == ["condition"]
    from data_pipeline.corpus import Corpus

    for _, block in Corpus(out).iter_blocks():
        src = ad.read_h5ad(files[block.source], backed="r")
        names = src.obs_names[block.source_row]
        assert list(names) == block.cell_ids
        expect_total = np.asarray(src[block.source_row].to_memory().X.sum(axis=1)).ravel()
        np.testing.assert_allclose(block.total_counts, expect_total)
        for j, col in enumerate(["cluster_id", "condition"]):
            if col in src.obs:
                got = [cols[col][c] for c in block.labels[:, j]]
                assert got == list(src.obs[col].astype(str).to_numpy()[block.source_row])
            else:
                assert (block.labels[:, j] == -1).all()
        src.file.close()


def test_sources_carry_checksums(tmp_path):
    import xxhash

    a = write_h5ad(tmp_path / "a.h5ad", random_counts(30, 40, seed=2))
    b = write_h5ad(tmp_path / "b.h5ad", random_counts(0, 40, seed=3))  # no rows: no work unit
    manifest = convert(tmp_path / "c", ConvertOptions([str(a), str(b)]), progress=False)
    for path, rep in zip((a, b), manifest["sources"]):
        assert rep["checksum"] == "xxh3_128:" + xxhash.xxh3_128(path.read_bytes()).hexdigest()


def test_bad_cells_are_counted(tmp_path):
    x = random_counts(60, 40, seed=1).astype(np.float32).toarray()
    x[3, 5] = np.nan
    x[4, 6] = np.inf
    x[7, 2] = -1
    x[9, 1] = 2.5
    x[11] = 0
    x[12] = 0
    x[12, 0] = 4  # only gene 0, which the supplied vocabulary lacks -> below_min_genes
    path = write_h5ad(tmp_path / "bad.h5ad", sp.csr_matrix(x))
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("token_id\tensembl_id\tsymbol\n0\t<pad>\t<pad>\n1\t<cls>\t<cls>\n2\t<mask>\t<mask>\n"
                     + "".join(f"{i + 2}\t{ensembl(i)}\tS\n" for i in range(1, 40)))
    manifest = convert(tmp_path / "c", ConvertOptions([str(path)], vocab=str(vocab), min_genes=1),
                       progress=False)
    assert manifest["accounting"]["cells_skipped"] == {
        "not_finite": 2, "negative": 1, "non_integer": 1, "empty": 1, "below_min_genes": 1,
        "count_overflow": 0, "unreadable_rows": 0}
    assert manifest["accounting"]["cells_written"] == 54
    # the same with small blocks: units are read in several chunks (bad cells only in the first)
    chunked = convert(tmp_path / "c3", ConvertOptions([str(path)], vocab=str(vocab), min_genes=1, block_cells=2,
                                                      unit_cells=64), progress=False)
    assert chunked["accounting"] == manifest["accounting"]
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], vocab=str(vocab), min_genes=6),
                       progress=False)
    lengths = (np.nan_to_num(x[:, 1:]) > 0).sum(axis=1)
    assert manifest["accounting"]["cells_skipped"]["below_min_genes"] == int(
        ((lengths < 6) & np.isfinite(x).all(1) & (x >= 0).all(1) & (x == np.rint(x)).all(1) & (x.sum(1) > 0)).sum())
    assert manifest["accounting"]["balanced"]


def test_a_few_fractions_in_most_cells_are_refused_not_skipped(tmp_path):
    """Multi-mapper EM counts: integers but for about one value in 200, in nearly every cell. Each
    such cell would be skipped as non_integer, so the file is refused naming the fix instead."""
    x = random_counts(50, 400, seed=3, density=0.5).astype(np.float32)
    x.data[x.indptr[:45]] += 0.5  # the first value of each of 45 of the 50 cells: fractional
    path = write_h5ad(tmp_path / "em.h5ad", x)
    with pytest.raises(ConvertError, match=r"a few fractional values in 90% of the cells.*--allow-non-integer"):
        convert(tmp_path / "c", ConvertOptions([str(path)]), progress=False)
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], allow_non_integer=True), progress=False)
    assert manifest["accounting"]["cells_written"] == 50


def test_log_normalized_input_is_refused(tmp_path):
    x = random_counts(50, 30, seed=2)
    x.data = np.log1p(x.data / 7.0).astype(np.float32)
    path = write_h5ad(tmp_path / "lognorm.h5ad", x)
    with pytest.raises(ConvertError, match="log-normalized.*--allow-non-integer"):
        convert(tmp_path / "c", ConvertOptions([str(path)]), progress=False)
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], allow_non_integer=True), progress=False)
    assert manifest["block_format"]["counts_kind"] == "float"
    cells = corpus_cells(tmp_path / "c2")
    lo, hi = x.indptr[0], x.indptr[1]
    assert cells[(0, 0)] == pytest.approx({ensembl(int(c)): float(v) for c, v in zip(x.indices[lo:hi], x.data[lo:hi])})


def test_file_without_gene_ids_is_refused(shared_data, tmp_path):
    bad = shared_data / "h5ad" / REFUSED_FILE
    good = shared_data / "h5ad" / "celltypist_sample559.h5ad"
    with pytest.raises(ConvertError) as err:
        convert(tmp_path / "c", ConvertOptions([str(good), str(bad)]), progress=False)
    msg = str(err.value)
    assert REFUSED_FILE in msg and "no gene identifiers" in msg and "--gene-column" in msg
    assert not (tmp_path / "c" / "manifest.json").exists()
    manifest = convert(tmp_path / "c2", ConvertOptions([str(good), str(bad)], skip_bad_files=True), progress=False)
    rep = manifest["sources"][1]
    assert "no gene identifiers" in rep["refused"] and rep["cells_skipped"] == {"file_refused": 4271}
    assert manifest["accounting"]["cells_read"] == 559 + 4271
    assert manifest["accounting"]["balanced"]


def test_unreadable_and_missing_inputs(tmp_path):
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(ConvertError, match="garbage.h5ad.*cannot be read"):
        convert(tmp_path / "c", ConvertOptions([str(garbage)]), progress=False)
    with pytest.raises(ConvertError, match="nope.h5ad: no such file"):
        convert(tmp_path / "c", ConvertOptions([str(tmp_path / "nope.h5ad")]), progress=False)


def test_duplicate_gene_columns_are_summed(tmp_path):
    x = random_counts(30, 10, seed=3)
    ids = [ensembl(i) for i in range(10)]
    ids[7] = ids[2]  # two columns of one gene, as after symbol -> Ensembl mapping
    path = write_h5ad(tmp_path / "dup.h5ad", x, gene_ids=ids, var_names=[f"v{i}" for i in range(10)])
    manifest = convert(tmp_path / "c", ConvertOptions([str(path)]), progress=False)
    assert manifest["sources"][0]["duplicate_columns_summed"] == 1
    cells = corpus_cells(tmp_path / "c")
    dense = x.toarray()
    for r in range(30):
        if dense[r, 2] + dense[r, 7]:
            assert cells[(0, r)][ids[2]] == dense[r, 2] + dense[r, 7]


def test_a_gene_of_two_columns_counts_each_cell_once_for_min_cells(tmp_path):
    """--min-cells-per-gene counts cells, not columns: a gene whose two columns are both positive in
    3 cells is in 3 cells (it was counted 6 times, and kept under a threshold of 4)."""
    x = np.zeros((10, 4), np.int64)
    x[:3, 0] = x[:3, 1] = 2          # gene A: columns 0 and 1, the same 3 cells
    x[:, 2] = 1                      # gene B: every cell
    x[3:8, 3] = 5                    # gene C: 5 cells
    ids = [ensembl(0), ensembl(0), ensembl(1), ensembl(2)]
    path = write_h5ad(tmp_path / "dup.h5ad", sp.csr_matrix(x), gene_ids=ids, var_names=["a1", "a2", "b", "c"])
    convert(tmp_path / "c", ConvertOptions([str(path)], min_cells_per_gene=4), progress=False)
    assert read_vocab(tmp_path / "c" / "vocab.tsv").ensembl_ids[len(SPECIAL_TOKENS):] == [ensembl(1), ensembl(2)]
    convert(tmp_path / "d", ConvertOptions([str(path)], min_cells_per_gene=3), progress=False)
    assert read_vocab(tmp_path / "d" / "vocab.tsv").ensembl_ids[len(SPECIAL_TOKENS):] == [ensembl(i) for i in range(3)]


def test_rerun_and_conflicting_out(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad", random_counts(40, 20, seed=4))
    opts = ConvertOptions([str(path)])
    first = convert(tmp_path / "c", opts, progress=False)
    assert convert(tmp_path / "c", opts, progress=False) == first  # already complete
    with pytest.raises(ConvertError, match="other inputs or options.*--overwrite"):
        convert(tmp_path / "c", ConvertOptions([str(path)], min_genes=3), progress=False)
    convert(tmp_path / "c", ConvertOptions([str(path)], min_genes=3), overwrite=True, progress=False)


def test_overwrite_checks_the_new_command_before_it_deletes_the_old_corpus(tmp_path):
    """--overwrite with a mistake in the new command (options that do not fit, an input that is not
    there) leaves the old corpus whole; one killed while it deleted the old corpus (only a corpus's
    names left) is taken up by the rerun; several nodes may not overwrite."""
    import shutil

    path = write_h5ad(tmp_path / "a.h5ad", random_counts(40, 20, seed=4))
    out = tmp_path / "c"
    convert(out, ConvertOptions([str(path)]), progress=False)
    for bad in (ConvertOptions([str(path)], block_cells=1000),  # the unit size is no multiple of it
                ConvertOptions([str(tmp_path / "missing.h5ad")])):
        with pytest.raises(ConvertError):
            convert(out, bad, overwrite=True, progress=False)
        assert verify(out) == []
    (out / "manifest.json").unlink()  # as a kill during the deletion leaves it
    shutil.rmtree(out / "stats.zarr")
    convert(out, ConvertOptions([str(path)], min_genes=3), overwrite=True, progress=False)
    assert verify(out) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not a corpus .*notes.txt"):
        convert(out, ConvertOptions([str(path)]), overwrite=True, progress=False)
    with pytest.raises(ConvertError, match="--overwrite with --num-nodes 2"):
        convert(tmp_path / "d", ConvertOptions([str(path)]), num_nodes=2, node_rank=0, overwrite=True, progress=False)


def test_every_input_refused_is_said_as_such(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not an h5ad")
    with pytest.raises(ConvertError, match="--skip-bad-files refused every input"):
        convert(tmp_path / "c", ConvertOptions([str(bad)], skip_bad_files=True, label_columns=["cell_type"]),
                progress=False)


def test_cli_commands(tmp_path):
    """The CLI end to end: convert, verify, inspect, to-h5ad; errors exit 2 with a message."""
    path = write_h5ad(tmp_path / "a.h5ad", random_counts(300, 50, seed=5), obs={"kind": ["x", "y", "z"] * 100})
    def run(*a):
        return subprocess.run([sys.executable, "-m", "data_pipeline", *a], cwd=REPO,
                              capture_output=True, text=True)
    r = run("convert", str(path), "--out", str(tmp_path / "c"), "--label-columns", "kind", "--workers", "2",
            "--block-cells", "64", "--unit-cells", "128", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "cells read 300 = written 300" in r.stderr
    assert run("verify", str(tmp_path / "c")).returncode == 0
    r = run("inspect", str(tmp_path / "c"))
    assert r.returncode == 0 and "cells 300" in r.stdout and "a.h5ad" in r.stdout
    r = run("to-h5ad", str(tmp_path / "c"), "--out", str(tmp_path / "back.h5ad"), "--limit", "100")
    assert r.returncode == 0, r.stderr
    back = ad.read_h5ad(tmp_path / "back.h5ad")
    src = ad.read_h5ad(path)
    rows = back.obs["source_row"].to_numpy()
    cols = [int(g[4:]) - 90000000000 for g in back.var["ensembl_id"]]
    np.testing.assert_array_equal(back.X.toarray(), src.X[rows][:, cols].toarray())
    assert list(back.obs["kind"].astype(str)) == list(src.obs["kind"].to_numpy()[rows])
    r = run("convert", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "c3"))
    assert r.returncode == 2 and "error:" in r.stderr and "missing.h5ad" in r.stderr


def test_disk_full_is_a_clear_error_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    """A write failing for lack of space exits 2 saying what to do; rerunning then completes."""
    import errno

    from data_pipeline.cli import main
    from data_pipeline.conversion import fsio

    path = write_h5ad(tmp_path / "a.h5ad", random_counts(400, 60, seed=6))
    argv = ["convert", str(path), "--out", str(tmp_path / "c"), "--workers", "1", "--block-cells", "64",
            "--unit-cells", "128", "--no-progress"]
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(1)
        if len(calls) == 2:  # the second direct write: the first unit's statistics
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fsio.os, "pwrite", pwrite)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command" in err
    monkeypatch.setattr(fsio.os, "pwrite", real_pwrite)
    assert main(argv) == 0
    assert verify(tmp_path / "c") == []


def test_symbols_through_a_symbol_table(shared_data, tmp_path):
    """A file named by symbols only converts through --symbol-table; without one it is refused
    with an error naming the option."""
    src = ad.read_h5ad(shared_data / "h5ad" / "mudan_pbmcA.h5ad")
    symbols_only = ad.AnnData(X=src.X, obs=src.obs[[]],
                              var=src.var[[]].set_axis(src.var["gene_symbol"].astype(str).to_numpy()))
    symbols_only.var_names_make_unique()
    path = tmp_path / "symbols.h5ad"
    symbols_only.write_h5ad(path)
    with pytest.raises(ConvertError, match="--symbol-table"):
        convert(tmp_path / "c", ConvertOptions([str(path)]), progress=False)
    table = shared_data / "genes" / "geneformer_gene_name_id_dict.pkl"
    manifest = convert(tmp_path / "c2", ConvertOptions([str(path)], symbol_table=str(table)), progress=False)
    rep = manifest["sources"][0]
    assert "symbol table" in rep["gene_identity"]
    assert rep["genes_from_symbols"] > 0.5 * src.n_vars
    assert rep["fraction_counts_in_vocab"] > 0.8
    assert manifest["accounting"]["balanced"]


def test_geneformer_token_dictionary_as_vocab(shared_data, tmp_path):
    """--vocab with Geneformer's token dictionary keeps Geneformer's token ids."""
    from data_pipeline.conversion.vocab import read_pickled_dict

    tokens = read_pickled_dict(shared_data / "genes" / "geneformer_token_dictionary.pkl")
    path = shared_data / "h5ad" / "muscat_kang_se.h5ad"
    out = tmp_path / "c"
    convert(out, ConvertOptions([str(path)], vocab=str(shared_data / "genes" / "geneformer_token_dictionary.pkl")),
            progress=False)
    vocab = read_vocab(out / "vocab.tsv")
    for gene, token in list(tokens.items())[2:200]:
        assert vocab.index[gene] == token
    src = ad.read_h5ad(path)
    cells = corpus_cells(out)
    row = sp.csr_matrix(src.X)[0]
    expect = {g: int(v) for g, v in zip(src.var_names[row.indices], row.data) if g in tokens and v > 0}
    assert cells[(0, 0)] == expect


def test_node_rank_from_a_slurm_array(monkeypatch):
    from data_pipeline.cli import _node_from_env, build_parser

    args = build_parser().parse_args(["convert", "x.h5ad", "--out", "c"])
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert _node_from_env(args) == (4, 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "16")  # --array=10-16:2: tasks 10, 12, 14, 16
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    assert _node_from_env(args) == (4, 3)
    assert _node_from_env(build_parser().parse_args(["convert", "x.h5ad", "--out", "c", "--num-nodes", "1"])) == (1, 0)
    explicit = build_parser().parse_args(["convert", "x.h5ad", "--out", "c", "--num-nodes", "3", "--node-rank", "1"])
    assert _node_from_env(explicit) == (3, 1)
    with pytest.raises(ConvertError, match="--node-rank 5"):
        convert("unused", ConvertOptions(["x.h5ad"]), num_nodes=2, node_rank=5, progress=False)


def test_units_are_cut_by_estimated_output_size():
    rng = np.random.default_rng(3)
    nnz = rng.integers(0, 3000, 10_000)
    nnz[4000:4100] = 200_000  # a stretch of very dense rows
    pointers = np.concatenate([[7], 7 + np.cumsum(nnz)])  # need not start at 0
    opts = ConvertOptions(["x"], block_cells=64, unit_cells=4096, shard_bytes=4 << 20)
    pieces = source_pieces(len(nnz), pointers, 0.0, opts)
    est = 4 * (pointers - pointers[0]) + 64 * np.arange(len(nnz) + 1)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(nnz)
    for (a, b, size), nxt in zip(pieces, pieces[1:] + [None]):
        assert size == est[b] - est[a]
        if nxt is None:
            break
        assert nxt[0] == b and 0 < b - a <= opts.unit_cells and (b - a) % 64 == 0
        if b - a < opts.unit_cells:  # cut by size: the target reached, not by a block earlier
            assert est[b] - est[a] >= opts.shard_bytes > est[b - 64] - est[a]
    # without row pointers (CSC, dense, mtx): equal pieces from the sampled row density
    flat = source_pieces(1000, None, 100.0, ConvertOptions(["x"], block_cells=10, unit_cells=500,
                                                          shard_bytes=464 * 99))
    assert [p[:2] for p in flat] == [[a, a + 100] for a in range(0, 1000, 100)]

    # grouping: full pieces alone; small ones (file ends, small files) share units, in order
    sources = [{"index": 0, "pieces": [[0, 100, 900], [100, 150, 300]]},
               {"index": 1, "pieces": [[0, 20, 200]]},
               {"index": 2, "pieces": [[0, 30, 600], [30, 40, 100]]},
               {"index": 3, "pieces": [[0, 5, 50]]}]
    units, sizes = group_pieces(sources, ConvertOptions(["x"], block_cells=5, unit_cells=1000, shard_bytes=1000))
    assert units == [[[0, 0, 100]], [[0, 100, 150], [1, 0, 20]], [[2, 0, 30], [2, 30, 40], [3, 0, 5]]]
    assert sizes == [900, 500, 750]
