"""Reading a finished corpus: its block table, blocks checked before use, `verify`, `inspect`,
and `to_h5ad`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np

from .conversion.fsio import atomic_write_json, commit, fsync_file, sha256_path, temp_path
from .conversion.shards import END_OF_ARCHIVE, BlockError, CellBlock, block_problem, parse_block, read_block
from .conversion.vocab import Vocabulary, read_vocab
from .remote import RemoteError, RemoteShards, fetch_metadata, is_url, remote_fs

# 2: per-block offsets in shard records, cell_lengths.npy; 3: each block record ends with the
# block's xxh3-64 (hex), each shard record lists the sources that wrote it. 2 is still read.
SCHEMA_VERSION = 3
OLDEST_SCHEMA_VERSION = 2  # schema 1 has no random-access index, which the loader and verify need
MANIFEST = "manifest.json"
VOCAB = "vocab.tsv"
STATS = "stats.zarr"
CELL_LENGTHS = "cell_lengths.npy"  # genes per cell in corpus order (the loader's length index)
SHARDS = "shards"
LAYOUT = (MANIFEST, VOCAB, STATS, CELL_LENGTHS, SHARDS)  # what a corpus folder holds
# What a corpus at a URL is read from locally (copied once; the manifest first, it keys the copy).
# stats.zarr is not copied (HTTP cannot list a folder): `Corpus.medians` opens it at its URL.
REMOTE_COPIED = (MANIFEST, VOCAB, CELL_LENGTHS)


def shard_name(i: int) -> str:
    """The manifest's name of shard ``i`` (relative to the corpus folder)."""
    return f"{SHARDS}/corpus-{i:06d}.tar"


class CorpusError(ValueError):
    """A corpus folder that is missing pieces or fails its checks."""


BLOCK_RECORD = ["offset", "bytes", "n_cells", "n_tokens", "xxh3_64"]  # named in the manifest for people


def block_record(offset: int, nbytes: int, n_cells: int, n_tokens: int, checksum: int) -> list:
    """A shard's manifest entry for one block: where it lies, what it holds, its checksum."""
    return [offset, nbytes, n_cells, n_tokens, f"{checksum:016x}"]


@dataclass(frozen=True)
class BlockTable:
    """The corpus's blocks in corpus order: ``shard`` [B] (index into ``shard_files``),
    ``offset`` / ``nbytes`` [B] (where the block lies in its shard), ``first_cell`` [B+1]
    (global index of each block's first cell; the last entry is the corpus's cell count),
    ``n_tokens`` [B] and ``checksum`` [B] uint64 (None: not recorded, a schema-2 corpus)."""

    shard_files: tuple[str, ...]
    shard: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    first_cell: np.ndarray
    n_tokens: np.ndarray | None = None
    checksum: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return int(self.first_cell[-1])

    def __len__(self) -> int:
        return len(self.shard)

    def in_shard(self, block: int) -> int:
        """The position of corpus block ``block`` among its shard's blocks."""
        return block - int(np.searchsorted(self.shard, self.shard[block]))


@dataclass(frozen=True)
class LabelColumn:
    """A per-cell label column asked for at conversion: cells carry codes into ``categories``."""

    name: str
    categories: tuple[str, ...]


