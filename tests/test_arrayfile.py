"""Raw array files (`data_pipeline.conversion.arrayfile`) and the direct file I/O under them (`fsio`)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.conversion.arrayfile import read_arrays, write_arrays
from data_pipeline.conversion.buffers import Buffers
from data_pipeline.conversion.fsio import atomic_write_stream, read_whole

MAGIC = b"TESTARRAYS1\n"


def _arrays(rng) -> dict[str, np.ndarray]:
    return {"a": rng.integers(0, 1 << 40, 1000, dtype=np.int64), "empty": np.zeros(0, np.float32),
            "b": rng.random(12345).astype(np.float32), "c": rng.integers(0, 65535, 77, dtype=np.uint16),
            "big_endian": np.arange(10, dtype=">i4")}


@pytest.mark.parametrize("direct", [False, True])
def test_round_trip_and_partial_reads(tmp_path, direct):
    rng = np.random.default_rng(3)
    arrays = _arrays(rng)
    path = tmp_path / "x.arrays"
    atomic_write_stream(path, lambda fh: write_arrays(fh, MAGIC, arrays, kind="test", n=5))
    head, back = read_arrays(path, MAGIC, direct=direct)
    assert head["kind"] == "test" and head["n"] == 5
    assert list(back) == list(arrays)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(back[name], arr)
    _, some = read_arrays(path, MAGIC, ["c", "a"], direct=direct, buffers=Buffers())
    assert list(some) == ["c", "a"]
    np.testing.assert_array_equal(some["c"], arrays["c"])


@pytest.mark.parametrize("direct", [False, True])
def test_torn_and_foreign_files_are_refused(tmp_path, direct):
    path = tmp_path / "x.arrays"
    with open(path, "wb") as fh:
        write_arrays(fh, MAGIC, _arrays(np.random.default_rng(4)))
    blob = path.read_bytes()
    for cut, match in [(len(blob) - 1, "truncated"), (30, "truncated"), (5, "not a")]:
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=match):
            read_arrays(path, MAGIC, direct=direct)
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="not a OTHER"):
        read_arrays(path, b"OTHER1\n", direct=direct)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 8 << 20, (8 << 20) * 3 + 12345])
def test_stream_writer_writes_exact_bytes(tmp_path, size):
    """Buffer boundaries, the padded tail of direct writes and the final truncation."""
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    cuts = np.sort(rng.integers(0, size + 1, 7))
    path = tmp_path / "s.bin"
    atomic_write_stream(path, lambda fh: fh.writelines(
        [data[a:b] for a, b in zip([0, *cuts], [*cuts, size])]))
    assert path.read_bytes() == data
    assert bytes(read_whole(path)) == data
    assert bytes(read_whole(path, 100)) == data[:100]


def test_failed_stream_write_leaves_nothing(tmp_path):
    def fail(fh):
        fh.write(b"x" * 100)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_stream(tmp_path / "f.bin", fail)
    assert not (tmp_path / "f.bin").exists()


def test_source_checksum_maps_a_window_at_a_time(tmp_path, monkeypatch):
    """Inputs are hashed through memory maps of a bounded window (a whole-file map put a 4 GB input
    in a worker's resident set); the hash is that of the whole bytes, window size or not."""
    import mmap

    import xxhash

    from data_pipeline.conversion import fsio

    data = np.random.default_rng(0).integers(0, 256, 3 * mmap.ALLOCATIONGRANULARITY + 123, np.uint8).tobytes()
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")
    whole = f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"
    assert fsio.source_checksum(tmp_path / "a.bin") == whole
    monkeypatch.setattr(fsio, "_HASH_WINDOW", mmap.ALLOCATIONGRANULARITY)  # four windows, the last short
    assert fsio.source_checksum(tmp_path / "a.bin") == whole
    assert fsio.source_checksum(tmp_path / "empty.bin") == f"xxh3_128:{xxhash.xxh3_128(b'').hexdigest()}"
