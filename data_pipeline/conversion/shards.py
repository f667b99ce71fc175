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

A block's checksum is xxh3-64 of all its bytes (headers, payloads, padding), written at conversion
into its manifest record and checked by `read_block` before the block is decoded: xxh3 hashes
at tens of GB/s, so checking every block costs the loader little (`benchmarks/bench_loader.py`).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

DTYPES = {"i64": "<i8", "i32": "<i4", "u16": "<u2", "u32": "<u4", "f32": "<f4", "f64": "<f8"}
_CODE_OF = {np.dtype(v).str: k for k, v in DTYPES.items()}
END_OF_ARCHIVE = b"\0" * 1024
LENGTH_BINS = 18  # cells with 2**k <= genes < 2**(k+1), k = 0..17 (the manifest's length histograms)


def length_histogram(lengths: np.ndarray) -> list[int]:
    """Cells per ``LENGTH_BINS`` bin of genes per cell."""
    k = np.minimum(np.log2(np.maximum(lengths, 1)).astype(np.int64), LENGTH_BINS - 1)
    return np.bincount(k, minlength=LENGTH_BINS).tolist()
# the members of every block, each once, and the dtype codes each may have
MEMBER_CODES = {"indptr": ("i64",), "genes": ("u16", "u32"), "counts": ("u16", "u32", "f32"),
                "total_counts": ("f64",), "source_row": ("i64",), "labels": ("i32",), "meta": ("json",)}


class BlockError(ValueError):
    """A block that fails its checks (damaged or misplaced bytes); the message says what failed.
    Readers add where the block is (corpus, shard, block) and what to do."""


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


def block_checksum(parts) -> int:
    """xxh3-64 of a block's bytes (the buffers of `encode_block_parts`, or one buffer read back)."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


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


def read_block(fd: int, offset: int, nbytes: int, checksum: int | None = None) -> CellBlock:
    """The block whose tar members are bytes ``offset:offset+nbytes`` of the shard open as ``fd``
    (the manifest's block records), without reading anything else of the shard. Arrays are
    views of one buffer read for the block. With ``checksum`` (the record's xxh3-64) the bytes
    are checked before anything is decoded. Raises `BlockError` for bytes that are not a whole,
    well-formed block (the members of one key, each once, with the dtypes the format allows)."""
    buf = np.empty(nbytes, np.uint8)  # not bytearray: that zeroes the buffer first, a pass the read then overwrites
    view = memoryview(buf)
    got = os.preadv(fd, [view], offset)
    return parse_block(view[:got], offset, nbytes, checksum)


def parse_block(view: memoryview, offset: int, nbytes: int, checksum: int | None = None) -> CellBlock:
    """`read_block` on bytes already read (``view``: what was read of the record's ``nbytes``
    starting at ``offset``; a remote corpus fetches them by ranged reads)."""
    view = memoryview(view)
    got = len(view)
    if got != nbytes:
        raise BlockError(f"cut short ({got} of {nbytes} bytes): the shard is truncated")
    if checksum is not None and xxhash.xxh3_64_intdigest(view) != checksum:
        raise BlockError(f"checksum mismatch (xxh3 {xxhash.xxh3_64_hexdigest(view)}, recorded "
                         f"{checksum:016x}): the bytes changed since conversion")
    members, pos, key = {}, 0, None
    while pos < nbytes:
        header = view[pos : pos + 512]
        if len(header) < 512 or bytes(header[257:262]) != b"ustar":
            raise BlockError(f"no tar header at byte {offset + pos}: the block records do not match the shard")
        try:
            name = bytes(header[:100]).rstrip(b"\0").decode()
            size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise BlockError(f"unreadable tar header at byte {offset + pos}") from None
        k, _, member = name.partition(".")
        field, _, code = member.partition(".")
        if key is not None and k != key:
            raise BlockError(f"members of two blocks ({key}, {k}): the block records do not match the shard")
        key = k
        if code not in MEMBER_CODES.get(field, ()) or member in members or pos + 512 + size > nbytes:
            raise BlockError(f"unexpected member {name!r} ({size} bytes) at byte {offset + pos} of block {key}")
        members[member] = view[pos + 512 : pos + 512 + size]
        pos += 512 + size + (-size % 512)
    if len(members) != len(MEMBER_CODES):
        raise BlockError(f"block {key} has members {sorted(members)}, not one of each of {sorted(MEMBER_CODES)}")
    try:
        return decode_block(members)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BlockError(f"block {key} does not decode ({type(exc).__name__}: {exc})") from None


def block_problem(block: CellBlock, n_cells: int | None = None, n_tokens: int | None = None,
                  vocab_size: int | None = None, label_sizes: list[int] | None = None) -> str | None:
    """What makes ``block`` unsafe to use (None: nothing), in O(cells) plus one pass over the gene
    ids for ``vocab_size``: CSR pointers from 0, non-decreasing, ending at the token arrays'
    length; per-cell arrays of one length; the record's cell and token counts; gene ids inside
    the vocabulary; label codes inside their columns' categories (``label_sizes``: categories per
    column). What indexing by these arrays (numba kernels do not check bounds) relies on."""
    p = block.indptr
    if len(p) == 0 or p[0] != 0 or (p[1:] < p[:-1]).any():
        return "bad indptr (not from 0, or decreasing)"
    n = len(p) - 1
    if not int(p[-1]) == len(block.genes) == len(block.counts):
        return f"indptr ends at {int(p[-1])}, but there are {len(block.genes)} genes and {len(block.counts)} counts"
    if not n == len(block.total_counts) == len(block.source_row) == len(block.labels) == len(block.cell_ids):
        return (f"{n} cells in indptr, but {len(block.total_counts)} total_counts, {len(block.source_row)} "
                f"source_row, {len(block.labels)} labels, {len(block.cell_ids)} cell ids")
    if (n_cells is not None and n != n_cells) or (n_tokens is not None and int(p[-1]) != n_tokens):
        return f"holds {n} cells / {int(p[-1])} tokens, its record says {n_cells} / {n_tokens}"
    if vocab_size is not None and len(block.genes) and int(block.genes.max()) >= vocab_size:
        return f"gene id {int(block.genes.max())} outside the vocabulary of {vocab_size} tokens"
    if label_sizes is not None:
        labels = block.labels
        if labels.ndim != 2 or labels.shape[1] != len(label_sizes):
            return f"labels of shape {labels.shape}, the corpus has {len(label_sizes)} label columns"
        if n and len(label_sizes) and ((labels < -1).any() or (labels >= np.asarray(label_sizes)).any()):
            return "a label code outside its column's categories"
    return None


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
