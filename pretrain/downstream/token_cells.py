"""Cells of .h5ad files of raw counts in the model's token layout, with their labels: what
fine-tuning, prediction (and any other downstream task that trains on cells) read.

Files are read as `pretrain.embed` and the converter read them (`pretrain.embed.open_cells`: the
converter's reader, in row ranges) and genes are matched to the bundle's vocabulary exactly as
`pretrain.embed` matches them (`gene_tokens`, the same coverage check), so a cell is the same model
input here as when embedded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.conversion.vocab import read_symbol_table

from ..embed import gene_tokens, open_cells, require_coverage, token_csr


@dataclass
class TokenCells:
    """Cells as CSR over vocabulary tokens (`pretrain.embed.token_csr`): ``indptr`` [n+1],
    ``genes`` / ``counts`` [nnz], ``totals`` [n] (over all of a cell's genes, as in the corpus);
    ``obs_names`` [n]; ``labels`` [n] str ("" where unknown) or None (no label column asked for);
    ``coverage``: one `gene_tokens` report per file read."""

    indptr: np.ndarray
    genes: np.ndarray
    counts: np.ndarray
    totals: np.ndarray
    obs_names: np.ndarray
    labels: np.ndarray | None
    coverage: list[dict]

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def subset(self, rows: np.ndarray) -> TokenCells:
        """The cells ``rows`` (in that order)."""
        rows = np.asarray(rows, np.int64)
        lengths = np.diff(self.indptr)[rows]
        index = (np.concatenate([np.arange(self.indptr[r], self.indptr[r + 1]) for r in rows]) if len(rows)
                 else np.zeros(0, np.int64))
        return replace(self, indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       genes=self.genes[index], counts=self.counts[index], totals=self.totals[rows],
                       obs_names=self.obs_names[rows], labels=None if self.labels is None else self.labels[rows])

    @staticmethod
    def concat(parts: list[TokenCells]) -> TokenCells:
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64)
        labels = None if any(p.labels is None for p in parts) else np.concatenate([p.labels for p in parts])
        return TokenCells(indptr, np.concatenate([p.genes for p in parts]), np.concatenate([p.counts for p in parts]),
                          np.concatenate([p.totals for p in parts]), np.concatenate([p.obs_names for p in parts]),
                          labels, [c for p in parts for c in p.coverage])


# what a missing label reads as once a column went through astype(str) or a CSV ("nan", "None", "<NA>")
MISSING_LABELS = frozenset({"", "nan", "none", "<na>", "na"})


def label_strings(values) -> np.ndarray:
    """Labels as strings, "" for missing ones (NaN, None, empty, or their `MISSING_LABELS` texts:
    a class called "nan" would be trained and predicted).  [n] object"""
    values = pd.Series(np.asarray(values, dtype=object))
    out = np.array([str(v).strip() for v in values], dtype=object)
    out[pd.isna(values).to_numpy() | np.isin(np.char.lower(out.astype(str)), list(MISSING_LABELS))] = ""
    return out


def read_token_cells(path: str | Path, model, label_column: str | None = None, layer: str | None = None,
                     gene_column: str | None = None, symbol_table: str | Path | dict | None = None,
                     min_coverage: float = 0.5, chunk_cells: int = 8192) -> TokenCells:
    """Every cell of ``path`` (raw counts in X or ``layer``) over ``model``'s vocabulary (a bundle's
    model: `pretrain.load_pretrained`), with ``obs[label_column]`` when asked for. Refuses a file
    whose counts fall less than ``min_coverage`` on vocabulary genes, or without the label column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass an .h5ad of raw counts")
    if symbol_table is not None and not isinstance(symbol_table, dict):
        symbol_table = read_symbol_table(symbol_table)
    with open_cells(path, layer) as source:
        labels = None
        if label_column is not None:
            columns = source.obs_columns()
            if label_column not in columns:
                shown = ", ".join(columns[:40]) + (f", ... ({len(columns)} in all)" if len(columns) > 40 else "")
                raise ValueError(f"{path}: no obs column {label_column!r} to take the labels from (obs columns: "
                                 f"{shown or 'none'}); pass --label-column with the column holding the cell types")
            labels = label_strings(pd.Series(source.obs_values(label_column)))
        tokens, report = gene_tokens(source.var, model.vocab, str(path), gene_column, symbol_table)
        n = source.n_cells
        require_coverage(source, chunk_cells, tokens, report, str(path), min_coverage)
        parts = []
        for a in range(0, n, chunk_cells):
            indptr, genes, counts, totals = token_csr(source.read_rows(a, min(n, a + chunk_cells)), tokens,
                                                      model.config.vocab_size)
            parts.append(TokenCells(indptr, genes, counts, totals, np.zeros(len(indptr) - 1, object), None, []))
        cells = TokenCells.concat(parts) if parts else TokenCells(np.zeros(1, np.int64), np.zeros(0, np.int64),
                                                                  np.zeros(0), np.zeros(0), np.zeros(0, object),
                                                                  None, [])
        report["file"] = str(path)
        return replace(cells, obs_names=source.obs_names(), labels=labels, coverage=[report])