class Corpus:
    """A corpus folder: ``manifest.json``, ``vocab.tsv``, ``shards/``, ``stats.zarr``,
    ``cell_lengths.npy``. The one reader and writer of this layout: every other module asks it
    (properties below) rather than parsing the manifest. ``manifest`` is the whole record, for
    reports to people (`summary`, `merge.format_report`)."""

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, cache_limit_gb: float = 0.0):
        # A URL (`remote.is_url`): the small files are read from a local copy, blocks by ranged reads,
        # cached up to ``cache_limit_gb`` (0: no limit; `remote.RemoteShards`).
        self.url = path.rstrip("/") if is_url(path) else None
        self.remote = None
        if self.url:
            try:
                path = fetch_metadata(self.url, REMOTE_COPIED, cache_dir)
            except RemoteError as exc:
                raise CorpusError(str(exc)) from None
            if not cache_limit_gb >= 0:
                raise CorpusError(f"cache limit {cache_limit_gb} GB: give a size in GB, or 0 for no limit")
            self.remote = RemoteShards(self.url, path, int(cache_limit_gb * 2**30))
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            hint = (" (an unfinished conversion: rerun its convert command, or `merge` after a "
                    "multi-node run)" if (self.path / ".work").exists() else "")
            raise CorpusError(f"{self.path}: no manifest.json, so not a finished corpus{hint}")
        self.manifest = json.loads(manifest.read_text())
        version = self.manifest.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise CorpusError(f"{self.path}: corpus schema version {version} is newer than this data_pipeline "
                              f"reads ({OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION}): update the code to the "
                              "version that wrote it, or convert the inputs again with this one")
        if not isinstance(version, int) or version < OLDEST_SCHEMA_VERSION:
            raise CorpusError(f"{self.path}: corpus schema version {version!r} is older than this data_pipeline "
                              f"reads ({OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION}): convert the inputs again "
                              f"(`python -m data_pipeline convert ... --out {self.path} --overwrite`)")

    @property
    def location(self) -> str | Path:
        """Where the corpus is, for messages: its URL, else its folder."""
        return self.url or self.path

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("vocab", None)  # read again where asked for, not pickled into every loader worker
        return state

    @staticmethod
    def is_finished(path: str | Path, cache_dir: str | Path | None = None) -> bool:
        """Whether ``path`` (a folder or URL) holds a finished corpus (its manifest is written last)."""
        if is_url(path):
            try:
                fetch_metadata(path, REMOTE_COPIED, cache_dir)
            except RemoteError:
                return False
            return True
        return (Path(path) / MANIFEST).is_file()

    @staticmethod
    def write_manifest(path: str | Path, manifest: dict) -> None:
        """Write the manifest of the corpus in ``path`` (atomically; the last file a conversion
        writes, so a folder with one is a finished corpus)."""
        atomic_write_json(Path(path) / MANIFEST, manifest, indent=1)  # read by people too

    @property
    def schema_version(self) -> int:
        return self.manifest["schema_version"]

    @property
    def plan_hash(self) -> str:
        """The hash of the conversion's inputs and options: which corpus this is, wherever it lies."""
        return self.manifest["plan_hash"]

    @property
    def vocab_path(self) -> Path:
        """``vocab.tsv``: token id, Ensembl id, symbol (special tokens first)."""
        return self.path / VOCAB

    @cached_property
    def vocab(self) -> Vocabulary:
        return read_vocab(self.vocab_path)

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, special tokens included."""
        return self.manifest["vocab"]["size"]

    @property
    def vocab_sha256(self) -> str:
        return self.manifest["vocab"]["sha256"]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name (``<pad>``, ``<cls>``, ``<mask>``) -> token id."""
        return dict(self.manifest["vocab"]["special_tokens"])

    @property
    def label_columns(self) -> list[LabelColumn]:
        return [LabelColumn(c["name"], tuple(c["categories"])) for c in self.manifest["label_columns"]]

    @property
    def label_classes(self) -> list[int]:
        """Categories per label column (what a label head predicts)."""
        return [len(c.categories) for c in self.label_columns]

    @property
    def n_cells(self) -> int:
        return self.manifest["totals"]["n_cells"]

    @property
    def n_tokens(self) -> int:
        return self.manifest["totals"]["n_tokens"]

    @property
    def totals(self) -> dict:
        """Cells, tokens, shards and bytes of the corpus."""
        return dict(self.manifest["totals"])

    @property
    def accounting(self) -> dict:
        """Cells read = cells written + cells skipped (by reason)."""
        return dict(self.manifest["accounting"])

    @property
    def sources(self) -> list[dict]:
        """The converted input files in order: name, path, cells read / written / skipped (by reason)."""
        return [dict(s) for s in self.manifest.get("sources") or []]

    @property
    def cell_lengths_file(self) -> str:
        """The length index's file name (for messages)."""
        return self.manifest["cell_lengths"]["file"]

    def cell_lengths(self) -> np.ndarray:
        """Genes per cell in corpus order, from the length index (no shard is read).  [N]"""
        return np.load(self.path / self.cell_lengths_file)

    def medians(self) -> np.ndarray:
        """Per-token nonzero medians of ``count / total * 1e4`` from ``stats.zarr`` (what rank
        mode divides by).  [vocab_size] float64, NaN for tokens never expressed"""
        from .conversion.stats import GeneStats

        # zarr reads a URL through fsspec itself (by its known keys: no folder listing needed)
        return GeneStats.read_nonzero_medians(f"{self.url}/{STATS}" if self.url else self.path / STATS)

    def shard_path(self, name: str) -> Path:
        """The file of shard ``name`` (as the manifest names it), refused unless it lies inside the
        corpus folder: a manifest must not make a reader open files elsewhere."""
        rel = PurePosixPath(name)
        path = self.path / rel
        # Only the manifest's names are confined: a `shards/` the user symlinked to another disk is theirs.
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise CorpusError(f"{self.path}: the manifest names shard {name!r}, which is outside the corpus "
                              "folder (an absolute path or '..'): refused. Shards "
                              "must lie under the corpus folder, e.g. shards/corpus-000000.tar: convert the "
                              "inputs again, or copy the shard files in and restore the manifest")
        return path

    def block_table(self) -> BlockTable:
        """The block records of every shard as one table (shard paths checked by `shard_path`)."""
        m = self.manifest
        if "cell_lengths" not in m or any("blocks" not in s for s in m["shards"]):
            raise CorpusError(f"{self.path}: the corpus has no random-access index (block records, "
                              "cell_lengths.npy); it was made by an older converter: convert the inputs again")
        with_checksums = m["schema_version"] >= 3
        width = 5 if with_checksums else 4
        shard, rows, sums = [], [], []
        for i, s in enumerate(m["shards"]):
            self.shard_path(s["file"])
            records = s["blocks"]
            try:
                if any(len(r) != width for r in records):
                    raise ValueError(f"block records of {width} fields expected")
                rows += [r[:4] for r in records]
                sums += [int(r[4], 16) for r in records] if with_checksums else []
            except (TypeError, ValueError) as exc:
                raise CorpusError(f"{self.location}: the block records of {s['file']} in manifest.json are malformed "
                                  f"({exc}): run `python -m data_pipeline verify {self.location}`") from None
            shard.append(np.full(len(records), i, np.int64))
        try:
            rec = np.asarray(rows, np.int64).reshape(-1, 4)
        except (TypeError, ValueError, OverflowError):
            rec = np.full((1, 4), -1, np.int64)
        if (rec < 0).any() or (rec[:, 1] < 512).any():
            raise CorpusError(f"{self.location}: manifest.json has block records with negative or impossible "
                              f"values: run `python -m data_pipeline verify {self.location}`")
        return BlockTable(tuple(s["file"] for s in m["shards"]),
                          np.concatenate(shard) if shard else np.zeros(0, np.int64), rec[:, 0], rec[:, 1],
                          np.concatenate([[0], np.cumsum(rec[:, 2])]), rec[:, 3],
                          np.asarray(sums, np.uint64) if with_checksums else None)

    def block_place(self, table: BlockTable, block: int, head: bytes | memoryview | None = None) -> str:
        """Where corpus block ``block`` lies in its shard, for messages: its index there, its key
        (as its first tar header names it, when that is readable: from ``head``, the block's first
        bytes when the caller holds them, else from the shard file) and its bytes."""
        start = int(table.offset[block])
        try:
            if head is None:
                with open(self.shard_path(table.shard_files[int(table.shard[block])]), "rb") as fh:
                    fh.seek(start)
                    head = fh.read(100)
            key = bytes(head[:100]).rstrip(b"\0").decode().partition(".")[0]
        except (OSError, UnicodeDecodeError):
            key = ""
        key = f"key {key}, " if re.fullmatch(r"u\d+-b\d+", key) else ""
        return f"block {table.in_shard(block)} ({key}bytes {start}-{start + int(table.nbytes[block])})"

    def damaged(self, table: BlockTable, block: int, problem: str) -> CorpusError:
        """The error for corpus block ``block`` failing its checks: where, what, and what to do."""
        s = int(table.shard[block])
        name = table.shard_files[s]
        known = self.manifest["sources"]
        sources = [known[k]["path"] for k in self.manifest["shards"][s].get("sources", [])
                   if isinstance(k, int) and 0 <= k < len(known)]
        written = f" ({name} was written from {', '.join(sources)})" if sources else ""
        return CorpusError(
            f"{self.location}: damaged {self.block_place(table, block)} of {name}: {problem}. Do not train on "
            f"this corpus: run `python -m data_pipeline verify {self.location}` to list every damaged shard, then "
            f"convert the sources of the damaged shards again{written}: rerun the convert command with "
            "--overwrite, or restore the corpus from a copy")

    def iter_blocks(self) -> Iterator[tuple[int, CellBlock]]:
        """``(global index of the block's first cell, block)`` over the corpus, in order, each
        block checked before it is handed out."""
        table = self.block_table()
        reader = BlockReader(self, table)
        try:
            for b in range(len(table)):
                yield int(table.first_cell[b]), reader.read(b)
        finally:
            reader.close()


