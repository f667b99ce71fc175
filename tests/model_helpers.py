"""Small random `PackedBatch`es and model configs shared by the model tests (CPU, fresh data)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from data_pipeline.loading.batch import PackedBatch
from pretrain.config import ModelConfig

N_SPECIAL = 3  # <pad>=0, <cls>=1, <mask>=2: gene tokens are 3 ... vocab_size - 1
MASK_TOKEN = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only cost (badly so on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    """Model init draws from the global generator: the same weights whatever ran before."""
    torch.manual_seed(0)


@dataclass
class Cell:
    """One sequence of a batch: gene_ids, values, mlm_mask, mlm_targets [L]; labels [n_cols]."""

    gene_ids: torch.Tensor
    values: torch.Tensor
    mlm_mask: torch.Tensor
    mlm_targets: torch.Tensor
    labels: torch.Tensor
    cell_index: int
    read_depth: tuple[float, float] = (2000.0, 1000.0)  # T, S: for models with depth tokens


def small_config(**overrides) -> ModelConfig:
    """A tiny model (d_model 16, 2 layers, 2 heads) with two label columns, dropout off."""
    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, dropout=0.0, n_bins=7, max_rank=64,
                favor_features=32, contrastive_dim=8, label_classes=[3, 2])
    base.update(overrides)
    return ModelConfig(**base)


def random_cell(length: int, g: torch.Generator, vocab_size: int = 64, value_mode: str = "bins", n_bins: int = 7,
                mask_ratio: float = 0.3, label_classes=(3, 2), cell_index: int = 0) -> Cell:
    """A cell of ``length`` distinct gene tokens (>= N_SPECIAL), at least one of them masked the
    way the loader masks: bins -> the mask bin ``n_bins``; continuous -> -1; rank -> the gene
    token becomes <mask> (values are the positions 0..L-1, genes in rank order)."""
    genes = torch.randperm(vocab_size - N_SPECIAL, generator=g)[:length] + N_SPECIAL
    mask = torch.rand(length, generator=g) < mask_ratio
    mask[torch.randint(length, (1,), generator=g)] = True
    if value_mode == "rank":
        values = torch.arange(length)
        targets = genes.clone()
        genes = torch.where(mask, torch.full_like(genes, MASK_TOKEN), genes)
    else:
        genes = genes.sort().values
        if value_mode == "bins":
            targets = torch.randint(1, n_bins, (length,), generator=g)
            values = torch.where(mask, torch.full_like(targets, n_bins), targets)
        else:
            targets = torch.rand(length, generator=g) * 4
            values = torch.where(mask, torch.full_like(targets, -1.0), targets)
    labels = torch.tensor([int(torch.randint(-1, n, (1,), generator=g)) for n in label_classes], dtype=torch.int64)
    return Cell(genes.long(), values, mask, targets, labels, cell_index)


def pack(cells: list[Cell], views_per_cell: int = 1) -> PackedBatch:
    """Concatenate sequences into a `PackedBatch` (consecutive groups of ``views_per_cell``
    sequences are views of one cell)."""
    lengths = [len(c.gene_ids) for c in cells]
    cu = torch.zeros(len(cells) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return PackedBatch(
        gene_ids=torch.cat([c.gene_ids for c in cells]), values=torch.cat([c.values for c in cells]),
        cu_seqlens=cu, max_seqlen=max(lengths), mlm_mask=torch.cat([c.mlm_mask for c in cells]),
        mlm_targets=torch.cat([c.mlm_targets for c in cells]), labels=torch.stack([c.labels for c in cells]),
        view_index=torch.arange(len(cells)) // views_per_cell,
        cell_index=torch.tensor([c.cell_index for c in cells], dtype=torch.int64),
        read_depth=torch.tensor([c.read_depth for c in cells], dtype=torch.float32))


def random_cells(lengths, seed: int = 0, **kw) -> list[Cell]:
    g = torch.Generator().manual_seed(seed)
    return [random_cell(n, g, cell_index=1000 + i, **kw) for i, n in enumerate(lengths)]


def random_batch(lengths, seed: int = 0, views_per_cell: int = 1, **kw) -> PackedBatch:
    return pack(random_cells(lengths, seed, **kw), views_per_cell)


def cells_of(batch: PackedBatch) -> list[Cell]:
    """The sequences of a batch, as `Cell`s (the inverse of `pack`)."""
    cu = batch.cu_seqlens.tolist()
    return [Cell(batch.gene_ids[a:b], batch.values[a:b], batch.mlm_mask[a:b], batch.mlm_targets[a:b],
                 batch.labels[i], int(batch.cell_index[i])) for i, (a, b) in enumerate(zip(cu[:-1], cu[1:]))]


def mlm_rows_per_cell(batch: PackedBatch) -> list[slice]:
    """Which rows of ``ModelOutput.mlm`` (masked positions in token order) belong to each sequence."""
    cu = batch.cu_seqlens.tolist()
    counts = [int(batch.mlm_mask[a:b].sum()) for a, b in zip(cu[:-1], cu[1:])]
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def generative_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         known: torch.Tensor) -> torch.Tensor:
    """scGPT's generative attention by its definition, one sequence at a time with an explicit mask
    matrix: softmax(q k^T / sqrt(D)) where M[i, j] = known[j] or i == j.  q, k, v [T, H, D] (float64
    for exactness), cu_seqlens [B+1], known [T] bool -> [T, H, D]"""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        allowed = known[a:b][None, :] | torch.eye(b - a, dtype=torch.bool, device=q.device)  # [L, L]
        scores = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) / q.shape[-1] ** 0.5
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[a:b] = torch.einsum("hij,jhd->ihd", weights, v[a:b])
    return out
