"""Which Ensembl gene each column of a source file is.

Rules, in order:
1. ``--gene-column`` names the var column (or ``var_names``) that identifies genes (Ensembl ids,
   or symbols with a table); otherwise every var column of strings and ``var_names`` are
   candidates. Symbols, for filling gaps and for ``GeneIdentity.symbols``, may come from any
   column.
2. The candidate whose values are most often Ensembl ids (at least half of them) gives the ids:
   plain ids, or ids inside names that join one to a symbol (``ENSG00000000003_TSPAN6``,
   ``TSPAN6|ENSG00000000003``; ``_ | : -`` between, the symbols kept when no column has them);
   its empty or non-Ensembl entries are filled from a symbol column through the symbol table,
   when one is supplied.
3. With no Ensembl candidate, a symbol column is mapped through ``--symbol-table``; without a
   table the file is refused (symbols are not a stable identity across files).
4. Placeholder names (``g0, g1, ...``, plain numbers) are not identifiers: a file with nothing
   else is refused with an error that says how to supply gene ids.

Conversion and embedding (`pretrain.embed`) both resolve genes here, with the same two options;
embedding passes its bundle's vocabulary as the symbol table (`vocabulary_symbol_table`), with
the entries of a ``--symbol-table`` taking precedence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .readers import SourceError
from .vocab import SPECIAL_TOKENS, ensembl_ids, is_ensembl

_SYMBOL_COLUMN_NAMES = ("gene_symbol", "gene_symbols", "symbol", "symbols", "gene_name",
                        "gene_names", "feature_name", "gene_short_name", "name", "genes")
_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")
# an Ensembl id and a symbol in one name, either way round: ENSG00000000003_TSPAN6, TSPAN6|ENSG00000000003.15
_ID_THEN_SYMBOL = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?[_|:\-](.*)$")
_SYMBOL_THEN_ID = re.compile(r"^(.+?)[_|:\-](ENS[A-Z]*G\d{11})(?:\.\d+)?$")


@dataclass
class GeneIdentity:
    """Per source column: ``ids`` [n_vars] Ensembl id (version stripped) or "" when unresolved;
    ``symbols`` [n_vars] the file's gene symbol or "" when it has none (for vocab.tsv)."""

    ids: np.ndarray
    how: str                # e.g. "var['ensembl_id'] (+ symbols via table for 120)"
    n_from_symbols: int
    n_unresolved: int
    symbols: np.ndarray
    from_symbols: np.ndarray  # [n_vars] bool: the id came from a symbol via the table


