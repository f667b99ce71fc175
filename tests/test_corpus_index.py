"""The corpus's random-access index: per-block records in the manifest and ``cell_lengths.npy``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.conversion.shards import iter_shard, read_block
from data_pipeline.corpus import Corpus, verify
from tests.corpus_helpers import random_counts, write_h5ad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index")
    inputs = []
    for i, (n, density) in enumerate([(700, 0.05), (1300, 0.2), (90, 0.5)]):
        path = tmp / f"s{i}.h5ad"
        write_h5ad(path, random_counts(n, 300, seed=i, density=density), obs={"kind": [f"k{j % 3}" for j in range(n)]})
        inputs.append(str(path))
    out = tmp / "corpus"
    convert(out, ConvertOptions(inputs, block_cells=128, unit_cells=512, label_columns=["kind"]), workers=2,
            progress=False)
    return out


def test_block_records_read_the_same_blocks_as_the_tar(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    n = 0
    for shard in manifest["shards"]:
        expected = [b for _, b in iter_shard(corpus / shard["file"])]
        assert len(shard["blocks"]) == len(expected) == shard["n_blocks"]
        fd = os.open(corpus / shard["file"], os.O_RDONLY)
        try:
            for (offset, nbytes, n_cells, n_tokens, checksum), want in zip(shard["blocks"], expected):
                got = read_block(fd, offset, nbytes, int(checksum, 16))
                assert (got.n_cells, got.n_tokens) == (n_cells, n_tokens) == (want.n_cells, want.n_tokens)
                for field in ("indptr", "genes", "counts", "total_counts", "source_row", "labels"):
                    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
                assert (got.source, got.cell_ids) == (want.source, want.cell_ids)
                n += 1
            with pytest.raises(ValueError, match="block records do not match"):
                read_block(fd, shard["blocks"][0][0] + 512, shard["blocks"][0][1])
        finally:
            os.close(fd)
    assert n > 10


def test_cell_lengths_follow_corpus_order(corpus):
    c = Corpus(corpus)
    lengths = c.cell_lengths()
    read = np.concatenate([np.diff(b.indptr) for _, b in c.iter_blocks()])
    np.testing.assert_array_equal(lengths, read)
    assert lengths.dtype == np.uint16 and len(lengths) == c.n_cells


def test_verify_checks_the_index(corpus, tmp_path):
    import shutil

    assert verify(corpus) == []
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    lengths = np.load(bad / "cell_lengths.npy")
    lengths[5] += 1
    np.save(bad / "cell_lengths.npy", lengths)
    assert any("cell_lengths.npy" in p for p in verify(bad))

    shutil.rmtree(bad)
    shutil.copytree(corpus, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["blocks"][1][0] += 512
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert any("block records" in p for p in verify(bad))
