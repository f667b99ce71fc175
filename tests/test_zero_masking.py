"""Masked unexpressed genes (``data.mask_zero_prob``, scFoundation's ``zero_mask_prob``): the loader adds
a share of each cell's unexpressed genes as masked tokens of input 0 and target 0, in gene order,
without touching the draws of the rest; the encoder-decoder predicts them at their decoder slots."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_pipeline.corpus import BlockReader, Corpus
from data_pipeline.loading.batching import TokenCost
from data_pipeline.loading.epoch_plan import Batching
from data_pipeline.loading.loader import CellLoader
from data_pipeline.loading.masking import Masking
from data_pipeline.loading.normalize import Normalization
from data_pipeline.loading.read_depth import Downsampling
from data_pipeline.loading.zero_masking import pick_unexpressed
from pretrain.model import CellModel
from pretrain.objectives import StepCounts
from pretrain.objectives.losses import mlm_loss_sum
from pretrain.presets import PRESETS
from tests.model_helpers import one_thread, seeded  # noqa: F401 (autouse fixtures)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.train_helpers import make_corpus

    return Corpus(make_corpus(tmp_path_factory.mktemp("zeromask"), n_cells=300, n_genes=300))


def gene_tokens(corpus: Corpus) -> tuple[int, int]:
    return max(corpus.special_tokens.values()) + 1, corpus.vocab_size


def stored_genes(corpus: Corpus) -> dict[int, np.ndarray]:
    """Each cell's genes as the corpus stores them (those with a count), by global cell index."""
    table, out = corpus.block_table(), {}
    reader = BlockReader(corpus, table, True)
    for b in range(len(table.shard)):
        block = reader.read(b)
        for i in range(block.n_cells):
            out[int(table.first_cell[b]) + i] = block.genes[block.indptr[i]:block.indptr[i + 1]].astype(np.int64)
    reader.close()
    return out


def encoder_decoder(corpus: Corpus, **overrides):
    """The scfoundation preset's model at tiny sizes over the corpus's vocabulary (sdpa everywhere)."""
    model = PRESETS["scfoundation"].model
    special = corpus.special_tokens
    return replace(model, vocab_size=corpus.vocab_size, pad_token=special["<pad>"], cls_token=special["<cls>"],
                   mask_token=special["<mask>"], d_model=16, n_heads=2, n_layers=1, dropout=0.0, attention="sdpa",
                   autobin_bins=8, contrastive_dim=8,
                   decoder=replace(model.decoder, d_model=8, n_heads=2, n_layers=1, attention="sdpa"), **overrides)


def make_loader(corpus: Corpus, zero_prob: float, max_genes: int | None = None, downsampling=None, seed: int = 3,
                megabatch_cells: int = 128) -> CellLoader:
    return CellLoader(corpus, normalization=Normalization(mode="continuous", max_genes=max_genes),
                      batching=Batching(token_budget=4096, megabatch_cells=megabatch_cells),
                      masking=Masking(0.3, zero_prob=zero_prob), downsampling=downsampling, seed=seed,
                      token_cost=encoder_decoder(corpus).token_cost(max_genes))


def sequences(batch):
    cu = batch.cu_seqlens.tolist()
    for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        yield s, slice(a, b)


@pytest.mark.parametrize("max_genes, downsampling", [(None, None), (40, Downsampling(1.0, 2.0, 2.0, 0.0))],
                         ids=["plain", "capped_downsampled"])
