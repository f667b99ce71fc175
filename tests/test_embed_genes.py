"""How embedding finds an input's genes: as conversion does (`data_pipeline.conversion.gene_ids`), with the
bundle vocabulary's symbols as the symbol table, and the converter's ``--gene-column`` /
``--symbol-table`` options (issue 19, point 2).

One tiny bundle (random weights, sdpa attention, 40 genes) is written once for the module; every
input is a few dozen cells, so the file runs in seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from data_pipeline.conversion.vocab import Vocabulary
from data_pipeline.loading.normalize import Normalization
from pretrain.config import ModelConfig
from pretrain.export import BUNDLE_FORMAT, load_pretrained, normalization_record
from pretrain.model import CellModel

ROOT = Path(__file__).resolve().parents[1]
N_GENES = 40
# letters only: names ending in numbers (SYN0, SYN1, ...) would read as placeholders, not symbols
SYMBOLS = [f"GN{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(N_GENES)]
SYMBOLS[25] = SYMBOLS[10]  # one symbol on two genes: the first listed (token of gene 10) is meant
GENES = [f"ENSG{100000000 + i:011d}" for i in range(N_GENES)]
AMBIGUOUS = SYMBOLS[10]
N_CELLS = 48


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle as `launch/export.py` writes it, from a randomly initialized model."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("bundle")
    vocab = Vocabulary.from_genes(GENES, SYMBOLS)
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.0)
    torch.manual_seed(0)
    model = CellModel(config)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"bundle_format": BUNDLE_FORMAT, "model": asdict(config)}))
    (folder / "vocab.tsv").write_bytes(vocab.to_tsv())
    (folder / "normalization.json").write_text(json.dumps(normalization_record(Normalization(mode="log1p_bins",
                                                                                              n_bins=7))))
    return folder


@pytest.fixture(scope="module")
def model(bundle):
    return load_pretrained(bundle)


def _counts(n_vars: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, size=(N_CELLS, n_vars)) * (rng.random((N_CELLS, n_vars)) < 0.5)
    return sp.csr_matrix(x.astype(np.int32))


# the input's columns: 30 vocabulary genes (the ambiguous symbol's first gene among them), 2 genes
# the vocabulary lacks (they count towards each cell's total, as in the corpus)
COLUMNS = [i for i in range(31) if i != 25]  # gene 25 (the ambiguous symbol's second gene) is absent
OUTSIDE_IDS = ["ENSG00000999990", "ENSG00000999991"]
OUTSIDE_SYMBOLS = ["NOTINVOCAB", "ALSONOTHERE"]
IDS = [GENES[i] for i in COLUMNS] + OUTSIDE_IDS
SYMS = [SYMBOLS[i] for i in COLUMNS] + OUTSIDE_SYMBOLS


def _write(path: Path, var: pd.DataFrame, seed: int = 0) -> Path:
    obs = pd.DataFrame(index=[f"cell{i:03d}" for i in range(N_CELLS)])
    ad.AnnData(X=_counts(len(var), seed), obs=obs, var=var).write_h5ad(path)
    return path


def _embed(model, source: Path, out: Path, **kw) -> tuple[np.ndarray, dict]:
    from pretrain.embed import embed_h5ad

    report = embed_h5ad(model, source, out, progress=False, **kw)
    return ad.read_h5ad(out).obsm["X_scfm"], report


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> np.ndarray:
    """Embeddings of the cells with genes named by Ensembl ids (no symbols anywhere)."""
    folder = tmp_path_factory.mktemp("reference")
    source = _write(folder / "ensembl.h5ad", pd.DataFrame(index=IDS))
    x, report = _embed(model, source, folder / "out.h5ad")
    assert report["mapped_genes"] == 30 and report["mapped_by_ensembl"] == 30 and report["mapped_by_symbol"] == 0
    assert x.shape == (N_CELLS, 32) and np.isfinite(x).all() and np.abs(x - x[0]).max() > 1e-4
    return x


def _embed_options() -> set[str]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "embed.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(re.findall(r"--[a-z][a-z-]*", proc.stdout))


@pytest.fixture(scope="module")
def embed_options() -> set[str]:
    return _embed_options()


def test_symbol_named_file_embeds_as_its_ensembl_twin(model, reference, tmp_path):
    source = _write(tmp_path / "symbols.h5ad", pd.DataFrame(index=SYMS))  # var_names only, no Ensembl column
    x, report = _embed(model, source, tmp_path / "out.h5ad")
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_genes"] == 30 and report["input_genes"] == 32
    assert report["mapped_by_symbol"] == 30 and report["mapped_by_ensembl"] == 0
    assert report["ambiguous_symbols"] == 1  # AMBIGUOUS: two vocabulary genes, the first listed taken
    assert "var_names" in report["gene_identity"]


def test_symbols_differing_only_in_case_match(model, reference, tmp_path):
    source = _write(tmp_path / "lower.h5ad", pd.DataFrame(index=[s.lower() for s in SYMS]))
    x, report = _embed(model, source, tmp_path / "out.h5ad")
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_by_symbol"] == 30 and report["ambiguous_symbols"] == 1


def test_symbols_fill_rows_without_an_ensembl_id(model, reference, tmp_path):
    ids = list(IDS)
    ids[3] = ids[7] = ""  # as in files whose symbol -> Ensembl mapping left gaps
    source = _write(tmp_path / "gaps.h5ad", pd.DataFrame({"ensembl_id": ids, "gene_symbol": SYMS}, index=SYMS))
    x, report = _embed(model, source, tmp_path / "out.h5ad")
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_by_ensembl"] == 28 and report["mapped_by_symbol"] == 2


def test_an_ensembl_id_of_another_release_is_matched_by_its_symbol(model, reference, tmp_path):
    ids = list(IDS)
    ids[5] = "ENSG00000777777"  # the gene of SYMS[5] under an id the vocabulary lacks (as CCL5 and SOD2 moved)
    source = _write(tmp_path / "release.h5ad", pd.DataFrame({"ensembl_id": ids, "gene_symbol": SYMS}, index=ids))
    x, report = _embed(model, source, tmp_path / "out.h5ad")
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_by_ensembl"] == 29 and report["mapped_by_symbol"] == 1

    # a file holding the gene under both ids: the vocabulary's id counts, the other stays out (not summed in)
    both = pd.DataFrame({"ensembl_id": IDS + ["ENSG00000777777"], "gene_symbol": SYMS + [SYMS[5]]},
                        index=IDS + ["ENSG00000777777"])
    _, report = _embed(model, _write(tmp_path / "both.h5ad", both), tmp_path / "both_out.h5ad")
    assert report["mapped_genes"] == 30 and report["mapped_by_symbol"] == 0


def test_gene_column_picks_the_var_column(model, reference, embed_options, tmp_path):
    stale = [f"ENSG{200000000 + i:011d}" for i in range(len(IDS))]  # Ensembl-looking, none in the vocabulary
    # two id columns, no symbols: detection takes var_names (the first of the equally Ensembl-like) and nothing matches
    source = _write(tmp_path / "two_id_columns.h5ad", pd.DataFrame({"ensembl_v2": IDS}, index=stale))
    with pytest.raises(ValueError, match="vocabulary") as err:
        _embed(model, source, tmp_path / "refused.h5ad")
    message = str(err.value)
    assert "--gene-column" in message and "--symbol-table" in message and "0 of 32 genes matched" in message
    assert set(re.findall(r"--[a-z][a-z-]*", message)) <= embed_options  # only options embed has
    assert not (tmp_path / "refused.h5ad").exists()
    x, report = _embed(model, source, tmp_path / "out.h5ad", gene_column="ensembl_v2")
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_by_ensembl"] == 30 and "ensembl_v2" in report["gene_identity"]

    # a column of symbols named explicitly
    var = pd.DataFrame({"ensembl_id": stale, "gene_symbol": SYMS}, index=[f"row{i}" for i in range(len(IDS))])
    source = _write(tmp_path / "symbol_column.h5ad", var)
    x, report = _embed(model, source, tmp_path / "out2.h5ad", gene_column="gene_symbol")
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_by_symbol"] == 30 and "gene_symbol" in report["gene_identity"]

    with pytest.raises(ValueError, match=r"--gene-column 'nope' is not a var column.*gene_symbol"):
        _embed(model, source, tmp_path / "x.h5ad", gene_column="nope")


def test_symbol_table_maps_symbols_the_vocabulary_lacks(model, reference, embed_options, tmp_path):
    aliases = [f"OLD{s}" for s in SYMS]  # previous names: not in the vocabulary's symbol column
    source = _write(tmp_path / "aliases.h5ad", pd.DataFrame(index=aliases))
    with pytest.raises(ValueError, match="vocabulary") as err:
        _embed(model, source, tmp_path / "refused.h5ad")
    assert "--symbol-table" in str(err.value)
    assert set(re.findall(r"--[a-z][a-z-]*", str(err.value))) <= embed_options

    table = tmp_path / "aliases.csv"
    table.write_text("symbol,ensembl_id\n" + "".join(f"{a},{g}.3\n" for a, g in zip(aliases, IDS)))
    x, report = _embed(model, source, tmp_path / "out.h5ad", symbol_table=table)
    np.testing.assert_array_equal(x, reference)
    assert report["mapped_by_symbol"] == 30 and report["ambiguous_symbols"] == 0


def test_symbol_table_takes_precedence_over_the_vocabulary(model, reference, tmp_path):
    source = _write(tmp_path / "symbols.h5ad", pd.DataFrame(index=SYMS))
    # the table says the ambiguous symbol is the second gene that carries it (token of gene 25)
    _, report = _embed(model, source, tmp_path / "a.h5ad", symbol_table={AMBIGUOUS: GENES[25]})
    x = ad.read_h5ad(tmp_path / "a.h5ad").obsm["X_scfm"]
    assert report["mapped_genes"] == 30
    changed = np.abs(x - reference).max(axis=1) > 0
    expressed = np.asarray(_counts(len(SYMS))[:, COLUMNS.index(10)].todense()).ravel() > 0
    assert (changed == expressed).all()  # exactly the cells that express it embed differently


def test_a_file_without_gene_identifiers_names_embeds_options(model, embed_options, tmp_path):
    source = _write(tmp_path / "placeholders.h5ad", pd.DataFrame(index=[f"g{i}" for i in range(len(IDS))]))
    with pytest.raises(ValueError, match="no gene identifiers") as err:
        _embed(model, source, tmp_path / "out.h5ad")
    message = str(err.value)
    assert "Ensembl ids or gene symbols" in message and "--gene-column" in message
    assert "convert" not in message
    assert set(re.findall(r"--[a-z][a-z-]*", message)) <= embed_options


def test_cli_accepts_both_gene_options(bundle, reference, embed_options, tmp_path):
    assert {"--gene-column", "--symbol-table"} <= embed_options
    aliases = [f"OLD{s}" for s in SYMS]
    var = pd.DataFrame({"ensembl_id": [f"ENSG{200000000 + i:011d}" for i in range(len(IDS))], "alias": aliases},
                       index=[f"row{i}" for i in range(len(IDS))])
    source = _write(tmp_path / "cli.h5ad", var)
    table = tmp_path / "aliases.tsv"
    table.write_text("".join(f"{g}\t{a}\n" for a, g in zip(aliases, IDS)))  # no header, Ensembl column first
    out = tmp_path / "out.zarr"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "embed.py"), str(bundle), str(source), "--out",
                           str(out), "--gene-column", "alias", "--symbol-table", str(table), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["mapped_by_symbol"] == 30 and report["input_genes"] == 32
    np.testing.assert_array_equal(ad.read_zarr(out).obsm["X_scfm"], reference)


def test_real_file_by_symbols_embeds_as_by_ensembl_ids(shared_data, tmp_path):
    """A real file's symbols (var['gene_symbol']) against a vocabulary of its own genes: the symbol-
    named copy embeds as the Ensembl-named one, over the genes whose symbol and id are both unique."""
    from safetensors.torch import save_file

    from pretrain.embed import embed_h5ad

    cells = ad.read_h5ad(shared_data / "h5ad" / "mudan_zheng_sorted_ref.h5ad")[:64]
    ids, syms = cells.var["ensembl_id"].astype(str).to_numpy(), cells.var["gene_symbol"].astype(str).to_numpy()
    keep = (ids != "") & (syms != "") & ~pd.Series(ids).duplicated(keep=False).to_numpy() \
        & ~pd.Series(syms).duplicated(keep=False).to_numpy()
    cells = cells[:, keep].copy()
    ids, syms = ids[keep], syms[keep]
    vocab = Vocabulary.from_genes(ids, syms)
    folder = tmp_path / "bundle"
    folder.mkdir()
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=1, n_heads=2, attention="sdpa", n_bins=7,
                         dropout=0.0)
    torch.manual_seed(0)
    save_file({k: v.contiguous().clone() for k, v in CellModel(config).state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"bundle_format": BUNDLE_FORMAT, "model": asdict(config)}))
    (folder / "vocab.tsv").write_bytes(vocab.to_tsv())
    (folder / "normalization.json").write_text(json.dumps(normalization_record(Normalization(mode="log1p_bins",
                                                                                              n_bins=7))))
    model = load_pretrained(folder)
    x = {}
    for name, names in (("ensembl", ids), ("symbol", syms)):
        copy = ad.AnnData(X=sp.csr_matrix(cells.X), obs=pd.DataFrame(index=cells.obs_names),
                          var=pd.DataFrame(index=names))
        copy.write_h5ad(tmp_path / f"{name}.h5ad")
        report = embed_h5ad(model, tmp_path / f"{name}.h5ad", tmp_path / f"{name}_out.h5ad", progress=False)
        assert report["mapped_genes"] == len(ids) and report[f"mapped_by_{name}"] == len(ids)
        x[name] = ad.read_h5ad(tmp_path / f"{name}_out.h5ad").obsm["X_scfm"]
    np.testing.assert_array_equal(x["symbol"], x["ensembl"])


def test_duplicate_genes_in_a_narrow_integer_type_sum_without_wrapping():
    """Two columns of one gene are summed in int64: in the file's uint16 two counts of 40,000 wrapped
    to 14,464, below the cell's own total."""
    from pretrain.embed import token_csr

    x = sp.csr_matrix(np.array([[40000, 40000, 3], [200, 100, 0]], np.uint16))
    indptr, genes, counts, totals = token_csr(x, np.array([5, 5, 6]), 10)
    assert indptr.tolist() == [0, 2, 3] and genes.tolist() == [5, 6, 5]
    assert counts.tolist() == [80000, 3, 300] and totals.tolist() == [80003, 300]