class BlockReader:
    """Reads blocks of a corpus by their records (random access; one per process: it keeps the
    shards open) and checks each before handing it out: its xxh3-64 against the record (when the
    corpus has checksums) and its structure (`shards.block_problem`). ``check=False`` skips the
    checks; only benchmarks use it, to measure what the checks cost."""

    def __init__(self, corpus: Corpus, table: BlockTable, check: bool = True):
        self.corpus, self.table, self.check = corpus, table, check
        self.vocab_size = corpus.vocab_size
        self.label_sizes = corpus.label_classes
        self.fds: dict[int, int] = {}

    def read(self, block: int) -> CellBlock:
        """Block ``block`` (corpus order); raises `CorpusError` naming it when it fails a check."""
        block_or_problem = self.read_or_problem(block)
        if isinstance(block_or_problem, str):
            raise self.corpus.damaged(self.table, block, block_or_problem)
        return block_or_problem

    def read_or_problem(self, block: int, view: memoryview | None = None) -> CellBlock | str:
        """Block ``block``, or what is wrong with it. ``view``: its bytes, read already (`verify`
        reads each shard once, hashing and checking the same bytes); the block's arrays are views of
        them."""
        t = self.table
        s = int(t.shard[block])
        try:
            checksum = int(t.checksum[block]) if self.check and t.checksum is not None else None
            offset, nbytes = int(t.offset[block]), int(t.nbytes[block])
            if view is not None:
                data = parse_block(view, offset, nbytes, checksum)
            elif self.corpus.remote is not None:
                self.corpus.shard_path(t.shard_files[s])  # the same confinement as a local corpus
                data = parse_block(memoryview(self._fetch(block)), offset, nbytes, checksum)
            else:
                if s not in self.fds:
                    self.fds[s] = os.open(self.corpus.shard_path(t.shard_files[s]), os.O_RDONLY)
                data = read_block(self.fds[s], offset, nbytes, checksum)
        except BlockError as exc:
            return str(exc)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if self.check:
            first = int(t.first_cell[block])
            n_tokens = int(t.n_tokens[block]) if t.n_tokens is not None else None
            problem = block_problem(data, int(t.first_cell[block + 1]) - first, n_tokens, self.vocab_size,
                                    self.label_sizes)
            if problem:
                return problem
        return data

    def _fetch(self, block: int) -> bytes:
        """A remote block's bytes. A failed fetch is the store's or the network's fault, not the
        corpus's: it is named as such (the blocks fetched so far stay cached for the rerun)."""
        t = self.table
        offset, nbytes, name = int(t.offset[block]), int(t.nbytes[block]), t.shard_files[int(t.shard[block])]
        try:
            return self.corpus.remote.read(name, offset, nbytes)
        except Exception as exc:  # noqa: BLE001 - a store's own errors differ (aiohttp, botocore, OSError, ...)
            raise CorpusError(f"{self.corpus.url}: cannot fetch block {block} (bytes {offset}-{offset + nbytes}) of "
                              f"{name} ({type(exc).__name__}: {exc}): check that the server is up and reachable "
                              "from this machine and the credentials (fsspec's environment, e.g. AWS_PROFILE), "
                              "then resume the run (--resume auto)") from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# --- verify -----------------------------------------------------------------------------------

