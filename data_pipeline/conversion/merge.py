"""Merge finished work units into the corpus: shards, ``stats.zarr``, ``manifest.json``.

A work unit (about ``shard_bytes`` of output, see `plan.group_pieces`) writes a complete shard:
a tar with its end-of-archive marker, hashed while it was written. Merging renames each unit's
file into ``shards/`` (units whose cells were all skipped make no shard), so the corpus bytes are
written once and never read back. ``manifest.json`` is written last: a corpus without one is
unfinished and a rerun of the same command completes it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..child_processes import progress_bar
from ..corpus import (
    BLOCK_RECORD,
    CELL_LENGTHS,
    SCHEMA_VERSION,
    SHARDS,
    STATS,
    VOCAB,
    Corpus,
    block_record,
    shard_name,
)
from .fsio import (
    atomic_replace_dir,
    atomic_write_with,
    fsync_dir,
    remove_stale_temps,
    sha256_path,
    temp_path,
)
from .plan import WORK, ConvertError, input_checksum, load_gene_table, load_plan, locked_output, unit_name
from .shards import DTYPES, LENGTH_BINS, block_checksum
from .stats import merge_partials
from .validate import SKIP_REASONS
from .vocab import read_vocab, vocabulary_coverage


def _place_shard(out: Path, i: int, unit: dict) -> dict:
    """Rename the unit's file to shard ``i`` (idempotent: an interrupted merge already moved it)."""
    src = out / WORK / "units" / f"{unit_name(unit['unit'])}.tar"
    path = out / shard_name(i)
    if src.exists():
        os.replace(src, path)
    elif not path.exists() or path.stat().st_size != unit["bytes"]:
        raise ConvertError(f"{src} is missing; delete {src.with_suffix('.json')} and rerun the "
                           "convert command to redo that unit")
    blocks = unit["blocks"]
    hist = np.sum([b["length_histogram"] for b in blocks], axis=0).astype(int).tolist()
    return {"sha256": unit["sha256"], "bytes": unit["bytes"],
            "n_cells": sum(b["n_cells"] for b in blocks), "n_tokens": sum(b["n_tokens"] for b in blocks),
            "n_blocks": len(blocks), "length_histogram": hist,
            # what to convert again should the shard be damaged
            "sources": sorted({p["source"] for p in unit["pieces"] if p["cells_written"]}),
            # where each block (tar members of one sample) lies, random access without tar parsing,
            # and its checksum, checked by every reader
            "blocks": [block_record(b["offset"], b["bytes"], b["n_cells"], b["n_tokens"], _checksum(path, b))
                       for b in blocks],
            "counts_dtypes": sorted({b["counts_dtype"] for b in blocks})}


def _checksum(shard: Path, block: dict) -> int:
    """The block's xxh3-64 from its unit record, or from the shard for a unit written by a
    converter that did not record it (a conversion resumed across an upgrade)."""
    if "xxh3" in block:
        return block["xxh3"]
    with open(shard, "rb") as fh:
        fh.seek(block["offset"])
        return block_checksum([fh.read(block["bytes"])])


def finish_if_complete(out: Path, keep_work: bool) -> dict:
    manifest = Corpus(out).manifest
    if not keep_work and (out / WORK).exists():
        shutil.rmtree(out / WORK)
    return manifest


def merge_corpus(out: str | Path, keep_work: bool = False, progress: bool = True, workers: int = 1) -> dict:
    """Build shards, stats and manifest from finished units (after every node has run), with
    ``workers`` threads merging the statistics; holds the folder's lock (`convert.locked_output`)
    meanwhile, so it is refused while a node still converts into it."""
    out = Path(out)
    if not Corpus.is_finished(out) and load_plan(out / WORK) is None:
        raise ConvertError(f"{out}: no conversion to merge (no {WORK}/plan.json); run "
                           "`python -m data_pipeline convert ... --out` first")
    with locked_output(out):
        return merge_units(out, keep_work, progress, workers)


