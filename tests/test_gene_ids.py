"""Gene identity resolution, vocabulary files and symbol tables (incl. the restricted unpickler)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipeline.conversion.gene_ids import resolve_gene_ids
from data_pipeline.conversion.readers import SourceError, open_source
from data_pipeline.conversion.vocab import (
    SPECIAL_TOKENS,
    VocabError,
    Vocabulary,
    read_pickled_dict,
    read_symbol_table,
    read_vocab,
)
from tests.source_writers import write_10x_h5

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFUSED = "scdcc_10X_PBMC_top2000.h5ad"
TABLE = {"CD3E": "ENSG00000198851", "MS4A1": "ENSG00000156738", "LYZ": "ENSG00000090382"}


def _shared(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real-data tests run where ../shared/data exists)")
    return path


def test_ensembl_column_wins_and_versions_are_stripped():
    var = pd.DataFrame({"gene_ids": ["ENSG00000198851.9", "ENSG00000156738", "ENSG00000090382.7"],
                        "feature_types": ["Gene Expression"] * 3}, index=["CD3E", "MS4A1", "LYZ"])
    got = resolve_gene_ids(var, "f.h5ad")
    assert list(got.ids) == ["ENSG00000198851", "ENSG00000156738", "ENSG00000090382"]
    assert list(got.symbols) == ["CD3E", "MS4A1", "LYZ"]
    assert got.how == "var['gene_ids']" and got.n_unresolved == 0


@pytest.mark.parametrize("join", ["{id}_{sym}", "{id}.12|{sym}", "{sym}_{id}", "{sym}:{id}.3", "{id}-{sym}"])
def test_names_that_join_an_id_and_a_symbol_give_both(join):
    genes = [("ENSG00000198851", "CD3E"), ("ENSG00000156738", "MS4A1"), ("ENSG00000090382", "LYZ"),
             ("ENSG00000254682", "RP11-466F5.8"), ("ENSG00000000003", "TSPAN6")]
    extra = ["not-a-gene", "ENSG00000000005", "ENSG00000182378.14_PAR_Y"]  # a plain id; GENCODE's Y copy
    var = pd.DataFrame(index=[join.format(id=i, sym=s) for i, s in genes] + extra)
    got = resolve_gene_ids(var, "f.h5ad")
    assert list(got.ids) == [i for i, _ in genes] + ["", "ENSG00000000005", ""]
    assert list(got.symbols) == [s for _, s in genes] + ["", "", ""]
    assert got.how == "var_names (the Ensembl ids inside its names)" and got.n_unresolved == 2
    # a symbol column is still the symbols' source; plain ids win a tie with joined names
    var["gene_symbol"] = list("abcdefgh")
    assert list(resolve_gene_ids(var, "f.h5ad").symbols) == list("abcdefgh")
    var["gene_ids"] = [i for i, _ in genes] + ["", "ENSG00000000005", ""]
    assert resolve_gene_ids(var, "f.h5ad").how == "var['gene_ids']"


def test_ensembl_var_names_with_gaps_filled_from_symbols_via_table():
    """Missing ids (NaN, as a categorical column stores them) come from the symbol column."""
    var = pd.DataFrame({"gene_symbol": ["CD3E", "MS4A1", "LYZ", "NOTAGENE"],
                        "ensembl_id": pd.Categorical(["ENSG00000198851", None, None, "ENSG00000000003"])},
                       index=["a", "b", "c", "d"])
    plain = resolve_gene_ids(var, "f.h5ad")
    assert list(plain.ids) == ["ENSG00000198851", "", "", "ENSG00000000003"]
    assert plain.n_unresolved == 2 and plain.n_from_symbols == 0
    filled = resolve_gene_ids(var, "f.h5ad", symbol_table=TABLE)
    assert list(filled.ids) == ["ENSG00000198851", "ENSG00000156738", "ENSG00000090382", "ENSG00000000003"]
    assert filled.n_from_symbols == 2 and "via the symbol table" in filled.how
    assert list(filled.symbols) == ["CD3E", "MS4A1", "LYZ", "NOTAGENE"]


def test_gene_column_selects_and_a_wrong_one_lists_the_columns():
    var = pd.DataFrame({"old_ids": ["ENSG00000000001", "ENSG00000000002"],
                        "new_ids": ["ENSG00000000011.2", "ENSG00000000012.1"],
                        "symbol": ["CD3E", "LYZ"]}, index=["CD3E", "LYZ"])
    got = resolve_gene_ids(var, "f.h5ad", gene_column="new_ids")
    assert list(got.ids) == ["ENSG00000000011", "ENSG00000000012"]
    assert list(got.symbols) == ["CD3E", "LYZ"]
    with pytest.raises(SourceError, match=r"--gene-column 'ensembl'.*var_names, var\['old_ids'\], "
                                          r"var\['new_ids'\], var\['symbol'\]"):
        resolve_gene_ids(var, "f.h5ad", gene_column="ensembl")


def test_symbols_through_a_table_leave_unknown_symbols_unresolved():
    var = pd.DataFrame(index=["CD3E", "LYZ", "MADEUP1", "MS4A1"])
    got = resolve_gene_ids(var, "f.h5ad", symbol_table=TABLE)
    assert list(got.ids) == ["ENSG00000198851", "ENSG00000090382", "", "ENSG00000156738"]
    assert (got.n_from_symbols, got.n_unresolved) == (3, 1)
    assert list(got.symbols) == ["CD3E", "LYZ", "MADEUP1", "MS4A1"]


def test_symbols_without_a_table_ask_for_one():
    var = pd.DataFrame({"gene_name": ["CD3E", "LYZ", "MS4A1"]}, index=["0", "1", "2"])
    with pytest.raises(SourceError, match=r"f\.h5ad: genes are named by symbols \(var\['gene_name'\].*"
                                          r"--symbol-table"):
        resolve_gene_ids(var, "f.h5ad")


def test_placeholders_are_refused_with_how_to_supply_ids():
    var = pd.DataFrame({"feature_types": ["Gene Expression"] * 50}, index=[f"g{i}" for i in range(50)])
    for table in (None, TABLE):
        with pytest.raises(SourceError, match=r"no gene identifiers.*g0, g1, g2.*--gene-column"):
            resolve_gene_ids(var, "f.h5ad", symbol_table=table)


def test_10x_source_resolves_end_to_end(tmp_path):
    ids = ["ENSG00000198851", "ENSG00000156738"]
    path = write_10x_h5(tmp_path / "m.h5", sp.csr_matrix(np.eye(3, 2, dtype=np.int32)), ids,
                        ["CD3E", "MS4A1"], ["c0", "c1", "c2"])
    with open_source(path) as src:
        got = resolve_gene_ids(src.var, str(path))
    assert list(got.ids) == ids and list(got.symbols) == ["CD3E", "MS4A1"]


def test_real_file_without_gene_ids_is_refused():
    with open_source(_shared("h5ad", REFUSED)) as src:
        with pytest.raises(SourceError, match="no gene identifiers.*--gene-column"):
            resolve_gene_ids(src.var, REFUSED)


def _real_resolvable():
    folder = SHARED_DATA / "h5ad"
    files = sorted(p for p in folder.glob("*.h5ad") if p.name != REFUSED) if folder.is_dir() else []
    return [pytest.param(p, id=p.stem) for p in files] or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"{folder} not present"))]


@pytest.mark.parametrize("path", _real_resolvable())
def test_real_files_resolve_most_genes(path):
    with open_source(path) as src:
        got = resolve_gene_ids(src.var, path.name)
    assert got.ids.shape == got.symbols.shape == (src.n_vars,)
    assert got.n_unresolved <= 0.5 * src.n_vars, got.how
    assert (got.symbols != "").mean() > 0.9  # every file has gene_symbol (or symbol var_names)


def test_vocab_tsv_round_trip(tmp_path):
    vocab = Vocabulary.from_genes(["ENSG00000000003.15", "ENSG00000000005"], ["TSPAN6", 'odd"name'])
    path = tmp_path / "vocab.tsv"
    path.write_bytes(vocab.to_tsv())
    back = read_vocab(path)
    assert back.ensembl_ids == list(SPECIAL_TOKENS) + ["ENSG00000000003", "ENSG00000000005"]
    assert back.symbols == vocab.symbols and back.sha256() == vocab.sha256()
    assert list(back.lookup(["ENSG00000000005.2", "ENSG00000999999"])) == [4, -1]


def test_a_supplied_vocab_tsv_of_versioned_ids_matches_the_inputs(tmp_path):
    """A vocab.tsv written elsewhere with versioned ids: read without versions, as the inputs' ids
    are, so its genes match (they matched none before)."""
    path = tmp_path / "vocab.tsv"
    path.write_text("token_id\tensembl_id\tsymbol\n" + "".join(
        f"{i}\t{g}\t{sym}\n" for i, (g, sym) in enumerate([*((t, "") for t in SPECIAL_TOKENS),
                                                         ("ENSG00000000003.15", "TSPAN6"), ("ENSG00000000005.6", "TNMD")])))
    vocab = read_vocab(path)
    n = len(SPECIAL_TOKENS)
    assert list(vocab.lookup(["ENSG00000000003", "ENSG00000000005.2"])) == [n, n + 1]


def test_geneformer_token_dictionary_keeps_its_ids():
    path = _shared("genes", "geneformer_token_dictionary.pkl")
    mapping = read_pickled_dict(path)
    vocab = read_vocab(path)
    assert vocab.special_tokens == {"<pad>": 0, "<mask>": 1, "<cls>": len(mapping)}
    assert vocab.n_genes == len(mapping) - 2
    some = [g for g in mapping if g.startswith("ENSG")][:100]
    assert list(vocab.lookup(some)) == [mapping[g] for g in some]


def test_symbol_table_from_geneformer_pickle():
    table = read_symbol_table(_shared("genes", "geneformer_gene_name_id_dict.pkl"))
    assert len(table) > 40_000 and table["TP53"] == "ENSG00000141510"


def test_symbol_table_from_cellxgene_csv():
    # headerless: ensembl_id, symbol, version, length, biotype
    table = read_symbol_table(_shared("genes", "cellxgene_genes_homo_sapiens.csv.gz"))
    assert len(table) > 70_000
    assert table["TP53"] == "ENSG00000141510" and table["CD3E"] == "ENSG00000198851"
    assert all(v.startswith("ENSG") and "." not in v for v in list(table.values())[:1000])


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000003": _RunsACommand(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_pickled_dict(path)
    with pytest.raises(VocabError, match="evil.pkl: cannot be read .*refusing to unpickle"):
        read_vocab(path)
    assert not marker.exists()


def test_restricted_unpickler_accepts_numpy_scalars(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": np.int16(2),
                                   "ENSG00000000005": np.float32(3.5)}))
    assert read_pickled_dict(path) == {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2,
                                       "ENSG00000000005": 3.5}
