"""Direct HDF5 range reads against h5py slicing (the reference), on every layout they handle."""

import os
import zlib

import h5py
import numpy as np
import pytest

from data_pipeline.conversion.h5direct import DirectReader

LAYOUTS = {
    "contiguous": {},
    "chunked": {"chunks": (1000,)},
    "gzip": {"chunks": (777,), "compression": "gzip"},
    "shuffle+gzip": {"chunks": (1024,), "compression": "gzip", "shuffle": True},
    "shuffle": {"chunks": (512,), "shuffle": True},
}


def _ranges(rng, n):
    fixed = [(0, n), (0, 0), (n, n), (0, 1), (n - 1, n), (999, 1001), (1000, 2000), (5, 6)]
    return fixed + [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(40)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["<i4", "<f4", ">i8", "<u2"])
def test_direct_reads_equal_h5py(tmp_path, layout, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{layout}{dtype}".encode()))
    n = 10_007  # not a multiple of any chunk size: a partial last chunk
    values = rng.integers(0, 5000, n).astype(dtype)
    values[rng.random(n) < 0.5] = 0  # runs of zeros: chunks that compress well and badly
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=values, **LAYOUTS[layout])
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r") as f:
            dset = f["x"]
            reader = DirectReader.open(dset, fd)
            assert reader is not None
            for lo, hi in _ranges(rng, n):
                got = reader.read(lo, hi)
                want = dset[lo:hi]
                assert got.dtype.isnative and got.dtype == want.dtype.newbyteorder("=")
                np.testing.assert_array_equal(got, want)
    finally:
        os.close(fd)


def test_unhandled_layouts_fall_back(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("lzf", data=np.arange(5000), chunks=(100,), compression="lzf")
        f.create_dataset("fletcher", data=np.arange(5000), chunks=(100,), fletcher32=True)
        sparse = f.create_dataset("unwritten", shape=(5000,), dtype="i4", chunks=(100,))
        sparse[200:300] = 7  # the other chunks are never allocated
        f.create_dataset("empty", shape=(0,), dtype="i4")
        f.create_dataset("two_d", data=np.zeros((10, 10)))
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r") as f:
            for name in ("lzf", "fletcher", "unwritten", "empty", "two_d"):
                assert DirectReader.open(f[name], fd) is None, name
    finally:
        os.close(fd)


def test_corrupt_chunk_raises(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(20_000, dtype="i4"), chunks=(1000,), compression="gzip")
    with h5py.File(path, "r") as f:
        infos = []
        f["x"].id.chunk_iter(infos.append)
    victim = infos[3]
    with open(path, "r+b") as fh:  # overwrite the middle of one compressed chunk
        fh.seek(victim.byte_offset + victim.size // 2)
        fh.write(b"\xff" * 16)
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r") as f:
            reader = DirectReader.open(f["x"], fd)
            np.testing.assert_array_equal(reader.read(0, 3000), np.arange(3000))
            with pytest.raises(ValueError, match="corrupt"):
                reader.read(2500, 4500)
    finally:
        os.close(fd)


@pytest.mark.parametrize("layout", ["contiguous", "gzip"])
@pytest.mark.parametrize("lo, hi", [(-5, 10), (9_990, 10_010), (20, 10)])
def test_ranges_outside_the_dataset_raise(tmp_path, layout, lo, hi):
    """A damaged row index must not turn into a read of another dataset's bytes (or a crash)."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(10_000, dtype="i4"), **LAYOUTS[layout])
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r") as f:
            with pytest.raises(ValueError, match="outside the dataset's 0:10000"):
                DirectReader.open(f["x"], fd).read(lo, hi)
    finally:
        os.close(fd)