def merge_units(out: Path, keep_work: bool = False, progress: bool = True, workers: int = 1) -> dict:
    """`merge_corpus` by a command that holds the folder's lock exclusively."""
    work = out / WORK
    if Corpus.is_finished(out):
        return finish_if_complete(out, keep_work)
    plan = load_plan(work)
    units = plan["units"]
    missing = [u for u in range(len(units)) if not (work / "units" / f"{unit_name(u)}.json").exists()]
    if missing or not (out / VOCAB).exists():
        raise ConvertError(f"{out}: {len(missing)} of {len(units)} work units are not finished (e.g. "
                           f"{missing[:5]}); rerun the convert command on every node (unit u belongs "
                           "to node u % num_nodes), then merge")
    vocab = read_vocab(out / VOCAB)
    results = [json.loads((work / "units" / f"{unit_name(u)}.json").read_text()) for u in range(len(units))]
    with_cells = [r for r in results if r["blocks"]]
    if not with_cells:  # refused here, where the manifest would be written, so every node's cells count
        raise ConvertError(empty_corpus_message(out, build_manifest(out, plan, vocab, results, [])))
    (out / SHARDS).mkdir(exist_ok=True)
    remove_stale_temps(out / SHARDS)
    for stale in (out / SHARDS).glob("corpus-*.tar"):
        if int(stale.stem.split("-")[1]) >= len(with_cells):
            stale.unlink()
    shards = [_place_shard(out, i, r) for i, r in enumerate(with_cells)]
    fsync_dir(out / SHARDS)
    with progress_bar(len(units), "merge statistics", progress, unit="unit") as bar:
        stats = merge_partials([work / "units" / f"{unit_name(u)}.stats" for u in range(len(units))],
                               len(vocab), bar.update, workers)

    lengths = write_cell_lengths(out, [work / "units" / f"{unit_name(r['unit'])}.lengths" for r in with_cells])

    tmp = temp_path(out / STATS)
    if tmp.exists():
        shutil.rmtree(tmp)
    stats.to_zarr(tmp)
    atomic_replace_dir(tmp, out / STATS)  # fsynced before the manifest says the corpus is finished

    manifest = build_manifest(out, plan, vocab, results, shards)
    manifest["cell_lengths"] = lengths
    Corpus.write_manifest(out, manifest)
    if not keep_work:
        shutil.rmtree(work)
    return manifest


def empty_corpus_message(out: Path, manifest: dict) -> str:
    """Why a conversion wrote no cell, from its would-be manifest's accounting."""
    acc = manifest["accounting"]
    skipped = ", ".join(f"{k} {v:,}" for k, v in acc["cells_skipped"].items() if v) or "none"
    refused = [f"{s['name']}: {s['refused']}" for s in manifest["sources"] if "refused" in s]
    hints = []
    if acc["cells_skipped"].get("empty") or acc["cells_skipped"].get("below_min_genes"):
        hints.append("check that the vocabulary (--vocab) shares genes with the inputs (gene ids of the "
                     "same species and kind) and that --min-genes is not too high")
    if refused:
        hints.append("fix or leave out the refused files")
    return (f"{out}: no cell is left to write, so no corpus was written: read {acc['cells_read']:,} cells, "
            f"skipped {skipped}" + (f"; refused files: {'; '.join(refused)}" if refused else "")
            + (f". {'; '.join(hints)}" if hints else "") + ", then rerun with --overwrite")


def write_cell_lengths(out: Path, unit_files: list[Path]) -> dict:
    """``CELL_LENGTHS``: genes per cell, in corpus order (what a loader groups cells by, without
    reading the shards); returns its manifest record."""
    lengths = np.concatenate([np.load(f) for f in unit_files]) if unit_files else np.zeros(0, np.uint32)
    lengths = lengths.astype(np.uint16 if lengths.max(initial=0) < 1 << 16 else np.uint32)
    atomic_write_with(out / CELL_LENGTHS, lambda fh: np.save(fh, lengths))
    return {"file": CELL_LENGTHS, "dtype": lengths.dtype.str, "sha256": sha256_path(out / CELL_LENGTHS)}


def _source_report(work: Path, entry: dict, vocab, results: list[dict]) -> dict:
    rep = {k: entry[k] for k in ("index", "path", "name") if k in entry}
    if "refused" in entry:
        n = entry.get("n_cells")
        rep.update({"refused": entry["refused"], "cells_read": n, "cells_written": 0,
                    "cells_skipped": {"file_refused": n}})
        return rep
    mine = [p for r in results for p in r["pieces"] if p["source"] == entry["index"]]
    counts_total = sum(r["counts_total"] for r in mine)
    first = [r for r in mine if r["start"] == 0]
    rep["checksum"] = first[0]["source_checksum"] if first else input_checksum(entry["path"])  # no rows: no unit
    coverage = first[0].get("vocabulary_coverage") if first else None
    if coverage is None:  # no unit, or one written by a version that did not record it
        coverage = vocabulary_coverage(vocab.lookup(load_gene_table(work, entry["index"])["ids"]))
    rep.update({k: entry[k] for k in ("format", "matrix", "bytes", "n_cells", "n_vars",
                                      "integer_counts", "gene_identity", "genes_resolved",
                                      "genes_from_symbols", "label_columns_missing")})
    rep.update({
        "genes_in_vocab": coverage["genes_in_vocab"],
        "fraction_genes_in_vocab": round(coverage["genes_in_vocab"] / max(entry["n_vars"], 1), 6),
        "fraction_counts_in_vocab": round(sum(r["counts_in_vocab"] for r in mine) / counts_total, 6) if counts_total else None,
        "duplicate_columns_summed": coverage["duplicate_columns_summed"],
        "cells_read": sum(r["cells_read"] for r in mine),
        "cells_written": sum(r["cells_written"] for r in mine),
        # .get: units finished by a version with fewer skip reasons
        "cells_skipped": {k: sum(r["cells_skipped"].get(k, 0) for r in mine) for k in SKIP_REASONS},
    })
    if "cells_excluded_by_filter" in entry:  # cells a SOMA obs filter left out: not read, not lost
        n = entry["cells_excluded_by_filter"]
        rep["obs_filter"] = entry["obs_filter"]
        rep["cells_read"] += n
        rep["cells_skipped"]["excluded_by_filter"] = n
    errors = [e for r in mine for e in r.get("read_errors", [])]
    if errors:
        rep["read_errors"] = errors
    return rep


