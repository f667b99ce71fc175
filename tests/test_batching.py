"""The one batcher: the fast cut against its plain-loop reference (sum and padded rules), the budget
and cell-count invariants, the model's token cost, and the trainer, the embedder and the training
benchmark cutting the same lengths into the same batches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loading.batching import (
    TokenCost,
    cut_batches,
    cut_batches_reference,
    group_by_length,
    longest_first,
)
from data_pipeline.loading.epoch_plan import Batching, BlockTable, EpochPlan
from pretrain.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def _random_costs(rng, n: int, sort: bool) -> np.ndarray:
    cost = rng.integers(1, rng.integers(2, 400), n)
    return np.sort(cost)[::-1] if sort else cost


@pytest.mark.parametrize("padded", [False, True])
def test_cut_matches_the_reference_on_random_inputs(padded):
    rng = np.random.default_rng()  # fresh inputs every run
    for trial in range(300):
        cost = _random_costs(rng, int(rng.integers(0, 80)), sort=trial % 3 != 0)
        budget = int(rng.integers(1, 1500))  # some cells cost more than the budget on their own
        max_cells = None if trial % 2 else int(rng.integers(1, 12))
        fast = cut_batches(cost, budget, max_cells, padded)
        assert fast.tolist() == cut_batches_reference(cost, budget, max_cells, padded), (cost, budget, max_cells)


@pytest.mark.parametrize("padded", [False, True])
def test_batches_keep_the_budget_and_the_cell_limit_and_are_greedy(padded):
    rng = np.random.default_rng()
    rule = TokenCost(padded=padded)
    for trial in range(200):
        cost = _random_costs(rng, int(rng.integers(1, 300)), sort=True)
        budget = int(rng.integers(int(cost.max()), 4000))
        max_cells = None if trial % 2 else int(rng.integers(1, 20))
        bounds = cut_batches(cost, budget, max_cells, padded)
        assert bounds[0] == 0 and bounds[-1] == len(cost) and np.all(np.diff(bounds) >= 1)  # every cell once
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert rule.batch(cost[a:b]) <= budget
            assert max_cells is None or b - a <= max_cells
            if b < len(cost):  # greedy: the next cell did not fit (budget or cell limit)
                assert rule.batch(cost[a : b + 1]) > budget or b - a == max_cells


def test_padded_batches_count_cells_times_the_longest():
    cost = np.array([10, 4, 4, 4])
    assert cut_batches(cost, 20).tolist() == [0, 3, 4]  # sums 18 and 4
    assert cut_batches(cost, 20, padded=True).tolist() == [0, 2, 4]  # 2 x 10, then 2 x 4
    assert cut_batches(np.array([50, 3]), 20).tolist() == [0, 1, 2]  # over the budget: a batch of its own


def test_token_cost_of_cells():
    lengths = np.array([5, 100, 3000])
    assert TokenCost().cells(lengths).tolist() == [5, 100, 3000]
    assert TokenCost(cap=1000, extra_tokens=1, views=2).cells(lengths).tolist() == [12, 202, 2002]
    assert TokenCost(cap=1000, extra_tokens=1, full_length=500).cells(lengths).tolist() == [500, 500, 1001]
    with pytest.raises(ValueError, match="views"):
        TokenCost(views=0)


def _model(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=2003, d_model=32, n_layers=1, n_heads=2, favor_features=16, **kw).validate()


def test_the_model_says_what_a_cell_costs():
    lengths = np.array([10, 1500])
    assert _model(attention="favor").token_cost(1200).cells(lengths).tolist() == [11, 1201]
    assert not _model(attention="favor").token_cost(1200).padded
    assert _model(attention="sdpa").token_cost(1200).padded  # sdpa pads a packed batch to its longest cell
    # scBERT: the encoder runs all 2,000 vocabulary genes (+ <cls>) of every cell
    every = _model(gene_set="all").token_cost(None, views=2)
    assert every.cells(lengths).tolist() == [2 * 2001, 2 * 2001]
    # the encoder-decoder's decoder runs the full gene set whatever the encoder sees
    enc_dec = _model(architecture="encoder_decoder", value_mode="continuous").token_cost(None)
    assert enc_dec.cells(lengths).tolist() == [2000, 2000]


def _trainer_batches(lengths: np.ndarray, cost: TokenCost, budget: int) -> list[tuple]:
    """The EpochPlan's batches of one megabatch holding every cell, as sorted tuples of capped lengths
    (cells of equal capped length are interchangeable: each caller breaks ties its own way)."""
    n = len(lengths)
    table = BlockTable(("s.tar",), np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64),
                       np.array([0, n]))
    plan = EpochPlan(table, cost.cells(lengths), Batching(budget, megabatch_cells=n), seed=3, epoch=0, world_size=1,
                     streams_per_rank=1, padded=cost.padded)
    (m,) = plan.stream_megabatches(0)
    capped = np.minimum(lengths, cost.cap)
    return sorted(tuple(sorted(capped[m.cells[a:b]].tolist())) for a, b in zip(m.bounds[:-1], m.bounds[1:]))


def _embedder_batches(lengths: np.ndarray, cost: TokenCost, budget: int) -> list[tuple]:
    from pretrain.embed import length_batches

    capped = np.minimum(lengths, cost.cap)  # the embedder batches normalized (capped) cells
    indptr = np.concatenate([[0], np.cumsum(capped)])
    genes = np.arange(indptr[-1]) % 50 + 3
    return sorted(tuple(sorted(capped[cells].tolist()))
                  for cells, _ in length_batches(indptr, genes, genes.astype(np.float32), budget, cost))


def _bench_batches(lengths: np.ndarray, config: ModelConfig, cap: int, budget: int) -> list[tuple]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import plan_batches

    pool = np.minimum(lengths, cap)  # bench_train's pool is capped at the preset's longest cell
    batches = plan_batches("packed", pool, config.token_cost(cap), budget, cap, np.random.default_rng(1))
    return sorted(tuple(sorted(pool[b].tolist())) for b in batches)


@pytest.mark.parametrize("attention", ["favor", "sdpa"])
def test_trainer_embedder_and_benchmark_cut_the_same_batches(attention):
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 700, 600)
    cap, budget = 500, 3000
    config = _model(attention=attention)
    cost = config.token_cost(cap)
    trainer = _trainer_batches(lengths, cost, budget)
    assert trainer == _embedder_batches(lengths, cost, budget) == _bench_batches(lengths, config, cap, budget)
    other = _trainer_batches(lengths, TokenCost(cap, 1, padded=not cost.padded), budget)
    assert trainer != other  # the rule matters on these lengths, so the equality above says something


def test_gene_set_all_batches_keep_the_budget_counting_every_gene(tmp_path):
    """scBERT-like: each cell runs the full vocabulary in the encoder, so the budget counts that (a
    batch of expressed-gene lengths would hold tens of full-length cells)."""
    from pretrain.config import load_config
    from pretrain.train import build_loader
    from tests.train_helpers import TINY, TINY_CONFIG, make_corpus

    corpus = make_corpus(tmp_path, n_cells=120, n_genes=300)
    budget = 2000
    config = load_config(str(TINY_CONFIG), [*TINY, f"data.corpus={corpus}", "model.gene_set=all",
                                            "data.views=false", "objectives.contrastive_weight=0",
                                            f"data.token_budget={budget}"])
    loader = build_loader(config, torch.device("cpu"))
    full = loader.corpus.vocab_size - 3 + 1  # every gene token, + <cls>
    sizes = [batch.n_cells for batch in loader]
    assert sum(sizes) == 120
    assert max(sizes) * full <= budget and max(sizes) == budget // full


def test_a_loader_state_from_another_token_cost_is_refused(tmp_path):
    from data_pipeline.loading.loader import CellLoader
    from data_pipeline.loading.normalize import Normalization
    from tests.train_helpers import make_corpus

    corpus = make_corpus(tmp_path, n_cells=60, n_genes=200)
    norm = Normalization(max_genes=40)

    def loader(cost):
        return CellLoader(corpus, normalization=norm, batching=Batching(400, 64), token_cost=cost)

    state = loader(TokenCost(40, 1)).state_dict()
    loader(TokenCost(40, 1)).load_state_dict(state)
    with pytest.raises(ValueError, match="attention backend.*restart_epoch=True"):
        loader(TokenCost(40, 1, padded=True)).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "token_cost"}  # saved before the cost was recorded
    loader(TokenCost(40, 1)).load_state_dict(legacy)
    with pytest.raises(ValueError, match="restart_epoch=True"):
        loader(TokenCost(40, 1, full_length=201)).load_state_dict(legacy)
    restarted = loader(TokenCost(40, 1, padded=True))
    restarted.load_state_dict({**state, "epoch": 3, "batches_done": 2}, restart_epoch=True)
    assert (restarted.epoch, restarted.batches_done) == (3, 0)
    with pytest.raises(ValueError, match="build the token cost from the same normalization"):
        loader(TokenCost(100, 1))


@pytest.mark.parametrize("seed", range(4))
def test_an_epoch_plan_with_padded_batches_keeps_its_guarantees(seed):
    rng = np.random.default_rng(seed)
    blocks = [int(rng.integers(1, 200)) for _ in range(int(rng.integers(3, 20)))]
    n = sum(blocks)
    table = BlockTable(("a.tar",), np.zeros(len(blocks), np.int64), np.zeros(len(blocks), np.int64),
                       np.ones(len(blocks), np.int64), np.concatenate([[0], np.cumsum(blocks)]))
    cost = rng.integers(1, 500, n)
    batching = Batching(token_budget=int(rng.integers(500, 3000)), megabatch_cells=150)
    plan = EpochPlan(table, cost, batching, seed, 0, world_size=2, streams_per_rank=2, padded=True)
    seen, counts = [], []
    for s in range(4):
        mbs = plan.stream_megabatches(s)
        counts.append(sum(m.n_batches for m in mbs))
        for m in mbs:
            for a, b in zip(m.bounds[:-1], m.bounds[1:]):
                assert (b - a) * cost[m.cells[a:b]].max() <= batching.token_budget
            seen.append(m.cells)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))
    assert len(set(counts)) == 1 and counts[0] == plan.batches_per_stream


def test_group_by_length_sorts_costliest_first_keeping_ties_in_order():
    order, bounds = group_by_length(np.array([3, 9, 3, 9, 1]), 100)
    assert order.tolist() == [1, 3, 0, 2, 4] and bounds.tolist() == [0, 5]


@pytest.mark.parametrize("spread", [1, 5, 65535, 65536, 1 << 40])
def test_longest_first_is_the_stable_descending_sort(spread):
    """Costs within 65,536 of each other take the 16-bit radix sort, wider ones the general one:
    both give numpy's stable argsort of the negated costs (ties in the given order)."""
    rng = np.random.default_rng(spread % 1000)
    for n in (0, 1, 7, 5000):
        cost = rng.integers(0, spread, n) + int(rng.integers(-3, 3)) * spread
        assert np.array_equal(longest_first(cost), np.argsort(-cost.astype(np.int64), kind="stable"))


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_budget_holds_several_of_its_costliest_cells(path):
    """With full-gene-set cells counted in full (20,000 vocabulary genes here), the YAML's budget
    alone sizes the batches, and still gives each batch a few cells."""
    from types import SimpleNamespace

    from pretrain.config import load_config
    from pretrain.train import resolve_model_config

    # one label column, named as the celllm preset's objective reads it
    corpus = SimpleNamespace(special_tokens={"<pad>": 0, "<cls>": 1, "<mask>": 2}, vocab_size=20003, label_classes=[2],
                             label_columns=[SimpleNamespace(name="tumor_normal")])
    config = resolve_model_config(load_config(str(path), ["data.corpus=/some/corpus"]), corpus)
    d = config.data
    cost = config.model.token_cost(d.max_genes, views=2 if d.views else 1)
    costliest = int(cost.cells(np.array([d.max_genes or 20000]))[0])
    assert d.token_budget // costliest >= 3, (d.token_budget, costliest)


