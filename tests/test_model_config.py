"""Model configuration: presets' parameter and FLOP counts (`model_cost`) against built models
and a FLOP counter, pretrained gene-embedding files, and validation errors that name the fix."""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import DecoderConfig, ModelConfig
from pretrain.model import CellModel, model_cost, sequences_flops
from pretrain.model.embeddings import read_gene_embedding_file
from pretrain.presets import PRESETS
from tests.model_helpers import one_thread, pack, random_cells, seeded, small_config  # noqa: F401 (autouse fixtures)


def cpu_preset(name: str, **overrides) -> ModelConfig:
    """A preset's model with a small vocabulary, two label columns and flash -> sdpa (CPU)."""
    model = PRESETS[name].model
    attention = "sdpa" if model.attention == "flash" else model.attention
    return replace(model, vocab_size=64, label_classes=[3, 5], gene_embedding_file=None, attention=attention,
                   **overrides)


# --- 4. parameters and FLOPs -------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [None, 24])
@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_equals_the_built_model(name, head_dim):
    """Also with heads of their own width (model.head_dim: n_heads x 24 != d_model)."""
    for vocab_size in (64, 101):
        config = replace(cpu_preset(name), vocab_size=vocab_size, head_dim=head_dim)
        with torch.device("meta"):  # full-size shapes, no memory or init time
            model = CellModel(config)
        built = sum(p.numel() for p in model.parameters())
        assert model_cost(config, 500).params == built, vocab_size
        assert model_cost(config, 2000).params == built  # no dependence on the cell length


def shrunk_preset(name: str, head_dim: int | None = None) -> ModelConfig:
    """A preset's structure (attention, value mode, gene set, <cls>, pooling, architecture) at
    width 64 and 2 layers, so that a forward pass is quick."""
    return cpu_preset(name, d_model=64, n_heads=4, n_layers=2, max_rank=64, favor_features=32, contrastive_dim=16,
                      dropout=0.0, head_dim=head_dim, decoder=DecoderConfig(
                          n_layers=1, d_model=16, n_heads=2, attention=PRESETS[name].model.decoder.attention))


@pytest.mark.parametrize("head_dim", [None, 24])
@pytest.mark.parametrize("name", list(PRESETS))
def test_flops_match_a_flop_counter(name, head_dim):
    """Forward FLOPs counted by torch's FlopCounterMode on B cells of L genes, 3 of them masked,
    against ``model_cost(config, L, mask_ratio=3/L).flops_per_cell / 3 * B``. CPU sdpa is not
    counted by FlopCounterMode, so its scores and weighted sum (4 n^2 d per layer, n tokens as the
    model sees them) are added. Measured: exact for sdpa presets; +0.2% for favor (its
    denominators, 2 m per head and token, are not counted by model_cost); +1.8% for the
    encoder-decoder (the continuous value MLP is not counted)."""
    config = shrunk_preset(name, head_dim)
    model = CellModel(config).eval()
    length, n_cells, n_masked = 20, 3, 3
    cells = random_cells([length] * n_cells, seed=0, value_mode=config.value_mode, n_bins=config.n_bins,
                         vocab_size=64, mask_ratio=0.0)
    for cell in cells:
        cell.mlm_mask = torch.arange(length) < n_masked
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pack(cells))
    counted = counter.get_total_flops()
    n_genes, cls, depth = 64 - 3, config.n_prefix, 2 * int(config.depth_tokens)  # <cls>, T and S
    if config.attention != "favor":
        n = n_genes if config.gene_set == "all" else length - (n_masked if config.architecture != "encoder" else 0)
        counted += n_cells * config.n_layers * 4 * (n + cls) ** 2 * config.n_heads * config.attention_head_dim
    if config.architecture == "encoder_decoder" and config.decoder.attention != "favor":
        counted += n_cells * config.decoder.n_layers * 4 * (n_genes + depth) ** 2 * config.decoder.d_model
    expected = model_cost(config, length, mask_ratio=n_masked / length).flops_per_cell / 3 * n_cells
    assert counted == pytest.approx(expected, rel=0.025)
    assert model_cost(config, length).flops_per_token == pytest.approx(expected * 3 / n_cells / length, rel=1e-9)


