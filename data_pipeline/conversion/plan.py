"""The conversion plan: options, sources, gene identity, label categories and work units.

The plan is computed once, written to ``CORPUS/.work/plan.json``, and fixes everything the output
depends on. Work units (row ranges of one or more files, about ``shard_bytes`` of output each: a
unit writes one shard) depend only on the inputs and options, never on the worker or node count,
which is why shards come out byte-identical whatever the parallelism. A rerun with the same
command finds the same plan and resumes; a rerun with different inputs or options is refused
instead of mixing two corpora.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .fsio import FolderBusy, OutputLock, atomic_write_json, remove_stale_temps, source_checksum
from .gene_ids import resolve_gene_ids
from .readers import Source, SourceError, is_soma, is_uri, open_source, pool_start_method
from .soma_source import SomaSelection
from .validate import check_integer_counts, looks_integer, non_integer_message, sample_rows
from .vocab import VocabError, read_symbol_table

WORK = ".work"  # a conversion's work folder inside the corpus folder: plan, units, scans
PLAN_VERSION = 3
# Rows read and converted at once (in blocks): bounds a worker's memory whatever the unit size.
CHUNK_BLOCKS = 16
logger = logging.getLogger(__name__)


class ConvertError(RuntimeError):
    """A conversion that cannot start or go on; the message names the problem and the fix."""


@dataclass
class ConvertOptions:
    """Everything that decides the corpus bytes (runtime knobs such as workers live elsewhere)."""

    inputs: list[str]
    matrix: str = "X"                      # X | raw.X | layers/<name>
    gene_column: str | None = None         # var column (or var_names) holding gene ids
    symbol_table: str | None = None        # symbol -> Ensembl table (CSV/TSV or pickled dict)
    vocab: str | None = None               # supplied vocab.tsv or Geneformer token dictionary
    min_cells_per_gene: int = 1            # built vocabulary: genes positive in >= N cells
    min_genes: int = 1                     # cells need >= N vocabulary genes with a count
    allow_non_integer: bool = False        # keep fractional input as float32 instead of refusing
    label_columns: list[str] = field(default_factory=list)
    block_cells: int = 1024                # cells per webdataset sample
    unit_cells: int = 1 << 17              # most rows per work unit (= shard)
    shard_bytes: int = 64 << 20            # target shard (work unit) size
    skip_bad_files: bool = False           # count unusable files as skipped instead of stopping
    soma_measurement: str = "RNA"          # SOMA experiments: the measurement read
    soma_layer: str = "raw"                # SOMA experiments: the X layer read
    soma_filter: str | None = None         # SOMA experiments: obs value filter (None: every cell)

    def validate(self) -> None:
        if not self.inputs:
            raise ConvertError("no inputs: pass one or more .h5ad / .zarr / 10x folders, .h5 or .loom "
                               "files, or SOMA experiments")
        for name in ("block_cells", "unit_cells", "shard_bytes"):
            if getattr(self, name) < 1:
                raise ConvertError(f"--{name.replace('_', '-')} must be >= 1")
        if self.min_genes < 1:
            raise ConvertError("--min-genes must be >= 1 (a cell with no vocabulary gene has no tokens)")
        if self.unit_cells % self.block_cells:
            raise ConvertError(f"--unit-cells ({self.unit_cells}) must be a multiple of --block-cells "
                               f"({self.block_cells}) so blocks are full except at a file's end")
        if self.soma_filter is not None and not self.soma_filter.strip():
            raise ConvertError("--soma-filter is empty: give a value filter such as "
                               "\"is_primary_data == True\", or leave the flag out to read every cell")
        if self.soma_filter and not any(is_soma(p) for p in self.inputs):
            raise ConvertError("--soma-filter applies to TileDB-SOMA experiments only, and no input is "
                               "one (a URI, or a folder holding __tiledb_group.tdb); leave it out")

    def soma_selection(self) -> SomaSelection:
        """What SOMA inputs are read as (`open_source`'s ``soma``)."""
        return SomaSelection(self.soma_measurement, self.soma_layer, self.soma_filter)


# Options added after corpora were made enter the plan hash only when set away from their
# default, so the same command still finds the corpus (or unfinished conversion) it made before.
_HASHED_WHEN_SET = ("soma_measurement", "soma_layer", "soma_filter")


def _hashed_options(options: ConvertOptions) -> dict:
    defaults = {f.name: f.default for f in fields(ConvertOptions)}
    return {k: v for k, v in asdict(options).items() if k not in _HASHED_WHEN_SET or v != defaults[k]}


def _identity_key(path: str) -> dict:
    if is_uri(path):  # a remote experiment: its URI is all there is to hash (Census URIs name a release)
        return {"uri": path}
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": _size(Path(path)), "mtime_ns": st.st_mtime_ns}


def _size(path: Path | str) -> int | None:
    """Bytes of an input file or folder; None for a URI."""
    if is_uri(path):
        return None
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def plan_hash(options: ConvertOptions) -> str:
    """Hash of the options and the identity (path, size, mtime) of every input."""
    keys = []
    for p in options.inputs:
        try:
            keys.append(_identity_key(p))
        except OSError:
            keys.append({"path": str(Path(p).resolve()), "missing": True})
    blob = json.dumps({"version": PLAN_VERSION, "options": _hashed_options(options), "inputs": keys},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def source_label(source: Source, column: str, start: int = 0, stop: int | None = None):
    """Values of an obs label column as str/None, or None when the file lacks the column."""
    try:
        return source.obs_values(column, start, stop)
    except KeyError:
        return None


def _alternatives(source: Source) -> list[str]:
    root = getattr(source, "_root", None)
    if root is None:
        return []
    out = ["raw.X"] if "raw" in root and "X" in root["raw"] else []
    if "layers" in root:
        out += [f"layers/{k}" for k in root["layers"].keys()]
    return [m for m in out if m != source.matrix]


def _warn_column_major(src: Source, options: ConvertOptions) -> None:
    """A CSC matrix holds no row ranges: each chunk of rows the converter reads (`CHUNK_BLOCKS`
    blocks) scans the whole matrix, in the gene scan and in the conversion, so the time grows with
    the square of the file. Said once per file, with the fix, where it takes more than a few scans."""
    chunk = options.block_cells * CHUNK_BLOCKS
    scans = -(-src.n_cells // chunk)
    if getattr(src, "layout", None) == "csc" and scans > 4:
        logger.warning(f"{src.path}: matrix '{src.matrix}' is stored by column (CSC), so every {chunk:,} cells the "
                       f"converter reads all of it again: {scans} reads of the whole matrix per pass, twice. Rewrite "
                       "it by row first (CSR: e.g. `adata.X = adata.X.tocsr()` then write_h5ad, where it fits in "
                       "memory), then convert that file")


def _plan_source(index: int, path: str, options: ConvertOptions, symbol_table) -> tuple[dict, dict]:
    """(source entry, gene table) for one input; raises SourceError naming the fix."""
    src = open_source(path, options.matrix, options.soma_selection())
    try:
        identity = resolve_gene_ids(src.var, path, options.gene_column, symbol_table)
        row_pointers = src.row_pointers()
        a, b = sample_rows(src.n_cells, row_pointers)
        sample = src.read_rows(a, b)
        _warn_column_major(src, options)
        frac, cells, max_value = check_integer_counts(sample)
        integer_counts = looks_integer(frac, cells)
        if not integer_counts and not options.allow_non_integer:
            raise SourceError(non_integer_message(path, frac, cells, max_value, src.matrix, _alternatives(src)))
        labels = {}
        for col in options.label_columns:
            values = source_label(src, col)
            labels[col] = None if values is None else sorted({v for v in values if v is not None})
        entry = {
            "index": index, "path": path, "name": Path(path).name, "format": src.format,
            "matrix": src.matrix, "n_cells": src.n_cells, "n_vars": src.n_vars,
            "integer_counts": integer_counts,
            "gene_identity": identity.how,
            "genes_resolved": int(len(identity.ids) - identity.n_unresolved),
            "genes_from_symbols": identity.n_from_symbols,
            "label_values": labels,
            "label_columns_missing": [c for c, v in labels.items() if v is None],
            "pieces": source_pieces(src.n_cells, row_pointers, sample.nnz / max(b - a, 1), options),
        }
        if src.format == "soma" and options.soma_filter:
            entry.update({"obs_filter": options.soma_filter, "cells_excluded_by_filter": src.cells_excluded})
        genes = {"ids": [str(g) for g in identity.ids],
                 "symbols": [str(s) for s in getattr(identity, "symbols", [""] * len(identity.ids))]}
        return entry, genes
    finally:
        src.close()


# Output bytes per stored nonzero (uint16 token + uint16 count) and per cell (pointers, totals,
# source row, id, tar overhead), for cutting units of about --shard-size.
_BYTES_PER_NONZERO = 4
_BYTES_PER_CELL = 64


def source_pieces(n_cells: int, row_pointers: np.ndarray | None, nonzeros_per_row: float,
                  options: ConvertOptions) -> list[list[int]]:
    """One source's rows cut into pieces ``[start, stop, estimated output bytes]`` of about
    ``shard_bytes`` (from the row pointers where the format has them, else from the average row
    of a sample), at most ``unit_cells`` rows, in whole blocks; the last piece is what is left."""
    bc = options.block_cells
    if row_pointers is not None:
        nonzeros_before = row_pointers - row_pointers[0]
    else:
        nonzeros_before = nonzeros_per_row * np.arange(n_cells + 1)
    est = _BYTES_PER_NONZERO * nonzeros_before + _BYTES_PER_CELL * np.arange(n_cells + 1)
    pieces, a = [], 0
    while a < n_cells:
        rows = int(np.searchsorted(est, est[a] + options.shard_bytes, side="left")) - a
        b = min(a + min(max(-(-rows // bc) * bc, bc), options.unit_cells), n_cells)
        pieces.append([a, b, int(round(est[b] - est[a]))])
        a = b
    return pieces


def group_pieces(sources: list[dict], options: ConvertOptions) -> tuple[list, list[int]]:
    """Work units: each a list of pieces ``[source, start, stop]``, in source order, and each
    unit's estimated output bytes. A unit becomes one shard, so pieces of about ``shard_bytes``
    make a unit each, while consecutive smaller ones (file ends, small files) share a unit up to
    ``shard_bytes`` / ``unit_cells``."""
    units, sizes, current, size, rows = [], [], [], 0, 0

    def close():
        nonlocal current, size, rows
        units.append(current)
        sizes.append(size)
        current, size, rows = [], 0, 0

    for s in sources:
        for a, b, est in s.pop("pieces", []):
            if current and (size + est > options.shard_bytes or rows + b - a > options.unit_cells):
                close()
            current.append([s["index"], a, b])
            size += est
            rows += b - a
            if size >= options.shard_bytes or rows >= options.unit_cells:
                close()
    if current:
        close()
    return units, sizes


def _plan_one(args) -> tuple[dict, dict] | str:
    i, path, options, symbol_table = args
    try:
        return _plan_source(i, path, options, symbol_table)
    except SourceError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any unreadable input is that input's error, never a crash
        return f"{path}: cannot be read ({type(exc).__name__}: {exc})"


def _import_readers_libraries(inputs: list[str]) -> None:
    """Import what reading the inputs needs before forking, so that forked workers inherit it.
    Not anndata (~0.5 s to import): only files in its legacy encodings need it."""
    import importlib

    wanted = {"h5py"}
    if any(str(p).rstrip("/").endswith(".zarr") for p in inputs):
        wanted.add("zarr")
    for name in sorted(wanted):
        try:
            importlib.import_module(name)
        except ImportError:  # reported by the reader that needs it
            pass


def build_plan(options: ConvertOptions, workers: int = 1) -> tuple[dict, list[dict]]:
    """Open every input, resolve genes, check counts, collect label categories, cut work units.

    Returns ``(plan, gene_tables)``; raises ConvertError listing every unusable input (unless
    ``skip_bad_files``, which records them as refused with all their cells skipped).
    """
    options.validate()
    try:
        symbol_table = read_symbol_table(options.symbol_table) if options.symbol_table else None
    except VocabError as exc:
        raise ConvertError(f"--symbol-table: {exc}") from None
    sources, genes, errors = [], [], []
    jobs = [(i, path, options, symbol_table) for i, path in enumerate(options.inputs)]
    if workers > 1 and len(jobs) > 1:  # opening files and resolving genes is per-file work
        from multiprocessing import get_context

        _import_readers_libraries(options.inputs)

        from ..child_processes import exit_with_parent

        # a SIGKILLed converter must not leave its workers waiting forever on the pool's queue
        start_method = pool_start_method(options.inputs)
        with get_context(start_method).Pool(min(workers, len(jobs)), exit_with_parent, (os.getpid(),)) as pool:
            planned = pool.map(_plan_one, jobs, chunksize=1)
    else:
        planned = [_plan_one(j) for j in jobs]
    for (i, path, *_), outcome in zip(jobs, planned):
        if not isinstance(outcome, str):
            entry, table = outcome
            entry["bytes"] = _size(path)
        else:
            if not options.skip_bad_files:
                errors.append(outcome)
                continue
            entry = {"index": i, "path": path, "name": Path(path).name, "refused": outcome,
                     "n_cells": _cells_if_known(path, options)}
            table = {"ids": [], "symbols": []}
        sources.append(entry)
        genes.append(table)
    if errors:
        more = "" if options.skip_bad_files else ("\n(fix these inputs, leave them out, or pass "
                                                  "--skip-bad-files to count their cells as skipped)")
        raise ConvertError("cannot convert:\n- " + "\n- ".join(errors) + more)
    if sources and all("refused" in s for s in sources):  # said as such, not as a vocabulary or label problem
        raise ConvertError("cannot convert: --skip-bad-files refused every input, so nothing is left:\n- "
                           + "\n- ".join(f"{s['path']}: {s['refused']}" for s in sources))
    categories = {}
    for col in options.label_columns:
        seen = [s["label_values"][col] for s in sources if "refused" not in s]
        if all(v is None for v in seen):
            raise ConvertError(f"--label-columns: no input has an obs column '{col}'")
        categories[col] = sorted({v for vals in seen if vals is not None for v in vals})
    for s in sources:
        s.pop("label_values", None)
    units, unit_bytes = group_pieces(sources, options)
    plan = {
        "plan_version": PLAN_VERSION,
        "plan_hash": plan_hash(options),
        "options": asdict(options),
        "sources": sources,
        "label_categories": categories,
        "units": units,
        "unit_bytes": unit_bytes,
    }
    return plan, genes


def _cells_if_known(path: str, options: ConvertOptions) -> int | None:
    try:
        src = open_source(path, options.matrix, options.soma_selection())
    except SourceError:
        return None
    try:
        return src.n_cells + src.cells_excluded
    finally:
        src.close()


def input_checksum(path: str) -> str | None:
    """`fsio.source_checksum` of a local input, for provenance; None for a URI (nothing local to
    hash: the URI itself is recorded)."""
    return None if is_uri(path) else source_checksum(path)


def save_plan(work: Path, plan: dict, genes: list[dict]) -> None:
    (work / "sources").mkdir(parents=True, exist_ok=True)
    for s, table in zip(plan["sources"], genes):
        atomic_write_json(work / "sources" / f"s{s['index']:06d}.genes.json", table)
    atomic_write_json(work / "plan.json", plan)  # last: its presence means the plan is whole


def load_plan(work: Path) -> dict | None:
    path = work / "plan.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def load_gene_table(work: Path, source_index: int) -> dict:
    return json.loads((work / "sources" / f"s{source_index:06d}.genes.json").read_text())


def options_from_plan(plan: dict) -> ConvertOptions:
    return ConvertOptions(**plan["options"])


def unit_name(unit: int) -> str:
    return f"u{unit:06d}"


def label_codes(values, categories: list[str], n: int) -> np.ndarray:
    """Codes of ``values`` in ``categories`` (-1 for missing or unknown).  -> [n] int32"""
    if values is None:
        return np.full(n, -1, np.int32)
    lookup = {c: i for i, c in enumerate(categories)}
    return np.fromiter((lookup.get(v, -1) if v is not None else -1 for v in values), np.int32, n)


@contextmanager
def locked_output(out: Path, node: int | None = None):
    """This command's `OutputLock` on ``out`` (``node``: a node of a multi-node conversion, which
    shares the folder with the other nodes), with the temp files of killed writers swept from the
    corpus folder once it is held; a refusal is a `ConvertError` (an ``error:`` line)."""
    with ExitStack() as held:
        try:
            lock = held.enter_context(OutputLock(out, node=node))
        except FolderBusy as exc:
            raise ConvertError(str(exc)) from None
        if lock.exclusive:  # the corpus root is written by the merge, which holds the folder alone
            remove_stale_temps(out)
        yield lock
