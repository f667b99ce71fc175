"""Files of named raw arrays, for the converter's work files (statistics partials, row caches).

Layout: a magic line naming the kind of file, the header's length (8 bytes, little-endian), a
JSON header (the caller's fields plus ``arrays``: name, dtype, length, in file order), then the
arrays' raw bytes one after the other. Unlike npz there is no archive to build and no checksum
to compute on the way: npz cost a conversion unit more than its statistics fold. A torn file
fails the length checks; a file of another kind fails the magic check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .buffers import Buffers

_HEAD_MAX = 1 << 16  # headers are a few hundred bytes; read at once with the file's start


def write_arrays(fh, magic: bytes, arrays: dict[str, np.ndarray], **head) -> None:
    """Write ``arrays`` (1-D) and the JSON-able ``head`` fields to the open binary file ``fh``."""
    arrays = {k: np.ascontiguousarray(v, np.dtype(v.dtype).newbyteorder("<")) for k, v in arrays.items()}
    blob = json.dumps(dict(head, arrays=[[k, v.dtype.str, len(v)] for k, v in arrays.items()])).encode()
    fh.write(magic + len(blob).to_bytes(8, "little") + blob)
    for v in arrays.values():
        fh.write(memoryview(v).cast("B"))


def _layout(path, magic: bytes, start_bytes) -> tuple[dict, dict, int]:
    """(header, {name: (offset, dtype, length)}, end of the header) from the file's first bytes."""
    start = len(magic) + 8
    if bytes(start_bytes[: len(magic)]) != magic or len(start_bytes) < start:
        raise ValueError(f"{path}: not a {magic.decode().strip()} file (written by another version?)")
    size = int.from_bytes(start_bytes[len(magic) : start], "little")
    if start + size > len(start_bytes):
        raise ValueError(f"{path}: truncated (header)")
    head = json.loads(bytes(start_bytes[start : start + size]))
    spans, pos = {}, start + size
    for name, dtype, n in head["arrays"]:
        spans[name] = (pos, np.dtype(dtype), n)
        pos += np.dtype(dtype).itemsize * n
    return head, spans, pos


def read_arrays(path: str | Path, magic: bytes, names=None, direct: bool = False,
                buffers: Buffers | None = None, slot: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {name: array}) for the arrays named (all by default), reading the file only as
    far as the last of them.

    ``direct``: read with `fsio.read_whole` (``O_DIRECT``; for files written by `StreamWriter`);
    the arrays are then views of buffer ``slot``, which the next such read reuses. Otherwise the arrays
    are read into ``buffers`` (views valid until the same names are asked for again) or into new
    arrays."""
    from .fsio import read_whole

    if direct:
        blob = read_whole(path, _HEAD_MAX, slot)
        head, spans, _ = _layout(path, magic, blob)
        names = list(spans) if names is None else names
        end = max((spans[k][0] + spans[k][1].itemsize * spans[k][2] for k in names), default=0)
        if end > len(blob):
            blob = read_whole(path, end, slot)
        out = {}
        for name in names:
            off, dt, n = spans[name]
            if off + dt.itemsize * n > len(blob):
                raise ValueError(f"{path}: truncated (array {name})")
            out[name] = np.frombuffer(blob, dt, n, off)
        return head, out
    with open(path, "rb") as fh:
        head, spans, _ = _layout(path, magic, fh.read(_HEAD_MAX))
        out = {}
        for name in (list(spans) if names is None else names):
            off, dt, n = spans[name]
            arr = buffers.get(name, n, dt) if buffers is not None else np.empty(n, dt)
            fh.seek(off)
            if fh.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise ValueError(f"{path}: truncated (array {name})")
            out[name] = arr
        return head, out
