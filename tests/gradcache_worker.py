"""Worker of tests/test_gradient_cache.py, run on 2 CPU ranks (``torchrun --nproc_per_node 2``).

For each ZeRO stage and chunk size it runs one `train_step` of the gradient-cached objective under
DeepSpeed (SGD, so that the update is the gradient) and, on rank 0, the same loss over the whole
global batch in one graph (`full_batch_loss`) in plain PyTorch; it writes the relative difference
of the two parameter updates to the JSON file named by ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import replace

import deepspeed
import torch
import torch.distributed as dist

from data_pipeline.loading.batch import PackedBatch
from pretrain.config import DeepSpeedConfig, ModelConfig, ObjectiveConfig
from pretrain.distributed import deepspeed_engine, host_all_reduce
from pretrain.model import CellModel
from pretrain.objectives import PretrainModule, StepCounts, full_batch_loss, train_step
from pretrain.objectives import step as step_module

VOCAB, N_BINS, LR = 80, 9, 0.5
# (cells per chunk, cells per rank): ranks must make equal numbers of micro-steps (the loader
# gives every rank the same number of batches); unequal cell counts test the gather
CASES = ((1, (6, 6)), (3, (6, 5)), (None, (6, 5)))


def rank_batch(rank: int, n_cells: int) -> PackedBatch:
    """Two views of each of this rank's cells, with masked positions and labels."""
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(2, 14, (2 * n_cells,), generator=g)
    genes = torch.cat([torch.randperm(VOCAB - 3, generator=g)[:n].sort().values + 3 for n in lengths.tolist()])
    cu = torch.zeros(2 * n_cells + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    values = torch.randint(1, N_BINS, (len(genes),), generator=g)
    mask = torch.rand(len(genes), generator=g) < 0.3
    targets = values.clone()
    values[mask] = N_BINS
    labels = torch.randint(-1, 3, (n_cells, 1), generator=g).repeat_interleave(2, 0)
    view = torch.arange(2 * n_cells) // 2
    return PackedBatch(genes, values, cu, int(lengths.max()), mask, targets, labels, view, view + 1000 * rank)


def build(objectives: ObjectiveConfig) -> PretrainModule:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_bins=N_BINS, dropout=0.1,
                         attention="favor", favor_features=16, contrastive_dim=16, label_classes=[3],
                         mvc_head=True)
    return PretrainModule(CellModel(config, seed=1), objectives)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in params])


def one_case(stage: int, cells_per_chunk: int | None, cells_per_rank: tuple[int, ...],
             objectives: ObjectiveConfig, replay: bool = True, bf16: bool = False,
             host_counts: bool = False) -> float | None:
    """Relative difference of the step's update from the full-batch one (rank 0; None elsewhere).
    ``replay=False``: the recompute does not replay the first pass's dropout (a negative control).
    ``bf16``: DeepSpeed's bf16 mode (the reference stays fp32). ``host_counts``: the step gets its
    counts as the trainer gives them (`StepCounts` of the CPU chunks, summed on the host group)."""
    rank = dist.get_rank()
    batches = [rank_batch(r, n) for r, n in enumerate(cells_per_rank)]
    rank_chunks = [[b] if cells_per_chunk is None else b.split(cells_per_chunk) for b in batches]
    if objectives.joins_chunks:  # train_step joins the chunks: one dropout draw over all
        rank_chunks = [[PackedBatch.concat(chunks)] for chunks in rank_chunks]
    n_chunks = len(rank_chunks[rank])
    module = build(objectives)
    before = flat(module.parameters())
    # the trainer's engine: its ZeRO and precision settings (under bf16, fp32 sums of the chunks' gradients)
    ds = DeepSpeedConfig(zero_stage=stage, bf16=bf16, gradient_clipping=0.0)
    engine, _ = deepspeed_engine(module, torch.optim.SGD(module.parameters(), lr=LR), ds, torch.device("cpu"),
                                 micro_steps=n_chunks)
    if host_counts:
        local = StepCounts.of(rank_chunks[rank])
        counts = StepCounts(*host_all_reduce(local.as_list()))
        train_step(engine, rank_chunks[rank], objectives, step_seed=7, counts=counts)
    elif replay:
        train_step(engine, rank_chunks[rank], objectives, step_seed=7)
    else:
        seeded, step_module.seeded = step_module.seeded, lambda seed: contextlib.nullcontext()
        try:
            train_step(engine, rank_chunks[rank], objectives, step_seed=7)
        finally:
            step_module.seeded = seeded
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        after = flat(params)
    if rank != 0:
        return None
    reference = build(objectives)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    full_batch_loss(reference, rank_chunks, objectives, step_seed=7).backward()
    optimizer.step()
    expected = flat(reference.parameters()) - before
    return float((after - before - expected).norm() / expected.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    objectives = ObjectiveConfig(mlm_weight=1.0, contrastive_weight=0.5, label_weight=0.3, temperature=0.1,
                                 mvc_weight=0.4)
    results = []
    for stage in args.stages:
        for cells, cells_per_rank in CASES:
            error = one_case(stage, cells, cells_per_rank, objectives)
            results.append({"stage": stage, "cells_per_chunk": cells or "full", "cells_per_rank": cells_per_rank,
                            "relative_error": error})
    uncached = replace(objectives, gradient_cache=False)
    for stage in args.stages:  # the same loss without the cache: one graph per rank, GAS 1
        error = one_case(stage, 3, CASES[1][1], uncached)
        results.append({"stage": stage, "cells_per_chunk": "uncached", "cells_per_rank": CASES[1][1],
                        "relative_error": error})
    control = one_case(args.stages[-1], 3, CASES[1][1], objectives, replay=False)
    bf16 = {stage: one_case(stage, 3, CASES[1][1], objectives, bf16=True) for stage in args.stages}
    host_counts = one_case(args.stages[-1], 3, CASES[1][1], objectives, host_counts=True)
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"cases": results, "without_replay": control, "bf16": bf16, "host_counts": host_counts},
                      fh, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