def test_unexpressed_genes_are_added_masked_at_zero_without_changing_the_rest(corpus, max_genes, downsampling):
    """Against the same loader without them (same seed): every token of that run is there unchanged,
    the added ones are genes the cell has no count for (neither the cap's dropped genes nor the genes a
    downsampled input lost every read of), input 0, masked, target 0, in ascending order with the
    rest; their share of the unexpressed genes is the probability within binomial noise."""
    p = 0.1
    first, end = gene_tokens(corpus)
    stored = stored_genes(corpus)
    base = list(make_loader(corpus, 0.0, max_genes, downsampling))
    zero = list(make_loader(corpus, p, max_genes, downsampling))
    assert len(base) == len(zero) > 1
    added = unexpressed = capped = lost_reads = 0
    for x, y in zip(base, zero, strict=True):
        assert torch.equal(x.cell_index, y.cell_index) and y.n_tokens <= 4096
        extra_masked = 0
        for (s, a), (_, b) in zip(sequences(x), sequences(y)):
            genes = y.gene_ids[b].numpy()
            assert np.all(np.diff(genes) > 0) and genes.min() >= first and genes.max() < end
            new = ~np.isin(genes, x.gene_ids[a].numpy())
            old = ~new
            assert np.array_equal(genes[old], x.gene_ids[a].numpy())
            for name in ("values", "mlm_mask", "mlm_targets"):
                assert torch.equal(getattr(y, name)[b][torch.from_numpy(old)], getattr(x, name)[a]), name
            cell_genes = stored[int(y.cell_index[s])]
            assert not np.isin(genes[new], cell_genes).any()
            assert torch.all(y.values[b][torch.from_numpy(new)] == 0) and torch.all(y.mlm_mask[b][torch.from_numpy(new)])
            assert torch.all(y.mlm_targets[b][torch.from_numpy(new)] == 0)
            added += int(new.sum())
            extra_masked += int(new.sum())
            unexpressed += (end - first) - len(cell_genes)
            capped += len(cell_genes) - int(old.sum())
            lost = (x.values[a] == 0) & ~x.mlm_mask[a] & (x.mlm_targets[a] > 0)
            lost_reads += int(lost.sum())
        assert StepCounts.of([y]).masked == StepCounts.of([x]).masked + extra_masked
        # throughput counts the input: the added targets are not tokens the encoder reads
        assert StepCounts.of([y]).tokens == StepCounts.of([x]).tokens
        assert StepCounts.of([y]).slots == StepCounts.of([x]).slots  # padding waste: of the input too
        for per_seq in (lambda lengths, _: float(lengths.pow(2).sum()), lambda _, masked: float(masked.pow(2).sum())):
            assert StepCounts.of([y], per_seq).flops == StepCounts.of([x], per_seq).flops  # FLOPs: the same input
        assert y.n_masked_zeros == x.n_masked_zeros + extra_masked  # x: masked-but-kept genes that lost every read
    assert abs(added - p * unexpressed) < 5 * math.sqrt(unexpressed * p * (1 - p))
    if max_genes is not None:  # the cases where a wrong draw would pick an expressed gene did occur
        assert capped > 100 and lost_reads > 100


def test_every_unexpressed_gene_fits_the_encoder_decoder_token_budget(corpus):
    """With probability 1 every cell holds the whole gene set, in order: what the encoder-decoder's
    token cost (the full gene set, + T and S) counts for it, so no batch outgrows the budget."""
    first, end = gene_tokens(corpus)
    cost = encoder_decoder(corpus).token_cost(None)
    assert cost.full_length == end - first + 2
    for batch in make_loader(corpus, 1.0):
        for _, a in sequences(batch):
            assert torch.equal(batch.gene_ids[a], torch.arange(first, end))
        assert batch.n_tokens <= cost.batch(cost.cells(np.zeros(batch.n_seqs, np.int64))) <= 4096


