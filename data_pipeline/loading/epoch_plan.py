"""Which cells go into which batch, in which order, on which rank and loader worker: one epoch.

Everything here is a function of the corpus index (block records, ``cell_lengths.npy``), the
seed, the epoch and the layout (world size, streams per rank), computed identically by every
process without communication and without reading a shard:

1. Blocks are permuted (seed, epoch): consecutive positions of the permuted cell sequence come
   from random shards, so a megabatch mixes many sources.
2. The permuted sequence is cut into ``K`` megabatches of equal size (+-1 cell), ``K`` a multiple
   of the number of streams (ranks x workers per rank), at least ``N / megabatch_cells``.
   Megabatch ``k`` belongs to stream ``k % n_streams``; stream ``s`` is worker ``s % W`` of rank
   ``s // W``. Its cells are read from the few blocks it spans.
3. In a megabatch, cells are shuffled (a shuffle buffer of the megabatch's size), sorted by
   cost (stable, costliest first), and cut greedily into batches whose token cost stays within
   ``token_budget`` (Geneformer's length-grouped megabatches): `batching.group_by_length`, the one
   batcher, counting a batch as the sum of its cells' costs, or ``n_cells x`` the costliest when
   ``padded`` (the `batching` module says which backends pad).
4. Every stream must yield the same number of batches (so that every rank does, and so that a
   DataLoader's round-robin over workers gives a fixed order): streams below the largest count
   split their batches with the most cells in two until they reach it.
5. The batch order within each megabatch is shuffled.

So every cell is in exactly one batch of one stream per epoch, every batch respects the budget,
and a rank's batch ``i`` is batch ``i // W`` of its worker ``i % W``.

Step 4 needs every megabatch's batch count (``batch_counts`` [K]: one sort and cut per megabatch,
a pass over every cell of the corpus), the only part of the plan that is not either cheap (steps
1-2: O(blocks)) or a stream's own (steps 3 and 5, for its megabatches only). A loader computes it
once per epoch in its own process (which needs it for ``len()``) and hands it to its DataLoader
workers (``EpochPlan(..., batch_counts=...)``), so a worker cuts only its own stream's megabatches,
one at a time as it reads them (`EpochPlan.iter_stream_megabatches`): it holds one megabatch's
cells, not its stream's (a stream that needs splits keeps its batch bounds, 8 bytes a batch).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..corpus import BlockTable
from .batching import cut_batches, group_by_length, longest_first

# The epoch's random streams, one key each. numpy's SeedSequence pads a key shorter than its 4-word pool
# with zeros (``[s, e]`` and ``[s, e, 0]`` are one stream), so keys must differ in more than that: the
# shuffle of megabatch k is [seed, epoch, k], its views and masking [seed, epoch, k, VIEWS_AND_MASKING],
# its masked zeros [seed, epoch, k, MASKED_ZEROS], and the block order [seed, epoch, 0, BLOCK_ORDER]
# (it was [seed, epoch], megabatch 0's shuffle, until loader state version 2).
VIEWS_AND_MASKING, MASKED_ZEROS, BLOCK_ORDER = 1, 2, 3


def stream_key(seed: int, epoch: int, megabatch: int | None = None, use: int | None = None) -> list[int]:
    """The SeedSequence key of one of an epoch's random streams: ``megabatch`` k's shuffle (``use``
    None), one of its other streams (``use`` VIEWS_AND_MASKING or MASKED_ZEROS), or the block order
    (neither given)."""
    if megabatch is None:
        if use is not None:
            raise ValueError(f"stream {use} is a megabatch's: pass the megabatch")
        return [seed, epoch, 0, BLOCK_ORDER]
    return [seed, epoch, megabatch] + ([] if use is None else [use])


@dataclass(frozen=True)
class Batching:
    """``token_budget``: most tokens in a batch, counting each cell's `batching.TokenCost`;
    ``megabatch_cells``: cells shuffled and length-sorted together; ``max_batch_cells``: most
    cells in a batch (None: no limit)."""

    token_budget: int = 16384
    megabatch_cells: int = 8192
    max_batch_cells: int | None = None

    def __post_init__(self):
        if self.token_budget < 1 or self.megabatch_cells < 1:
            raise ValueError("token_budget and megabatch_cells must be >= 1")
        if self.max_batch_cells is not None and self.max_batch_cells < 1:
            raise ValueError("max_batch_cells must be >= 1 (or None)")


@dataclass
class Megabatch:
    """One megabatch of a stream: ``index`` (global megabatch number), ``cells`` [n] (global cell
    indices, in batch order: batch ``j`` is ``cells[bounds[j]:bounds[j+1]]``)."""

    index: int
    cells: np.ndarray
    bounds: np.ndarray

    @property
    def n_batches(self) -> int:
        return len(self.bounds) - 1


class EpochPlan:
    """The plan of epoch ``epoch`` for ``world_size`` ranks with ``streams_per_rank`` loader
    streams each (DataLoader workers, or 1 without workers). ``cost`` [N] is each cell's token
    cost (`batching.TokenCost.cells`: its length as the model will run it); ``padded``: a batch
    costs ``n_cells x`` its costliest cell instead of the sum (`TokenCost.padded`).

    ``batch_counts`` [K]: the ``batch_counts`` of this same plan (same index, costs, batching,
    seed, epoch and layout) computed by another process; given, the plan skips computing them
    (a pass over every cell) and is otherwise the same plan. None: computed here.
    """

    def __init__(self, blocks: BlockTable, cost: np.ndarray, batching: Batching, seed: int, epoch: int,
                 world_size: int, streams_per_rank: int, padded: bool = False,
                 batch_counts: np.ndarray | None = None):
        if world_size < 1 or streams_per_rank < 1:
            raise ValueError("world_size and streams_per_rank must be >= 1")
        cost = np.asarray(cost)
        if cost.dtype.kind not in "iu":
            raise ValueError(f"cell costs must be integers, got {cost.dtype}")
        if len(cost) != blocks.n_cells:
            raise ValueError(f"{len(cost)} cell lengths for {blocks.n_cells} cells: the corpus index is stale")
        if len(cost) and cost.max() > batching.token_budget:
            raise ValueError(f"a cell costs {int(cost.max())} tokens, more than token_budget="
                             f"{batching.token_budget}: raise the budget to at least {int(cost.max())}, or cap genes "
                             "per cell (max_genes; no help for a model that runs every cell over the full gene set, "
                             "gene_set=all or the encoder-decoder)")
        self.blocks, self.batching, self.seed, self.epoch, self.padded = blocks, batching, seed, epoch, padded
        self.world_size, self.streams_per_rank = world_size, streams_per_rank
        self.n_streams = world_size * streams_per_rank
        n = blocks.n_cells
        rng = np.random.default_rng(stream_key(seed, epoch))
        self.block_order = rng.permutation(len(blocks))
        sizes = np.diff(blocks.first_cell)[self.block_order]
        # where each permuted block starts in the permuted cell sequence
        self.perm_start = np.concatenate([[0], np.cumsum(sizes)])
        self.n_megabatches = megabatch_count(n, batching, self.n_streams)
        if n < self.n_megabatches and n < self.n_streams:
            raise ValueError(f"{n} cells cannot give every one of {self.n_streams} loader streams "
                             f"(ranks x workers) a cell: use fewer ranks or workers")
        self.mb_start = (np.arange(self.n_megabatches + 1) * n) // self.n_megabatches
        self._cost = cost
        if batch_counts is None:
            counts = self._batch_counts()
        else:
            counts = np.array(batch_counts, np.int64)  # a copy: the caller's buffer may be reused
            if counts.shape != (self.n_megabatches,):
                raise ValueError(f"{counts.shape} batch_counts for a plan of {self.n_megabatches} megabatches: "
                                 "not this plan's counts")
        self.batch_counts = counts  # [K] batches of each megabatch before the splits of step 4
        stream_of = np.arange(self.n_megabatches) % self.n_streams
        per_stream = np.bincount(stream_of, weights=counts, minlength=self.n_streams).astype(np.int64)
        self.batches_per_stream = int(per_stream.max())
        # Each stream must reach that count by splitting batches, and a batch holds at least one cell:
        # found here, on every rank alike, not in one rank's loader worker while the others wait in a
        # collective.
        cells = np.bincount(stream_of, weights=np.diff(self.mb_start), minlength=self.n_streams).astype(np.int64)
        short = np.flatnonzero(cells < self.batches_per_stream)
        if len(short):
            raise ValueError(f"loader stream {int(short[0])} (rank x worker) holds {int(cells[short[0]])} cells this "
                             f"epoch but every stream must give {self.batches_per_stream} batches of at least one cell "
                             "(cells costing more than half the token_budget make one-cell batches): use fewer ranks "
                             "or workers, or a larger token_budget")

    # --- cells of a megabatch -----------------------------------------------------------------
    def megabatch_cells(self, k: int) -> np.ndarray:
        """Global indices of megabatch ``k``'s cells, in permuted-sequence order.  [n]"""
        return self._positions_to_cells(int(self.mb_start[k]), int(self.mb_start[k + 1]))

    def _positions_to_cells(self, p0: int, p1: int) -> np.ndarray:
        j0 = int(np.searchsorted(self.perm_start, p0, side="right")) - 1
        out = []
        p = p0
        j = j0
        while p < p1:
            b = self.block_order[j]
            start = self.perm_start[j]
            end = min(p1, self.perm_start[j + 1])
            first = self.blocks.first_cell[b]
            out.append(np.arange(first + p - start, first + end - start, dtype=np.int64))
            p = end
            j += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def blocks_of(self, k: int) -> np.ndarray:
        """Corpus block indices megabatch ``k`` reads (each once).  [<= a few]"""
        p0, p1 = int(self.mb_start[k]), int(self.mb_start[k + 1])
        if p1 <= p0:
            return np.zeros(0, np.int64)
        j0 = int(np.searchsorted(self.perm_start, p0, side="right")) - 1
        j1 = int(np.searchsorted(self.perm_start, p1, side="left"))
        return self.block_order[j0:j1]

    # --- batches ------------------------------------------------------------------------------
    def _batch_counts(self) -> np.ndarray:
        """Greedy batch count of every megabatch (needs only its sorted costs).  [K]"""
        counts = np.zeros(self.n_megabatches, np.int64)
        for k in range(self.n_megabatches):
            counts[k] = len(self._sorted_cut(k)) - 1
        return counts

    def stream_megabatches(self, stream: int) -> list[Megabatch]:
        """The megabatches of ``stream`` (rank * streams_per_rank + worker), in order, cut into
        batches, padded to ``batches_per_stream`` batches by splits, batch order shuffled."""
        return list(self.iter_stream_megabatches(stream))

    def iter_stream_megabatches(self, stream: int):
        """`stream_megabatches` one at a time, each made when asked for: a loader worker holds one
        megabatch's cells, not its stream's. A stream short of ``batches_per_stream`` first cuts its
        megabatches' sorted costs to choose its splits (the cut depends on the costs alone, not on
        their shuffle), keeping their batch bounds (8 bytes a batch).  -> iterator of Megabatch"""
        if not 0 <= stream < self.n_streams:
            raise ValueError(f"stream {stream} outside 0..{self.n_streams - 1}")
        budget, max_cells = self.batching.token_budget, self.batching.max_batch_cells
        mine = range(stream, self.n_megabatches, self.n_streams)
        deficit = self.batches_per_stream - int(self.batch_counts[stream :: self.n_streams].sum())
        split = self._split([self._sorted_cut(k) for k in mine], deficit, stream) if deficit else None
        for i, k in enumerate(mine):
            rng = np.random.default_rng(stream_key(self.seed, self.epoch, k))
            cells = rng.permutation(self.megabatch_cells(k))  # the shuffle buffer
            if split is None:
                order, bounds = group_by_length(self._cost[cells], budget, max_cells, self.padded)
            else:
                order, bounds = longest_first(self._cost[cells]), split[i]
                split[i] = None
            yield Megabatch(k, *reorder_batches(cells[order], bounds, rng.permutation(len(bounds) - 1)))

    def _sorted_cut(self, k: int) -> np.ndarray:
        """Batch bounds of megabatch ``k``'s cells sorted costliest first.  [n_batches + 1]"""
        cost = np.sort(self._cost[self.megabatch_cells(k)])[::-1]
        return cut_batches(cost, self.batching.token_budget, self.batching.max_batch_cells, self.padded)

    @staticmethod
    def _split(bounds: list[np.ndarray], deficit: int, stream: int) -> list[np.ndarray]:
        """Split the batches with the most cells (earliest first on ties: megabatch, then position)
        in two, ``deficit`` times; ``bounds``: each megabatch's batch bounds.  -> the new bounds

        Only batches at least as large as the ``deficit``-th largest can be split (until ``deficit``
        splits are done one of those is always left, and halves are smaller), so the heap holds only
        those: the same splits as a heap of every batch of the stream."""
        sizes = [np.diff(b).astype(np.int32) for b in bounds]  # a batch holds at most a megabatch
        flat = np.concatenate(sizes) if sizes else np.zeros(0, np.int32)
        least = 0
        if deficit < len(flat):
            flat.partition(len(flat) - deficit)
            least = int(flat[len(flat) - deficit])
        del flat
        heap = [(-int(sizes[m][j]), m, int(bounds[m][j])) for m in range(len(bounds))
                for j in np.flatnonzero(sizes[m] >= least)]
        heapq.heapify(heap)
        added: dict[int, list[int]] = {}
        for _ in range(deficit):
            if not heap or -heap[0][0] < 2:
                raise ValueError(f"loader stream {stream} has too few cells to give the same number of "
                                 "batches as the others: use fewer ranks or workers, or a larger token_budget")
            size, m, start = heapq.heappop(heap)
            half = -size // 2
            added.setdefault(m, []).append(start + half)
            heapq.heappush(heap, (-half, m, start))
            heapq.heappush(heap, (-(-size - half), m, start + half))
        return [np.union1d(b, added[m]).astype(np.int64) if m in added else b for m, b in enumerate(bounds)]