def test_flops_linear_in_length_for_favor_and_quadratic_for_exact_attention():
    favor = cpu_preset("celllm")
    exact = replace(favor, attention="sdpa")
    f = lambda config, n: model_cost(config, n).flops_per_cell  # noqa: E731
    for config in (favor, exact):
        assert all(f(config, n) > 0 for n in (1, 100, 6000))
    # favor: exactly affine in the length (second difference zero), ratio at 2L just under 2
    length = 2000
    assert f(favor, 3 * length) - 2 * f(favor, 2 * length) + f(favor, length) == pytest.approx(0, abs=1e-6 * f(favor, length))
    assert 1.9 < f(favor, 2 * length) / f(favor, length) < 2.0
    # exact attention: the n^2 term makes the ratio at 2L > 2, tending to 4 for long cells
    assert f(exact, 2 * length) / f(exact, length) > 2.2
    assert f(exact, 2e6) / f(exact, 1e6) > 3.9
    assert f(exact, 3 * length) - 2 * f(exact, 2 * length) + f(exact, length) > 0
    # favor at m features beats exact attention once the length passes ~2m
    assert f(favor, 4 * favor.favor_features) < f(exact, 4 * favor.favor_features)
    # gene_set=all (scBERT): the encoder always sees every gene, only the masked head grows with L
    scbert = cpu_preset("scbert")
    assert f(scbert, 2 * 30) / f(scbert, 30) < 1.05


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_batch_costs_the_sum_of_its_sequences(name):
    """`sequences_flops` on a ragged batch equals the sum of `model_cost` of each sequence at its
    own length and masked share; for exact attention that exceeds the cost at the mean length."""
    config = cpu_preset(name)
    rng = np.random.default_rng(list(PRESETS).index(name))
    lengths = torch.from_numpy(rng.integers(1, 3000, size=17))
    masked = torch.from_numpy(rng.binomial(lengths.numpy(), 0.15))
    summed = sum(model_cost(config, int(n), mask_ratio=int(m) / int(n)).flops_per_cell for n, m in zip(lengths, masked))
    assert sequences_flops(config, lengths, masked) == pytest.approx(summed, rel=1e-12)
    at_mean = model_cost(config, float(lengths.double().mean()), int(masked.sum()) / int(lengths.sum())).flops_per_cell * 17
    if config.attention == "favor" or config.gene_set == "all":  # affine in the length: the mean is exact
        assert at_mean == pytest.approx(summed, rel=1e-9)
    else:
        assert summed > 1.01 * at_mean


@pytest.mark.parametrize("gene_set, architecture", [("all", "encoder"), ("expressed", "encoder_decoder")])
def test_the_full_gene_set_is_the_models_when_cls_comes_after_the_genes(gene_set, architecture):
    """A Geneformer token dictionary has no <cls>: conversion appends it after the genes. The gene
    count that sizes batches (token_cost) and FLOPs is the run of genes the model itself draws."""
    config = ModelConfig(vocab_size=12, pad_token=0, mask_token=1, cls_token=11, gene_set=gene_set,
                         architecture=architecture, d_model=16, n_heads=2, n_layers=1, attention="sdpa",
                         value_mode="continuous" if architecture == "encoder_decoder" else "bins",
                         decoder=DecoderConfig(d_model=16, n_heads=2, n_layers=1, attention="sdpa"))
    low, high = CellModel(config).gene_range
    assert config.n_genes == high - low == 9
    cost = config.token_cost(None)
    assert cost.full_length == 9 + (config.n_prefix if gene_set == "all" else 0)


# --- 5. pretrained gene embeddings -------------------------------------------------------------

ENSEMBL = ["<pad>", "<cls>", "<mask>", "ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457",
           "ENSG00000000460", "ENSG00000000938", "ENSG00000000971", "ENSG00000001036", "ENSG00000001084"]