def verify(path: str | Path) -> list[str]:
    """Every problem found (empty list: the corpus is sound). Re-reads every shard: its sha256,
    then each block by its record (the records must tile the shard and agree with what each
    block holds: checksum, cells, tokens, structure). A corpus at a URL is checked as its store
    holds it now: the small files are fetched afresh into a temporary folder and the shards
    streamed from the store, not from a node's block cache."""
    if is_url(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="verify-") as fresh:
            return _verify(path, fresh)
    return _verify(path, None)


def _verify(path: str | Path, cache_dir: str | None) -> list[str]:
    try:
        corpus = Corpus(path, cache_dir)
        table = corpus.block_table()
    except CorpusError as exc:
        return [str(exc)]
    m = corpus.manifest
    problems = []
    if not corpus.vocab_path.exists():
        problems.append("vocab.tsv is missing")
    elif corpus.vocab.sha256() != m["vocab"]["sha256"]:
        problems.append("vocab.tsv does not match the manifest's vocabulary hash")
    lengths = []
    reader = BlockReader(corpus, table)
    try:
        for i, shard in enumerate(m["shards"]):
            problems += _verify_shard(corpus, reader, i, shard, lengths)
    finally:
        reader.close()
    problems += _verify_cell_lengths(corpus, lengths)
    acc = m["accounting"]
    if acc["cells_read"] != acc["cells_written"] + sum(v or 0 for v in acc["cells_skipped"].values()):
        problems.append("accounting: cells read != cells written + cells skipped")
    for s in m["sources"]:
        skipped = sum(v or 0 for v in s["cells_skipped"].values())
        if s["cells_read"] is not None and s["cells_read"] != s["cells_written"] + skipped:
            problems.append(f"accounting of {s['name']}: read {s['cells_read']} != written "
                            f"{s['cells_written']} + skipped {skipped}")
    written = sum(s["n_cells"] for s in m["shards"])
    if written != acc["cells_written"] or written != m["totals"]["n_cells"]:
        problems.append(f"shards hold {written} cells but the accounting says {acc['cells_written']} written")
    problems += _verify_stats(corpus)
    return problems


