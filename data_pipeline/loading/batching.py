"""The token budget, in one place: what a cell costs (`TokenCost`) and how length-sorted cells are
cut into batches within a budget (`cut_batches`, `group_by_length`), for training
(`epoch_plan.EpochPlan`), embedding (`pretrain.embed`), the benchmarks and fine-tuning alike.

A cell's cost is the number of token rows the model runs for it: its expressed genes capped at
``cap`` (the loader's ``max_genes``), plus ``extra_tokens`` (a ``<cls>``), or ``full_length`` where
the model runs every cell over the full gene set (scBERT's ``gene_set=all``; the encoder-decoder's
decoder), times ``views`` (two sequences per cell for the contrastive objective). The numbers are
plain ones: `pretrain` fills them in from its model config (`ModelConfig.token_cost`), so that
nothing here knows a model.

A batch's cost is the SUM of its cells' costs when the attention backend runs packed sequences
(favor, varlen, flash: no tensor of the step has more rows than that), or ``n_cells x`` its
LONGEST cell's cost when it pads them (``padded``; `ModelConfig.token_cost` sets it for sdpa).
Why sdpa counts padded: `pretrain.model.attention.sdpa` scatters the packed q, k, v into
``[B, H, L, D]`` zeros and runs ``scaled_dot_product_attention`` with a key mask, so in every
block its q/k/v/output (kept for the backward) hold ``n_cells x longest`` rows, beside the packed
projections and feed-forward; the sum would let those tensors outgrow the budget. On length-sorted
batches the two rules differ only by the padding within a batch: on the real length distribution,
`benchmarks/results/train_cpu.json` has Geneformer-10M's length-grouped batches holding 13.72
cells padded against 13.77 summed (0.3 % fewer; 8,192-token budget). The score matrices of an
attention kernel that builds them (``n_cells x heads x longest^2``) are bounded by neither rule:
the budget counts token rows.
The same rule holds wherever the model runs: training (the loader), embedding, the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class TokenCost:
    """Tokens a cell takes in a batch, and how a batch's cells add up.

    ``cap``: most expressed genes kept per cell (None: all); ``extra_tokens``: tokens the model adds
    per sequence (1 for ``<cls>``); ``views``: sequences per cell; ``full_length``: tokens of the
    longest sequence the model runs for any cell whatever its expressed genes (the full gene set,
    for gene_set=all or a full-gene-set decoder; None: none); ``padded``: a batch costs
    ``n_cells x`` its longest cell (a backend that pads) rather than the sum of its cells."""

    cap: int | None = None
    extra_tokens: int = 0
    views: int = 1
    full_length: int | None = None
    padded: bool = False

    def __post_init__(self):
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"TokenCost(cap={self.cap}): the gene cap must be >= 1 (or None: no cap)")
        if self.extra_tokens < 0 or self.views < 1:
            raise ValueError(f"TokenCost(extra_tokens={self.extra_tokens}, views={self.views}): extra tokens must "
                             "be >= 0 and views >= 1")
        if self.full_length is not None and self.full_length < 1:
            raise ValueError(f"TokenCost(full_length={self.full_length}) must be >= 1 (or None)")

    def cells(self, lengths: np.ndarray) -> np.ndarray:
        """Cost of cells with ``lengths`` expressed genes.  [n] -> [n] int32 (one per corpus cell in
        every loader process: 30M cells take 120 MB)"""
        cost = np.asarray(lengths).astype(np.int32)
        if self.cap is not None:
            np.minimum(cost, self.cap, out=cost)
        cost += self.extra_tokens
        if self.full_length is not None:
            np.maximum(cost, self.full_length, out=cost)
        cost *= self.views
        return cost

    def batch(self, cost: np.ndarray) -> int:
        """Cost of one batch of cells costing ``cost`` [n] each."""
        cost = np.asarray(cost)
        if not len(cost):
            return 0
        return int(len(cost) * cost.max()) if self.padded else int(cost.sum())


def cut_batches(cost: np.ndarray, budget: int, max_cells: int | None = None, padded: bool = False) -> np.ndarray:
    """Cut cells costing ``cost`` [n] (in the order given, meant longest first) greedily into
    consecutive batches whose cost (`TokenCost.batch`: sum, or ``n x`` longest when ``padded``)
    stays within ``budget`` and that hold at most ``max_cells`` cells. A cell costing more than the
    budget on its own gets a batch of its own (callers that must refuse it check first).
    -> bounds [n_batches + 1]: batch ``j`` is cells ``bounds[j]:bounds[j+1]``"""
    cost = np.ascontiguousarray(cost, dtype=np.int64)
    bounds = np.empty(len(cost) + 1, np.int64)
    n = _cut(cost, int(budget), int(max_cells or NO_LIMIT), bool(padded), bounds)
    return bounds[: n + 1].copy()  # not a view that keeps a slot per cell alive


@njit(cache=True, nogil=True)
def _cut(cost, budget, max_cells, padded, bounds):  # pragma: no cover
    n = 0
    bounds[0] = 0
    total = 0
    longest = 0
    size = 0
    for i in range(len(cost)):
        c = cost[i]
        if size:
            over = (size + 1) * max(longest, c) > budget if padded else total + c > budget
            if over or size == max_cells:
                n += 1
                bounds[n] = i
                total = 0
                longest = 0
                size = 0
        total += c
        longest = max(longest, c)
        size += 1
    if size:
        n += 1
        bounds[n] = len(cost)
    return n


def cut_batches_reference(cost, budget: int, max_cells: int | None = None, padded: bool = False) -> list[int]:
    """The definition `cut_batches` is tested against: add cells to the open batch while the batch
    with the next cell still fits; a batch holds at least one cell.  -> bounds"""
    cost, rule = [int(c) for c in cost], TokenCost(padded=padded)
    bounds, batch = [0], []
    for i, c in enumerate(cost):
        fits = rule.batch(np.array(batch + [c])) <= budget
        if batch and (not fits or len(batch) == (max_cells or NO_LIMIT)):
            bounds.append(i)
            batch = []
        batch.append(c)
    if batch:
        bounds.append(len(cost))
    return bounds


def longest_first(cost: np.ndarray) -> np.ndarray:
    """Order of cells costing ``cost`` [n], costliest first, ties kept in the given order (so a
    shuffled input keeps its shuffle among equal costs).  -> [n]"""
    cost = np.asarray(cost, np.int64)
    if len(cost) and int(cost.max()) - int(cost.min()) < 1 << 16:
        # 16-bit keys: numpy's stable sort of them is a radix sort, the same order ~10x faster
        return np.argsort((cost.max() - cost).astype(np.uint16), kind="stable")
    return np.argsort(-cost, kind="stable")


def group_by_length(cost: np.ndarray, budget: int, max_cells: int | None = None,
                   padded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Length grouping: cells costing ``cost`` [n] sorted costliest first (`longest_first`) and cut
    into batches (`cut_batches`).  -> (order [n], bounds [n_batches + 1]): batch ``j`` is cells
    ``order[bounds[j]:bounds[j+1]]``"""
    order = longest_first(cost)
    return order, cut_batches(np.asarray(cost)[order], budget, max_cells, padded)
