"""10x MatrixMarket read in bounded memory (`mtx_index`): the streamed row ranges and the CSR index
against ``scipy.io.mmread`` of the same file (the library reference), on fresh random files with
what real ones hold (entries in any order, duplicates, dropped non-gene features, empty cells, many
chunks); truncated and foreign files refused; and the converter reading mtx inputs through an
index it builds once per file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from data_pipeline.conversion import convert as convert_module
from data_pipeline.conversion import nodes
from data_pipeline.conversion.mtx_index import MtxIndex, build_index, read_header, stream_rows
from data_pipeline.conversion.readers import SourceError, open_source
from tests.source_writers import write_10x_mtx


def _random_mtx(path: Path, rng, n_features: int, n_cells: int, field: str = "integer",
                duplicates: bool = True, gz: bool = False) -> Path:
    """A genes x cells coordinate file, entries shuffled (Cell Ranger's order is by cell; others write
    by gene, or any order), some repeated (summed by readers), some cells empty."""
    density = rng.uniform(0.05, 0.4)
    m = sp.random(n_features, n_cells, density=density, format="coo", random_state=rng)
    rows, cols = m.row, m.col
    if field == "real":
        vals = np.round(rng.gamma(1.0, 2.0, len(rows)), 3)
    else:
        vals = rng.integers(1, 50, len(rows))
    if duplicates and len(rows):
        pick = rng.choice(len(rows), size=max(1, len(rows) // 10))
        rows, cols = np.concatenate([rows, rows[pick]]), np.concatenate([cols, cols[pick]])
        vals = np.concatenate([vals, vals[pick]])
    order = rng.permutation(len(rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    lines = [f"%%MatrixMarket matrix coordinate {field} general\n", "% a comment line\n",
             f"{n_features} {n_cells} {len(rows)}\n"]
    if field == "pattern":
        lines += [f"{r + 1} {c + 1}\n" for r, c in zip(rows, cols)]
    else:
        lines += [f"{r + 1} {c + 1} {v}\n" for r, c, v in zip(rows, cols, vals)]
    text = "".join(lines).encode()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text))
    else:
        path.write_bytes(text)
    return path


def _reference(path: Path, feature_map: np.ndarray) -> sp.csr_matrix:
    """scipy.io.mmread (duplicates summed), cells x kept features, canonical CSR."""
    m = scipy.io.mmread(str(path))
    m = sp.csr_matrix(m.T)
    keep = np.flatnonzero(feature_map >= 0)
    out = sp.csr_matrix(m[:, keep])
    out.sum_duplicates()
    return out


def _same(got: sp.csr_matrix, want: sp.csr_matrix) -> None:
    assert got.shape == want.shape
    assert got.has_canonical_format
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.data, want.data, rtol=0, atol=0)


@pytest.mark.parametrize("field,gz", [("integer", False), ("integer", True), ("real", False), ("pattern", True)])
def test_streamed_rows_and_the_index_equal_mmread(field, gz, tmp_path):
    rng = np.random.default_rng()
    n_features, n_cells = int(rng.integers(5, 40)), int(rng.integers(1, 120))
    path = _random_mtx(tmp_path / "matrix.mtx", rng, n_features, n_cells, field, duplicates=field != "pattern", gz=gz)
    header = read_header(path)
    assert (header.n_features, header.n_cells, header.field) == (n_features, n_cells, field)
    feature_map = np.arange(n_features)
    feature_map[rng.random(n_features) < 0.2] = -1  # e.g. antibody capture: not genes
    feature_map[feature_map >= 0] = np.arange((feature_map >= 0).sum())
    n_vars = int((feature_map >= 0).sum())
    want = _reference(path, feature_map)
    chunk = int(rng.integers(3, 50))  # many chunks: a cell's entries spread over several
    bucket = int(rng.integers(1, 80))  # many buckets of cells in the second pass (or one)
    build_index(header, feature_map, n_vars, tmp_path / "index", chunk=chunk, bucket=bucket)
    index = MtxIndex(tmp_path / "index", header, n_vars)
    assert not list(tmp_path.glob(".index*")), "the build left its temp folder"
    cuts = sorted({0, n_cells, *rng.integers(0, n_cells + 1, 4).tolist()})
    for a, b in zip(cuts[:-1], cuts[1:]):
        _same(stream_rows(header, feature_map, n_vars, a, b, chunk=chunk), want[a:b])
        _same(index.rows(a, b), want[a:b])
    assert index.rows(n_cells, n_cells).shape == (0, n_vars)


def test_truncated_file_is_refused_and_leaves_no_index(tmp_path):
    rng = np.random.default_rng()
    path = _random_mtx(tmp_path / "matrix.mtx", rng, 20, 50)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    header = read_header(path)
    with pytest.raises(SourceError, match="promises .* entries but .* were read"):
        stream_rows(header, np.arange(20), 20, 0, 1, chunk=7)
    with pytest.raises(SourceError, match="truncated"):
        build_index(header, np.arange(20), 20, tmp_path / "index", chunk=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.mtx"]


def test_entries_outside_the_size_are_refused(tmp_path):
    path = tmp_path / "matrix.mtx"
    path.write_text("%%MatrixMarket matrix coordinate integer general\n3 2 2\n1 1 5\n4 2 1\n")
    with pytest.raises(SourceError, match="outside the declared size"):
        build_index(read_header(path), np.arange(3), 3, tmp_path / "index")
    path.write_text("%%MatrixMarket matrix coordinate integer general\n3 2 1\n0 1 5\n")
    with pytest.raises(SourceError, match="1-based"):
        stream_rows(read_header(path), np.arange(3), 3, 0, 2)


def test_an_index_of_another_file_is_refused(tmp_path):
    rng = np.random.default_rng()
    a = _random_mtx(tmp_path / "a.mtx", rng, 10, 30)
    b = _random_mtx(tmp_path / "b.mtx", rng, 10, 31)
    build_index(read_header(a), np.arange(10), 10, tmp_path / "index")
    with pytest.raises(SourceError, match="another file .*n_cells"):
        MtxIndex(tmp_path / "index", read_header(b), 10)
    (tmp_path / "index" / "index.json").unlink()  # a folder that is not a whole index
    with pytest.raises(SourceError, match="not a complete index .* delete the folder"):
        MtxIndex(tmp_path / "index", read_header(a), 10)
    with pytest.raises(SourceError, match="no index of .*a.mtx; rerun the conversion"):
        MtxIndex(tmp_path / "absent", read_header(a), 10)


def _counts(rng, n_cells=300, n_genes=40):
    dense = rng.poisson(0.8, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.5)
    dense[3] = 0
    return (sp.csr_matrix(dense.astype(np.int32)), [f"ENSG{i:011d}" for i in range(n_genes)],
            [f"G{i}" for i in range(n_genes)], [f"c{i}" for i in range(n_cells)])


def test_a_10x_source_reads_through_its_index(tmp_path):
    """Through the index a read is slices of a memory map (not 'compressed': no row cache needed);
    rows equal the streamed reads, non-gene features dropped."""
    rng = np.random.default_rng()
    X, ids, syms, bcs = _counts(rng)
    extra = sp.random(X.shape[0], 2, density=0.5, format="csr", random_state=rng) * 10
    folder = write_10x_mtx(tmp_path / "tenx", X, ids, syms, bcs, version=3, extra=sp.csr_matrix(extra.astype(np.int32)))
    with open_source(folder) as src:
        assert src.compressed
        assert src.build_index(tmp_path / "index") == X.nnz  # the gene entries it holds (the extra features dropped)
        streamed = src.read_rows(0, X.shape[0])
    with open_source(folder, mtx_index=tmp_path / "index") as src:
        assert not src.compressed
        for a, b in [(0, 0), (0, 17), (17, 250), (250, 300)]:
            got = src.read_rows(a, b)
            _same(got, sp.csr_matrix(streamed[a:b]))
            assert (got != X[a:b]).nnz == 0
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["n_cells"] == X.shape[0] and meta["n_vars"] == X.shape[1] and meta["entries"] == X.nnz


def test_converter_indexes_each_mtx_input_once_and_reads_through_it(tmp_path, monkeypatch):
    """The converter's index stage builds `.work/mtx/sNNNNNN/` per 10x mtx input (in the pool), the
    stages after read rows through it and never stream the file; a rerun of a conversion killed
    after the index stage builds nothing again."""
    from data_pipeline.conversion import mtx_index
    from data_pipeline.conversion.plan import ConvertOptions

    rng = np.random.default_rng()
    inputs = []
    for k in range(2):
        X, ids, syms, bcs = _counts(rng, n_cells=200 + 50 * k)
        inputs.append(str(write_10x_mtx(tmp_path / f"tenx{k}", X, ids, syms, [f"s{k}_{b}" for b in bcs], version=2)))
    options = ConvertOptions(inputs=inputs, block_cells=64, unit_cells=128)
    builds, streams = [], []
    real_build, real_stream = mtx_index.build_index, mtx_index.stream_rows
    monkeypatch.setattr("data_pipeline.conversion.readers.build_index",
                        lambda h, *a, **k: builds.append(h.path) or real_build(h, *a, **k))
    stage = []

    def stream(h, *a, **k):
        streams.append(stage[-1] if stage else "plan")
        return real_stream(h, *a, **k)

    monkeypatch.setattr("data_pipeline.conversion.readers.stream_rows", stream)
    real_vocab = convert_module.ensure_vocab

    def killed_after_index(*a, **k):
        raise KeyboardInterrupt  # as a kill between the stages

    monkeypatch.setattr(convert_module, "ensure_vocab", killed_after_index)
    out = tmp_path / "corpus"
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(out, options, workers=1, progress=False)
    assert sorted(p.name for p in (out / ".work" / "mtx").iterdir()) == ["s000000", "s000001"]
    assert len(builds) == 2 and streams == ["plan", "plan"]  # the plan's sample: one pass per file

    def vocab_then_read(*a, **k):
        stage.append("after index")
        return real_vocab(*a, **k)

    monkeypatch.setattr(convert_module, "ensure_vocab", vocab_then_read)
    manifest = convert_module.convert(out, options, workers=1, progress=False)
    assert len(builds) == 2 and streams == ["plan", "plan"], "the rerun built again or read past the index"
    assert manifest["accounting"]["balanced"] and manifest["totals"]["n_shards"] > 2


def test_a_line_that_does_not_parse_names_the_file(tmp_path):
    path = tmp_path / "matrix.mtx"
    path.write_text("%%MatrixMarket matrix coordinate integer general\n3 2 2\n1 1 5\n2 x 1\n")
    with pytest.raises(SourceError, match=rf"{path}: cannot parse the MatrixMarket entries .*rewrite it"):
        build_index(read_header(path), np.arange(3), 3, tmp_path / "index")
    assert not list(tmp_path.glob("*index*"))


def test_a_write_failure_stops_the_run_naming_the_index_and_a_rerun_goes_on(tmp_path, monkeypatch):
    """What fails in the index stage is the machine (the plan read every entry): a full disk stops
    the run, --skip-bad-files or not, with an error naming the index folder and the space it needs
    (the CLI's message for a full disk); the same command then goes on."""
    import errno

    from data_pipeline.conversion import mtx_index
    from data_pipeline.conversion.plan import ConvertOptions

    rng = np.random.default_rng()
    X, ids, syms, bcs = _counts(rng, n_cells=150)
    folder = str(write_10x_mtx(tmp_path / "tenx", X, ids, syms, bcs, version=2))
    real = mtx_index._build

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mtx_index, "_build", full_disk)
    options = ConvertOptions(inputs=[folder], skip_bad_files=True)
    with pytest.raises(OSError, match=r"No space left on device \(indexing .*matrix.mtx needs about .* GiB") as caught:
        convert_module.convert(tmp_path / "corpus", options, progress=False)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("mtx/s000000")
    assert not list((tmp_path / "corpus" / ".work" / "mtx").iterdir())
    monkeypatch.setattr(mtx_index, "_build", real)
    manifest = convert_module.convert(tmp_path / "corpus", options, progress=False)
    assert manifest["accounting"]["balanced"] and manifest["totals"]["n_cells"] == (np.diff(X.indptr) > 0).sum()


