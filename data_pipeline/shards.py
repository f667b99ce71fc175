"""Shard format: webdataset tar files whose samples are blocks of cells stored as CSR.

A sample (block) is a group of tar members sharing the key ``u{unit:06d}-b{block:05d}``:

================== ====================== =============================================
member              dtype                 shape / meaning
================== ====================== =============================================
``indptr.i64``      int64                 [n+1] CSR row pointers, from 0
``genes.u16|u32``   uint16 / uint32       [nnz] token ids, ascending within each cell
``counts.u16|u32|f32`` uint16/uint32/float32 [nnz] raw counts (float only for non-integer input)
``total_counts.f64`` float64              [n] counts per cell before vocabulary filtering
``source_row.i64``  int64                 [n] row of the cell in its source file
``labels.i32``      int32                 [n, n_label_columns] category codes, -1 unknown
``meta.json``       JSON                  {"source": index into manifest sources, "cell_ids": [...]}
================== ====================== =============================================

Arrays are raw little-endian bytes (``np.frombuffer``); the extension is the dtype code, listed
in the manifest under ``dtypes``. Tar headers are deterministic (mtime 0, uid 0, mode 0644), so
identical blocks give identical bytes.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {"i64": "<i8", "i32": "<i4", "u16": "<u2", "u32": "<u4", "f32": "<f4", "f64": "<f8"}
_CODE_OF = {np.dtype(v).str: k for k, v in DTYPES.items()}
END_OF_ARCHIVE = b"\0" * 1024


def dtype_code(dtype) -> str:
    return _CODE_OF[np.dtype(dtype).newbyteorder("<").str]


@dataclass
class CellBlock:
    """Cells of one sample.  n cells, nnz tokens."""

    indptr: np.ndarray        # [n+1] int64
    genes: np.ndarray         # [nnz] uint16/uint32
    counts: np.ndarray        # [nnz] uint16/uint32/float32
    total_counts: np.ndarray  # [n] float64
    source_row: np.ndarray    # [n] int64
    labels: np.ndarray        # [n, n_label_columns] int32
    source: int
    cell_ids: list[str]

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.indptr[-1])


def _member(name: str, payload) -> list:
    """Tar header, payload (any buffer, not copied) and padding of one member."""
    size = memoryview(payload).nbytes
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return [header, payload, b"\0" * (-size % 512)]


def encode_block_parts(key: str, block: CellBlock) -> list:
    """The tar members of one block as a list of buffers (write them in order), without an
    end-of-archive marker. Array payloads are views of the block's arrays, not copies."""
    parts = []
    for field, arr in (("indptr", block.indptr), ("genes", block.genes), ("counts", block.counts),
                       ("total_counts", block.total_counts), ("source_row", block.source_row),
                       ("labels", block.labels)):
        arr = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
        parts += _member(f"{key}.{field}.{dtype_code(arr.dtype)}", memoryview(arr.reshape(-1)).cast("B"))
    meta = json.dumps({"source": block.source, "cell_ids": list(block.cell_ids)}, separators=(",", ":"))
    parts += _member(f"{key}.meta.json", meta.encode())
    return parts


def decode_block(members: dict[str, bytes], n_label_columns: int | None = None) -> CellBlock:
    """Rebuild a block from ``{"indptr.i64": bytes, ...}`` (extensions carry the dtypes)."""
    arrays = {}
    for name, payload in members.items():
        field, _, code = name.rpartition(".")
        if code in DTYPES:
            arrays[field] = np.frombuffer(payload, dtype=DTYPES[code])
    meta = json.loads(bytes(members["meta.json"]))
    n = len(arrays["indptr"]) - 1
    labels = arrays.get("labels", np.zeros(0, np.int32))
    labels = labels.reshape(n, -1) if n else labels.reshape(0, n_label_columns or 0)
    return CellBlock(arrays["indptr"], arrays["genes"], arrays["counts"], arrays["total_counts"],
                     arrays["source_row"], labels, int(meta["source"]), meta["cell_ids"])


def read_block(fd: int, offset: int, nbytes: int) -> CellBlock:
    """The block whose tar members are bytes ``offset:offset+nbytes`` of the shard open as ``fd``
    (the manifest's block records), without reading anything else of the shard. Arrays are
    views of one buffer read for the block."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = os.preadv(fd, [view], offset)
    if got != nbytes:
        raise ValueError(f"block at byte {offset} is cut short ({got} of {nbytes} bytes): truncated shard?")
    members, pos = {}, 0
    while pos < nbytes:
        header = view[pos : pos + 512]
        if bytes(header[257:262]) != b"ustar":
            raise ValueError(f"no tar header at byte {offset + pos}: the manifest's block records do "
                             "not match this shard (run `python -m data_pipeline verify`)")
        name = bytes(header[:100]).rstrip(b"\0").decode()
        size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
        members[name.partition(".")[2]] = view[pos + 512 : pos + 512 + size]
        pos += 512 + size + (-size % 512)
    return decode_block(members)


def iter_shard(path: str | Path) -> Iterator[tuple[str, CellBlock]]:
    """Yield ``(key, block)`` for every block of a shard, in order; raises on a damaged tar."""
    with tarfile.open(path, "r:") as tar:
        key, members = None, {}
        for info in tar:
            if not info.isfile():
                continue
            k, _, ext = info.name.partition(".")
            if k != key and members:
                yield key, decode_block(members)
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
        if members:
            yield key, decode_block(members)
