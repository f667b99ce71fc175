"""Gene vocabulary: token ids for Ensembl genes plus special tokens, and the tables that feed it.

`vocab.tsv` (one per corpus) has a header and one row per token::

    token_id    ensembl_id      symbol
    0           <pad>           <pad>
    1           <cls>           <cls>
    2           <mask>          <mask>
    3           ENSG00000000003 TSPAN6

Special tokens carry their own name in both name columns. Ensembl ids are stored without the
version suffix (``ENSG00000000003.15`` -> ``ENSG00000000003``). Token ids are dense from 0.

Also here: reading a Geneformer token dictionary or median dictionary (Python pickles of plain
dicts) with a restricted unpickler, and symbol -> Ensembl tables (CSV/TSV or pickle).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<cls>", "<mask>")
ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?$")  # group 1: the id without version
_VERSION_RE = re.compile(r"\.\d+$")
_VERSIONED_ENSEMBL = re.compile(r"^(ENS.*?)\.\d+$")
# The species part of an Ensembl gene id: ENSG (human), ENSMUSG (mouse), ENSDARG (zebrafish), ...
_ENSEMBL_PREFIX = re.compile(r"^(ENS[A-Z]*G)\d")


def strip_version(gene_id: str) -> str:
    """``ENSG00000000003.15`` -> ``ENSG00000000003``; other strings unchanged."""
    return _VERSION_RE.sub("", gene_id) if gene_id.startswith("ENS") else gene_id


def ensembl_ids(values) -> np.ndarray:
    """Each string's Ensembl gene id without its version, or "" where it is not one (one regex
    per value: this runs over every gene column of every input).  [n] -> [n] object"""
    match = ENSEMBL_RE.match
    out = [match(str(v)) for v in values]
    return np.array([m.group(1) if m else "" for m in out], dtype=object)


def is_ensembl(values) -> np.ndarray:
    """Boolean mask: which strings look like Ensembl gene ids (any species, optional version)."""
    return ensembl_ids(values) != ""


@dataclass
class Vocabulary:
    """Token ids for genes and special tokens.

    ``ensembl_ids[i]`` / ``symbols[i]`` describe token ``i``; special tokens have their name in
    both lists. ``index`` maps Ensembl id -> token id for genes only.
    """

    ensembl_ids: list[str]
    symbols: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.ensembl_ids) != len(self.symbols):
            raise ValueError("vocabulary: ensembl_ids and symbols differ in length")
        self.index = {g: i for i, g in enumerate(self.ensembl_ids) if g not in SPECIAL_TOKENS}
        if len(self.index) + sum(g in SPECIAL_TOKENS for g in self.ensembl_ids) != len(self.ensembl_ids):
            raise ValueError("vocabulary: an Ensembl id appears twice; each gene needs one token id")

    def __len__(self) -> int:
        return len(self.ensembl_ids)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.ensembl_ids) if g in SPECIAL_TOKENS}

    @property
    def n_genes(self) -> int:
        return len(self.index)

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every token id."""
        return np.dtype("<u2") if len(self) <= 1 << 16 else np.dtype("<u4")

    @classmethod
    def from_genes(cls, ensembl_ids, symbols=None) -> Vocabulary:
        """Special tokens 0..2, then the given genes in the given order."""
        ensembl_ids = [strip_version(str(g)) for g in ensembl_ids]
        symbols = list(symbols) if symbols is not None else ["" for _ in ensembl_ids]
        return cls(list(SPECIAL_TOKENS) + ensembl_ids, list(SPECIAL_TOKENS) + [str(s) for s in symbols])

    def to_tsv(self) -> bytes:
        out = io.StringIO()
        out.write("token_id\tensembl_id\tsymbol\n")
        for i, (g, s) in enumerate(zip(self.ensembl_ids, self.symbols)):
            out.write(f"{i}\t{g}\t{s}\n")
        return out.getvalue().encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_tsv()).hexdigest()

    def id_prefixes(self) -> dict[str, int]:
        """Genes per Ensembl id prefix (one per species: ENSG human, ENSMUSG mouse, ...), most
        first; genes whose id is not an Ensembl id count as ``other``."""
        counts: dict[str, int] = {}
        for g in self.index:
            key = ensembl_prefix(g) or "other"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def mixed_species_warning(self) -> str | None:
        """A warning when the genes come from several species (Ensembl prefixes), else None: a
        model then learns one species' genes from a fraction of the cells, and orthologous genes
        get unrelated tokens."""
        species = {k: v for k, v in self.id_prefixes().items() if k != "other"}
        if len(species) < 2:
            return None
        listed = ", ".join(f"{k} {v:,}" for k, v in species.items())
        return (f"the vocabulary mixes genes of {len(species)} species ({listed} by Ensembl id prefix); "
                "if that is not intended, convert each species separately, or map the genes to one "
                "species' orthologs before converting")

    def lookup(self, ensembl_ids) -> np.ndarray:
        """Token id per Ensembl id, -1 where the gene is not in the vocabulary.  [n] int64"""
        import pandas as pd

        ids = pd.Series(np.asarray(ensembl_ids, dtype=object), dtype=object).astype(str)
        versioned = ids.str.contains(".", regex=False)
        if versioned.any():
            ids[versioned] = ids[versioned].str.replace(_VERSIONED_ENSEMBL, r"\1", regex=True)
        if not hasattr(self, "_gene_index"):
            # special tokens are not genes: give them names no gene id can have
            names = [g if g not in SPECIAL_TOKENS else f"\0{g}" for g in self.ensembl_ids]
            self._gene_index = pd.Index(names)
        return self._gene_index.get_indexer(ids.to_numpy()).astype(np.int64)


