"""Corpus conversion: plan, (vocabulary scan), work units, then `merge` into shards.

Stages, each resumable because each output is written atomically and its presence means "done":

1. plan      ``.work/plan.json``            inputs opened, genes resolved, units cut (`plan.py`)
   index     ``.work/mtx/sNNNNNN/``         a CSR index of each 10x ``matrix.mtx`` input (`mtx_index`):
                                            MatrixMarket has none, and parsing the file whole in
                                            every worker that reads it would cost its size in memory
                                            each time
2. scan      ``.work/scan/uNNNNNN.genes.npz``  per-gene cell counts, only when the vocabulary is
                                            built from the corpus (``--vocab`` skips it); rows of
                                            compressed sources are kept in ``.work/cache/`` so they
                                            are decompressed once
3. vocab     ``vocab.tsv``
4. units     ``.work/units/uNNNNNN.{tar,stats,json}``  a finished shard (row ranges of
                                            one or more files), its statistics, and its record
                                            (accounting, sha256), written last
5. merge     shards renamed into ``shards/``, ``cell_lengths.npy``, ``stats.zarr``, then
             ``manifest.json`` last
             (`merge.py`)

Units run in a process pool (``workers``) and across nodes (unit ``u`` belongs to node
``u % num_nodes``); neither changes any output byte. A node that stops with an error, or is killed,
stops the nodes waiting for its share instead of leaving them waiting ``wait_s`` (`nodes.py`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..child_processes import exit_with_parent, progress_bar
from ..corpus import LAYOUT, VOCAB, Corpus
from .arrayfile import read_arrays, write_arrays
from .buffers import Buffers
from .fsio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    atomic_write_with,
    is_lock_file,
    remove_stale_temps,
)
from .merge import finish_if_complete, merge_units
from .nodes import failure_path, heartbeat, record_failure, wait_for_nodes
from .plan import (
    CHUNK_BLOCKS,
    WORK,
    ConvertError,
    ConvertOptions,
    build_plan,
    input_checksum,
    label_codes,
    load_gene_table,
    load_plan,
    locked_output,
    options_from_plan,
    plan_hash,
    save_plan,
    source_label,
    unit_name,
)
from .readers import SourceError, open_source, pool_start_method
from .rowkernels import convert_rows, scan_counts
from .shards import END_OF_ARCHIVE, CellBlock, block_checksum, encode_block_parts, length_histogram
from .stats import GeneStats
from .validate import SKIP_REASONS
from .vocab import VocabError, Vocabulary, read_vocab, vocabulary_coverage

log = logging.getLogger(__name__)

_OPEN_SOURCES = 8  # per worker; thousands of inputs must not exhaust file handles


# --- per-process context (filled once per worker, so tasks carry only a unit number) ----------

class _Context:
    def __init__(self, work: Path, vocab: Vocabulary | None):
        self.work = work
        self.plan = load_plan(work)
        self.options = options_from_plan(self.plan)
        self.vocab = vocab
        self.buffers = Buffers()  # chunk arrays reused from one chunk to the next
        self.cache_buffers = Buffers()  # rows read back from the scan's cache
        self._sources = {}
        self._colmaps = {}
        self._slots = {}

    def source(self, index: int):
        if index not in self._sources:
            if len(self._sources) >= _OPEN_SOURCES:  # units come in file order: close the oldest
                self._sources.pop(next(iter(self._sources))).close()
            entry = self.plan["sources"][index]
            # a 10x mtx input is read through its index (`ensure_mtx_indexes` made it before any stage that reads rows)
            index_folder = mtx_index_folder(self.work, index) if _indexed(entry) else None
            self._sources[index] = open_source(entry["path"], self.options.matrix, self.options.soma_selection(),
                                               mtx_index=index_folder)
        return self._sources[index]

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()

    def gene_slots(self, index: int) -> tuple[np.ndarray, list[str]]:
        """`gene_slots` of source ``index``'s columns (cached)."""
        if index not in self._slots:
            self._slots[index] = gene_slots(load_gene_table(self.work, index)["ids"])
        return self._slots[index]

    def colmap(self, index: int) -> np.ndarray:
        """Token id per source column, -1 where the gene is unresolved or not in the vocabulary."""
        if index not in self._colmaps:
            ids = load_gene_table(self.work, index)["ids"]
            self._colmaps[index] = self.vocab.lookup(ids) if ids else np.zeros(0, np.int64)
        return self._colmaps[index]


