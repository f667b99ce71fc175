"""A corpus at a URL (``https://``, ``s3://``, ``gs://``, ``memory://`` …: anything fsspec opens),
read without a shared filesystem. Used by `corpus.Corpus` only: the small files (manifest,
vocabulary, length index, stats) are copied once into a local cache folder, so every reader of
them works on local paths; shard blocks are fetched by ranged reads of their records' bytes and
kept in the same cache folder, so a second epoch (or a second worker) does not fetch them again.
With a limit, the least recently used blocks are deleted once the blocks pass it (a node whose
local disk cannot hold the whole corpus). Credentials come from fsspec's usual environment
(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, …)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "DATA_PIPELINE_CACHE"  # the cache folder of remote corpora (default ~/.cache/data_pipeline)


def is_url(path) -> bool:
    """Whether ``path`` names a corpus by URL (a protocol), not a local folder."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "data_pipeline")


class RemoteError(Exception):
    """A remote corpus that cannot be read: names the URL and what to do."""


def remote_fs(url: str):
    """(fsspec filesystem, root path) of ``url``."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def fetch_metadata(url: str, files: tuple[str, ...], cache_dir: str | Path | None = None) -> Path:
    """A local folder holding ``files`` of the folder at ``url`` (`corpus.Corpus` names them: its
    manifest first, then the other small files, each of which must be there), fetched
    unless the cache holds it already. The copy is keyed by the URL and the first file's bytes, so
    a corpus converted again at the same URL is fetched again; it is written to a temporary folder
    and renamed, so ranks fetching at once do not see each other's half-written files."""
    url, (manifest_name, *others) = url.rstrip("/"), files
    try:
        fs, root = remote_fs(url)
    except (ImportError, ValueError) as exc:  # fsspec: ValueError for a protocol it does not know
        raise RemoteError(f"{url}: no filesystem for this protocol ({exc}): check the URL's protocol, or install "
                          "the package fsspec names (s3fs for s3://, gcsfs for gs://, aiohttp for https://)") from None
    try:
        manifest = fs.cat_file(f"{root}/{manifest_name}")
    except FileNotFoundError:
        raise RemoteError(f"{url}: no {manifest_name} there, so not a finished corpus: check the URL (the "
                          "folder `python -m data_pipeline convert ... --out CORPUS` made, copied whole)") from None
    except ImportError as exc:  # a filesystem that imports its client on first use
        raise RemoteError(f"{url}: no filesystem for this protocol ({exc}): install the package fsspec names "
                          "(s3fs for s3://, gcsfs for gs://, aiohttp for https://)") from None
    except Exception as exc:  # noqa: BLE001 - connection errors differ per protocol (aiohttp, botocore, ...)
        raise RemoteError(f"{url}: cannot read {manifest_name} ({type(exc).__name__}: {exc}): check that the "
                          "server is up and reachable from this machine, and the credentials "
                          "(fsspec's environment, e.g. AWS_PROFILE)") from None
    key = hashlib.sha256(url.encode() + b"\0" + manifest).hexdigest()[:24]
    local = cache_root(cache_dir) / key
    if (local / manifest_name).is_file():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=local.parent))
    try:
        for name in others:
            try:
                fs.get_file(f"{root}/{name}", str(tmp / name))
            except FileNotFoundError:
                # the converter writes manifest.json last, but an upload (`aws s3 sync`, `gsutil cp -r`) may
                # not: a copy cached without this file would be kept as whole for good
                raise RemoteError(f"{url}: {manifest_name} is there but {name} is not, so the corpus is not whole: "
                                  "an upload still under way, or one that left files out. Wait for it to finish (or "
                                  f"copy the corpus folder again, {manifest_name} last), then rerun") from None
        (tmp / manifest_name).write_bytes(manifest)  # last: a copy with a manifest is whole
        try:
            os.rename(tmp, local)
        except OSError:  # another process renamed its copy first: use that one
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


class RemoteShards:
    """Ranged reads of a remote corpus's shards, each block cached in ``cache/blocks`` under its
    shard and offset; a store that ignores ranges gives whole shards, cached whole. The caller
    checks each block's checksum, cached or not.

    ``limit_bytes`` (0: none) bounds the cached blocks: a process that has stored another
    `TRIM_SHARE` of the limit since it last looked deletes the least recently used blocks (a read
    from the cache counts as a use) until the folder holds `TRIM_TO` of the limit. Loader workers
    and ranks share the folder and each trims it, so between trims it may pass the limit by
    `TRIM_SHARE` per process; a block deleted under another process is fetched again."""

    TRIM_SHARE = 0.05
    TRIM_TO = 0.9

    def __init__(self, url: str, cache: Path, limit_bytes: int = 0):
        self.url, self.cache = url.rstrip("/"), cache / "blocks"
        self.limit_bytes = int(limit_bytes)
        self._fs = None
        self._stored = 0  # bytes this process stored since it last trimmed

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}  # each worker opens its own (sessions do not pickle)

    def read(self, name: str, offset: int, nbytes: int) -> bytes:
        """Bytes ``offset:offset+nbytes`` of shard ``name`` (a path relative to the corpus)."""
        flat = name.replace("/", "__")
        cached, whole = self.cache / f"{flat}.{offset}.{nbytes}", self.cache / flat
        for path in (cached, whole):
            try:
                with open(path, "rb") as fh:
                    fh.seek(0 if path is cached else offset)
                    data = fh.read(nbytes)
            except FileNotFoundError:  # never fetched, or trimmed away (by any process sharing the cache)
                continue
            if self.limit_bytes:
                with contextlib.suppress(FileNotFoundError):  # trimmed since: the bytes are read already
                    os.utime(path)  # recently used: trimmed last
            return data
        if self._fs is None:
            self._fs = remote_fs(self.url)
        fs, root = self._fs
        data = fs.cat_file(f"{root}/{name}", start=offset, end=offset + nbytes)
        if len(data) > nbytes:
            # The store ignored the range (a plain HTTP server answers 200 with the whole shard):
            # keep the whole shard, so its other blocks are read from it rather than fetched again.
            cached, data = whole, data
        self._store(cached, data)
        return data[offset : offset + nbytes] if cached is whole else data

    def _store(self, path: Path, data: bytes) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: workers and ranks share the cache
        self._stored += len(data)
        if self.limit_bytes and self._stored >= self.TRIM_SHARE * self.limit_bytes:
            self.trim()

    def trim(self) -> int:
        """Delete the least recently used cached blocks while the folder holds more than the limit,
        down to `TRIM_TO` of it.  -> bytes the folder holds after"""
        self._stored = 0
        blocks = []
        with os.scandir(self.cache) as entries:
            for entry in entries:
                if entry.name.startswith("."):  # another process's block being written
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                blocks.append((st.st_mtime, st.st_size, entry.path))
        held = sum(size for _, size, _ in blocks)
        if held <= self.limit_bytes:
            return held
        for _, size, path in sorted(blocks):
            if held <= self.TRIM_TO * self.limit_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another process trimmed it first
                os.unlink(path)
            held -= size
        return held