class VocabError(ValueError):
    """A vocabulary, token dictionary or symbol table that cannot be read; names the file."""


@contextmanager
def _reading_table(path: Path, what: str):
    """Turn any failure to read ``path`` into a VocabError naming it and what was expected."""
    if not path.is_file():
        raise VocabError(f"{path}: no such file (expected {what})")
    try:
        yield
    except VocabError:
        raise
    except (OSError, ValueError, IndexError, UnicodeDecodeError, EOFError, pickle.UnpicklingError) as exc:
        raise VocabError(f"{path}: cannot be read as {what} ({type(exc).__name__}: {exc})") from None


def read_vocab(path: str | Path) -> Vocabulary:
    """Read our ``vocab.tsv`` or a Geneformer-style token dictionary (``.pkl``: Ensembl id -> id).

    A Geneformer dictionary keeps its token ids (so a corpus stays compatible with models trained
    on it); special tokens it lacks (``<cls>``) are appended after its largest id. VocabError
    (naming the file) for anything else, a pickle holding more than plain data included.
    """
    path = Path(path)
    with _reading_table(path, "a vocab.tsv or a Geneformer token dictionary .pkl"):
        return _read_vocab(path)


def ensembl_prefix(gene_id: str) -> str | None:
    """The species prefix of an Ensembl gene id (ENSG human, ENSMUSG mouse, ...), None for another id."""
    m = _ENSEMBL_PREFIX.match(str(gene_id))
    return m.group(1) if m else None


def gene_token_range(special_ids, vocab_size: int) -> tuple[int, int]:
    """[low, high) of the gene tokens of a vocabulary of ``vocab_size`` tokens whose special tokens
    are ``special_ids``. Ours put the special tokens first; a token dictionary that lacked some
    (Geneformer's pickled ones have no ``<cls>``) gets them appended after its genes. Either way the
    genes are one contiguous run, which masking's random replacements and the full gene set draw from."""
    special = {int(i) for i in special_ids}
    low, high = 0, int(vocab_size)
    while low in special:
        low += 1
    while high - 1 in special and high > low:
        high -= 1
    inside = sorted(i for i in special if low <= i < high)
    if inside or high <= low:
        raise VocabError(f"special token ids {sorted(special)} of a {vocab_size}-token vocabulary: they must lie "
                         "before or after the gene tokens, which must be one contiguous run (convert with a vocabulary "
                         "whose special tokens come first, or a token dictionary that maps genes to a dense range)")
    return low, high