_CTX: _Context | None = None


def _init_worker(work: Path, vocab_path: Path | None) -> None:
    global _CTX
    vocab = read_vocab(vocab_path) if vocab_path is not None and vocab_path.exists() else None
    _CTX = _Context(work, vocab)


def _init_pool_worker(parent_pid: int, *init_args) -> None:
    exit_with_parent(parent_pid)  # a SIGKILLed converter must not leave its workers waiting forever
    _init_worker(*init_args)


def _chunks(unit: int) -> list[tuple[int, int, int]]:
    """``(source, start, stop)`` row ranges a unit is read in, over all its pieces."""
    step = _CTX.options.block_cells * CHUNK_BLOCKS
    return [(s, lo, min(lo + step, b)) for s, a, b in _CTX.plan["units"][unit] for lo in range(a, b, step)]


def _cache_path(unit: int, chunk: int) -> Path:
    return _CTX.work / "cache" / f"{unit_name(unit)}-c{chunk:05d}.rows"


_CACHE_MAGIC = b"ROWCACHE2\n"  # an `arrayfile` of CSR indptr, indices, data and their xxh3-128 checksum


def _cache_checksum(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> np.ndarray:
    """[2] uint64: a torn cache (unsynced: after a power cut its blocks may read back as zeros, a
    structure that still parses) is told from a whole one by its contents, not its shape."""
    import xxhash

    h = xxhash.xxh3_128()
    for a in (indptr, indices, data):
        h.update(np.ascontiguousarray(a).view(np.uint8))
    return np.frombuffer(h.digest(), np.uint64).copy()


def _read_chunk(unit: int, chunk: int, s: int, lo: int, hi: int) -> sp.csr_matrix:
    """Rows ``lo:hi`` of source ``s`` as CSR, from the scan's cache when it left them."""
    cached = _cache_path(unit, chunk)
    if cached.exists():
        try:
            _, a = read_arrays(cached, _CACHE_MAGIC, buffers=_CTX.cache_buffers)
            if np.array_equal(a["checksum"], _cache_checksum(a["indptr"], a["indices"], a["data"])):
                return sp.csr_matrix((a["data"], a["indices"], a["indptr"]),
                                     shape=(hi - lo, _CTX.plan["sources"][s]["n_vars"]))
        except (OSError, ValueError, KeyError):  # torn by a crash, or of an earlier cache format: re-read
            pass
    return _CTX.source(s).read_rows(lo, hi, _CTX.buffers)


def _write_cache(unit: int, chunk: int, x: sp.csr_matrix) -> None:
    """Keep a compressed source's rows for the conversion pass: decompressing (or parsing) twice
    costs more than writing and re-reading raw arrays. Counts that fit uint16 are kept so (float
    ones too, when every value is an integer); no fsync (a cache torn by a crash is detected by its
    checksum and the rows re-read)."""
    data = x.data
    if data.size and data.dtype.itemsize > 2 and data.min() >= 0 and data.max() <= np.iinfo(np.uint16).max:
        narrow = _CTX.buffers.get("cache_data", len(data), np.uint16)
        np.copyto(narrow, data, casting="unsafe")
        if data.dtype.kind in "iu" or np.array_equal(narrow, data):
            data = narrow
    indices = _CTX.buffers.get("cache_indices", len(x.indices), np.uint16 if x.shape[1] <= 1 << 16 else np.uint32)
    np.copyto(indices, x.indices, casting="unsafe")
    indptr = np.asarray(x.indptr, np.int64)
    arrays = {"indptr": indptr, "indices": indices, "data": data,
              "checksum": _cache_checksum(indptr, indices, data)}
    atomic_write_with(_cache_path(unit, chunk), lambda fh: write_arrays(fh, _CACHE_MAGIC, arrays), durable=False)


def _unreadable(exc: SourceError, lo: int, hi: int) -> str:
    """With --skip-bad-files, the note on rows ``lo:hi`` of a file that could not be read (they
    are counted as skipped, ``unreadable_rows``); without it, re-raise: the run stops there."""
    if not _CTX.options.skip_bad_files:
        raise exc
    note = f"rows {lo}:{hi} skipped: {exc}"
    log.warning(note)
    return note


_COUNT_OVERFLOW = SKIP_REASONS.index("count_overflow")
_UNREADABLE = SKIP_REASONS.index("unreadable_rows")


def _refuse_overflow(reason: np.ndarray, src, path: str, lo: int) -> None:
    """Without --skip-bad-files, a cell whose count overflows uint32 stops the run, named."""
    over = np.flatnonzero(reason == _COUNT_OVERFLOW)
    if len(over) and not _CTX.options.skip_bad_files:
        row = lo + int(over[0])
        cell = src.obs_names(row, row + 1)[0]
        raise ConvertError(f"{path} row {row} (cell {cell!r}): a count above 2^32 - 1, which uint32 counts "
                           f"cannot hold ({len(over)} such cells in rows {lo}:{lo + len(reason)}); is this "
                           "matrix raw counts? Pass --skip-bad-files to skip such cells (counted as "
                           "count_overflow)")


def unit_rows(plan: dict, unit: int) -> int:
    return sum(b - a for _, a, b in plan["units"][unit])


# --- stage 1b: index the 10x mtx inputs --------------------------------------------------------

def mtx_index_folder(work: Path, index: int) -> Path:
    return work / "mtx" / f"s{index:06d}"


def _indexed(entry: dict) -> bool:
    """Whether a plan's source is read through an `mtx_index` (a 10x mtx input the plan did not refuse)."""
    return entry.get("format") == "10x-mtx" and "refused" not in entry


def mtx_sources(plan: dict) -> list[int]:
    """The plan's sources read through an `mtx_index`, by source index."""
    return [s["index"] for s in plan["sources"] if _indexed(s)]


def index_source(index: int) -> int:
    """Build source ``index``'s `mtx_index` (one worker, bounded memory); -> its cells. A failure
    stops the run, --skip-bad-files or not: the plan has read and checked every entry of the file
    (a bad one is refused there), so what fails here is the machine (a full disk, an I/O error),
    which a rerun of the same command goes on from once it is fixed."""
    entry = _CTX.plan["sources"][index]
    with open_source(entry["path"], _CTX.options.matrix) as src:
        src.build_index(mtx_index_folder(_CTX.work, index))
    return entry["n_cells"]


def ensure_mtx_indexes(work: Path, plan: dict, workers: int, num_nodes: int, node_rank: int, progress: bool,
                       wait_s: float) -> None:
    """Index every 10x mtx input not indexed yet (node ``r`` of a multi-node run indexes sources
    ``i % num_nodes == r``, then waits for the others' indexes)."""
    wanted = mtx_sources(plan)
    if not wanted:
        return
    (work / "mtx").mkdir(exist_ok=True)
    remove_stale_temps(work / "mtx", num_nodes > 1)

    def missing(sources):
        return [i for i in sources if not mtx_index_folder(work, i).is_dir()]

    todo = missing(i for i in wanted if i % num_nodes == node_rank)
    with progress_bar(sum(plan["sources"][i]["n_cells"] for i in todo), "index mtx", progress) as bar:
        # no kernels: their warm-up reads rows, which before the index is a pass over a whole mtx file
        run_pool(index_source, todo, workers, (work, None), bar.update, kernels=False)
    late = wait_for_nodes(lambda: missing(wanted), num_nodes, wait_s, "mtx indexes", work, node_rank)
    if late:
        raise ConvertError(f"{len(late)} 10x mtx inputs were not indexed by the other nodes within {wait_s:.0f} s "
                           f"(e.g. {plan['sources'][late[0]]['path']}); run every node")


# --- stage 2: scan (vocabulary from the corpus) -----------------------------------------------

def gene_slots(ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """A source's genes in the order their first column comes, and each column's gene among them
    (-1: unresolved).  ids [n_vars] -> (slot_of [n_vars] int64, genes [n_genes])"""
    genes: dict[str, int] = {}
    slot_of = np.array([genes.setdefault(g, len(genes)) if g else -1 for g in ids], np.int64)
    return slot_of, list(genes)


def scan_unit(unit: int) -> int:
    """Cells with a positive count of each gene of each source (`gene_slots`; a cell counts once
    per gene, whatever its columns), over cells passing the value checks; saved per source
    (``s{index}`` arrays)."""
    counts = {}
    for k, (s, lo, hi) in enumerate(_chunks(unit)):
        entry = _CTX.plan["sources"][s]
        src = _CTX.source(s)
        slot_of, genes = _CTX.gene_slots(s)
        per_gene = counts.setdefault(f"s{s}", np.zeros(len(genes), np.int64))
        try:
            x = src.read_rows(lo, hi, _CTX.buffers)
        except SourceError as exc:  # the conversion pass meets the same rows and counts them
            _unreadable(exc, lo, hi)
            continue
        scan_counts(x, entry["integer_counts"], slot_of, per_gene)
        if src.compressed:
            _write_cache(unit, k, x)
    atomic_write_with(_scan_path(_CTX.work, unit), lambda fh: np.savez(fh, **counts))
    return unit_rows(_CTX.plan, unit)


def _scan_path(work: Path, unit: int) -> Path:
    # per gene ("genes"), not per column as the scans of earlier versions, which a rerun leaves aside
    return work / "scan" / f"{unit_name(unit)}.genes.npz"


def build_vocab(work: Path, plan: dict) -> Vocabulary:
    """Genes positive in >= min_cells_per_gene cells over the whole corpus, sorted by Ensembl id."""
    options = options_from_plan(plan)
    per_source = {}
    for u in range(len(plan["units"])):
        with np.load(_scan_path(work, u)) as z:
            for key in z.files:
                per_source[key] = per_source[key] + z[key] if key in per_source else z[key]
    genes, cells, ids, syms = [], [], [], []
    for s in plan["sources"]:
        if "refused" in s:
            continue
        table = load_gene_table(work, s["index"])
        ids += table["ids"]
        syms += table["symbols"]
        source_genes = gene_slots(table["ids"])[1]
        genes += source_genes
        cells.append(per_source.get(f"s{s['index']}", np.zeros(len(source_genes), np.int64)))
    # a gene's cells of different files add up (they are different cells); its symbol is the first one given
    frame = pd.DataFrame({"gene": genes, "cells": np.concatenate(cells) if cells else []})
    per_gene = frame.groupby("gene", sort=False)["cells"].sum().to_dict()
    named = pd.DataFrame({"gene": ids, "symbol": syms})
    named = named[(named.gene != "") & (named.symbol != "")].drop_duplicates("gene")
    symbols = dict(zip(named.gene, named.symbol))
    genes = sorted(g for g, c in per_gene.items() if c >= options.min_cells_per_gene)
    if not genes:
        raise ConvertError(f"no gene is positive in >= {options.min_cells_per_gene} cells; lower "
                           "--min-cells-per-gene or check the inputs")
    return Vocabulary.from_genes(genes, [symbols.get(g, "") for g in genes])


# --- stage 4: units ---------------------------------------------------------------------------

def convert_unit(unit: int) -> dict:
    """Validate, map genes, and write one unit's shard file, statistics and accounting.

    The unit is read and converted in chunks of rows and streamed to its ``.tar``, hashed on the
    way, so that `merge` can rename the file into place without reading it again. Blocks never
    span two source files."""
    opts, vocab = _CTX.options, _CTX.vocab
    stats = GeneStats(len(vocab))
    sha = hashlib.sha256()
    blocks: list[dict] = []
    lengths: list[np.ndarray] = []  # genes per written cell, for the corpus's length index
    pieces = {(s, a): {"source": s, "start": a, "stop": b, "cells_read": b - a, "cells_written": 0,
                       "cells_skipped": np.zeros(len(SKIP_REASONS), np.int64),
                       "counts_total": 0.0, "counts_in_vocab": 0.0}
              for s, a, b in _CTX.plan["units"][unit]}

    def write(fh) -> None:
        offset = 0
        piece = None
        for k, (s, lo, hi) in enumerate(_chunks(unit)):
            entry = _CTX.plan["sources"][s]
            src = _CTX.source(s)
            piece = pieces.get((s, lo), piece)
            try:  # the chunk's cells whole (counts and metadata), or skipped whole
                x = _read_chunk(unit, k, s, lo, hi)
                chunk_labels = [source_label(src, col, lo, hi) for col in opts.label_columns]
                chunk_ids = src.obs_names(lo, hi)
            except SourceError as exc:
                piece.setdefault("read_errors", []).append(_unreadable(exc, lo, hi))
                piece["cells_skipped"][_UNREADABLE] += hi - lo
                continue
            # duplicate source columns of one gene are summed; tokens come out ascending per cell
            rows = convert_rows(x.indptr, x.indices, x.data, _CTX.colmap(s), entry["integer_counts"],
                                opts.min_genes, vocab.token_dtype, _CTX.buffers)
            del x
            _refuse_overflow(rows.reason, src, entry["path"], lo)
            reason, indptr, genes, counts = rows.reason, rows.indptr, rows.tokens, rows.values
            written = np.flatnonzero(reason < 0)
            tc = rows.total_counts[written]
            labels = (np.stack([label_codes(values, _CTX.plan["label_categories"][col], hi - lo)[written]
                                for col, values in zip(opts.label_columns, chunk_labels)], axis=1)
                      if opts.label_columns else np.zeros((len(written), 0), np.int32))
            cell_ids = chunk_ids[written]
            for c0 in range(0, len(written), opts.block_cells):
                c1 = min(c0 + opts.block_cells, len(written))
                p, q = indptr[c0], indptr[c1]
                block = CellBlock(indptr[c0 : c1 + 1] - p, genes[p:q], counts[p:q], tc[c0:c1],
                                  lo + written[c0:c1], np.ascontiguousarray(labels[c0:c1], np.int32), s,
                                  [str(c) for c in cell_ids[c0:c1]])
                key = f"{unit_name(unit)}-b{len(blocks):05d}"
                payload = encode_block_parts(key, block)
                fh.writelines(payload)
                for part in payload:
                    sha.update(part)
                size = sum(memoryview(part).nbytes for part in payload)
                blocks.append({"key": key, "offset": offset, "bytes": size, "n_cells": c1 - c0,
                               "n_tokens": int(q - p), "xxh3": block_checksum(payload),
                               "counts_dtype": counts.dtype.str,
                               "length_histogram": length_histogram(np.diff(block.indptr))})
                offset += size
            lengths.append(np.diff(indptr))
            stats.add_cells(genes, counts, indptr, tc, rows.partition_counts)
            piece["cells_skipped"] += np.bincount(reason[reason >= 0], minlength=len(SKIP_REASONS))
            piece["cells_written"] += len(written)
            piece["counts_total"] += float(tc.sum())
            piece["counts_in_vocab"] += float(counts.sum(dtype=np.float64))
        fh.write(END_OF_ARCHIVE)
        sha.update(END_OF_ARCHIVE)

    base = _CTX.work / "units" / unit_name(unit)
    atomic_write_stream(base.with_suffix(".tar"), write)
    atomic_write_stream(base.with_suffix(".stats"), stats.save_partial)
    cell_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    atomic_write_with(base.with_suffix(".lengths"), lambda fh: np.save(fh, cell_lengths.astype(np.uint32)))
    for piece in pieces.values():
        piece["cells_skipped"] = dict(zip(SKIP_REASONS, piece["cells_skipped"].tolist()))
        if piece["start"] == 0:  # per-source facts ride on its first unit, overlapping other units
            piece["source_checksum"] = input_checksum(_CTX.plan["sources"][piece["source"]]["path"])
            piece["vocabulary_coverage"] = vocabulary_coverage(_CTX.colmap(piece["source"]))
    result = {
        "unit": unit, "cells_read": unit_rows(_CTX.plan, unit),
        "cells_written": sum(blk["n_cells"] for blk in blocks),
        "sha256": sha.hexdigest(), "bytes": base.with_suffix(".tar").stat().st_size,
        "pieces": list(pieces.values()), "blocks": blocks,
    }
    atomic_write_json(base.with_suffix(".json"), result)  # last: marks the unit done
    for k in range(len(_chunks(unit))):
        _cache_path(unit, k).unlink(missing_ok=True)
    return result


# --- orchestration ----------------------------------------------------------------------------

def run_pool(fn, items: list[int], workers: int, init_args: tuple, on_done, kernels: bool = True) -> None:
    """Run ``fn(item)`` for every item, in ``workers`` processes (inline for 1; forked, or spawned
    where an input needs it: `readers.pool_start_method`), after ``_init_worker(*init_args)``
    (load the plan and vocabulary) in each. ``kernels``: ``fn`` runs the compiled row kernels
    (`_load_kernels` before forking)."""
    if not items:
        return
    if workers <= 1:
        _init_worker(*init_args)
        for it in items:
            on_done(fn(it))
        return
    start_method = pool_start_method(s["path"] for s in load_plan(init_args[0])["sources"])
    if start_method == "fork" and kernels:  # spawned workers load their kernels themselves
        _load_kernels(init_args)
    ctx = get_context(start_method)
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx, initializer=_init_pool_worker,
                             initargs=(os.getpid(), *init_args)) as pool:
        try:
            for fut in as_completed([pool.submit(fn, it) for it in items]):
                on_done(fut.result())
        except BaseException:
            # a failed unit (or Ctrl-C) stops the run now: the queued units are dropped, not run for
            # hours before the error is seen (the units running finish; a rerun resumes after them)
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _load_kernels(init_args: tuple) -> None:
    """Load (or compile) the numba kernels for the first source's dtypes in this process before
    forking, so that the workers inherit them instead of each loading them (about half a second
    per worker and stage: a tenth of a small conversion). Best effort: errors surface in workers."""
    _init_worker(*init_args)
    try:
        s, a, b = next((p for unit in _CTX.plan["units"] for p in unit), (None, 0, 0))
        if s is None:
            return
        entry = _CTX.plan["sources"][s]
        x = _CTX.source(s).read_rows(a, min(a + 64, b))
        scan_counts(x, entry["integer_counts"], np.arange(x.shape[1]), np.zeros(x.shape[1], np.int64))
        if _CTX.vocab is not None:
            colmap = _CTX.colmap(s)
            # both row kernels: reversed, the columns are out of vocabulary order
            convert_rows(x.indptr, x.indices, x.data, colmap[::-1].copy(), entry["integer_counts"], 1,
                         _CTX.vocab.token_dtype)
            rows = convert_rows(x.indptr, x.indices, x.data, colmap, entry["integer_counts"], 1,
                                _CTX.vocab.token_dtype)
            stats = GeneStats(len(_CTX.vocab))
            stats.add_cells(rows.tokens, rows.values, rows.indptr, rows.total_counts[rows.reason < 0],
                            rows.partition_counts)
            stats.save_partial(io.BytesIO())
    except Exception:  # noqa: BLE001 - only a warm-up
        pass
    finally:
        _CTX.close()


def _largest_first(plan: dict, units: list[int]) -> list[int]:
    """Submission order: big units first, so the pool does not end waiting on one late big unit."""
    return sorted(units, key=lambda u: -plan["unit_bytes"][u])


def prepare_out(out: Path, options: ConvertOptions, overwrite: bool) -> str:
    """Check ``out`` against this command; returns 'complete', 'resume' or 'new'. ``overwrite``
    deletes what a corpus (or a conversion) left there: the caller has checked the new command
    first (`build_plan`), so that a mistake in it does not cost the old corpus."""
    work = out / WORK
    h = plan_hash(options)
    if overwrite and out.exists():
        # a folder holding nothing but a corpus's names is one (a replacement killed while it deleted
        # the old one leaves part of them: a rerun goes on deleting)
        foreign = [p.name for p in out.iterdir() if p.name not in (*LAYOUT, WORK) and not is_lock_file(p.name)]
        if foreign:
            raise ConvertError(f"--out {out} is a non-empty folder that is not a corpus (it holds "
                               f"{', '.join(sorted(foreign)[:5])}); refusing to overwrite it: choose an empty or new "
                               "folder")
        for name in (WORK, *LAYOUT):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if Corpus.is_finished(out):
        if Corpus(out).plan_hash == h:
            return "complete"
        raise ConvertError(f"{out} already holds a corpus made from other inputs or options; choose "
                           "a new --out, or pass --overwrite to replace it")
    plan = load_plan(work)
    if plan is not None:
        if plan["plan_hash"] != h:
            raise ConvertError(f"{out} holds an unfinished conversion of other inputs or options (or "
                               "the inputs changed since); rerun that exact command to finish it, or "
                               "pass --overwrite to start over")
        return "resume"
    if out.exists() and any(p.name != WORK and not is_lock_file(p.name) for p in out.iterdir()):
        raise ConvertError(f"--out {out} is not empty; choose an empty or new folder")
    return "new"


def ensure_vocab(out: Path, plan: dict, workers: int, mine: list[int], progress: bool,
                 num_nodes: int, node_rank: int, wait_s: float) -> Path:
    """Write ``vocab.tsv`` (supplied, or scanned from the corpus) unless it is already there."""
    vocab_path = out / VOCAB
    if vocab_path.exists():
        return vocab_path
    options = options_from_plan(plan)
    if options.vocab:
        atomic_write_bytes(vocab_path, read_vocab(options.vocab).to_tsv())
        return vocab_path
    work = out / WORK
    for folder in ("scan", "cache"):
        (work / folder).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(work / folder, num_nodes > 1)
    todo = _largest_first(plan, [u for u in mine if not _scan_path(work, u).exists()])
    with progress_bar(sum(unit_rows(plan, u) for u in todo), "scan genes", progress) as bar:
        run_pool(scan_unit, todo, workers, (work, None), bar.update)
    missing = wait_for_nodes(lambda: [u for u in range(len(plan["units"])) if not _scan_path(work, u).exists()],
                             num_nodes, wait_s, "gene scans", work, node_rank)
    if missing:
        raise ConvertError(f"{len(missing)} units were not scanned by the other nodes within "
                           f"{wait_s:.0f} s (e.g. {missing[:5]}); run every node, or pass --vocab")
    vocab = build_vocab(work, plan)
    atomic_write_bytes(vocab_path, vocab.to_tsv())
    return vocab_path


def convert(out: str | Path, options: ConvertOptions, workers: int = 1, num_nodes: int = 1,
            node_rank: int = 0, overwrite: bool = False, progress: bool = True,
            keep_work: bool = False, wait_s: float = 86400.0, timings: dict | None = None) -> dict | None:
    """Convert ``options.inputs`` into the corpus folder ``out``; resumes an interrupted run.

    Returns the manifest (None on a node of a multi-node run, which leaves merging to
    `merge.merge_corpus`). ``timings``, if given, receives seconds per stage.
    """
    out = Path(out)
    if not 0 <= node_rank < num_nodes:
        raise ConvertError(f"--node-rank {node_rank} must be in [0, --num-nodes {num_nodes})")
    if overwrite and num_nodes > 1:  # each node would delete the others' finished units as it starts
        raise ConvertError(f"--overwrite with --num-nodes {num_nodes}: nodes start at different times, and each would "
                           f"delete the work of those already running; delete {out} once, then start every node "
                           "without --overwrite")
    if options.vocab:  # a bad --vocab fails now, not after planning thousands of inputs
        try:
            read_vocab(options.vocab)
        except VocabError as exc:
            raise ConvertError(f"--vocab: {exc}") from None
    with locked_output(out, node_rank if num_nodes > 1 else None):
        if num_nodes > 1:  # this rerun is the fix the waiting nodes were told to run
            failure_path(out / WORK, node_rank).unlink(missing_ok=True)
        try:
            return _convert_locked(out, options, workers, num_nodes, node_rank, overwrite, progress, keep_work,
                                   wait_s, timings)
        except Exception as exc:  # not a kill (KeyboardInterrupt, SIGKILL): a killed node's heartbeat stops instead
            if num_nodes > 1:
                record_failure(out / WORK, node_rank, exc)
            raise


def _convert_locked(out: Path, options: ConvertOptions, workers: int, num_nodes: int, node_rank: int,
                    overwrite: bool, progress: bool, keep_work: bool, wait_s: float,
                    timings: dict | None) -> dict | None:
    """`convert` once this command holds ``out``'s lock."""
    timings = {} if timings is None else timings
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
        log.debug(f"convert: {stage} took {now - clock:.1f} s")
        clock = now

    others_may_write = num_nodes > 1  # the other nodes' temps in .work are theirs to finish
    planned = build_plan(options, workers) if overwrite else None  # the new command checked before a deletion
    state = prepare_out(out, options, overwrite)
    if state == "complete":
        return finish_if_complete(out, keep_work)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(work, others_may_write)
    with heartbeat(work, node_rank) if num_nodes > 1 else nullcontext():  # the waiting nodes' sign that it lives
        if state == "new":
            plan, genes = planned or build_plan(options, workers)
            save_plan(work, plan, genes)
        plan = load_plan(work)
        lap("plan")
        ensure_mtx_indexes(work, plan, workers, num_nodes, node_rank, progress, wait_s)
        lap("index")
        mine = [u for u in range(len(plan["units"])) if u % num_nodes == node_rank]
        vocab_path = ensure_vocab(out, plan, workers, mine, progress, num_nodes, node_rank, wait_s)
        mixed = read_vocab(vocab_path).mixed_species_warning()
        if mixed:
            log.warning(mixed)
        lap("vocab")

        (work / "units").mkdir(exist_ok=True)
        remove_stale_temps(work / "units", others_may_write)
        todo = _largest_first(plan, [u for u in mine if not (work / "units" / f"{unit_name(u)}.json").exists()])
        log.debug(f"convert: {len(todo)} of this node's {len(mine)} work units left to do")
        with progress_bar(sum(unit_rows(plan, u) for u in todo), "convert", progress) as bar:
            run_pool(convert_unit, todo, workers, (work, vocab_path), lambda r: bar.update(r["cells_read"]))
        lap("units")
        if num_nodes > 1:
            return None
        manifest = merge_units(out, keep_work=keep_work, progress=progress, workers=workers)
        lap("merge")
        return manifest
