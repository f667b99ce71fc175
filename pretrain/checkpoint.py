"""Checkpoints of a run: DeepSpeed's files (model, optimizer, ZeRO shards, lr schedule) plus our
client state (step, loader position, metrics history), in ``RUN/checkpoints/step-NNNNNNNN``.

A checkpoint is complete once every rank has written its part and rank 0 has written the
``COMPLETE`` marker after a barrier; `latest_complete` ignores any other folder, so a run killed
while saving resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from data_pipeline.fsio import atomic_write_with

MARKER = "COMPLETE"


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def save(engine, run_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    folder = Path(run_dir) / "checkpoints"
    tag = tag_of(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_with(folder / tag / MARKER, lambda fh: fh.write(json.dumps({"step": step}).encode()))
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder / tag


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MARKER).exists())


def latest_complete(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load(engine, checkpoint: Path) -> dict:
    """Restore engine state from ``checkpoint``; returns the client state."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MARKER).exists():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker): "
                         "the run was killed while writing it; resume from an earlier one")
    _, client_state = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if client_state is None:
        raise ValueError(f"{checkpoint}: DeepSpeed could not load it")
    return client_state
