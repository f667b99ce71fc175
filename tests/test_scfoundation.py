"""xTrimoGene / scFoundation's recipe pieces against plain reference computations: the
auto-discretization value embedding, the T and S depth tokens with the [S | T | max | mean] cell
embedding, read-depth-aware downsampling (its beta-binomial draw, the loader's inputs at the lower
depth and targets at the original), and the preset training 20 steps and exporting on CPU."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from data_pipeline.loading.masking import Masking
from data_pipeline.loading.normalize import Normalization
from data_pipeline.loading.read_depth import Downsampling, downsample
from pretrain.model import CellModel
from pretrain.model.embeddings import ValueEmbedding
from pretrain.presets import PRESETS
from tests.model_helpers import one_thread, pack, random_cells, seeded, small_config  # noqa: F401 (autouse fixtures)

# --- (a) auto-discretization ---------------------------------------------------------------------

def autobin_reference(module: ValueEmbedding, v: float) -> torch.Tensor:
    """One value's embedding, element by element (scFoundation's AutoDiscretizationEmbedding2:
    leaky-ReLU(0.1) logits, alpha x them + their b x b mix, softmax, weighted sum of b vectors)."""
    a = module.autobin
    b = a.bins.weight.shape[0]
    h = [a.to_logits.weight[k, 0] * v + a.to_logits.bias[k] for k in range(b)]
    h = [x if x > 0 else 0.1 * x for x in h]
    z = [a.alpha * h[k] + a.mix.bias[k] + sum(a.mix.weight[k, j] * h[j] for j in range(b)) for k in range(b)]
    top = max(z)
    e = [torch.exp(x - top) for x in z]
    total = sum(e)
    return sum(e[k] / total * a.bins.weight[k] for k in range(b))


def test_autobin_equals_its_elementwise_definition_with_gradients():
    torch.manual_seed(1)
    module = ValueEmbedding("continuous", 6, 7, 8, continuous_embedding="autobin", autobin_bins=5,
                            autobin_alpha=0.7).double()
    for p in module.parameters():  # away from the all-zero mask init, so every path is exercised
        torch.nn.init.normal_(p, std=0.8)
    values = torch.cat([torch.rand(6, dtype=torch.float64) * 8, torch.tensor([0.0, -1.0], dtype=torch.float64)])
    fast = module(values)
    ref = torch.stack([module.mask if v < 0 else autobin_reference(module, float(v)) for v in values])
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(fast)
    grads = torch.autograd.grad((fast * weights).sum(), list(module.parameters()))
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(module.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_autobin_values_select_different_bins():
    """At initialization the embedding of a value depends on the value (torch's default init of
    the two linear layers, as scFoundation's, not the model's 0.02 one)."""
    model = CellModel(small_config(value_mode="continuous", continuous_embedding="autobin", autobin_bins=100))
    out = model.value_embedding(torch.tensor([0.5, 4.0]))
    assert (out[0] - out[1]).norm() > 0.05 * out.norm()


# --- (b, d) T and S tokens, [S | T | max | mean] ------------------------------------------------

def depth_config(**overrides):
    return small_config(value_mode="continuous", continuous_embedding="autobin", autobin_bins=8, depth_tokens=True,
                        use_cls=False, pooling="depth_max_mean", attention="sdpa", **overrides)


def test_depth_tokens_and_cell_embedding_equal_one_cell_at_a_time():
    """Packed cells with T and S tokens against each cell alone, built by hand: [T, S, genes] with
    T's input = identity_T + value_embedding(log10 T) (S alike), the encoder over that sequence,
    the embedding [h_S | h_T | max over genes | mean over genes]."""
    model = CellModel(depth_config()).double().eval()
    cells = random_cells([5, 9, 3], seed=2, value_mode="continuous", mask_ratio=0.0)
    depths = [(2400.0, 900.0), (150.0, 150.0), (31000.0, 4000.0)]
    for cell, depth in zip(cells, depths):
        cell.read_depth = depth
    batch = pack(cells)
    batch.values = batch.values.double()
    tokens, embedding = model.encode(batch.gene_ids, batch.values, batch.cu_seqlens, batch.max_seqlen,
                                     batch.read_depth.double())
    assert embedding.shape == (3, 4 * 16) and model.config.cell_dim == 64
    row = 0
    for i, (cell, (t, s)) in enumerate(zip(cells, depths)):
        genes = model.gene_embedding(cell.gene_ids) + model.value_embedding(cell.values.double())
        special = model.depth + model.value_embedding(torch.tensor([math.log10(t), math.log10(s)], dtype=torch.float64))
        x = torch.cat([special, genes])[None]
        h = model.encoder.forward_padded(x, torch.ones(1, x.shape[1], dtype=torch.bool))[0]
        body = h[2:]
        expected = torch.cat([h[1], h[0], body.max(0).values, body.mean(0)])
        torch.testing.assert_close(embedding[i], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tokens[row:row + len(body)], body, rtol=1e-10, atol=1e-10)
        row += len(body)


def test_depth_tokens_need_the_batch_read_depth_and_change_the_embedding():
    model = CellModel(depth_config()).eval()
    batch = pack(random_cells([6, 4], seed=3, value_mode="continuous", mask_ratio=0.0))
    with torch.no_grad():
        base = model(batch).cells
        batch.read_depth = batch.read_depth * torch.tensor([1.0, 0.1])  # a lower input depth S
        lower = model(batch).cells
        batch.read_depth = None
        with pytest.raises(ValueError, match="read_depth"):
            model(batch)
    assert not torch.allclose(base, lower)


@pytest.mark.parametrize("embedding", ["autobin", "mlp"])
def test_bf16_value_embedding_keeps_a_few_percent_of_depth(embedding):
    """In bf16 (DeepSpeed's training dtype), log10 of 20,000, 19,000 and 18,500 round to two values;
    the value embedding's first layer takes them in fp32, so the three T/S inputs stay distinct
    (and in fp32 it is the plain linear layer)."""
    from pretrain.model.embeddings import ValueEmbedding

    torch.manual_seed(0)
    module = ValueEmbedding("continuous", 32, 7, 8, continuous_embedding=embedding, autobin_bins=16)
    logs = torch.log10(torch.tensor([20000.0, 19000.0, 18500.0]))
    assert len(set(logs.bfloat16().tolist())) < 3  # what a bf16 input would be
    wide = module(logs)
    first = module.autobin.to_logits if embedding == "autobin" else module.mlp[0]
    torch.testing.assert_close(first(logs[:, None]), nn.functional.linear(logs[:, None], first.weight, first.bias),
                               rtol=0, atol=0)
    narrow = module.to(torch.bfloat16)(logs)
    assert narrow.dtype == torch.bfloat16
    assert all(not torch.equal(narrow[i], narrow[j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    # each row still the fp32 embedding, to bf16's rounding of the layers after the first
    assert ((narrow.float() - wide).norm(dim=1) / wide.norm(dim=1)).max() < 0.05


def test_encoder_decoder_leaves_zero_inputs_to_the_decoder():
    """Genes of a downsampled cell that lost every read (input 0) are not encoder tokens: changing
    their (zero) value's gene identity in the encoder table changes nothing, while the decoder still
    predicts them when masked."""
    config = replace(PRESETS["scfoundation"].model, vocab_size=64, d_model=16, n_heads=2, n_layers=1, dropout=0.0,
                     favor_features=16, attention="sdpa", autobin_bins=8, contrastive_dim=8,
                     decoder=replace(PRESETS["scfoundation"].model.decoder, d_model=8, n_heads=2, n_layers=1,
                                     attention="sdpa"))
    model = CellModel(config).eval()
    batch = pack(random_cells([8, 6], seed=4, value_mode="continuous", mask_ratio=0.3))
    zero = (~batch.mlm_mask).nonzero().flatten()[:2]
    batch.values[zero] = 0.0
    with torch.no_grad():
        out = model(batch)
        model.gene_embedding.weight[batch.gene_ids[zero]] += 1.0
        again = model(batch)
    torch.testing.assert_close(out.cells, again.cells)
    torch.testing.assert_close(out.mlm, again.mlm)
    assert out.mlm.shape == (int(batch.mlm_mask.sum()),)


# --- (c) read-depth-aware downsampling -----------------------------------------------------------

def test_downsampled_counts_follow_the_beta_binomial():
    """Cells of one gene with c reads (none outside the vocabulary), all downsampled: the kept
    reads against BetaBinomial(c, a, b)'s mean c a / (a + b) and variance
    c a b (a + b + c) / ((a + b)^2 (a + b + 1)); S is the kept reads."""
    n, c, a, b = 40000, 20, 2.0, 3.0
    indptr = np.arange(n + 1)
    counts = np.full(n, c, np.int32)
    thinned, totals, rate = downsample(Downsampling(1.0, a, b, 0.0), indptr, counts, np.full(n, c, np.float64),
                                       np.random.default_rng(0))
    assert thinned.dtype == counts.dtype and np.array_equal(totals, np.maximum(thinned, 1))
    mean, var = c * a / (a + b), c * a * b * (a + b + c) / ((a + b) ** 2 * (a + b + 1))
    se = math.sqrt(var / n)
    assert abs(thinned.mean() - mean) < 5 * se
    assert abs(thinned.var() - var) < 0.05 * var
    assert abs(rate.mean() - a / (a + b)) < 0.01


def test_cells_without_vocabulary_genes_are_downsampled_by_their_outside_reads_alone():
    """A cell whose reads all fall outside the vocabulary (no entries), here the last of the block,
    keeps its place: S is its thinned outside reads, never more than T."""
    indptr, counts = np.array([0, 2, 2, 3, 3]), np.array([4, 9, 50], np.uint16)
    totals = np.array([1500.0, 1200.0, 2000.0, 1100.0])
    thinned, s, rate = downsample(Downsampling(1.0), indptr, counts, totals, np.random.default_rng(3))
    assert thinned.shape == counts.shape and np.all(thinned <= counts)
    assert np.all((s >= 1) & (s <= totals)) and np.all(rate < 1)


def test_downsampling_probability_min_total_and_outside_reads():
    n = 20000
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 6, n)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    counts = rng.integers(1, 30, int(indptr[-1])).astype(np.int64)
    inside = np.add.reduceat(counts, indptr[:-1]).astype(np.float64)
    totals = inside + 50  # 50 reads on genes outside the vocabulary
    totals[: n // 4] = 10  # below min_total (with fewer reads than the genes hold: never touched)
    thinned, new_totals, rate = downsample(Downsampling(0.4, 2.0, 2.0, 40.0), indptr, counts, totals, rng)
    low = slice(0, n // 4)
    assert np.all(rate[low] == 1) and np.array_equal(new_totals[low], totals[low])
    chosen = rate < 1
    assert abs(chosen[n // 4:].mean() - 0.4) < 0.02
    kept = np.add.reduceat(thinned, indptr[:-1])
    assert np.array_equal(thinned[np.repeat(~chosen, lengths)], counts[np.repeat(~chosen, lengths)])
    assert np.all(thinned <= counts) and np.all(new_totals[n // 4:] >= kept[n // 4:])
    # the outside reads thinned at the cell's rate: E[S - kept | rate] = 50 rate
    outside = (new_totals - kept)[chosen]
    assert abs(outside.mean() - 50 * rate[chosen].mean()) < 0.5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.train_helpers import make_corpus

    return make_corpus(tmp_path_factory.mktemp("scfoundation"), n_cells=300, n_genes=300)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_loader_inputs_are_the_downsampled_cell_and_targets_the_original(corpus, ratio):
    """Every cell downsampled: a sequence's T is the corpus's total, its unmasked inputs are
    log1p(c' / S * 1e4) with integer c' <= c, summing (with the outside reads, none here) to S, and
    its targets everywhere are the original log1p(c / T * 1e4)."""
    from data_pipeline.corpus import BlockReader, Corpus

    c = Corpus(corpus)
    table = c.block_table()
    reference = {}
    reader = BlockReader(c, table, True)
    for blk in range(len(table.shard)):
        block = reader.read(blk)
        first = int(table.first_cell[blk])
        for i in range(block.n_cells):
            lo, hi = block.indptr[i], block.indptr[i + 1]
            reference[first + i] = (block.genes[lo:hi].astype(np.int64), block.counts[lo:hi].astype(np.float64),
                                    float(block.total_counts[i]))
    reader.close()
    loader = CellLoader(c, normalization=Normalization(mode="continuous"), masking=Masking(ratio),
                        downsampling=Downsampling(1.0, 2.0, 2.0, 0.0), seed=3)
    seen = lowered = whole = 0
    for batch in loader:
        cu = batch.cu_seqlens.tolist()
        for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            genes, counts, total = reference[int(batch.cell_index[s])]
            t, s_total = batch.read_depth[s].double().tolist()
            assert t == total and s_total <= t
            assert np.array_equal(batch.gene_ids[a:b].numpy(), genes)
            targets = batch.mlm_targets[a:b].double().numpy()
            np.testing.assert_allclose(targets, np.log1p(counts / total * 1e4), rtol=1e-6)
            inputs = batch.values[a:b].double().numpy()
            shown = ~batch.mlm_mask[a:b].numpy()
            kept = np.expm1(inputs[shown]) * s_total / 1e4
            np.testing.assert_allclose(kept, np.rint(kept), atol=2e-3 * max(1.0, kept.max(initial=1)))
            assert np.all(np.rint(kept) <= counts[shown])
            if shown.all():
                assert abs(np.rint(kept).sum() - s_total) < 0.5
                whole += 1
            seen += 1
            lowered += s_total < t
    assert seen == 300 and lowered > 250 and (whole == 300 or ratio > 0)


@pytest.mark.parametrize("cap", ["top", "random"])
def test_a_capped_downsampled_cell_has_the_original_values_of_its_input_genes_as_targets(corpus, cap):
    """With a cap of 20 genes, the input keeps some of a cell's genes (``top``: the thinned counts'
    most expressed, not the original's); each target is the original value of that position's gene
    (the targets were capped on the original counts, so ``top`` gave other genes' values)."""
    from data_pipeline.corpus import Corpus

    c = Corpus(corpus)
    reference = {}
    for first, block in c.iter_blocks():
        for i in range(block.n_cells):
            lo, hi = block.indptr[i], block.indptr[i + 1]
            reference[first + i] = dict(zip(block.genes[lo:hi].tolist(),
                                             np.log1p(block.counts[lo:hi] / float(block.total_counts[i]) * 1e4)))
    loader = CellLoader(c, normalization=Normalization(mode="continuous", max_genes=20, cap=cap), masking=Masking(0.3),
                        downsampling=Downsampling(1.0, 2.0, 2.0, 0.0), seed=4)
    capped = 0
    for batch in loader:
        cu = batch.cu_seqlens.tolist()
        for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            original = reference[int(batch.cell_index[s])]
            genes = batch.gene_ids[a:b].tolist()
            assert b - a == min(20, len(original)) and set(genes) <= set(original)
            np.testing.assert_allclose(batch.mlm_targets[a:b].double().numpy(), [original[g] for g in genes],
                                       rtol=1e-6)
            capped += len(original) > 20
    assert capped > 100


def test_downsampling_draws_are_the_same_on_a_second_pass(corpus):
    """Draws come from the (seed, epoch, megabatch) generator: a new loader repeats them exactly."""
    make = lambda: CellLoader(corpus, normalization=Normalization(mode="continuous"),  # noqa: E731
                              downsampling=Downsampling(0.5), seed=5)
    first = [b for b in make()]
    second = [b for b in make()]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x.values, y.values) and torch.equal(x.read_depth, y.read_depth)


def test_downsampled_batches_resume_exactly(corpus):
    """A loader given another's state mid-epoch yields the batches that one would have yielded next."""
    make = lambda: CellLoader(corpus, normalization=Normalization(mode="continuous"),  # noqa: E731
                              batching=Batching(token_budget=2048, megabatch_cells=64),
                              downsampling=Downsampling(0.5), seed=7)
    whole = [b for b in make()]
    first = make()
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = [b for b in resumed]
    assert len(rest) == len(whole) - 3 > 0
    for x, y in zip(whole[3:], rest, strict=True):
        assert torch.equal(x.values, y.values) and torch.equal(x.mlm_targets, y.mlm_targets)
        assert torch.equal(x.read_depth, y.read_depth)


def test_downsampling_needs_continuous_normalization(corpus):
    with pytest.raises(ValueError, match="data.normalization=continuous"):
        CellLoader(corpus, normalization=Normalization(mode="log1p_bins"), downsampling=Downsampling())
    from pretrain.config import load_config

    with pytest.raises(ValueError, match="data.normalization=continuous"):
        load_config(None, ["preset=scfoundation", "data.normalization=log1p_bins", "model.value_mode=bins"])


# --- the preset ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_scfoundation_preset_trains_twenty_steps_and_exports(corpus, tmp_path):
    """The preset's recipe (auto-discretization, T/S tokens, [S | T | max | mean] cells, read-depth-
    aware downsampling, masked unexpressed genes, encoder-decoder) at tiny sizes: 20 steps, an export,
    an embedding."""
    import yaml

    from pretrain import load_pretrained
    from pretrain.embed import embed_counts
    from tests.train_helpers import TINY, export, run_pretrain, steps_logged

    run = tmp_path / "run"
    shrunk = [o for o in TINY if not o.startswith("data.max_genes")]
    run_pretrain(["preset=scfoundation", f"data.corpus={corpus}", f"run.out={run}", *shrunk,
                  "model.attention=sdpa", "model.autobin_bins=16", "model.decoder.d_model=16",
                  "model.decoder.n_heads=2", "model.decoder.n_layers=1", "data.views=false",
                  "objectives.contrastive_weight=0", "objectives.label_weight=0", "data.token_budget=4096",
                  "schedule.max_steps=20", "schedule.warmup_steps=2", "run.checkpoint_every=0", "run.log_every=1",
                  "deepspeed.chunks_per_step=1", "deepspeed.zero_stage=1"])
    assert steps_logged(run) == 20
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["mask_zero_prob"] == 0.03  # masked zeros trained
    bundle = export(run, tmp_path / "bundle")
    model = json.loads((bundle / "config.json").read_text())["model"]
    assert (model["continuous_embedding"], model["depth_tokens"], model["pooling"]) == ("autobin", True,
                                                                                        "depth_max_mean")
    loaded = load_pretrained(bundle)
    indptr = np.array([0, 3, 5])
    emb = embed_counts(loaded, indptr, np.array([5, 9, 40, 7, 8]), np.array([3, 1, 2, 5, 1]), np.array([40.0, 9.0]))
    assert emb.shape == (2, 4 * 32) and np.isfinite(emb).all()