def build_manifest(out: Path, plan: dict, vocab, results: list[dict], shard_records: list[dict]) -> dict:
    work = out / WORK
    options = dict(plan["options"])
    options.pop("inputs")
    sources = [_source_report(work, e, vocab, results) for e in plan["sources"]]
    skipped = {}
    for s in sources:
        for k, v in s["cells_skipped"].items():
            skipped[k] = skipped.get(k, 0) + (v or 0)
    cells_read = sum(s["cells_read"] or 0 for s in sources)
    cells_written = sum(s["cells_written"] for s in sources)
    offset = 0
    shards = []
    for i, rec in enumerate(shard_records):
        rec = dict(rec)
        shards.append({"file": shard_name(i), "cell_offset": offset, **rec})
        offset += rec["n_cells"]
    dtypes = sorted({d for s in shards for d in s.pop("counts_dtypes")})
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "scfm-corpus",
        "plan_hash": plan["plan_hash"],
        "vocab": {"file": VOCAB, "sha256": vocab.sha256(), "size": len(vocab),
                  "n_genes": vocab.n_genes, "special_tokens": vocab.special_tokens,
                  "origin": (f"supplied: {plan['options']['vocab']}" if plan["options"]["vocab"] else
                             f"built: genes positive in >= {plan['options']['min_cells_per_gene']} cells")},
        "block_format": {
            "members": ["indptr", "genes", "counts", "total_counts", "source_row", "labels", "meta.json"],
            "dtype_codes": DTYPES,
            "genes_dtype": vocab.token_dtype.str,
            "counts_dtypes": dtypes,
            "counts_kind": "integer" if all(s.get("integer_counts", True) for s in sources) else "float",
            "key": "u{unit:06d}-b{block:05d}",
            "block_record": BLOCK_RECORD,  # the fields of each entry of a shard's "blocks"
        },
        "label_columns": [{"name": c, "categories": plan["label_categories"][c]} for c in options["label_columns"]],
        "length_histogram_edges": [2 ** k for k in range(LENGTH_BINS)],
        "totals": {"n_cells": cells_written, "n_tokens": sum(s["n_tokens"] for s in shards),
                   "n_shards": len(shards), "bytes": sum(s["bytes"] for s in shards)},
        "accounting": {"cells_read": cells_read, "cells_written": cells_written,
                       "cells_skipped": skipped,
                       "balanced": cells_read == cells_written + sum(skipped.values())},
        "sources": sources,
        "shards": shards,
        "conversion": options,
    }


def format_report(manifest: dict) -> str:
    """Per-source coverage and accounting, for people (the CLIs log it)."""
    acc = manifest["accounting"]
    t = manifest["totals"]
    lines = [f"corpus: {t['n_cells']:,} cells, {t['n_tokens']:,} tokens, {t['n_shards']} shards, "
             f"{t['bytes'] / 1e6:.1f} MB; vocabulary {manifest['vocab']['n_genes']:,} genes",
             f"cells read {acc['cells_read']:,} = written {acc['cells_written']:,} + skipped "
             f"{sum(acc['cells_skipped'].values()):,} {acc['cells_skipped']}"]
    for s in manifest["sources"]:
        if "refused" in s:
            lines.append(f"  {s['name']}: REFUSED ({s['refused']})")
            continue
        if s.get("read_errors"):
            lines.append(f"  {s['name']}: {len(s['read_errors'])} unreadable row ranges skipped, e.g. "
                         f"{s['read_errors'][0]}")
        fc = s["fraction_counts_in_vocab"]
        line = (f"  {s['name']}: {s['cells_written']:,}/{s['cells_read']:,} cells; genes in vocab "
                f"{s['fraction_genes_in_vocab']:.1%}, counts in vocab {fc:.1%}" if fc is not None else
                f"  {s['name']}: {s['cells_written']:,}/{s['cells_read']:,} cells")
        if s["duplicate_columns_summed"]:
            line += f"; {s['duplicate_columns_summed']} duplicate columns summed"
        if "obs_filter" in s:
            line += f"; {s['cells_skipped']['excluded_by_filter']:,} left out by --soma-filter {s['obs_filter']!r}"
        lines.append(f"{line}; genes from {s['gene_identity']}")
    return "\n".join(lines)
