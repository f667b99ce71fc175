"""Where fine-tuning's optimizer steps and checkpoints happen: one process with a torch optimizer
(`PlainTrainer`, ``OUT/checkpoint.pt``), or data-parallel ranks under a DeepSpeed engine
(`DeepSpeedTrainer`, pretraining's checkpoints: ``OUT/checkpoints/step-NNNNNNNN`` with their
``COMPLETE`` markers, `pretrain.checkpoint`). Both run the same `Trainer.step`.

Data parallelism: every rank holds every cell and draws the same shuffled order; each global batch
of ``batch_size`` cells is cut into one contiguous share per rank (`np.array_split`). A rank's loss
is its share's weighted cross-entropy divided by the global batch's total class weight, times the
world size: DeepSpeed averages gradients over ranks, so the update is the one the whole batch
gives in one process (up to float summation order) where no dropout runs: each rank draws its
own dropout masks for its share, so with ``dropout`` > 0 (the head's default 0.1) a run on N ranks
is another draw of the same recipe, not the one-process run's weights. Embedding every cell (head mode's fixed
embeddings, the validation each epoch in full mode) is shared the same way and gathered, so every
rank scores the same validation probabilities and takes the same early-stopping decision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINTS_KEPT = 2


class Classifier(nn.Module):
    """What trains: the head, and in full mode the encoder under it (``model``; None in head mode,
    where the inputs are fixed cell embeddings). ``inputs``: embeddings [B, cell_dim], or the
    packed batch ``(gene_ids, values, cu_seqlens, max_seqlen, read_depth)`` of `CellModel.encode`."""

    def __init__(self, head: nn.Module, model: nn.Module | None):
        super().__init__()
        self.head, self.model = head, model

    def forward(self, inputs) -> torch.Tensor:
        if self.model is None:
            cells = inputs
        else:
            _, cells = self.model.encode(*inputs)
        return self.head(cells.to(next(self.head.parameters()).dtype))


class Trainer:
    """A rank's part of the run: ``rank`` of ``world``; `step` on a global batch; `share`/`gather`
    for work split over ranks; `save`/`load` of the run's checkpoint."""

    rank, world = 0, 1

    def __init__(self, module: Classifier, groups: list[dict], config, device):
        self.module, self.config, self.device = module, config, device
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def step(self, cells, rows: np.ndarray, y: torch.Tensor, weight: torch.Tensor | None) -> float:
        """One optimizer step on the global batch ``rows`` (this rank computes its share); returns
        this rank's part of the batch's loss (the parts sum to the batch's weighted mean loss)."""
        share, scale = self.share_of(rows), 1.0
        if len(share) == 0:  # a last batch smaller than the world: this rank still joins the all-reduce
            share, scale = rows[:1], 0.0
        index = torch.from_numpy(rows).to(self.device)
        total = float(weight[y[index]].sum()) if weight is not None else float(len(rows))
        logits = self.forward(cells.batch(share))
        per_cell = F.cross_entropy(logits.float(), y[torch.from_numpy(share).to(self.device)], weight=weight,
                                   reduction="none")  # weight[y] x cross-entropy
        loss = per_cell.sum() * (scale * self.world / total)
        self.backward(loss)
        return float(per_cell.detach().sum()) * scale / total

    def share_of(self, rows: np.ndarray) -> np.ndarray:
        return np.array_split(rows, self.world)[self.rank]

    def gather(self, part: np.ndarray) -> np.ndarray:
        """The ranks' parts (`share_of` of the same rows), concatenated in rank order."""
        return part

    def sum(self, value: float) -> float:
        return value

    def forward(self, inputs) -> torch.Tensor:
        return self.module(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        clip = self.config.deepspeed.gradient_clipping
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def barrier(self) -> None:
        pass


class PlainTrainer(Trainer):
    """One process, a torch AdamW; the run's state in ``OUT/checkpoint.pt`` (written atomically)."""

    def load(self, out: Path, check) -> dict | None:
        """The saved run state (its weights and optimizer restored), or None for a fresh start.
        ``check(saved)``: refuses a run of other settings or data."""
        if (out / "checkpoints").is_dir():
            raise ValueError(f"{out} holds a fine-tuning run made under a launcher (checkpoints/): resume it the "
                             "same way (deepspeed launch/finetune.py ... or torchrun ...), or pass another --out")
        path = out / CHECKPOINT_FILE
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        check(saved)
        self.module.head.load_state_dict(saved["head"])
        if self.module.model is not None:
            self.module.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return saved

    def save(self, out: Path, state: dict, step: int) -> None:
        from data_pipeline.conversion.fsio import atomic_write_with

        model = self.module.model
        state = {**state, "head": self.module.head.state_dict(),
                 "model": model.state_dict() if model is not None else None, "optimizer": self.optimizer.state_dict()}
        atomic_write_with(out / CHECKPOINT_FILE, lambda fh: torch.save(state, fh))


class DeepSpeedTrainer(Trainer):
    """A rank of a launched job: the module in a DeepSpeed engine built from the config's
    ``deepspeed`` keys (`pretrain.distributed.deepspeed_engine`: ZeRO stage, bf16, clipping), the
    client optimizer's parameter groups (the encoder's lower learning rate) kept; pretraining's
    checkpoints, the run state in their client state, each rank's RNG state among them."""

    def __init__(self, module: Classifier, groups: list[dict], config, device, rank: int, world: int):
        from ..distributed import deepspeed_engine

        super().__init__(module, groups, config, device)
        self.rank, self.world = rank, world
        self.engine, self.bf16 = deepspeed_engine(module, self.optimizer, config.deepspeed, device)

    def forward(self, inputs) -> torch.Tensor:
        return self.engine(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def gather(self, part: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)

    def sum(self, value: float) -> float:
        from ..distributed import host_all_reduce

        return host_all_reduce([value])[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def load(self, out: Path, check) -> dict | None:
        """As `PlainTrainer.load`, from the newest intact complete checkpoint (`--resume auto` of
        pretraining: `pretrain.checkpoint.agreed_resume_point`)."""
        from .. import checkpoint

        if (out / CHECKPOINT_FILE).exists():  # every rank sees it (the run folder is shared, as for checkpoints)
            raise ValueError(f"{out} holds a single-process fine-tuning run ({CHECKPOINT_FILE}): resume it with "
                             "plain `python launch/finetune.py ...`, or pass another --out")
        found = checkpoint.agreed_resume_point(out, "auto", self.rank,
                                               lambda found: check(checkpoint.read_marker(found)))
        if found is None:
            return None
        saved = checkpoint.load(self.engine, found)["finetune"]
        if saved["world"] != self.world:
            raise ValueError(f"{found} was saved by {saved['world']} ranks, and each rank's random state (dropout) "
                             f"is restored: resume with {saved['world']} ranks, or pass another --out")
        return {**saved, "rng": saved["rng"][self.rank]}

    def save(self, out: Path, state: dict, step: int) -> None:
        import torch.distributed as dist

        from .. import checkpoint

        rng = [None] * self.world
        dist.all_gather_object(rng, state["rng"])
        record = {k: state[k] for k in ("format", "config", "identity", "classes")}
        checkpoint.save(self.engine, out, step, {"finetune": {**state, "rng": rng, "world": self.world}},
                        CHECKPOINTS_KEPT, record)


def make_trainer(module: Classifier, groups: list[dict], config, device) -> Trainer:
    """A `DeepSpeedTrainer` in a launched process (RANK set), else a `PlainTrainer`; a DeepSpeed-only
    setting without a launcher is refused."""
    from ..distributed import launched

    if not launched():
        if config.deepspeed.bf16:
            raise ValueError("--deepspeed.bf16 needs the DeepSpeed engine: launch with `deepspeed launch/finetune.py "
                             "...` (or torchrun), or leave it out")
        return PlainTrainer(module, groups, config, device)
    from ..distributed import init_distributed

    rank, world, _ = init_distributed()  # a no-op where `finetune` did it already
    return DeepSpeedTrainer(module, groups, config, device, rank, world)
