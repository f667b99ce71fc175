"""A corpus read from a URL (a local HTTP server, an fsspec memory filesystem) gives the same
batches as the same corpus read from its folder; blocks are cached; errors name the URL."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import threading
from pathlib import Path

import fsspec
import pytest
import torch

from data_pipeline.corpus import Corpus, CorpusError
from data_pipeline.loading.masking import Views
from tests.test_loader import _loader, _same, corpus  # noqa: F401 - the module's corpus fixture


class _Counting(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


class _Ranged(_Counting):
    """Answers ``Range: bytes=A-B`` with 206 and those bytes, as object stores and most web servers
    do (python's own handler ignores ranges and sends the whole file)."""

    ranges: list[tuple[str, str | None]] = []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).ranges.append((self.path, rng))
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", rng or "")
        if match is None:
            return super().do_GET()
        type(self).requests.append(self.path)
        data = Path(self.translate_path(self.path)).read_bytes()
        start, end = int(match[1]), min(int(match[2]), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


@contextlib.contextmanager
def _serve(folder, handler):
    """The URL of ``folder`` served on 127.0.0.1 by ``handler`` (its logs emptied), stopped on exit."""
    handler.requests = []
    handler.ranges = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(corpus):  # noqa: F811
    """(URL, request log) of the corpus folder served on 127.0.0.1, stopped after the test."""
    with _serve(corpus, _Counting) as url:
        yield url, _Counting.requests


@pytest.fixture
def served_ranged(corpus):  # noqa: F811
    """(URL, [(path, Range header)]) of the corpus served by a server that honours ranges."""
    with _serve(corpus, _Ranged) as url:
        yield url, _Ranged.ranges


def _epoch(source, workers=0, seed=7):
    return list(_loader(source, seed=seed, num_workers=workers, views=Views()))


@pytest.mark.parametrize("workers", [0, 2])
def test_http_corpus_gives_the_local_batches(corpus, served, tmp_path, monkeypatch, workers):  # noqa: F811
    monkeypatch.setenv("DATA_PIPELINE_CACHE", str(tmp_path / "cache"))
    url, _ = served
    local, remote = _epoch(corpus, workers), _epoch(url, workers)
    assert len(local) == len(remote) > 0 and all(_same(a, b) for a, b in zip(local, remote))


def test_memory_filesystem_corpus_gives_the_local_batches(corpus, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DATA_PIPELINE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.put(str(corpus), "/corpus_copy", recursive=True)
    try:
        local, remote = _epoch(corpus), _epoch("memory://corpus_copy")
        assert len(local) == len(remote) > 0 and all(_same(a, b) for a, b in zip(local, remote))
    finally:
        fs.rm("/corpus_copy", recursive=True)


def test_a_server_that_honours_ranges_sends_each_block_once(corpus, served_ranged, tmp_path):  # noqa: F811
    """Against a server answering 206, every shard read is a ranged request for one block, the
    cache holds blocks (no whole shard), and the batches are the local ones."""
    url, ranges = served_ranged
    cache = tmp_path / "cache"
    remote = list(_loader(Corpus(url, cache_dir=cache), seed=7, views=Views()))
    local = list(_loader(corpus, seed=7, views=Views()))
    assert len(local) == len(remote) > 0 and all(_same(a, b) for a, b in zip(local, remote))
    shard_reads = [r for path, r in ranges if "/shards/" in path]
    blocks = Corpus(corpus).block_table()
    assert len(shard_reads) == len(blocks.offset) and all(r and r.startswith("bytes=") for r in shard_reads)
    cached = [p.name for p in cache.glob("*/blocks/*")]
    assert len(cached) == len(blocks.offset) and all(name.count(".") == 3 for name in cached)


def test_second_epoch_reads_blocks_from_the_cache(served, tmp_path):
    url, requests = served
    loader = _loader(Corpus(url, cache_dir=tmp_path / "cache"), seed=7, views=Views())
    first = list(loader)
    fetched = len(requests)
    assert any("/shards/" in r for r in requests)
    second = list(loader)
    assert len(second) == len(first) and len(requests) == fetched  # nothing fetched again


def test_missing_corpus_or_server_names_the_url(served, tmp_path):
    url, _ = served
    with pytest.raises(CorpusError, match=r"nowhere: no manifest.json there.*check the URL"):
        Corpus(f"{url}/nowhere", cache_dir=tmp_path)
    with pytest.raises(CorpusError, match=r"127.0.0.1:1/corpus: cannot read manifest.json.*server is up"):
        Corpus("http://127.0.0.1:1/corpus", cache_dir=tmp_path)


def test_training_config_takes_a_corpus_url(corpus, served, tmp_path):  # noqa: F811
    """`data.corpus` may be a URL and `data.cache_dir` names the cache: the trainer's loader gives the
    batches of the same config on the folder."""
    from pretrain.config import load_config
    from pretrain.train import build_loader

    url, _ = served
    common = ["data.token_budget=3000", f"data.cache_dir={tmp_path / 'cache'}"]
    by_url = build_loader(load_config(None, [f"data.corpus={url}", *common]), torch.device("cpu"))
    by_path = build_loader(load_config(None, [f"data.corpus={corpus}", *common]), torch.device("cpu"))
    assert (tmp_path / "cache").is_dir()
    a, b = list(by_url), list(by_path)
    assert len(a) == len(b) > 0 and all(_same(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_launch_trains_from_a_corpus_url(served, tmp_path):
    """`launch/pretrain.py` end to end, the corpus given by URL (no Path() on the way breaks it)."""
    from tests.train_helpers import TINY, run_pretrain

    url, requests = served
    run_pretrain([*TINY, f"data.corpus={url}", f"data.cache_dir={tmp_path / 'cache'}", f"run.out={tmp_path / 'run'}",
                  "schedule.max_steps=2", "run.checkpoint_every=0", "run.mlflow=false"])
    assert any("/shards/" in r for r in requests)
    missing = run_pretrain([*TINY, f"data.corpus={url}/nowhere", f"run.out={tmp_path / 'run2'}"], check=False)
    assert missing.returncode != 0 and "no manifest.json there" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_server_gone_mid_run_is_named_as_such(corpus, tmp_path):  # noqa: F811
    """Blocks that cannot be fetched (the server went away after the manifest was read) stop the
    loader with the URL and the cause, not as a damaged block."""
    with _serve(corpus, _Counting) as url:
        loader = _loader(Corpus(url, cache_dir=tmp_path / "cache"), seed=7, views=Views())
    with pytest.raises(CorpusError) as err:
        list(loader)
    assert url in str(err.value) and "damaged" not in str(err.value)
    assert "server is up" in str(err.value)


def test_cache_limit_keeps_the_blocks_within_it_and_the_batches_the_same(corpus, served_ranged, tmp_path):  # noqa: F811
    """`data.cache_limit_gb` below the corpus: two epochs give the local batches, the cached blocks
    stay within the limit (plus one process's trim share), and the second epoch fetches again what
    was deleted."""
    from data_pipeline.remote import RemoteShards

    url, ranges = served_ranged
    total = int(Corpus(corpus).block_table().nbytes.sum())
    limit = 0.4 * total
    loader = _loader(Corpus(url, cache_dir=tmp_path / "cache", cache_limit_gb=limit / 2**30), seed=7, views=Views())
    local = _loader(corpus, seed=7, views=Views())
    fetched = []
    for _ in range(2):  # epochs
        before = len(ranges)
        remote, expected = list(loader), list(local)
        assert len(remote) == len(expected) > 0 and all(_same(a, b) for a, b in zip(remote, expected))
        held = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*/blocks/*"))
        assert 0 < held <= limit * (1 + RemoteShards.TRIM_SHARE)
        fetched.append(sum("/shards/" in path for path, _ in ranges[before:]))
    assert fetched[0] == len(Corpus(corpus).block_table().offset) and fetched[1] > 0


def test_trim_deletes_the_least_recently_used_blocks(tmp_path):
    """Blocks stored in order a, b, c, d with d over the limit: a read of a makes b the oldest use, so
    the trim deletes b (and c if needed), keeps a and d."""
    from data_pipeline.remote import RemoteShards

    fs = fsspec.filesystem("memory")
    fs.pipe("/trim_corpus/shards/s.tar", bytes(range(256)) * 40)  # 10,240 bytes
    try:
        shards = RemoteShards("memory://trim_corpus", tmp_path, limit_bytes=3000)
        for i, t in zip(range(3), (100, 200, 300)):  # 1,000 bytes each: a, b, c at times 100, 200, 300
            assert shards.read("shards/s.tar", 1000 * i, 1000) == (bytes(range(256)) * 40)[1000 * i : 1000 * (i + 1)]
            os.utime(tmp_path / "blocks" / f"shards__s.tar.{1000 * i}.1000", (t, t))
        shards.read("shards/s.tar", 0, 1000)  # a, from the cache: used now
        shards.read("shards/s.tar", 3000, 1000)  # d: 4,000 bytes held, over the limit: trimmed to 2,700
        left = sorted(p.name for p in (tmp_path / "blocks").iterdir())
        assert left == ["shards__s.tar.0.1000", "shards__s.tar.3000.1000"]
        assert shards.read("shards/s.tar", 1000, 1000) == (bytes(range(256)) * 40)[1000:2000]  # fetched again
    finally:
        fs.rm("/trim_corpus", recursive=True)


@pytest.mark.parametrize("handler", [_Counting, _Ranged])
def test_verify_checks_a_corpus_at_a_url_as_its_store_holds_it(corpus, tmp_path, monkeypatch, handler):  # noqa: F811
    """`verify URL` streams every shard from the store (a server answering ranges or not) and finds
    what the local verify finds, fetching the small files afresh: a stale copy in the block cache
    must not hide a change, and verify adds nothing to that cache."""
    from data_pipeline.corpus import verify
    from tests.test_corpus_integrity import _copy, _manifest, _xor

    cache = tmp_path / "cache"
    monkeypatch.setenv("DATA_PIPELINE_CACHE", str(cache))
    served = _copy(corpus, tmp_path)
    with _serve(served, handler) as url:
        assert verify(url) == [] == verify(served)
        Corpus(url).block_table()  # a reader's copy of the small files, cached before the changes below
        before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
        shards = _manifest(served)["shards"]
        name = _xor(served, shard=0, block=1, field="counts")
        (served / shards[1]["file"]).unlink()
        lengths = served / "cell_lengths.npy"
        lengths.write_bytes(lengths.read_bytes()[:-8])
        problems = verify(url)
        assert problems == verify(served), problems
        assert f"{name}: sha256/size differ from the manifest (truncated or edited)" in problems
        assert any(p.startswith(f"{name}: block 1 ") and "checksum mismatch" in p for p in problems)
        assert f"{shards[1]['file']}: missing" in problems
        assert any(p.startswith("cell_lengths.npy") for p in problems)
        assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


def test_a_partly_uploaded_corpus_is_refused_and_not_cached(corpus, tmp_path, monkeypatch):  # noqa: F811
    """A store holding manifest.json but not yet cell_lengths.npy (an upload under way) is refused,
    naming the missing file, and nothing is cached: once the upload ends, the corpus reads."""
    from data_pipeline.loading.loader import CellLoader
    from tests.test_corpus_integrity import _copy

    served = _copy(corpus, tmp_path)
    held = (served / "cell_lengths.npy").read_bytes()
    (served / "cell_lengths.npy").unlink()
    cache = tmp_path / "cache"
    monkeypatch.setenv("DATA_PIPELINE_CACHE", str(cache))
    with _serve(served, _Counting) as url:
        with pytest.raises(CorpusError, match="cell_lengths.npy is not, so the corpus is not whole"):
            Corpus(url, cache_dir=cache)
        with pytest.raises(CorpusError, match="cell_lengths.npy is not"):
            CellLoader(url)  # the loader's message is the corpus's, not "no manifest.json"
        assert not list(cache.rglob("manifest.json"))
        (served / "cell_lengths.npy").write_bytes(held)
        assert Corpus(url, cache_dir=cache).n_cells == Corpus(corpus).n_cells


def test_the_loader_names_a_url_problem_as_the_corpus_does(tmp_path):
    from data_pipeline.loading.loader import CellLoader

    with pytest.raises(CorpusError, match="nosuchproto://bucket/corpus: no filesystem for this protocol"):
        CellLoader("nosuchproto://bucket/corpus")