def _two_inputs_alone(tmp_path: Path):
    """Two random 10x mtx inputs converted by one node -> (its manifest, the options of a multi-node
    run of the same inputs with that run's vocabulary)."""
    from data_pipeline.conversion.plan import ConvertOptions

    rng = np.random.default_rng()
    inputs = []
    for k in range(2):
        X, ids, syms, bcs = _counts(rng, n_cells=int(rng.integers(100, 200)))
        inputs.append(str(write_10x_mtx(tmp_path / f"tenx{k}", X, ids, syms, [f"s{k}_{b}" for b in bcs], version=2)))
    alone = convert_module.convert(tmp_path / "alone", ConvertOptions(inputs, block_cells=64, unit_cells=128),
                                   progress=False)
    return alone, ConvertOptions(inputs, block_cells=64, unit_cells=128, vocab=str(tmp_path / "alone" / "vocab.tsv"))


def test_nodes_index_their_share_and_wait_for_the_others(tmp_path, monkeypatch):
    """Node r indexes mtx inputs i % num_nodes == r, then waits for the rest (a shared filesystem);
    one that waits in vain says which file and what to run. The corpus equals one node's."""
    from data_pipeline.conversion.convert import ConvertError
    from data_pipeline.conversion.merge import merge_corpus

    alone, options = _two_inputs_alone(tmp_path)
    out = tmp_path / "nodes"
    monkeypatch.setattr(nodes, "WAIT_POLL_S", 0.05)
    with pytest.raises(ConvertError, match=r"1 10x mtx inputs were not indexed by the other nodes .*tenx0.*run every"):
        convert_module.convert(out, options, num_nodes=2, node_rank=1, progress=False, wait_s=0.2)
    assert sorted(p.name for p in (out / ".work" / "mtx").iterdir()) == ["s000001"]
    for rank in (0, 1):
        assert convert_module.convert(out, options, num_nodes=2, node_rank=rank, progress=False) is None
    assert not list((out / ".work").glob("node-*.alive"))  # each node's heartbeat goes with it
    merged = merge_corpus(out, progress=False)
    assert merged["shards"] == alone["shards"]