def reorder_batches(cells: np.ndarray, bounds: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batches ``cells[bounds[j]:bounds[j+1]]`` put in the order ``order`` [n_batches], in one
    gather.  -> (cells [n], bounds [n_batches + 1]) of the reordered batches"""
    sizes = np.diff(bounds)[order]
    new_bounds = np.concatenate([[0], np.cumsum(sizes)])
    # entry i of reordered batch j is entry i - new_bounds[j] of batch order[j]
    source = np.repeat(bounds[:-1][order] - new_bounds[:-1], sizes) + np.arange(len(cells))
    return cells[source], new_bounds


def reorder_batches_reference(cells: np.ndarray, bounds: np.ndarray, order: np.ndarray):
    """The definition `reorder_batches` is tested against: the batches concatenated in order."""
    sizes = np.diff(bounds)[order]
    in_order = np.concatenate([cells[bounds[j]:bounds[j + 1]] for j in order]) if len(order) else cells
    return in_order, np.concatenate([[0], np.cumsum(sizes)])


def megabatch_count(n_cells: int, batching: Batching, n_streams: int) -> int:
    """``K``, the megabatches of an epoch of ``n_cells`` cells over ``n_streams`` streams (the same
    every epoch): at least ``n_cells / megabatch_cells``, a multiple of ``n_streams``."""
    k = max(1, -(-n_cells // batching.megabatch_cells))
    return -(-k // n_streams) * n_streams


def worker_skip(batches_done: int, streams_per_rank: int, worker: int) -> int:
    """How many of its batches worker ``worker`` had yielded when its rank had yielded
    ``batches_done`` (round-robin over equal-length worker streams)."""
    return batches_done // streams_per_rank + (1 if worker < batches_done % streams_per_rank else 0)