def _candidates(var: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(name, values as str with "" for missing) for var_names and every string column."""
    out = [("var_names", _as_str(var.index))]
    for col in var.columns:
        series = var[col]
        if series.dtype == object or isinstance(series.dtype, (pd.CategoricalDtype, pd.StringDtype)):
            out.append((f"var['{col}']", _as_str(series)))
    return out


def _as_str(values) -> np.ndarray:
    # missing first: astype(str) would turn NaN into the string "nan"
    values = pd.Series(np.asarray(values, dtype=object))
    return values.where(values.notna(), "").astype(str).to_numpy(dtype=object)


def looks_like_placeholders(values: np.ndarray) -> bool:
    """True for generated names such as ``g0..gN``, ``gene1..``, or plain numbers."""
    values = [str(v) for v in values[:5000]]
    if not values:
        return True
    prefixes = set()
    numbered = 0
    for v in values:
        m = _TRAILING_NUMBER.match(v)
        if m:
            numbered += 1
            prefixes.add(m.group(1))
    return numbered >= 0.9 * len(values) and len(prefixes) <= 2


def _split_names(values) -> tuple[np.ndarray, np.ndarray]:
    """Each name's Ensembl id (version stripped) and symbol where it joins both, "" and "" where it
    does not.  [n] -> ([n] object, [n] object)"""
    ids, symbols = [], []
    plain = ensembl_ids(values)
    for v, alone in zip(values, plain):
        v = str(v)
        if alone or v.endswith("_PAR_Y"):  # a plain id in the column; GENCODE's Y copy of a PAR gene: no id
            ids.append(alone), symbols.append("")
            continue
        m = _ID_THEN_SYMBOL.match(v)
        if m:
            ids.append(m.group(1)), symbols.append(m.group(2))
            continue
        m = _SYMBOL_THEN_ID.match(v)
        ids.append(m.group(2) if m else ""), symbols.append(m.group(1) if m else "")
    return np.array(ids, dtype=object), np.array(symbols, dtype=object)


def resolve_gene_ids(var: pd.DataFrame, source: str, gene_column: str | None = None,
                     symbol_table: dict[str, str] | None = None) -> GeneIdentity:
    """Resolve each var row of ``source`` to an Ensembl id; raise SourceError naming the fix.

    ``var``: [n_vars rows] indexed by var names. ``gene_column`` restricts where ids are taken
    from; symbols (to fill gaps through ``symbol_table`` and for ``GeneIdentity.symbols``) may
    come from any column.
    """
    all_candidates = _candidates(var)
    columns = [name for name, _ in all_candidates]
    candidates = all_candidates
    if gene_column:
        wanted = "var_names" if gene_column in ("var_names", "index", "_index") else f"var['{gene_column}']"
        candidates = [c for c in all_candidates if c[0] == wanted]
        if not candidates:
            raise SourceError(f"{source}: --gene-column {gene_column!r} is not a var column of "
                              f"strings (available: {', '.join(columns)})")
    # scored on an even sample: a regex per value of every string column costs ~1 s per 10 files
    def fraction(vals, split: bool) -> float:
        sample = vals[:: max(1, len(vals) // 4000)]
        return float(((_split_names(sample)[0] != "") if split else is_ensembl(sample)).mean()) if len(vals) else 0.0

    scored = [(fraction(vals, split), name, vals, split) for name, vals in candidates for split in (False, True)]
    best_frac, best_name, best_vals, split = max(scored, key=lambda t: (t[0], not t[3]))  # a tie: plain ids

    if best_frac >= 0.5:
        symbol_col = _pick_symbol_column(all_candidates, symbol_table, exclude=best_name)
        symbols = symbol_col[1] if symbol_col is not None else np.full(len(best_vals), "", dtype=object)
        if split:  # names joining an id and a symbol (ENSG00000000003_TSPAN6)
            ids, joined_symbols = _split_names(best_vals)
            best_name += " (the Ensembl ids inside its names)"
            if symbol_col is None:
                symbols = joined_symbols
        else:
            ids = ensembl_ids(best_vals)
        mask = ids != ""
        n_from_symbols = 0
        how = best_name
        take = np.zeros(len(ids), bool)
        if symbol_table and symbol_col is not None and not mask.all():
            filled = np.array([symbol_table.get(s, "") for s in symbols], dtype=object)
            take = (~mask) & (filled != "")
            ids[take] = filled[take]
            n_from_symbols = int(take.sum())
            if n_from_symbols:
                how += f" (+ {n_from_symbols} from {symbol_col[0]} via the symbol table)"
        return GeneIdentity(ids, how, n_from_symbols, int((ids == "").sum()), symbols, take)

    # an explicit --gene-column that is not Ensembl ids is the symbol column
    symbol_col = _pick_symbol_column(candidates, symbol_table, exclude=None)
    if symbol_col is not None:
        name, syms = symbol_col
        if not symbol_table:
            raise SourceError(
                f"{source}: genes are named by symbols ({name}, e.g. {', '.join(map(str, syms[:3]))}) "
                "but no var column holds Ensembl IDs; pass --symbol-table FILE (a symbol->Ensembl "
                "CSV/TSV or pickled dict) or --gene-column naming a column of Ensembl IDs")
        ids = np.array([symbol_table.get(s, "") for s in syms], dtype=object)
        n = int((ids != "").sum())
        return GeneIdentity(ids, f"{name} via the symbol table", n, len(ids) - n, syms, ids != "")

    example = ", ".join(map(str, candidates[0][1][:3])) if len(candidates[0][1]) else "none"
    raise SourceError(
        f"{source}: no gene identifiers: {candidates[0][0]} look like placeholders ({example}, ...) "
        f"and no var column holds Ensembl IDs or gene symbols (columns: {', '.join(columns)}). Add a "
        "var column of Ensembl IDs or symbols and pass --gene-column NAME (with --symbol-table for "
        "symbols), or leave this file out")


def vocabulary_symbol_table(vocab) -> dict[str, str]:
    """symbol -> Ensembl id for the genes of ``vocab`` (a `Vocabulary`: its vocab.tsv symbol
    column), to use as a symbol table. A symbol that names several genes keeps the first listed
    (the lowest token id), the rule `read_symbol_table` applies to a table's rows."""
    table: dict[str, str] = {}
    for gene, symbol in zip(vocab.ensembl_ids, vocab.symbols):
        if symbol and gene not in SPECIAL_TOKENS and symbol not in table:
            table[symbol] = gene
    return table


def _pick_symbol_column(candidates, symbol_table, exclude):
    """The (name, values) most likely to hold gene symbols, or None.

    A symbol column is mostly distinct non-Ensembl, non-placeholder names (a column such as
    feature_types = "Gene Expression" is not). With a table, the column most found in it wins;
    otherwise (or when no column is found in the table, e.g. another species) the column's name
    decides: known symbol column names, then var_names, then any other.
    """
    pool = [(name, vals) for name, vals in candidates if name != exclude and len(vals)
            and is_ensembl(vals[:2000]).mean() < 0.5 and not looks_like_placeholders(vals)
            and len(set(vals[:5000])) >= 0.5 * min(len(vals), 5000)]
    if not pool:
        return None
    if symbol_table:
        scored = [(np.mean([v in symbol_table for v in vals[:5000]]), name, vals) for name, vals in pool]
        frac, name, vals = max(scored, key=lambda t: t[0])
        if frac > 0.2:
            return name, vals

    def rank(item):
        name = item[0]
        col = name[5:-2].lower() if name.startswith("var[") else ""
        return (0 if col in _SYMBOL_COLUMN_NAMES else 1 if name == "var_names" else 2)

    return min(pool, key=rank)