def test_a_failed_node_stops_the_nodes_waiting_for_its_share(tmp_path, monkeypatch):
    """A node whose index build fails records its error; a node waiting for that share stops at once
    naming it (not after ``wait_s``), and records no failure of its own, which would stop the first
    node in turn once rerun. Rerun, both go on from where they stopped, and the merged corpus equals
    one node's."""
    import errno
    import time

    from data_pipeline.conversion import mtx_index
    from data_pipeline.conversion.convert import ConvertError
    from data_pipeline.conversion.merge import merge_corpus

    alone, options = _two_inputs_alone(tmp_path)
    out = tmp_path / "nodes"
    real = mtx_index._build

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mtx_index, "_build", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_module.convert(out, options, num_nodes=2, node_rank=0, progress=False)
    assert "No space left on device" in nodes.failure_path(out / ".work", 0).read_text()
    assert not nodes.heartbeat_path(out / ".work", 0).exists()  # its error, not a stale heartbeat, tells the others
    monkeypatch.setattr(mtx_index, "_build", real)
    monkeypatch.setattr(nodes, "WAIT_POLL_S", 0.05)
    start = time.monotonic()
    with pytest.raises(ConvertError, match=r"node 0 stopped with an error .*No space left on device.* waiting for the "
                                           r"other nodes' mtx indexes: fix the cause, rerun that node"):
        convert_module.convert(out, options, num_nodes=2, node_rank=1, progress=False, wait_s=600)
    assert time.monotonic() - start < 60
    assert not nodes.failure_path(out / ".work", 1).exists()
    assert sorted(p.name for p in (out / ".work" / "mtx").iterdir()) == ["s000001"]  # node 1 did its share
    for rank in (0, 1):
        assert convert_module.convert(out, options, num_nodes=2, node_rank=rank, progress=False, wait_s=0.2) is None
    assert not list((out / ".work").glob("node-*.failed"))
    assert merge_corpus(out, progress=False)["shards"] == alone["shards"]