SYMBOLS = ["<pad>", "<cls>", "<mask>", "TSPAN6", "TNMD", "DPM1", "SCYL3", "C1orf112", "FGR", "CFH", "FUCA2", "GCLC"]
WIDTH = 8


def file_rows(seed: int = 0) -> tuple[list[str], np.ndarray, dict[int, int]]:
    """(file gene ids, vectors [n, WIDTH], token -> file row it must get)."""
    ids = ["ENSG00000000003.15",  # versioned Ensembl id -> token 3
           "tnmd",                # symbol, other case  -> token 4
           "ENSG00000000457",     # plain Ensembl id    -> token 6
           "C1ORF112",            # symbol of token 7 ... but its Ensembl id below wins
           "ENSG00000000460.2",   # -> token 7
           "DPM1",                # symbol -> token 5
           "ENSG00000999999",     # not in the vocabulary
           "<PAD>"]               # special tokens never take a file row
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0, 0.5, (len(ids), WIDTH)).astype(np.float32)
    return ids, vectors, {3: 0, 4: 1, 6: 2, 7: 4, 5: 5}


def write_text(path, ids, vectors, header: bool):
    with open(path, "w") as fh:
        if header:
            fh.write(f"{len(ids)} {vectors.shape[1]}\n")
        for gene, row in zip(ids, vectors):
            fh.write(gene + " " + " ".join(repr(float(x)) for x in row) + "\n")
    return path


def embedding_model(path, freeze: bool = False, vocab=(ENSEMBL, SYMBOLS), **overrides) -> CellModel:
    fields = dict(vocab_size=len(ENSEMBL), d_model=WIDTH, n_heads=2, gene_embedding_file=str(path),
                  freeze_gene_embedding=freeze)
    return CellModel(small_config(**{**fields, **overrides}), vocab=vocab)


@pytest.mark.parametrize("form", ["text_header", "text", "npz"])
def test_gene_embedding_file_rows_align_by_ensembl_id_then_symbol(tmp_path, form):
    ids, vectors, expected = file_rows()
    if form == "npz":
        path = tmp_path / "genes.npz"
        np.savez(path, gene_ids=np.array(ids), embeddings=vectors)
    else:
        path = write_text(tmp_path / "gene2vec.txt", ids, vectors, header=form == "text_header")
    torch.manual_seed(0)
    model = embedding_model(path)
    weight = model.gene_embedding.weight.detach()
    for token, row in expected.items():
        assert torch.equal(weight[token], torch.from_numpy(vectors[row])), token
    unmatched = [t for t in range(3, len(ENSEMBL)) if t not in expected]
    assert unmatched == [8, 9, 10, 11]
    file_vectors = torch.from_numpy(vectors)
    for token in unmatched + [0, 1, 2]:
        assert (weight[token][None] - file_vectors).abs().amax(1).min() > 1e-3, token  # no file row
        assert weight[token].abs().max() > 0
    # random rows at the pretrained rows' scale (std 0.5 here, not the default init's 0.02)
    assert 0.2 < float(weight[unmatched].std()) < 1.0
    cov = model.gene_embedding_coverage
    assert (cov.n_vocab_genes, cov.n_found, cov.n_file_genes) == (9, 5, len(ids))
    assert cov.fraction == pytest.approx(5 / 9)
    assert model.gene_embedding.weight.requires_grad
    # another draw of the random rows, same file rows
    torch.manual_seed(1)
    other = embedding_model(path).gene_embedding.weight.detach()
    assert torch.equal(other[list(expected)], weight[list(expected)])
    assert not torch.equal(other[unmatched], weight[unmatched])


def test_frozen_gene_embedding_gets_no_gradient(tmp_path):
    ids, vectors, _ = file_rows()
    path = write_text(tmp_path / "g.txt", ids, vectors, header=False)
    model = embedding_model(path, freeze=True)
    assert not model.gene_embedding.weight.requires_grad
    cells = random_cells([4, 6], seed=0, vocab_size=len(ENSEMBL))
    out = model(pack(cells))
    (out.mlm.pow(2).sum() + out.cells.pow(2).sum()).backward()
    assert model.gene_embedding.weight.grad is None
    assert model.value_embedding.table.weight.grad is not None
    # unfrozen, the pretrained rows are trained
    model = embedding_model(path, freeze=False)
    out = model(pack(cells))
    out.cells.pow(2).sum().backward()
    assert model.gene_embedding.weight.grad is not None


