"""The shards are webdataset tars: `webdataset.WebDataset` reads them (files, ``pipe:`` commands,
HTTP URLs) and `shards.decode_block` turns each of its samples into the block the corpus holds,
so users with their own webdataset pipelines can stream a corpus without this loader."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.conversion.shards import decode_block, iter_shard
from data_pipeline.corpus import Corpus
from tests.test_loader import corpus  # noqa: F401 - the module's corpus fixture


def _blocks_by_webdataset(urls):
    return [(sample["__key__"], decode_block(sample)) for sample in wds.WebDataset(urls, shardshuffle=False)]


def _assert_same_blocks(got, corpus_dir):  # noqa: F811
    shards = [corpus_dir / f for f in Corpus(corpus_dir).block_table().shard_files]
    want = [kb for path in shards for kb in iter_shard(path)]
    assert len(got) == len(want) == len(Corpus(corpus_dir).block_table())
    for (key, block), (want_key, want_block) in zip(got, want):
        assert key == want_key and block.source == want_block.source and block.cell_ids == want_block.cell_ids
        for field in ("indptr", "genes", "counts", "total_counts", "source_row", "labels"):
            a, b = getattr(block, field), getattr(want_block, field)
            assert a.dtype == b.dtype and np.array_equal(a, b), field


def test_webdataset_reads_the_shard_files(corpus):  # noqa: F811
    shards = [str(corpus / f) for f in Corpus(corpus).block_table().shard_files]
    _assert_same_blocks(_blocks_by_webdataset(shards), corpus)


def test_webdataset_reads_shards_through_a_pipe(corpus):  # noqa: F811
    shards = [f"pipe:cat {corpus / f}" for f in Corpus(corpus).block_table().shard_files]
    _assert_same_blocks(_blocks_by_webdataset(shards), corpus)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset fetches http:// URLs with curl")
def test_webdataset_streams_shards_over_http(corpus):  # noqa: F811
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(corpus)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        shards = [f"{base}/{f}" for f in Corpus(corpus).block_table().shard_files]
        _assert_same_blocks(_blocks_by_webdataset(shards), corpus)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