def test_masked_zeros_resume_exactly(corpus):
    whole = list(make_loader(corpus, 0.2, megabatch_cells=64, seed=7))
    first = make_loader(corpus, 0.2, megabatch_cells=64, seed=7)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = make_loader(corpus, 0.2, megabatch_cells=64, seed=7)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert len(rest) == len(whole) - 3 > 0
    for x, y in zip(whole[3:], rest, strict=True):
        for name in ("gene_ids", "values", "mlm_mask", "mlm_targets", "cu_seqlens"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_unexpressed_picks_are_uniform_over_the_unexpressed_genes():
    """Each gene a cell lacks is drawn with the probability, the ones it has never."""
    cell = np.array([4, 5, 9, 20, 21, 22, 40])
    n = 5000
    ptr, picks = pick_unexpressed(0.25, np.arange(n + 1) * len(cell), np.tile(cell, n), (3, 43),
                                  np.random.default_rng(0))
    freq = np.bincount(picks, minlength=43)[3:] / n
    lacking = ~np.isin(np.arange(3, 43), cell)
    assert np.all(freq[~lacking] == 0)
    assert np.all(np.abs(freq[lacking] - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n))
    assert all(np.all(np.diff(picks[a:b]) > 0) for a, b in zip(ptr[:-1], ptr[1:]))


def decoder_reference(model: CellModel, batch) -> torch.Tensor:
    """Each cell alone, padded: the encoder over its unmasked genes of input > 0 (and T, S), then a
    decoder row per vocabulary gene (decoder gene embedding + the encoder output projected | the mask
    vector where masked, masked zeros included | the zero vector), T and S after them; the head at the
    masked genes, in token order.  -> [n_masked]"""
    c = model.config
    n_special = max(c.pad_token, c.cls_token, c.mask_token) + 1  # this test's vocabularies: special tokens first
    preds = []
    for s, a in sequences(batch):
        genes, values, masked = batch.gene_ids[a], batch.values[a], batch.mlm_mask[a]
        keep = ~masked & (values > 0)
        n = int(keep.sum())
        h, _, depth = model._encode(genes[keep], values[keep], torch.tensor([0, n], dtype=torch.int32), n,
                                    batch.read_depth[s:s + 1])
        table = model.decoder_gene_embedding
        x = table(torch.arange(n_special, model.config.vocab_size)) + model.decoder_zero
        rows = genes - n_special
        x[rows[masked]] = table(genes[masked]) + model.decoder_mask
        x[rows[keep]] = table(genes[keep]) + model.to_decoder(h)
        x = torch.cat([x, model.to_decoder(depth[0])])
        out = model.decoder.forward_padded(x[None], torch.ones(1, len(x), dtype=torch.bool))[0]
        preds.append(model.mlm_head(out[rows[masked]]).squeeze(-1))
    return torch.cat(preds)


def test_encoder_decoder_predicts_masked_zeros_at_their_decoder_slots(corpus):
    batch = next(iter(make_loader(corpus, 0.1))).select_cells(0, 3)
    zeros = batch.mlm_mask & (batch.mlm_targets == 0)
    assert zeros.sum() > 10
    model = CellModel(encoder_decoder(corpus)).double().eval()
    batch.values, batch.mlm_targets = batch.values.double(), batch.mlm_targets.double()
    with torch.no_grad():
        out = model(batch)
        expected = decoder_reference(model, batch)
    torch.testing.assert_close(out.mlm, expected, rtol=1e-9, atol=1e-9)
    loss, count = mlm_loss_sum(out.mlm, batch, regress=True)
    assert count == int(batch.mlm_mask.sum())
    # float32, as the loss is summed
    torch.testing.assert_close(loss.double(), ((expected - batch.mlm_targets[batch.mlm_mask]) ** 2).sum(), rtol=1e-5,
                               atol=1e-6)


def test_configurations_that_cannot_mask_zeros_are_refused(corpus):
    from pretrain.config import load_config

    config = load_config(None, ["preset=scfoundation"])
    assert config.data.mask_zero_prob == 0.03 and config.input_masking().zero_prob == 0.03
    with pytest.raises(ValueError, match="set model.architecture=encoder_decoder"):
        load_config(None, ["preset=scgpt", "data.mask_zero_prob=0.03"])
    with pytest.raises(ValueError, match="data.mask_zero_prob=0"):
        load_config(None, ["preset=scbert", "data.mask_zero_prob=0.03"])
    with pytest.raises(ValueError, match=r"data\.mask_\*.*\[0, 1\]"):
        load_config(None, ["preset=scfoundation", "data.mask_zero_prob=1.5"])
    full = encoder_decoder(corpus).token_cost(None)
    with pytest.raises(ValueError, match="data.normalization=continuous"):
        CellLoader(corpus, normalization=Normalization(mode="log1p_bins"), masking=Masking(zero_prob=0.1),
                   token_cost=full)
    with pytest.raises(ValueError, match="full gene set"):
        CellLoader(corpus, normalization=Normalization(mode="continuous"), masking=Masking(zero_prob=0.1),
                   token_cost=TokenCost())