def _verify_stats(corpus: Corpus) -> list[str]:
    """stats.zarr (at the corpus's URL when it has one: it is not copied) must cover every cell."""
    import zarr

    where = f"{corpus.url}/{STATS}" if corpus.url else corpus.path / STATS
    if not corpus.url and not where.exists():
        return ["stats.zarr is missing"]
    try:
        n = zarr.open_group(str(where), mode="r").attrs.get("n_cells")
    except Exception as exc:  # noqa: BLE001 - zarr's and the store's errors differ by version and protocol
        return [f"stats.zarr is missing or unreadable ({type(exc).__name__}: {exc})"]
    if n != corpus.manifest["totals"]["n_cells"]:
        return [f"stats.zarr covers {n} cells, the corpus {corpus.manifest['totals']['n_cells']}"]
    return []


def _verify_cell_lengths(corpus: Corpus, lengths: list[np.ndarray]) -> list[str]:
    """The length index against the genes per cell read from the shards (``lengths``: one array
    per block in corpus order; incomplete when a shard was bad, which is reported already)."""
    record = corpus.manifest.get("cell_lengths")
    if record is None:
        return ["manifest has no cell_lengths record (a corpus from an older converter: convert again)"]
    path = corpus.path / record["file"]
    if not path.exists():
        return [f"{record['file']} is missing"]
    if sha256_path(path) != record["sha256"]:
        return [f"{record['file']}: sha256 differs from the manifest (edited or truncated)"]
    found = np.load(path)
    if len(found) != corpus.n_cells:
        return [f"{record['file']} holds {len(found)} cells, the corpus {corpus.n_cells}"]
    read = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(read) == len(found) and not np.array_equal(read, found):
        return [f"{record['file']} disagrees with the genes per cell in the shards"]
    return []


