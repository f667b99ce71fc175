"""Pretraining objectives: masked expression, cell labels and divide-and-conquer contrastive."""

from .losses import info_nce, label_loss_sum, mlm_loss_sum, view_pairs
from .pretrain_module import PretrainModule
from .step import StepCounts, StepResult, full_batch_loss, step_seed, train_step

__all__ = ["PretrainModule", "StepCounts", "StepResult", "full_batch_loss", "info_nce", "label_loss_sum",
           "mlm_loss_sum", "step_seed", "train_step", "view_pairs"]