def _read_vocab(path: Path) -> Vocabulary:
    if path.suffix == ".pkl":
        mapping = read_pickled_dict(path)
        size = max(int(v) for v in mapping.values()) + 1
        ids = [""] * size
        for key, tok in mapping.items():
            ids[int(tok)] = strip_version(str(key))
        for special in SPECIAL_TOKENS:
            if special not in mapping:
                ids.append(special)
        holes = [i for i, g in enumerate(ids) if not g]
        if holes:
            raise VocabError(f"{path}: token ids are not dense (missing e.g. {holes[:5]}); "
                             "a token dictionary must map genes to 0..N-1")
        symbols = [g if g in SPECIAL_TOKENS else "" for g in ids]
        return Vocabulary(ids, symbols)
    with open(path, newline="") as fh:
        # QUOTE_NONE: a symbol is never quoted by to_tsv, so a '"' in one is part of the name
        rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if not rows or [c.strip() for c in rows[0][:2]] != ["token_id", "ensembl_id"]:
        raise VocabError(f"{path}: not a vocab.tsv (expected a header 'token_id<TAB>ensembl_id"
                         "<TAB>symbol'); pass our vocab.tsv or a Geneformer token dictionary .pkl")
    body = rows[1:]
    for expect, row in enumerate(body):
        if int(row[0]) != expect:
            raise VocabError(f"{path}: token ids must be 0..N-1 in order; row {expect + 2} has {row[0]}")
    # versions stripped, as the inputs' ids are: a supplied vocab.tsv of versioned ids would match none
    return Vocabulary([strip_version(r[1]) for r in body], [r[2] if len(r) > 2 else "" for r in body])


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts of str/int/float, including numpy scalars; refuses any other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return np.dtype if name == "dtype" else _numpy_scalar
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only plain dicts of "
                                     "strings and numbers are accepted")


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype)[0] if data is not None else dtype.type()


def read_pickled_dict(path: str | Path) -> dict:
    """A dict from a pickle holding only plain data (never executes code from the file)."""
    with open(path, "rb") as fh:
        obj = _PlainDataUnpickler(fh).load()
    if not isinstance(obj, dict):
        raise VocabError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in obj.items()}


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def read_symbol_table(path: str | Path) -> dict[str, str]:
    """Map gene symbol -> Ensembl id (version stripped).

    Accepts a pickled dict (Geneformer's ``gene_name_id_dict``) or a CSV/TSV (optionally .gz),
    with or without a header; the Ensembl column is the one whose values look like Ensembl ids,
    the symbol column the first other column. Symbols that map to several Ensembl ids keep the
    first one listed (the table's order decides, so a curated table can put its choice first).
    VocabError (naming the file) if it cannot be read.
    """
    path = Path(path)
    with _reading_table(path, "a symbol table (CSV/TSV[.gz] or a pickled dict)"):
        return _read_symbol_table(path)


def _read_symbol_table(path: Path) -> dict[str, str]:
    if path.suffix == ".pkl":
        return {str(k): strip_version(str(v)) for k, v in read_pickled_dict(path).items()}
    name = path.name.removesuffix(".gz")
    delim = "\t" if name.endswith((".tsv", ".txt")) else ","
    with _open_text(path) as fh:
        rows = [r for r in csv.reader(fh, delimiter=delim) if r]
    if not rows:
        raise VocabError(f"{path}: empty symbol table")
    width = min(len(r) for r in rows[: min(len(rows), 1000)])
    sample = rows[1 : min(len(rows), 1000)]
    ens_col = next((c for c in range(width) if is_ensembl([r[c] for r in sample]).mean() > 0.9), None)
    if ens_col is None or width < 2:
        raise VocabError(f"{path}: no column of Ensembl ids found; a symbol table needs an Ensembl "
                         "id column and a symbol column")
    sym_col = 1 if ens_col == 0 else 0
    start = 0 if ENSEMBL_RE.match(rows[0][ens_col]) else 1
    table: dict[str, str] = {}
    for r in rows[start:]:
        sym = r[sym_col].strip()
        if sym and sym not in table:
            table[sym] = strip_version(r[ens_col].strip())
    return table


def vocabulary_coverage(colmap: np.ndarray) -> dict:
    """A source's columns in the vocabulary, and how many of them were summed into another
    column of the same gene (``colmap``: token per column, -1 for none)."""
    mapped = colmap[colmap >= 0]
    return {"genes_in_vocab": int(len(mapped)), "duplicate_columns_summed": int(len(mapped) - len(np.unique(mapped)))}