MAX_BLOCK_PROBLEMS = 10  # per shard: a shard damaged throughout is named once, not per block


@contextlib.contextmanager
def _shard_bytes(corpus: Corpus, name: str) -> Iterator[tuple[int, Callable[[int, int], memoryview]]]:
    """(size, read) of shard ``name`` for `verify`, which reads it once, in order: ``read(offset,
    nbytes)`` gives those bytes (valid until the next read). A local file is read by preadv into one
    reused buffer (a fresh buffer per block costs a page fault per 4 KiB); a shard of a corpus at a
    URL is streamed from the store. Raises FileNotFoundError for a missing shard."""
    if corpus.url:
        fs, root = remote_fs(corpus.url)
        with fs.open(f"{root}/{name}", "rb", block_size=8 << 20) as fh:
            def read_remote(offset: int, nbytes: int) -> memoryview:
                fh.seek(offset)
                return memoryview(fh.read(nbytes))

            yield fh.size, read_remote
        return
    path = corpus.shard_path(name)
    fd = os.open(path, os.O_RDONLY)
    buf = np.empty(0, np.uint8)

    def read_local(offset: int, nbytes: int) -> memoryview:
        nonlocal buf
        if len(buf) < nbytes:
            buf = np.empty(nbytes, np.uint8)
        view = memoryview(buf)[:nbytes]
        return view[: os.preadv(fd, [view], offset)]

    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield os.fstat(fd).st_size, read_local
    finally:
        os.close(fd)


def _verify_shard(corpus: Corpus, reader: BlockReader, index: int, record: dict, lengths: list) -> list[str]:
    """Shard ``index``'s file against its record (size, sha256), then each of its blocks (genes
    per cell of the sound ones appended to ``lengths``). The shard is read once, in order: each
    block's bytes feed the sha256 and are then checked as a block. Reading it twice (hash, then
    blocks) doubled what verify read, and on a corpus larger than the page cache both passes came
    from disk (at 1M cells its system time grew 10x for 4x the cells)."""
    name = record["file"]
    changed = f"{name}: sha256/size differ from the manifest (truncated or edited)"
    t = reader.table
    blocks = np.flatnonzero(t.shard == index)
    h = hashlib.sha256()
    damaged = []
    try:
        with _shard_bytes(corpus, name) as (size, read):
            bad = _block_records_problem(record, size)
            if bad:  # the records cannot guide the read: the file is hashed on its own
                for offset in range(0, size, 8 << 20):
                    h.update(read(offset, min(8 << 20, size - offset)))
                return ([] if size == record["bytes"] and h.hexdigest() == record["sha256"] else [changed]) + bad
            for b in blocks:
                view = read(int(t.offset[b]), int(t.nbytes[b]))
                h.update(view)
                got = reader.read_or_problem(int(b), view)
                problem = got if isinstance(got, str) else _block_problem(got)
                if problem:
                    damaged.append(f"{name}: {corpus.block_place(t, int(b), view[:100])}: {problem}")
                else:
                    lengths.append(np.diff(got.indptr))
            end = int(t.offset[blocks[-1]] + t.nbytes[blocks[-1]]) if len(blocks) else 0
            h.update(read(end, size - end))
    except FileNotFoundError:
        return [f"{name}: missing"]
    except OSError as exc:
        return [f"{name}: unreadable ({exc.strerror or exc})"]
    except Exception as exc:  # noqa: BLE001 - a store's own errors differ (aiohttp, botocore, ...)
        if not corpus.url:
            raise
        return [f"{name}: unreadable at {corpus.url} ({type(exc).__name__}: {exc})"]
    problems = [changed] if size != record["bytes"] or h.hexdigest() != record["sha256"] else []
    if len(damaged) > MAX_BLOCK_PROBLEMS:
        damaged = damaged[:MAX_BLOCK_PROBLEMS] + [f"{name}: {len(damaged) - MAX_BLOCK_PROBLEMS} more damaged blocks"]
    return problems + damaged


