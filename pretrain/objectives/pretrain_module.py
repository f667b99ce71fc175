"""`PretrainModule`: what the DeepSpeed engine wraps: the cell model plus the objectives' own
parameter (the InfoNCE temperature), so that one forward call yields everything a loss needs
and ZeRO-3 gathers every parameter inside it."""

from __future__ import annotations

import math

import torch
from torch import nn

from data_pipeline.loading.batch import PackedBatch

from ..config import MIN_TEMPERATURE, ObjectiveConfig
from ..model.cell_model import CellModel, ModelOutput


class PretrainModule(nn.Module):
    def __init__(self, model: CellModel, objectives: ObjectiveConfig):
        super().__init__()
        if objectives.temperature < MIN_TEMPERATURE:
            raise ValueError(f"objectives.temperature={objectives.temperature} is below {MIN_TEMPERATURE}")
        self.model = model
        log_scale = torch.tensor([math.log(1.0 / objectives.temperature)])  # [1]: DeepSpeed cannot broadcast 0-d
        if objectives.learnable_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def forward(self, batch: PackedBatch, contrastive_only: bool = False) -> tuple[ModelOutput, torch.Tensor]:
        """(model outputs, logit scale [1] = 1 / temperature, clamped to [1, 1 / MIN_TEMPERATURE]);
        ``contrastive_only``: `CellModel.forward`'s."""
        scale = _ClampBack.apply(self.log_logit_scale.float(), 0.0, math.log(1.0 / MIN_TEMPERATURE)).exp()
        return self.model(batch, contrastive_only), scale


class _ClampBack(torch.autograd.Function):
    """``x.clamp(low, high)`` whose gradient is kept where a descent step would bring ``x`` back
    towards the range. A plain clamp's gradient is zero outside it: a log-scale that overshot the
    bound (Adam's momentum) would stay there for good, the temperature frozen at its floor even
    when the loss wants it higher. Clamping the parameter in place after the step (CLIP's way)
    would not reach ZeRO's fp32 master copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        outward = ((x > ctx.high) & (grad < 0)) | ((x < ctx.low) & (grad > 0))  # descent moves x by -grad
        return grad.masked_fill(outward, 0.0), None, None