def test_a_killed_node_stops_the_nodes_waiting_for_its_share(tmp_path, monkeypatch):
    """Node 0 is killed (SIGKILL: no error recorded) while node 1 waits for its mtx index: node 1 stops
    once node 0's heartbeat has not changed for HEARTBEAT_STALE_S, naming node 0 and what to rerun,
    and records no failure of its own. Rerun, both go on, and the merged corpus equals one node's."""
    import signal
    import subprocess
    import sys
    import time

    from data_pipeline.conversion.merge import merge_corpus

    alone, options = _two_inputs_alone(tmp_path)
    out = tmp_path / "nodes"
    work = out / ".work"
    work.mkdir(parents=True)
    alive = nodes.heartbeat_path(work, 0)
    node0 = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from data_pipeline.conversion import nodes; "
        "nodes.HEARTBEAT_S = 0.05\n"
        "with nodes.heartbeat(Path(sys.argv[1]), 0): time.sleep(600)"), str(work)],
        cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not alive.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = alive.read_text()
        while alive.read_text() == first and time.monotonic() < deadline:
            time.sleep(0.05)  # beating: the file changes while node 0 lives
        assert alive.read_text() != first
    finally:
        node0.send_signal(signal.SIGKILL)
        node0.wait()
    assert alive.exists()  # a killed node leaves its heartbeat, which goes stale
    monkeypatch.setattr(nodes, "WAIT_POLL_S", 0.05)
    monkeypatch.setattr(nodes, "HEARTBEAT_STALE_S", 1.0)
    start = time.monotonic()
    with pytest.raises(nodes.OtherNodeFailed, match=r"node 0 stopped without recording an error: its heartbeat .* has "
                                                    r"not changed for \d+ s, so it was killed.* waiting for the other "
                                                    r"nodes' mtx indexes: rerun that node, then rerun this one"):
        convert_module.convert(out, options, num_nodes=2, node_rank=1, progress=False, wait_s=600)
    assert time.monotonic() - start < 60
    assert not nodes.failure_path(work, 1).exists() and not nodes.heartbeat_path(work, 1).exists()
    for rank in (0, 1):
        assert convert_module.convert(out, options, num_nodes=2, node_rank=rank, progress=False, wait_s=0.2) is None
    assert not list(work.glob("node-*"))
    assert merge_corpus(out, progress=False)["shards"] == alone["shards"]
