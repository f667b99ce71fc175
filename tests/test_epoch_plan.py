"""The epoch plan: every cell exactly once, equal batch counts per stream, budgets kept."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from data_pipeline.loading.epoch_plan import (
    Batching,
    BlockTable,
    EpochPlan,
    reorder_batches,
    reorder_batches_reference,
    worker_skip,
)


def _table(block_cells: list[int]) -> BlockTable:
    n = len(block_cells)
    return BlockTable(("s0.tar", "s1.tar"), np.arange(n) % 2, np.zeros(n, np.int64), np.ones(n, np.int64),
                      np.concatenate([[0], np.cumsum(block_cells)]))


def _random_corpus(seed: int):
    rng = np.random.default_rng(seed)
    blocks = [int(rng.integers(1, 300)) for _ in range(int(rng.integers(3, 40)))]
    table = _table(blocks)
    cost = rng.integers(1, 500, table.n_cells)
    return table, cost


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_every_cell_once_equal_batches_budget_kept(seed, world_size, streams):
    table, cost = _random_corpus(seed)
    batching = Batching(token_budget=int(np.random.default_rng(seed).integers(500, 4000)), megabatch_cells=257,
                        max_batch_cells=None if seed % 2 else 37)
    plan = EpochPlan(table, cost, batching, seed=seed, epoch=3, world_size=world_size, streams_per_rank=streams)
    seen = []
    for s in range(plan.n_streams):
        mbs = plan.stream_megabatches(s)
        assert sum(m.n_batches for m in mbs) == plan.batches_per_stream  # equal for every stream
        for m in mbs:
            assert np.array_equal(np.sort(m.cells), np.sort(plan.megabatch_cells(m.index)))
            for j in range(m.n_batches):
                batch = m.cells[m.bounds[j]:m.bounds[j + 1]]
                assert len(batch) >= 1
                assert cost[batch].sum() <= batching.token_budget
                if batching.max_batch_cells:
                    assert len(batch) <= batching.max_batch_cells
                seen.append(batch)
            # the blocks a megabatch reads hold all its cells
            blocks = plan.blocks_of(m.index)
            held = np.concatenate([np.arange(table.first_cell[b], table.first_cell[b + 1]) for b in blocks])
            assert np.isin(m.cells, held).all()
    seen = np.concatenate(seen)
    assert len(seen) == table.n_cells and np.array_equal(np.sort(seen), np.arange(table.n_cells))


def test_deterministic_and_epochs_differ():
    table, cost = _random_corpus(1)
    batching = Batching(token_budget=3000, megabatch_cells=200)

    def order(epoch, seed=0):
        plan = EpochPlan(table, cost, batching, seed=seed, epoch=epoch, world_size=2, streams_per_rank=2)
        return np.concatenate([m.cells for s in range(4) for m in plan.stream_megabatches(s)])

    assert np.array_equal(order(0), order(0))
    assert not np.array_equal(order(0), order(1))
    assert not np.array_equal(order(0), order(0, seed=1))


def test_length_grouping_sorts_within_batches_of_a_megabatch():
    table, cost = _random_corpus(2)
    plan = EpochPlan(table, cost, Batching(token_budget=5000, megabatch_cells=400), seed=0, epoch=0,
                     world_size=1, streams_per_rank=1)
    for m in plan.stream_megabatches(0):
        spans = [(cost[m.cells[m.bounds[j]:m.bounds[j + 1]]].min(), cost[m.cells[m.bounds[j]:m.bounds[j + 1]]].max())
                 for j in range(m.n_batches)]
        # batches hold disjoint length ranges of the megabatch (they were cut from one sorted run)
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_every_random_stream_of_an_epoch_is_its_own():
    """SeedSequence drops trailing zeros, so keys like [s, e] and [s, e, 0] are one stream: the
    block order, each megabatch's shuffle, views and masking, and masked zeros must all differ."""
    from data_pipeline.loading.epoch_plan import MASKED_ZEROS, VIEWS_AND_MASKING, stream_key

    for seed, epoch in ((0, 0), (5, 0), (5, 1)):
        keys = [stream_key(seed, epoch)] + [stream_key(seed, epoch, k, use) for k in range(4)
                                            for use in (None, VIEWS_AND_MASKING, MASKED_ZEROS)]
        first = {tuple(np.random.default_rng(key).integers(0, 2**63, 4)) for key in keys}
        assert len(first) == len(keys), keys
    with pytest.raises(ValueError, match="pass the megabatch"):
        stream_key(0, 0, use=VIEWS_AND_MASKING)


