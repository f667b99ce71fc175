"""The three pretraining losses, as sums plus counts so that a step can normalize them over a
batch split into chunks, and over ranks, without the split changing the result.

- masked expression modelling: cross-entropy over bins (bins), over gene tokens (rank: the
  masked gene is predicted), or squared error of the value (continuous, or bins with
  ``model.bin_loss=mse``: scGPT's masked_mse_loss on the bin index), per masked position; the
  MVC / GEPC loss is the same squared error of its predictions (`ModelOutput.mvc`);
- cell labels: cross-entropy per label column, over the sequences whose label is known (>= 0);
- contrastive: symmetric InfoNCE between the two views of each cell (`info_nce`), every other
  cell of the (global) batch a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.loading.batch import PackedBatch


def mlm_loss_sum(prediction: torch.Tensor, batch: PackedBatch, regress: bool) -> tuple[torch.Tensor, int]:
    """(sum of the per-position loss, number of masked positions).  prediction: [n_masked, C]
    logits, or [n_masked] values (``regress``: `ModelConfig.mlm_regresses`, or the MVC output)."""
    targets = batch.mlm_targets[batch.masked_index()]
    if regress:
        loss = F.mse_loss(prediction.float(), targets.float(), reduction="sum")
    else:
        loss = F.cross_entropy(prediction.float(), targets.long(), reduction="sum")
    return loss, int(targets.shape[0])


def label_loss_sum(logits: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies over known labels, number of known labels as a 0-d tensor, so that
    the training step, which counts labels itself, does not wait for the device).  logits: per
    label column [B, n_classes]; labels [B, n_columns] (-1 unknown)."""
    total = labels.new_zeros((), dtype=torch.float32)
    count = labels.new_zeros(())
    for column, column_logits in enumerate(logits):
        target = labels[:, column]
        known = target >= 0
        # unknown labels ignored rather than indexed out: a boolean index waits for the device. The sum
        # over no known labels is still a function of the head, so that every rank's backward reaches
        # the same parameters (ZeRO reduces gradients in buckets that must match)
        total = total + F.cross_entropy(column_logits.float(), torch.where(known, target, -1), ignore_index=-1,
                                        reduction="sum")
        count = count + known.sum()
    return total, count


def view_pairs(view_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sequences of each cell: (first [n], second [n]) sequence indices, cells in order of
    ``view_index``.  view_index [B]: every value must appear exactly twice."""
    order = torch.argsort(view_index, stable=True)
    if view_index.numel() % 2 or not torch.equal(view_index[order][0::2], view_index[order][1::2]):
        raise ValueError("contrastive training needs two views of every cell in a batch: build the loader with "
                         "views=Views(...) (or set objectives.contrastive_weight=0)")
    return order[0::2], order[1::2]


def info_nce(first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's): cell i's two views are the positive pair, every other cell's
    views the negatives.  first, second [N, p] (normalized here); logit_scale: 1 / temperature."""
    a = F.normalize(first.float(), dim=-1)
    b = F.normalize(second.float(), dim=-1)
    logits = logit_scale.float() * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class _BlockedInfoNCE(torch.autograd.Function):
    """`info_nce` of normalized ``a``, ``b`` [N, p], computed over blocks of rows, so that memory
    is O(block x N) instead of the N x N logits (16 GiB each at N = 65,536 in fp32)."""

    @staticmethod
    def forward(ctx, a, b, scale, block):
        n = a.shape[0]
        row_lse = torch.empty(n, dtype=a.dtype, device=a.device)
        col_lse = torch.full((n,), -torch.inf, dtype=a.dtype, device=a.device)
        for i in range(0, n, block):  # one pass over the logits: the column sums accumulate across row blocks
            logits = scale * a[i : i + block] @ b.T  # [block, N]
            row_lse[i : i + block] = torch.logsumexp(logits, dim=1)
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
        positives = scale * (a * b).sum(1)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.block = block
        return ((row_lse - positives).sum() + (col_lse - positives).sum()) / (2 * n)

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        n, block = a.shape[0], ctx.block
        grad_a, grad_b = torch.empty_like(a), torch.zeros_like(b)
        grad_scale = torch.zeros_like(scale)
        for i in range(0, n, block):
            rows = slice(i, min(n, i + block))
            # at most three [block, N] tensors live at once (in place where it can be): the block's
            # memory, not the batch's, bounds the step
            logits = (a[rows] @ b.T).mul_(scale)  # [block, N]
            # d loss / d logits: the row and column softmaxes, minus the positives, over 2N
            g = torch.exp(logits - row_lse[rows, None])
            g.add_(torch.exp(logits - col_lse[None, :])).div_(2 * n)
            g[torch.arange(rows.stop - i, device=a.device), torch.arange(i, rows.stop, device=a.device)] -= 1.0 / n
            grad_scale += torch.dot(g.flatten(), logits.flatten()) / scale
            del logits
            grad_a[rows] = (g @ b).mul_(scale)
            grad_b += (g.T @ a[rows]).mul_(scale)
            del g
        return grad * grad_a, grad * grad_b, grad * grad_scale, None


def info_nce_blocked(first: torch.Tensor, second: torch.Tensor, logit_scale: torch.Tensor,
                     block_rows: int = 4096) -> torch.Tensor:
    """`info_nce` with memory O(block_rows x N): what the training step uses, so that the
    global contrastive batch is limited by embeddings, not by their N x N similarities."""
    a = F.normalize(first.float(), dim=-1)
    b = F.normalize(second.float(), dim=-1)
    return _BlockedInfoNCE.apply(a, b, logit_scale.float(), block_rows)