def test_stored_zeros_are_not_expressed_genes():
    """A stored zero (left by rounding ambient-corrected counts, or written explicitly) is not a
    token: the converter keeps counts > 0 only, so the model never trained on a zero-count gene."""
    from pretrain.embed import token_csr

    rng = np.random.default_rng()
    dense = rng.poisson(0.7, (30, 12)) * (rng.random((30, 12)) < 0.5)
    stored = sp.csr_matrix(dense)
    stored.data[rng.random(stored.nnz) < 0.3] = 0  # explicit zeros in the structure
    assert (stored.data == 0).any()
    clean = stored.copy()
    clean.eliminate_zeros()
    tokens = rng.permutation(12) + 4
    for got, want in zip(token_csr(stored, tokens, 20), token_csr(clean, tokens, 20)):
        np.testing.assert_array_equal(got, want)
    assert (token_csr(stored, tokens, 20)[2] > 0).all()


def test_rank_mode_keeps_its_top_ranks_under_every_cap():
    """A rank model's input is its top ranks, whatever the cap: `--cap none` let a long cell reach
    ranks past model.max_rank (refused on CPU, out of bounds on CUDA)."""
    from pretrain.embed import embedding_normalization

    model = CellModel(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, attention="favor",
                                  favor_features=16, value_mode="rank", max_rank=32))
    model.normalization = Normalization(mode="rank", medians=np.ones(50), max_genes=32)
    for cap in ("auto", "none", "top", "sample"):
        assert embedding_normalization(model, cap) == model.normalization


