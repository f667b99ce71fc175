"""A damaged corpus never trains silently: every block the loader reads is checked (checksum,
structure, its record), `verify` catches edited block records, shard paths cannot leave the corpus
folder, and corpora of schema 2 (no checksums) still load, with a warning."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.conversion.convert import convert
from data_pipeline.conversion.merge import merge_corpus
from data_pipeline.conversion.plan import ConvertOptions
from data_pipeline.corpus import Corpus, CorpusError, verify
from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from tests.corpus_helpers import random_counts, write_h5ad

REPO = Path(__file__).resolve().parents[1]
BATCHING = Batching(token_budget=2000, megabatch_cells=150)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~600 cells from two files in 3 shards of blocks of 64 cells, with a label column."""
    tmp = tmp_path_factory.mktemp("integrity")
    inputs = []
    for i, n in enumerate([300, 290]):
        path = tmp / f"s{i}.h5ad"
        write_h5ad(path, random_counts(n, 200, seed=i, density=0.1), obs={"kind": [f"k{j % 3}" for j in range(n)]})
        inputs.append(str(path))
    out = tmp / "corpus"
    convert(out, ConvertOptions(inputs, block_cells=64, unit_cells=256, label_columns=["kind"]), workers=1,
            progress=False)
    return out


def _copy(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(corpus, out)
    return out


def _manifest(corpus: Path) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


def _write_manifest(corpus: Path, manifest: dict) -> None:
    (corpus / "manifest.json").write_text(json.dumps(manifest))


def _as_schema_2(corpus: Path) -> None:
    """What the previous converter wrote: block records without checksums, shards without sources."""
    m = _manifest(corpus)
    m["schema_version"] = 2
    for s in m["shards"]:
        s["blocks"] = [r[:4] for r in s["blocks"]]
        s.pop("sources", None)
    _write_manifest(corpus, m)


def _xor(corpus: Path, shard: int, block: int, field: str, at: int = 0, mask: int = 0x5A) -> str:
    """XOR one byte of member ``field`` of block ``block`` of shard ``shard``; returns the shard file."""
    name = _manifest(corpus)["shards"][shard]["file"]
    with tarfile.open(corpus / name) as tar:
        members = [m for m in tar.getmembers() if m.name.split(".")[1] == field]
    payload = members[block].offset_data + at
    with open(corpus / name, "r+b") as fh:
        fh.seek(payload)
        byte = fh.read(1)[0]
        fh.seek(payload)
        fh.write(bytes([byte ^ mask]))
    return name


def _epoch(corpus: Path, workers: int) -> list:
    loader = CellLoader(corpus, batching=BATCHING, num_workers=workers, masking=None)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("field", ["counts", "genes", "labels"])
def test_damaged_block_stops_the_loader_naming_shard_and_block(corpus, tmp_path, field, workers):
    bad = _copy(corpus, tmp_path)
    name = _xor(bad, shard=0, block=2, field=field)
    with pytest.raises(CorpusError) as err:
        _epoch(bad, workers)
    text = str(err.value)
    assert re.search(rf"damaged block 2 \(key u\d+-b00002, bytes \d+-\d+\) of {name}: checksum mismatch", text)
    assert f"python -m data_pipeline verify {bad}" in text
    sources = [s["path"] for s in _manifest(bad)["sources"]]
    assert any(s in text for s in sources), "the sources that wrote the shard are named"
    assert "exited unexpectedly" not in text
    assert any(f"{name}: block 2 " in p for p in verify(bad))


def test_flipped_indptr_is_a_clean_error_without_checksums(corpus, tmp_path):
    """Structural checks alone (a schema-2 corpus) stop a damaged indptr before any kernel indexes
    by it: no segfault in-process (run in a child, where a crash is a return code), and with
    workers the user gets the message, not "worker exited unexpectedly"."""
    bad = _copy(corpus, tmp_path)
    _as_schema_2(bad)
    name = _xor(bad, shard=0, block=1, field="indptr", at=8 * 5 + 6, mask=0x40)  # indptr[5] += 2**54
    code = ("import sys, warnings; warnings.simplefilter('ignore'); from data_pipeline.loading.loader import CellLoader;"
            "from data_pipeline.loading.epoch_plan import Batching;"
            f"list(CellLoader(sys.argv[1], batching=Batching({BATCHING.token_budget}, {BATCHING.megabatch_cells}), "
            "masking=None))")
    run = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"CorpusError: {bad}: damaged block 1 (" in run.stderr and f"of {name}: bad indptr" in run.stderr
    with warnings.catch_warnings(), pytest.raises(CorpusError, match=f"damaged block 1 .* of {name}: bad indptr"):
        warnings.simplefilter("ignore")
        _epoch(bad, workers=2)


@pytest.mark.parametrize(("field", "at", "problem"), [("genes", 1, "outside the vocabulary"),
                                                     ("labels", 0, "label code outside")])
def test_structural_checks_without_checksums(corpus, tmp_path, field, at, problem):
    """Damage that would index out of range (a gene id, a label code) is caught on a schema-2
    corpus too."""
    bad = _copy(corpus, tmp_path)
    _as_schema_2(bad)
    name = _xor(bad, shard=0, block=3, field=field, at=at, mask=0x40)
    with warnings.catch_warnings(), pytest.raises(CorpusError, match=f"damaged block 3 .* of {name}: .*{problem}"):
        warnings.simplefilter("ignore")
        _epoch(bad, workers=0)


def test_verify_and_loader_catch_cells_moved_between_block_records(corpus, tmp_path):
    """Records still tile the shard and add up to its totals, but say 5 cells of block 1 are in
    block 0."""
    bad = _copy(corpus, tmp_path)
    m = _manifest(bad)
    records = m["shards"][0]["blocks"]
    first = records[0][2]  # block 1's first cell (shard 0 starts the corpus)
    moved = int(np.load(bad / "cell_lengths.npy")[first : first + 5].sum())
    records[0][2] += 5
    records[0][3] += moved
    records[1][2] -= 5
    records[1][3] -= moved
    _write_manifest(bad, m)
    problems = verify(bad)
    name = m["shards"][0]["file"]
    assert any(p.startswith(f"{name}: block 0 ") and "record says" in p for p in problems), problems
    assert any(p.startswith(f"{name}: block 1 ") for p in problems), problems
    with pytest.raises(CorpusError, match=f"damaged block 0 .* of {name}: .*record says"):
        _epoch(bad, workers=0)


def test_verify_catches_records_that_do_not_tile_the_shard(corpus, tmp_path):
    bad = _copy(corpus, tmp_path)
    m = _manifest(bad)
    m["shards"][0]["blocks"][1][1] -= 512  # block 1 shorter: a gap before block 2
    _write_manifest(bad, m)
    assert any("block records do not match" in p for p in verify(bad))


def test_verify_names_a_changed_byte_by_hash_and_block(corpus, tmp_path):
    bad = _copy(corpus, tmp_path)
    name = _xor(bad, shard=0, block=1, field="counts")
    problems = verify(bad)
    assert f"{name}: sha256/size differ from the manifest (truncated or edited)" in problems
    assert any(p.startswith(f"{name}: block 1 ") and "checksum mismatch" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_verify_hashes_the_end_of_archive_marker(corpus, tmp_path):
    """The bytes after the last block belong to no block record; the shard's sha256 still covers them."""
    bad = _copy(corpus, tmp_path)
    name = _manifest(bad)["shards"][0]["file"]
    with open(bad / name, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\1")
    assert verify(bad) == [f"{name}: sha256/size differ from the manifest (truncated or edited)"]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through Linux's /proc/self/io")
def test_verify_reads_each_shard_once(corpus):
    """One pass hashes and checks each block: on a corpus larger than the page cache a second pass
    (sha256, then the blocks) came from disk again (bench_scale.py: verify's system time 10x for
    4x the cells)."""
    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    assert verify(corpus) == []  # imports and first reads out of the way
    before = bytes_read()
    assert verify(corpus) == []
    shards = sum(s["bytes"] for s in _manifest(corpus)["shards"])
    assert shards <= bytes_read() - before < 1.5 * shards


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_shard_paths_outside_the_corpus_are_refused(corpus, tmp_path, where):
    bad = _copy(corpus, tmp_path)
    m = _manifest(bad)
    outside = tmp_path / "outside.tar"
    shutil.copy(bad / m["shards"][0]["file"], outside)  # a sound shard: only where it lies is wrong
    m["shards"][0]["file"] = "../outside.tar" if where == "dotdot" else str(outside)
    _write_manifest(bad, m)
    with pytest.raises(CorpusError, match="outside the corpus folder"):
        CellLoader(bad, batching=BATCHING)
    problems = verify(bad)
    assert len(problems) == 1 and "outside the corpus folder" in problems[0]
    with pytest.raises(CorpusError, match="outside the corpus folder"):
        next(Corpus(bad).iter_blocks())


def test_shards_folder_symlinked_to_another_disk_is_the_users_layout(corpus, tmp_path):
    moved = _copy(corpus, tmp_path)
    elsewhere = tmp_path / "other-disk-shards"
    shutil.move(moved / "shards", elsewhere)
    os.symlink(elsewhere, moved / "shards")
    assert verify(moved) == []
    assert sum(len(b.cell_index) for b in CellLoader(moved, batching=BATCHING, masking=None)) == Corpus(moved).n_cells


def test_schema_2_corpus_without_checksums_loads_with_a_warning(corpus, tmp_path):
    old = _copy(corpus, tmp_path)
    _as_schema_2(old)
    with pytest.warns(UserWarning, match=f"{old}: .*reconvert to get block checksums") as caught:
        loader = CellLoader(old, batching=BATCHING, masking=None)
    assert len([w for w in caught if "checksums" in str(w.message)]) == 1
    cells = np.sort(np.concatenate([b.cell_index.numpy() for b in loader]))
    assert np.array_equal(cells, np.arange(Corpus(corpus).n_cells))
    assert verify(old) == []


def test_merge_checksums_units_written_without_them(corpus, tmp_path):
    """A conversion resumed across the upgrade: units recorded by the previous converter carry no
    block checksums, so merge computes them from the shard bytes."""
    inputs = [s["path"] for s in _manifest(corpus)["sources"]]
    options = ConvertOptions(inputs, block_cells=64, unit_cells=256, label_columns=["kind"],
                             vocab=str(corpus / "vocab.tsv"))
    out = tmp_path / "nodes"
    for rank in range(2):  # a two-node run leaves its units for `merge`
        assert convert(out, options, num_nodes=2, node_rank=rank, progress=False) is None
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for unit in (old / ".work" / "units").glob("*.json"):
        record = json.loads(unit.read_text())
        for block in record["blocks"]:
            del block["xxh3"]
        unit.write_text(json.dumps(record))
    merged = [merge_corpus(folder, progress=False)["shards"] for folder in (out, old)]
    assert merged[0] == merged[1] and len(merged[0][0]["blocks"][0]) == 5
    assert verify(old) == []


def test_sound_corpus_passes_every_check(corpus):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a checksummed corpus
        batches = _epoch(corpus, workers=2)
    assert sum(len(b.cell_index) for b in batches) == Corpus(corpus).n_cells
    assert verify(corpus) == []
    assert _manifest(corpus)["schema_version"] == 3


@pytest.mark.parametrize("version, says", [(4, "is newer than this data_pipeline reads (2 to 3): update the code"),
                                           (1, "is older than this data_pipeline reads (2 to 3): convert the "
                                               "inputs again"),
                                           (None, "None is older than")])
def test_corpus_of_another_schema_version_is_refused_on_open(corpus, tmp_path, version, says):
    """Whoever opens the corpus (loader, verify, inspect, trainer) is refused before reading a block."""
    other = _copy(corpus, tmp_path)
    m = _manifest(other)
    m["schema_version"] = version
    _write_manifest(other, m)
    for open_it in (Corpus, lambda p: CellLoader(p, batching=BATCHING, masking=None)):
        with pytest.raises(CorpusError, match=re.escape(says)):
            open_it(other)
    assert says in verify(other)[0]