def test_clear_errors():
    table, cost = _random_corpus(3)
    with pytest.raises(ValueError, match="token_budget"):
        EpochPlan(table, cost, Batching(token_budget=int(cost.max()) - 1), 0, 0, 1, 1)
    with pytest.raises(ValueError, match="stale"):
        EpochPlan(table, cost[:-1], Batching(), 0, 0, 1, 1)
    tiny = _table([2, 1])
    with pytest.raises(ValueError, match="fewer ranks or workers"):
        EpochPlan(tiny, np.ones(3, np.int64), Batching(token_budget=10), 0, 0, 2, 2).stream_megabatches(0)
    # every cell costs more than half the budget: one-cell batches, and 8 streams of 1,001 cells and 1,000
    # cannot give the same number of batches; refused when the plan is made (on every rank), not later in
    # one rank's loader worker
    lone = _table([8001])
    with pytest.raises(ValueError, match="holds 1000 cells this epoch but every stream must give 1001 batches"):
        EpochPlan(lone, np.full(8001, 2049, np.int64), Batching(token_budget=4096, megabatch_cells=1000), 0, 0, 8, 1)


def test_worker_skip_matches_round_robin():
    for workers in (1, 2, 3):
        for done in range(20):
            produced = [0] * workers
            for i in range(done):
                produced[i % workers] += 1
            assert [worker_skip(done, workers, w) for w in range(workers)] == produced


@pytest.mark.parametrize("world_size,streams", [(1, 1), (2, 3)])
def test_a_plan_from_shared_batch_counts_is_the_same_plan(world_size, streams):
    """What a loader worker builds from the counts its rank computed equals the plan computed whole."""
    table, cost = _random_corpus(4)
    batching = Batching(token_budget=2000, megabatch_cells=150)
    whole = EpochPlan(table, cost, batching, 7, 2, world_size, streams)
    shared = EpochPlan(table, cost, batching, 7, 2, world_size, streams, batch_counts=whole.batch_counts)
    assert shared.batches_per_stream == whole.batches_per_stream
    for s in range(whole.n_streams):
        for a, b in zip(whole.stream_megabatches(s), shared.stream_megabatches(s), strict=True):
            assert a.index == b.index and np.array_equal(a.cells, b.cells) and np.array_equal(a.bounds, b.bounds)
    with pytest.raises(ValueError, match="not this plan's counts"):
        EpochPlan(table, cost, batching, 7, 2, world_size, streams, batch_counts=whole.batch_counts[:-1])


def test_reorder_batches_equals_its_reference():
    rng = np.random.default_rng(0)
    for n_batches in (0, 1, 2, 50):
        sizes = rng.integers(1, 20, n_batches)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cells = rng.permutation(int(bounds[-1])).astype(np.int64)
        order = rng.permutation(n_batches)
        got, expected = reorder_batches(cells, bounds, order), reorder_batches_reference(cells, bounds, order)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def _split_every_batch(mine: list, deficit: int) -> None:
    """The splits as first written: a heap of every batch of the stream, bounds inserted in lists."""
    heap = [(-(b[j + 1] - b[j]), m, b[j]) for m, (_, _, b, _) in enumerate(mine) for j in range(len(b) - 1)]
    heapq.heapify(heap)
    for _ in range(deficit):
        size, m, start = heapq.heappop(heap)
        half = -size // 2
        bounds = mine[m][2]
        bounds.insert(bounds.index(start) + 1, start + half)
        heapq.heappush(heap, (-half, m, start))
        heapq.heappush(heap, (-(-size - half), m, start + half))


@pytest.mark.parametrize("seed", range(20))
def test_splits_from_the_largest_batches_only_equal_a_heap_of_every_batch(seed):
    rng = np.random.default_rng(seed)
    mine = []
    for k in range(int(rng.integers(1, 6))):
        sizes = rng.integers(2, 12, int(rng.integers(1, 30)))  # many ties
        mine.append([k, None, np.concatenate([[0], np.cumsum(sizes)]).tolist(), None])
    total = sum(len(b) - 1 for _, _, b, _ in mine)
    deficit = int(rng.integers(1, 2 * total))
    got = EpochPlan._split([np.array(b, np.int64) for _, _, b, _ in mine], deficit, 0)
    _split_every_batch(mine, deficit)
    assert [b.tolist() for b in got] == [b for _, _, b, _ in mine]
    assert all(b.dtype == np.int64 for b in got)