def test_a_stale_length_index_is_caught_where_every_cell_costs_the_full_gene_set(tmp_path):
    """A full-gene-set cost is the same for every cell, so the loader compares the blocks' capped
    lengths with ``cell_lengths.npy``, not their costs."""
    from data_pipeline.corpus import CorpusError
    from data_pipeline.loading.loader import CellLoader
    from data_pipeline.loading.normalize import Normalization
    from tests.train_helpers import make_corpus

    corpus = make_corpus(tmp_path, n_cells=60, n_genes=200)
    lengths = np.load(corpus / "cell_lengths.npy")
    lengths[7] -= 1
    np.save(corpus / "cell_lengths.npy", lengths)
    loader = CellLoader(corpus, normalization=Normalization(max_genes=None), batching=Batching(2000, 64),
                        token_cost=TokenCost(None, 1, full_length=201))
    with pytest.raises(CorpusError, match="genes per cell disagree"):
        list(loader)


def test_worker_rings_are_sized_for_the_few_cells_a_full_gene_set_batch_holds(tmp_path):
    """Where every cell costs the full gene set a batch holds budget // that many cells: the ring
    buffers need room for those sequences, not one per token; every batch still fits its ring."""
    from data_pipeline.loading.loader import CellLoader, wire_bytes_bound
    from data_pipeline.loading.normalize import Normalization
    from tests.train_helpers import make_corpus

    corpus = make_corpus(tmp_path, n_cells=60, n_genes=200)
    budget = 2000
    loader = CellLoader(corpus, normalization=Normalization(), batching=Batching(budget, 64), num_workers=1,
                        token_cost=TokenCost(None, 1, full_length=201), prefetch_factor=2)
    slot = loader._stream.rings[0][0].numel()
    assert slot == wire_bytes_bound(budget, 1, budget // 201) < wire_bytes_bound(budget, 1)
    assert sum(batch.n_cells for batch in loader) == 60  # a batch outgrowing its ring would raise