def _block_records_problem(record: dict, size: int) -> list[str]:
    """The manifest's block records (offset, bytes, cells, tokens[, checksum]) must tile the shard
    (contiguous from byte 0 to its end-of-archive marker) and add up to the shard's record."""
    table = np.asarray([r[:4] for r in record["blocks"]], np.int64).reshape(-1, 4)
    starts = np.concatenate([[0], np.cumsum(table[:, 1])])
    if (len(table) != record["n_blocks"] or not np.array_equal(table[:, 0], starts[:-1])
            or starts[-1] + len(END_OF_ARCHIVE) != size or table[:, 2].sum() != record["n_cells"]
            or table[:, 3].sum() != record["n_tokens"]):
        return [f"{record['file']}: the manifest's block records do not match the shard (they must tile it "
                "from byte 0 to its end-of-archive marker and add up to its cells and tokens)"]
    return []


def _block_problem(block: CellBlock) -> str | None:
    """What the converter guarantees beyond what `shards.block_problem` (checked on every read)
    covers: cells with at least one gene, positive counts, genes ascending within each cell."""
    if (np.diff(block.indptr) < 1).any():
        return "a cell without genes"
    if (block.counts <= 0).any():
        return "non-positive count"
    g = block.genes.astype(np.int64)
    step = np.diff(g)
    starts = block.indptr[1:-1]
    step[starts - 1] = 1  # a cell boundary may step down
    if len(step) and (step <= 0).any():
        return "genes not strictly ascending within a cell"
    return None


# --- inspect ----------------------------------------------------------------------------------

def _percent(fraction) -> str:
    """A manifest fraction for people; None (no counts to divide by) as n/a."""
    return "n/a" if fraction is None else f"{fraction:.1%}"


def summary(path: str | Path) -> str:
    corpus = Corpus(path)
    m, vocab = corpus.manifest, corpus.vocab
    t, acc = m["totals"], m["accounting"]
    lines = [f"corpus {path}",
             f"  cells {t['n_cells']:,}  tokens {t['n_tokens']:,}  shards {t['n_shards']}  "
             f"bytes {t['bytes']:,} ({t['bytes'] / max(t['n_cells'], 1):.0f}/cell, "
             f"{t['bytes'] / max(t['n_tokens'], 1):.2f}/nonzero)",
             f"  vocabulary {m['vocab']['n_genes']:,} genes ({m['vocab']['origin']}), counts "
             f"{m['block_format']['counts_kind']} {m['block_format']['counts_dtypes']}",
             "  vocabulary genes by id prefix: " + ", ".join(f"{k} {v:,}" for k, v in vocab.id_prefixes().items()),
             f"  mean genes/cell {t['n_tokens'] / max(t['n_cells'], 1):.0f}",
             f"  accounting: read {acc['cells_read']:,} = written {acc['cells_written']:,} + skipped "
             + ", ".join(f"{k} {v:,}" for k, v in acc["cells_skipped"].items() if v)
             if any(acc["cells_skipped"].values()) else
             f"  accounting: read {acc['cells_read']:,} = written {acc['cells_written']:,}"]
    hist = np.sum([s["length_histogram"] for s in m["shards"]], axis=0) if m["shards"] else []
    edges = m["length_histogram_edges"]
    lines.append("  genes/cell histogram:")
    top = max(hist) if len(hist) else 0
    for k, c in enumerate(hist):
        if c:
            lines.append(f"    [{edges[k]:>6}, {2 * edges[k]:>6}) {c:>10,} {'#' * int(40 * c / top)}")
    lines.append("  sources:")
    for s in m["sources"]:
        if "refused" in s:
            lines.append(f"    {s['name']}: refused: {s['refused']}")
            continue
        lines.append(f"    {s['name']} ({s['format']}, {s['matrix']}): {s['cells_written']:,}/"
                     f"{s['cells_read']:,} cells, genes in vocab {_percent(s['fraction_genes_in_vocab'])}, "
                     f"counts in vocab {_percent(s['fraction_counts_in_vocab'])}"
                     + (f", {s['duplicate_columns_summed']} duplicate columns summed"
                        if s["duplicate_columns_summed"] else "")
                     + (f", {len(s['read_errors'])} unreadable row ranges skipped" if s.get("read_errors") else ""))
    warning = vocab.mixed_species_warning()
    if warning:
        lines.append(f"  warning: {warning}")
    for col in m["label_columns"]:
        lines.append(f"  label {col['name']}: {len(col['categories'])} categories")
    return "\n".join(lines)


