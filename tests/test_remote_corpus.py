"""A corpus read from a URL (a local HTTP server, an fsspec memory filesystem) gives the same
batches as the same corpus read from its folder; blocks are cached; errors name the URL."""

from __future__ import annotations

import functools
import http.server
import threading

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


@pytest.fixture
def served(corpus):  # noqa: F811
    """(URL, request log) of the corpus folder served on 127.0.0.1, stopped after the test."""
    _Counting.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Counting, directory=str(corpus)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Counting.requests
    server.shutdown()
    server.server_close()
    thread.join()


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
