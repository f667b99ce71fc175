"""Reading a finished corpus: blocks in order, `verify`, `inspect`, and `to_h5ad`."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .fsio import commit, fsync_file, sha256_path, temp_path
from .shards import END_OF_ARCHIVE, CellBlock, iter_shard
from .vocab import Vocabulary, read_vocab


class CorpusError(ValueError):
    """A corpus folder that is missing pieces or fails its checks."""


class Corpus:
    """A corpus folder: ``manifest.json``, ``vocab.tsv``, ``shards/``, ``stats.zarr``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            hint = (" (an unfinished conversion: rerun its convert command, or `merge` after a "
                    "multi-node run)" if (self.path / ".work").exists() else "")
            raise CorpusError(f"{self.path}: no manifest.json, so not a finished corpus{hint}")
        self.manifest = json.loads(manifest.read_text())

    @property
    def vocab(self) -> Vocabulary:
        return read_vocab(self.path / "vocab.tsv")

    @property
    def n_cells(self) -> int:
        return self.manifest["totals"]["n_cells"]

    def iter_blocks(self) -> Iterator[tuple[int, CellBlock]]:
        """``(global index of the block's first cell, block)`` over the corpus, in order."""
        for shard in self.manifest["shards"]:
            first = shard["cell_offset"]
            for _, block in iter_shard(self.path / shard["file"]):
                yield first, block
                first += block.n_cells


# --- verify -----------------------------------------------------------------------------------

def verify(path: str | Path) -> list[str]:
    """Every problem found (empty list: the corpus is sound). Re-reads every shard."""
    try:
        corpus = Corpus(path)
    except CorpusError as exc:
        return [str(exc)]
    m = corpus.manifest
    problems = []
    vocab_file = corpus.path / "vocab.tsv"
    if not vocab_file.exists():
        problems.append("vocab.tsv is missing")
        vocab_size = None
    else:
        vocab = corpus.vocab
        vocab_size = len(vocab)
        if vocab.sha256() != m["vocab"]["sha256"]:
            problems.append("vocab.tsv does not match the manifest's vocabulary hash")
    lengths = []
    for shard in m["shards"]:
        problems += _verify_shard(corpus.path / shard["file"], shard, vocab_size, lengths)
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
    if not (corpus.path / "stats.zarr").exists():
        problems.append("stats.zarr is missing")
    else:
        import zarr

        n = zarr.open_group(str(corpus.path / "stats.zarr"), mode="r").attrs.get("n_cells")
        if n != m["totals"]["n_cells"]:
            problems.append(f"stats.zarr covers {n} cells, the corpus {m['totals']['n_cells']}")
    return problems


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


def _verify_shard(path: Path, record: dict, vocab_size: int | None, lengths: list) -> list[str]:
    name = record["file"]
    if not path.exists():
        return [f"{name}: missing"]
    if path.stat().st_size != record["bytes"] or sha256_path(path) != record["sha256"]:
        return [f"{name}: sha256/size differ from the manifest (truncated or edited)"]
    cells = tokens = blocks = 0
    try:
        for key, block in iter_shard(path):
            blocks += 1
            cells += block.n_cells
            tokens += block.n_tokens
            bad = _block_problem(block, vocab_size)
            if bad:
                return [f"{name}: block {key}: {bad}"]
            lengths.append(np.diff(block.indptr))
    except (tarfile.TarError, KeyError, ValueError, json.JSONDecodeError) as exc:
        return [f"{name}: unreadable ({type(exc).__name__}: {exc})"]
    if (cells, tokens, blocks) != (record["n_cells"], record["n_tokens"], record["n_blocks"]):
        return [f"{name}: holds {cells} cells / {tokens} tokens / {blocks} blocks, manifest says "
                f"{record['n_cells']} / {record['n_tokens']} / {record['n_blocks']}"]
    return _block_records_problem(record, path.stat().st_size)


def _block_records_problem(record: dict, size: int) -> list[str]:
    """The manifest's block records (offset, bytes, cells, tokens) must tile the shard and add up."""
    table = np.asarray(record.get("blocks", []), np.int64).reshape(-1, 4)
    starts = np.concatenate([[0], np.cumsum(table[:, 1])])
    if (len(table) != record["n_blocks"] or not np.array_equal(table[:, 0], starts[:-1])
            or starts[-1] + len(END_OF_ARCHIVE) != size or table[:, 2].sum() != record["n_cells"]
            or table[:, 3].sum() != record["n_tokens"]):
        return [f"{record['file']}: the manifest's block records do not match the shard"]
    return []


def _block_problem(block: CellBlock, vocab_size: int | None) -> str | None:
    lengths = np.diff(block.indptr)
    if block.indptr[0] != 0 or (lengths < 1).any() or block.indptr[-1] != len(block.genes):
        return "bad indptr"
    if len(block.counts) != len(block.genes) or len(block.cell_ids) != block.n_cells:
        return "arrays of different lengths"
    if (block.counts <= 0).any():
        return "non-positive count"
    if vocab_size is not None and len(block.genes) and int(block.genes.max()) >= vocab_size:
        return "token id outside the vocabulary"
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


__all__ = ["Corpus", "CorpusError", "verify", "summary", "to_h5ad"]
