"""Crash-safe file writes: temp name in the same folder, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
partial one. Temp names start with ``.`` and end with ``.tmp-<pid>`` so a rerun can sweep what a
killed process left behind (`remove_stale_temps`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

_TMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    # host and pid: nodes of a multi-node run may write the same file on a shared filesystem
    return path.with_name(f".{path.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file written by a library that closed it itself (h5py, anndata, numpy)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (a store a library wrote file by file, e.g. zarr),
    so that a rename after it cannot outlive its contents in a power cut."""
    for sub, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(sub) / name)
        fsync_dir(Path(sub))


def commit(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced ``tmp`` onto ``path`` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_with(path: str | Path, write, durable: bool = True) -> None:
    """Call ``write(fh)`` on a temp file, then fsync and rename it onto ``path`` (``durable=False``:
    no fsyncs, for caches whose loss or tearing by a power cut is detected and redone)."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        write(fh)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    if durable:
        commit(tmp, path)
    else:
        os.replace(tmp, path)


# Writes of a streamed file go through this many buffers of _STREAM_BUFFER bytes: the caller
# fills one while a thread writes another.
_STREAM_BUFFER = 8 << 20
_STREAM_BUFFERS = 3
_ALIGN = 4096  # O_DIRECT wants offsets, lengths and memory aligned to the logical block size
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # absent off Linux: page-cache I/O


class StreamWriter:
    """A large file written sequentially, with the writing overlapped with the caller's work.

    ``write``/``writelines`` copy into page-aligned buffers; full buffers are written by one
    background thread with ``O_DIRECT`` where the filesystem allows it. A converter's output is
    not read again soon; through the page cache it cost fresh pages for every byte, then an fsync
    waiting for the disk (about 8 s of a 60 s conversion of 1M cells on this project's VM).
    Direct writes come from the same few buffers and are done by the disk's DMA while the caller
    converts the next rows.
    ``close()`` writes the tail, trims the block padding and fsyncs. Where ``O_DIRECT`` is
    refused (tmpfs, some network filesystems, not Linux) the thread writes through the page cache.
    """

    def __init__(self, path: Path):
        from concurrent.futures import ThreadPoolExecutor

        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | _O_DIRECT, 0o644)
        except OSError:
            self._fd = os.open(path, flags, 0o644)
        self._bufs = _take_buffers()
        self._views = [memoryview(b) for b in self._bufs]
        self._pending = [None] * _STREAM_BUFFERS  # the write in flight from each buffer
        self._pool = ThreadPoolExecutor(1)
        self._cur = 0
        self._fill = 0
        self._offset = 0  # file bytes handed to the thread so far
        self.size = 0

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n = len(src)
        done = 0
        while done < n:
            take = min(n - done, _STREAM_BUFFER - self._fill)
            self._views[self._cur][self._fill : self._fill + take] = src[done : done + take]
            self._fill += take
            done += take
            if self._fill == _STREAM_BUFFER:
                self._submit(_STREAM_BUFFER)
        self.size += n
        return n

    def writelines(self, parts) -> None:
        for part in parts:
            self.write(part)

    def _submit(self, length: int) -> None:
        k = self._cur
        self._pending[k] = self._pool.submit(_pwrite_all, self._fd, self._views[k][:length], self._offset)
        self._offset += length
        self._cur = (k + 1) % _STREAM_BUFFERS
        self._fill = 0
        if self._pending[self._cur] is not None:  # the next buffer is free once its write is done
            self._pending[self._cur].result()
            self._pending[self._cur] = None

    def close(self) -> None:
        """Write what is buffered, set the exact size, fsync and close."""
        try:
            if self._fill:
                tail = -self._fill % _ALIGN
                self._views[self._cur][self._fill : self._fill + tail] = bytes(tail)
                self._submit(self._fill + tail)
            for f in self._pending:
                if f is not None:
                    f.result()
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self._abort()

    def _abort(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for v in self._views:
            v.release()
        if self._bufs:
            _free_buffers.append(self._bufs)
        self._views, self._bufs = [], []


# Buffers of finished writers, reused by the next one in this process: fresh pages cost more
# than the copies into them (page faults; on a VM, often the host's too).
_free_buffers: list[list] = []


def _take_buffers() -> list:
    if _free_buffers:
        return _free_buffers.pop()
    return [_private_map(_STREAM_BUFFER) for _ in range(_STREAM_BUFFERS)]


def _private_map(size: int):
    """Page-aligned anonymous memory (what O_DIRECT needs), private: a shared map (mmap's
    default) would be one buffer for forked workers. Huge pages where offered: fewer faults."""
    import mmap

    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def _stop_direct(fd: int, exc: OSError) -> None:
    """After EINVAL from a direct read or write (a filesystem that accepts O_DIRECT at open but
    not for I/O), turn O_DIRECT off so that the caller can retry; re-raise anything else."""
    import errno
    import fcntl

    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    if exc.errno != errno.EINVAL or not fl & _O_DIRECT:
        raise exc
    fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~_O_DIRECT)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            _stop_direct(fd, exc)


_read_buffers: dict = {}  # slot -> mmap reused by read_whole


def read_whole(path: str | Path, limit: int | None = None, slot: int = 0) -> memoryview:
    """A file's bytes (at most its first ``limit``), read with ``O_DIRECT`` where allowed (a file
    written by `StreamWriter` is not in the page cache, and reading it through the cache would
    fill fresh pages only to copy them out), into buffer ``slot``, reused by the next call with
    the same slot: the view is valid until then."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECT)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if limit is None else min(limit, os.fstat(fd).st_size)
        cap = -(-max(size, 1) // _STREAM_BUFFER) * _STREAM_BUFFER
        if slot not in _read_buffers or len(_read_buffers[slot]) < cap:
            _read_buffers[slot] = _private_map(cap)  # the old one is freed once no view is left
        view = memoryview(_read_buffers[slot])
        done = 0
        while done < size:
            try:
                got = os.preadv(fd, [view[done : -(-size // _ALIGN) * _ALIGN]], done)
            except OSError as exc:
                _stop_direct(fd, exc)
                continue
            if got <= 0:
                break
            done += got
        return view[: min(done, size)]
    finally:
        os.close(fd)


def atomic_write_stream(path: str | Path, write) -> None:
    """`atomic_write_with` for a large output written once and not read again soon: ``write(fh)``
    gets a `StreamWriter`."""
    path = Path(path)
    tmp = temp_path(path)
    fh = StreamWriter(tmp)
    try:
        write(fh)
    except BaseException:
        fh._abort()
        raise
    fh.close()
    commit(tmp, path)


def atomic_write_bytes(path: str | Path, data) -> None:
    """Write ``data`` (a buffer, or a list of buffers written in order) atomically."""
    atomic_write_with(path, lambda fh: fh.writelines(data if isinstance(data, list) else [data]))


def atomic_write_json(path: str | Path, obj, indent: int | None = None) -> None:
    """Compact by default: work files can hold 10^5-10^6 values (gene tables, block lists), and
    json's indenting encoder is pure Python (several times slower than the compact one)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def atomic_replace_dir(tmp_dir: Path, path: Path) -> None:
    """Replace folder ``path`` by the fully written ``tmp_dir``: its files are fsynced, the old
    folder is moved aside (to a temp name of ``path.old``), the new one renamed in, the old one
    deleted. Folders cannot be swapped in one rename on POSIX: a crash in between leaves ``path``
    absent or old, never half-deleted, and the caller rebuilds it."""
    fsync_tree(tmp_dir)
    aside = temp_path(path.with_name(path.name + ".old")) if path.exists() else None
    if aside is not None:
        os.replace(path, aside)
    commit(tmp_dir, path)
    if aside is not None:
        shutil.rmtree(aside)


def output_temp(path: Path) -> Path:
    """This process's temp name for ``path`` in a user's folder (no lock held), after deleting the
    temps killed writers left of it: this host's dead processes', untouched for `STALE_TEMP_S`
    (``path.old`` ones too: `atomic_replace_dir`'s old folder moved aside)."""
    remove_stale_temps(path.parent, others_may_write=True, names={path.name, path.name + ".old"},
                       min_age_s=STALE_TEMP_S)
    return temp_path(path)


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)" + re.escape(_TMP_MARK) + r"(?P<host>.+)-(?P<pid>\d+)$")  # `temp_path`


# without a lock: a temp unchanged this long, of a process of this host that no longer runs, is stale
STALE_TEMP_S = 3600.0


def remove_stale_temps(folder: Path, others_may_write: bool = False, names: set[str] | None = None,
                       min_age_s: float = 0.0) -> int:
    """Delete the temp files/folders (`temp_path` names only) that a killed or failed writer left
    in ``folder``; returns how many. Call it holding the folder's `OutputLock`: exclusively, every
    temp there is stale; ``others_may_write`` (a shared lock: the nodes of a multi-node conversion)
    leaves every temp but those of this host's processes that no longer run. Without a lock (a
    user's folder): ``names``, only the temps of those files, and ``min_age_s``, only those unchanged
    for that long (containers can share a host name without sharing their processes)."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            m = _TEMP_NAME.match(p.name)
            if not m or (others_may_write and (m["host"] != socket.gethostname() or _running(int(m["pid"])))):
                continue
            if (names is not None and m["name"] not in names) or (
                    min_age_s and time.time() - p.lstat().st_mtime < min_age_s):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# --- the lock of an output folder --------------------------------------------------------------

LOCK_FILE = ".lock"  # in the output folder while a command writes there
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderBusy(RuntimeError):
    """Another command holds the output folder's lock."""


def is_lock_file(name: str) -> bool:
    return name == LOCK_FILE or name.startswith(LOCK_FILE + ".node-")


class OutputLock:
    """Who may write into an output folder, held for a whole command (``with OutputLock(...):``).

    A kernel lock (``flock``) on ``FOLDER/.lock``: exclusive for a command that owns the folder
    (a single-node conversion, `merge`), shared for a node of a multi-node conversion, which
    also locks ``.lock.node-R`` exclusively (nodes share the folder, but one node rank runs once).
    Never waits: a second command is refused at once (`FolderBusy`), naming the holder from what
    it wrote into its lock file (host, pid, start time, command). The kernel releases a flock when
    its holder dies, however it dies, so a killed command leaves nothing to clean; a lock file is
    removed by its last holder on the way out (after it checked, holding the lock, that the path
    still names the file it locked, so that a command racing with that removal cannot lock a
    deleted file). Where the filesystem has no flock (some network filesystems; Lustre without
    ``-o flock``) the folder is not locked, with a warning.
    """

    def __init__(self, folder: str | Path, command: str | None = None, node: int | None = None):
        self.folder, self.command, self.node = Path(folder), command or command_line(), node
        self._held: list[tuple[Path, int]] = []

    @property
    def exclusive(self) -> bool:
        return self.node is None

    def __enter__(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._take(self.folder / LOCK_FILE, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
            if not self.exclusive:
                self._take(self.folder / f"{LOCK_FILE}.node-{self.node}", fcntl.LOCK_EX)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _take(self, path: Path, mode: int) -> None:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderBusy(self._refusal()) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_FLOCK:
                    raise
                warnings.warn(f"{self.folder}: the filesystem refuses file locks ({exc.strerror}), so this "
                              "command runs without locking its output folder: make sure no other command "
                              "writes there meanwhile", stacklevel=3)
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its last holder had just removed: lock the new one
        if mode == fcntl.LOCK_EX:  # the holder's name, for whoever is refused
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder(self.command)) + "\n").encode(), 0)
        self._held.append((path, fd))

    def _release(self) -> None:
        for path, fd in reversed(self._held):
            try:
                # a shared holder removes the file only when it is the last one (its upgrade succeeds)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(fd)  # releases the flock
        self._held.clear()

    def _refusal(self) -> str:
        holders = [h for p in sorted(self.folder.glob(LOCK_FILE + "*")) if is_lock_file(p.name)
                   for h in [_held_by(p)] if h]
        who = "; ".join(f"host {h.get('host')} pid {h.get('pid')} since {h.get('started')}: {h.get('command')}"
                        for h in holders) or "a command that did not say who it is"
        return (f"{self.folder} is in use by another command ({who}). Wait for it to finish, or stop it, "
                f"then rerun this one. A lock is released by the kernel when its holder dies, so if that "
                f"process no longer runs (check on its host: ps -p PID) the lock is on a network "
                f"filesystem whose server kept it (NFS drops a dead client's lock when its lease ends, "
                f"about 90 s): wait that long, or delete {self.folder / LOCK_FILE}* once you are sure "
                f"nothing writes into {self.folder}, and rerun.")


def command_line() -> str:
    """This process's command, as its user typed it (``python -m data_pipeline convert ...``)."""
    argv = list(sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        argv[:1] = ["python", "-m", spec.name.removesuffix(".__main__")]
    return shlex.join(argv)


def _holder(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command}


def _held_by(path: Path) -> dict | None:
    """What the holder of lock file ``path`` wrote, if someone holds it exclusively (a probe for a
    shared lock fails); None if it is free or holds nothing readable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it exclusively
        except BlockingIOError:
            pass
        text = os.read(fd, 1 << 16).decode(errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            return None
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the probe's lock


def _hash_tree(path: Path, h, feed) -> None:
    """Feed ``h`` a file, or a folder's files (sorted; each preceded by its relative path):
    ``feed(h, open binary file)`` adds one file's bytes."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            feed(h, fh)


def _feed_read(h, fh) -> None:
    while block := fh.read(1 << 22):
        h.update(block)


_HASH_WINDOW = 1 << 26  # bytes mapped at once: a multiple of mmap.ALLOCATIONGRANULARITY


def _feed_mmap(h, fh) -> None:
    """Feed ``h`` a file through memory maps of ``_HASH_WINDOW`` bytes, one at a time: mapping the
    whole file would put all of it in this process's resident set (file pages of a map count in
    RSS), so a worker hashing a 4 GB input showed a 4 GB peak RSS, growing with the input file."""
    import mmap

    size = os.fstat(fh.fileno()).st_size
    for offset in range(0, size, _HASH_WINDOW):
        with mmap.mmap(fh.fileno(), min(_HASH_WINDOW, size - offset), offset=offset, access=mmap.ACCESS_READ) as m:
            with memoryview(m) as view:
                h.update(view)


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder (relative paths and contents of its files, sorted)."""
    h = hashlib.sha256()
    _hash_tree(Path(path), h, _feed_read)
    return h.hexdigest()


def source_checksum(path: str | Path) -> str:
    """``"xxh3_128:<hex>"`` of an input file or folder (as `sha256_path`). Inputs are hashed for
    provenance only (shards carry sha256 for verification), and xxh3 over a memory map runs at
    page-cache speed (~7 GB/s here, sha256 ~1.7 GB/s): on a large conversion sha256 cost a tenth
    of the whole time."""
    import xxhash

    h = xxhash.xxh3_128()
    _hash_tree(Path(path), h, _feed_mmap)
    return f"xxh3_128:{h.hexdigest()}"