def test_empty_first_cells_or_no_cells_are_not_taken_for_a_gene_mismatch(model, reference, tmp_path):
    """The coverage check reads the first chunk of cells that holds counts (empty droplets may come
    first): an input of empty cells, or of none, embeds (count_fraction None) instead of being refused
    for its genes; a later chunk of foreign genes is still refused."""
    counts = _counts(len(IDS))
    empty_first = sp.vstack([sp.csr_matrix((20, len(IDS)), dtype=np.int32), counts]).tocsr()
    obs = pd.DataFrame(index=[f"cell{i:03d}" for i in range(empty_first.shape[0])])
    source = tmp_path / "empty_first.h5ad"
    ad.AnnData(X=empty_first, obs=obs, var=pd.DataFrame(index=IDS)).write_h5ad(source)
    x, report = _embed(model, source, tmp_path / "a.h5ad", chunk_cells=16)
    assert report["count_fraction"] > 0.9
    np.testing.assert_allclose(x[20:], reference, rtol=0, atol=1e-5)
    for n in (0, 5):
        none = tmp_path / f"none{n}.h5ad"
        ad.AnnData(X=sp.csr_matrix((n, len(IDS)), dtype=np.int32), obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=IDS)).write_h5ad(none)
        x, report = _embed(model, none, tmp_path / f"out{n}.h5ad")
        assert x.shape == (n, 32) and report["count_fraction"] is None
    foreign = tmp_path / "foreign.h5ad"
    ad.AnnData(X=empty_first, obs=obs, var=pd.DataFrame(index=[f"ENSG{900000000 + i:011d}" for i in range(len(IDS))])
               ).write_h5ad(foreign)
    with pytest.raises(ValueError, match="only 0% of the counts"):
        _embed(model, foreign, tmp_path / "b.h5ad", chunk_cells=16)