# --- to-h5ad ----------------------------------------------------------------------------------

def to_h5ad(path: str | Path, out: str | Path, limit: int | None = None) -> int:
    """Write the first ``limit`` cells (all by default) as AnnData: raw counts over the
    vocabulary's genes, obs with cell id, source, source row, total counts and labels."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    corpus = Corpus(path)
    m = corpus.manifest
    vocab = corpus.vocab
    special = set(vocab.special_tokens.values())
    gene_tokens = np.array([i for i in range(len(vocab)) if i not in special])
    column_of = np.full(len(vocab), -1, np.int64)
    column_of[gene_tokens] = np.arange(len(gene_tokens))
    limit = corpus.n_cells if limit is None else min(limit, corpus.n_cells)
    parts, obs = [], {"cell_index": [], "cell_id": [], "source": [], "source_row": [], "total_counts": []}
    labels = []
    n = 0
    for first, block in corpus.iter_blocks():
        if n >= limit:
            break
        take = min(block.n_cells, limit - n)
        end = block.indptr[take]
        parts.append(sp.csr_matrix((block.counts[:end], column_of[block.genes[:end].astype(np.int64)],
                                    block.indptr[: take + 1]), shape=(take, len(gene_tokens))))
        obs["cell_index"] += range(first, first + take)
        obs["cell_id"] += block.cell_ids[:take]
        obs["source"] += [m["sources"][block.source]["name"]] * take
        obs["source_row"] += block.source_row[:take].tolist()
        obs["total_counts"] += block.total_counts[:take].tolist()
        labels.append(block.labels[:take])
        n += take
    x = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(gene_tokens)))
    # widen small storage dtypes so user arithmetic (sums over cells) cannot overflow
    x = x.astype(np.float32 if x.dtype.kind == "f" else np.int32)
    frame = pd.DataFrame(obs)
    frame["source"] = frame["source"].astype("category")
    label_codes = np.concatenate(labels) if labels else np.zeros((0, len(m["label_columns"])), np.int32)
    for j, col in enumerate(m["label_columns"]):
        frame[col["name"]] = pd.Categorical.from_codes(label_codes[:, j], categories=col["categories"])
    frame.index = pd.Index(frame["cell_index"].astype(str).to_numpy(), name=None)
    var = pd.DataFrame({"ensembl_id": [vocab.ensembl_ids[i] for i in gene_tokens],
                        "gene_symbol": [vocab.symbols[i] for i in gene_tokens],
                        "token_id": gene_tokens}, index=[vocab.ensembl_ids[i] for i in gene_tokens])
    adata = ad.AnnData(X=x, obs=frame, var=var)
    adata.uns["corpus"] = {"path": str(corpus.path), "plan_hash": m["plan_hash"], "n_cells": n}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    adata.write_h5ad(tmp)
    fsync_file(tmp)
    commit(tmp, out)
    return n


__all__ = ["Corpus", "CorpusError", "LabelColumn", "verify", "summary", "to_h5ad"]
