"""A configuration field: its default, its one-line help and what a resumed run may do with it.

A leaf module, so that both the model's shape (`pretrain.model.shape`) and the run configuration
(`pretrain.config`) declare their fields the same way without importing each other.
"""

from __future__ import annotations

from dataclasses import field

# What a resumed run may change against the checkpoint it resumes (``resume=`` of each field; checked
# by `resume_changes`, with the corpus's identity beside it in pretrain.train):
FIXED = "fixed"  # the checkpoint was trained with it (model shape, normalization, data order, objectives): refused
RESTORED = "restored"  # the checkpoint's optimizer state holds its own value, which DeepSpeed restores: refused
FREE = "free"  # applied from the resumed step on (run length, logging, checkpoints, loader workers): said


_UNSET = object()


def knob(text: str, default=None, factory=None, resume: str = FIXED, before=_UNSET):
    """``before``: what checkpoints written before the field existed were trained with, where that is
    not its default (`resume_changes` compares it; without it such checkpoints are not)."""
    metadata = {"help": text, "resume": resume} | ({} if before is _UNSET else {"before": before})
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