def test_gene_embedding_file_errors_name_the_fix(tmp_path):
    ids, vectors, _ = file_rows()
    narrow = write_text(tmp_path / "narrow.txt", ids, vectors[:, :6], header=True)
    with pytest.raises(ValueError, match=r"6 wide but model\.d_model=8; set model\.d_model=6"):
        embedding_model(narrow)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist; fix model\.gene_embedding_file"):
        embedding_model(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\nTSPAN6 0.1 0.2 0.3\nTNMD 0.1 oops 0.3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected 'GENE v1 \.\.\. vd' with numbers"):
        embedding_model(bad)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("TSPAN6 0.1 0.2 0.3\nTNMD 0.1 0.3\n")
    with pytest.raises(ValueError, match="rows have different widths"):
        embedding_model(ragged)
    empty = tmp_path / "empty.txt"
    empty.write_text("9 8\n\n")
    with pytest.raises(ValueError, match="no embedding rows"):
        embedding_model(empty)
    npz = tmp_path / "wrong.npz"
    np.savez(npz, genes=np.array(ids), embeddings=vectors)
    with pytest.raises(ValueError, match=r"needs arrays gene_ids and embeddings \(missing \['gene_ids'\]"):
        embedding_model(npz)
    good = write_text(tmp_path / "good.txt", ids, vectors, header=False)
    with pytest.raises(ValueError, match=r"needs the vocabulary .*pass vocab="):
        embedding_model(good, vocab=None)


def test_gene_embedding_vocab_of_the_wrong_length_names_the_fix(tmp_path):
    ids, vectors, _ = file_rows()
    path = write_text(tmp_path / "g.txt", ids, vectors, header=False)
    with pytest.raises(ValueError, match="vocab_size"):
        embedding_model(path, vocab=(ENSEMBL[:-1], SYMBOLS[:-1]))


def test_gene_embedding_symbols_with_a_dot_match(tmp_path):
    ensembl = ENSEMBL[:4] + ["ENSG00000230021", "ENSG00000237491"]
    symbols = SYMBOLS[:4] + ["AC000061.1", "AC000061.2"]
    ids = ["TSPAN6", "AC000061.1", "AC000061.2"]
    vectors = np.arange(3 * WIDTH, dtype=np.float32).reshape(3, WIDTH) / 10
    path = write_text(tmp_path / "g.txt", ids, vectors, header=False)
    model = CellModel(small_config(vocab_size=6, d_model=WIDTH, n_heads=2, gene_embedding_file=str(path)),
                      vocab=(ensembl, symbols))
    assert model.gene_embedding_coverage.n_found == 3
    weight = model.gene_embedding.weight.detach()
    assert torch.equal(weight[4], torch.from_numpy(vectors[1]))
    assert torch.equal(weight[5], torch.from_numpy(vectors[2]))


# --- 6. validation errors name the fix ---------------------------------------------------------

INVALID = {
    "backend": (dict(attention="flashy"), r"model\.attention='flashy': choose one of favor, flash, sdpa"),
    "decoder_backend": (dict(decoder=DecoderConfig(attention="linear")),
                        r"model\.decoder\.attention='linear': choose one of favor, flash, sdpa"),
    "heads": (dict(d_model=30, n_heads=4), r"model\.d_model=30 is not a multiple of model\.n_heads=4"),
    "decoder_heads": (dict(value_mode="continuous", architecture="encoder_decoder",
                           decoder=DecoderConfig(d_model=10, n_heads=4)),
                      r"model\.decoder\.d_model=10 is not a multiple of model\.decoder\.n_heads=4"),
    "cls_pooling": (dict(use_cls=False, pooling="cls"), r"model\.pooling=cls needs model\.use_cls=true "
                                                        r"\(or set model\.pooling=mean\)"),
    "encoder_decoder_bins": (dict(architecture="encoder_decoder"), r"set model\.value_mode=continuous"),
    "vocab_zero": (dict(vocab_size=0), r"model\.vocab_size=0: set it to the corpus vocabulary size"),
    "all_genes_rank": (dict(gene_set="all", value_mode="rank"),
                       r"model\.gene_set=all needs value_mode bins or continuous"),
    "all_genes_encoder_decoder": (dict(gene_set="all", value_mode="continuous", architecture="encoder_decoder"),
                                  r"model\.gene_set=all needs .*architecture=encoder"),
    "features": (dict(favor_features=40), r"model\.favor_features=40 must be a positive multiple of 16"),
    "favor_head_width": (dict(attention="favor", d_model=512, n_heads=2),
                         r"model: head width model\.d_model / n_heads = 256 is over FAVOR\+'s 128: raise model\.n_heads "
                         r"to at least 4"),
    "favor_head_dim": (dict(attention="favor", head_dim=256), r"model: head width model\.head_dim = 256 is over "
                                                               r"FAVOR\+'s 128: lower it"),
    "head_dim": (dict(head_dim=0), r"model\.head_dim=0: give a positive width"),
    "bins": (dict(n_bins=2), r"model\.n_bins=2: bins need at least 3"),
    "dropout": (dict(dropout=1.0), r"model\.dropout=1\.0 must be in \[0, 1\)"),
    "value_mode": (dict(value_mode="log"), r"model\.value_mode='log': choose one of bins, continuous, rank"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_config_errors_name_the_fix(case):
    overrides, message = INVALID[case]
    config = small_config(**overrides)
    with pytest.raises(ValueError, match=message):
        config.validate()
    with pytest.raises(ValueError, match=message):
        CellModel(config)


def test_valid_configs_pass_validation():
    for overrides in [{}, dict(attention="sdpa", use_cls=False, pooling="mean"), dict(gene_set="all"),
                      dict(value_mode="continuous", architecture="encoder_decoder"), dict(value_mode="rank")]:
        config = small_config(**overrides)
        assert config.validate() is config
    for name in PRESETS:
        cpu_preset(name).validate()



ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: Path) -> set[str]:
    """Absolute names of what a source file under ROOT imports (relative imports resolved)."""
    package = ".".join(source.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
    return names


def test_model_package_does_not_import_the_run_configuration():
    """One-way layering: the run configuration and the presets use the model's shape, never the reverse
    (a `from ..config import` in pretrain/model would make config <-> model a cycle again)."""
    def upward(source: Path, targets: tuple[str, ...]) -> list[str]:
        return sorted(m for m in imported_modules(source) if m in targets or m.startswith(tuple(t + "." for t in targets)))

    for source in sorted((ROOT / "pretrain" / "model").rglob("*.py")):
        assert not upward(source, ("pretrain.config", "pretrain.presets")), source
    assert not upward(ROOT / "pretrain" / "presets.py", ("pretrain.config",))


@pytest.mark.parametrize("form", ["w2v", "tab"])
def test_real_gene2vec_text_formats_load_aligned_by_symbol(tmp_path, form):
    """The files of jingcheng-du/Gene2vec (pre_trained_emb/): gene2vec_dim_200_iter_9_w2v.txt is word2vec text
    (a "24447 200" header, then "SYMBOL v1 ... v200" space separated), gene2vec_dim_200_iter_9.txt has no
    header and a tab after the symbol (values space separated, a trailing space). Both load at scBERT's width
    200, each vocabulary gene getting its own symbol's row whatever the file's order; frozen, as scBERT's."""
    rng = np.random.default_rng(7)
    symbols = ["TP53", "CD3E", "MS4A1", "GAPDH", "ACTB"]
    vectors = rng.normal(0, 0.3, (len(symbols), 200)).astype(np.float32)
    path = tmp_path / ("gene2vec_dim_200_iter_9_w2v.txt" if form == "w2v" else "gene2vec_dim_200_iter_9.txt")
    with open(path, "w") as fh:
        if form == "w2v":
            fh.write(f"24447 {vectors.shape[1]}\n")
        for gene, row in zip(symbols, vectors):
            values = " ".join(f"{x:.8f}" for x in row)
            fh.write(f"{gene} {values}\n" if form == "w2v" else f"{gene}\t{values} \n")
    # the vocabulary knows the genes by Ensembl id (not in the file) and symbol, in another order
    vocab_symbols = ["<pad>", "<cls>", "<mask>", "GAPDH", "NOTINFILE", "TP53", "ACTB", "CD3E", "MS4A1"]
    vocab_ensembl = ["", "", "", "ENSG00000111640", "ENSG00000000001", "ENSG00000141510", "ENSG00000075624",
                     "ENSG00000198851", "ENSG00000156738"]
    config = small_config(vocab_size=len(vocab_symbols), d_model=200, n_heads=10, gene_embedding_file=str(path),
                          freeze_gene_embedding=True)
    model = CellModel(config, vocab=(vocab_ensembl, vocab_symbols))
    weight = model.gene_embedding.weight.detach()
    for token, symbol in enumerate(vocab_symbols):
        if symbol in symbols:
            np.testing.assert_allclose(weight[token].numpy(), np.round(vectors[symbols.index(symbol)], 8), atol=1e-7)
    assert model.gene_embedding_coverage.n_found == 5 and not model.gene_embedding.weight.requires_grad


def test_nameless_npy_gene_embeddings_are_refused_with_the_conversion(tmp_path):
    """scBERT ships gene2vec as gene2vec_16906.npy: vectors in its gene list's order, no names."""
    path = tmp_path / "gene2vec_16906.npy"
    np.save(path, np.zeros((3, 200), np.float32))
    with pytest.raises(ValueError, match=r"without gene names.*\.npz with arrays gene_ids"):
        read_gene_embedding_file(path)


def test_every_preset_pools_what_a_loss_trains(caplog):
    """An exported cell embedding is trained: a preset pools <cls> only where a loss reads it
    (contrastive, labels, MVC / GEPC), else the gene tokens (mean, or scFoundation's T, S, max, mean,
    whose tokens feed the decoder); a config pooling an unread <cls> says so."""
    import logging

    from pretrain.config import load_config
    from pretrain.presets import PRESETS

    for name in PRESETS:
        config = load_config(overrides=[f"preset={name}"])
        assert config.model.pooling != "cls" or config.cell_embedding_trained, name
    with caplog.at_level(logging.WARNING, logger="pretrain.config"):
        load_config(overrides=["model.pooling=cls", "objectives.contrastive_weight=0", "objectives.label_weight=0"])
    assert any("model.pooling=cls: no loss reads the <cls> output" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("override, named", [
    ("objectives.temperature=5", "objectives.temperature=5"), ("objectives.temperature=0", "objectives.temperature=0"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas"), ("optimizer.betas=[a,b]", "optimizer.betas"),
    ("optimizer.eps=-1", "optimizer.eps=-1"), ("run.peak_tflops=-1", "run.peak_tflops=-1"),
    ("model.favor_redraw_interval=-5", "model.favor_redraw_interval=-5"),
    ("run.inject_nan_steps=[x]", "run.inject_nan_steps"),
])
def test_values_that_would_fail_or_mislead_mid_run_are_refused_when_loaded(override, named):
    """Each was accepted: a temperature above 1 trained at 1 and never learned, negative betas or eps
    failed after the run folder existed, a negative peak gave a negative MFU."""
    from pretrain.config import load_config

    with pytest.raises(ValueError, match=re.escape(named)):
        load_config(None, [override])


def test_view_settings_out_of_range_name_their_keys():
    from pretrain.config import load_config

    with pytest.raises(ValueError, match=r"data.gene_dropout=1.0 must be in \[0, 1\)"):
        load_config(None, ["data.views=true", "objectives.contrastive_weight=0.5", "data.gene_dropout=1"])