def test_case_variants_of_one_symbol_are_summed_and_other_species_are_reported(model, caplog):
    """Two rows whose symbols differ only in case (Gnaa, gnaa) name one gene: both map to it and are
    summed, as two rows of one id are (the second was dropped). Rows with another species' Ensembl ids
    matched by symbol are counted and warned about: a mapping by name, not orthology."""
    import logging

    from pretrain.embed import gene_tokens

    mouse = [f"ENSMUSG{200000000 + i:011d}" for i in range(4)]
    syms = [SYMBOLS[0].capitalize(), SYMBOLS[0].lower(), SYMBOLS[1].lower(), "NOTINVOCAB"]
    var = pd.DataFrame({"gene_symbol": syms}, index=mouse)
    with caplog.at_level(logging.WARNING, logger="pretrain.embed"):
        tokens, report = gene_tokens(var, model.vocab, "mouse.h5ad")
    expect = model.vocab.lookup([GENES[0], GENES[0], GENES[1]]).tolist()
    assert tokens.tolist() == expect + [-1]
    assert report["mapped_by_symbol"] == 3 and report["mapped_from_other_species"] == 3
    assert "3 genes with Ensembl ids of another species than the model's (ENSG)" in caplog.text
    human = pd.DataFrame({"gene_symbol": [SYMBOLS[0].lower()]}, index=["ENSG00000999990"])  # another release
    assert gene_tokens(human, model.vocab, "human.h5ad")[1]["mapped_from_other_species"] == 0


def test_a_model_left_in_training_mode_embeds_without_dropout_and_stays_in_it(bundle):
    """`embed_counts` on a model a caller left in training mode (dropout on) gives the eval-mode
    embedding, and hands the model back in training mode."""
    from pretrain.embed import embed_counts, token_csr

    model = load_pretrained(bundle)
    model.config.dropout = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    csr = token_csr(_counts(N_GENES), np.arange(N_GENES) + 3, model.config.vocab_size)
    expect = embed_counts(model, *csr)
    model.train()
    np.testing.assert_array_equal(embed_counts(model, *csr), expect)
    assert model.training


def test_cli_refusals_are_one_line_naming_the_fix(bundle, tmp_path):
    """`launch/embed.py` reports a refused input as export and predict do: exit 2, one `error:` line,
    no traceback."""
    source = _write(tmp_path / "placeholders.h5ad", pd.DataFrame(index=[f"g{i}" for i in range(len(IDS))]))
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "embed.py"), str(bundle), str(source), "--out",
                           str(tmp_path / "out.h5ad"), "--threads", "1"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no gene identifiers" in proc.stderr
