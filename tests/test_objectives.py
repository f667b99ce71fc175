"""The pretraining losses against plain per-element definitions, on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.loading.batch import PackedBatch
from pretrain.config import ModelConfig, ObjectiveConfig
from pretrain.model import CellModel
from pretrain.objectives import PretrainModule, info_nce, label_loss_sum, mlm_loss_sum, view_pairs
from pretrain.objectives.losses import info_nce_blocked
from pretrain.objectives.step import chunk_seed, gather_rows, seeded


def naive_info_nce(a, b, scale):
    """Symmetric InfoNCE written per cell, in float64."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    n, total = len(a), 0.0
    for i in range(n):
        row = [math.exp(scale * float(a[i] @ b[j])) for j in range(n)]
        col = [math.exp(scale * float(a[j] @ b[i])) for j in range(n)]
        pos = scale * float(a[i] @ b[i])
        total += (math.log(sum(row)) - pos) + (math.log(sum(col)) - pos)
    return total / (2 * n)


@pytest.mark.parametrize("seed", range(3))
def test_info_nce_matches_per_cell_definition(seed):
    g = torch.Generator().manual_seed(seed)
    n, p = 7, 5
    a, b = torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(n, p, generator=g, dtype=torch.float64)
    scale = torch.tensor([1 / 0.2], dtype=torch.float64)
    assert float(info_nce(a, b, scale)) == pytest.approx(naive_info_nce(a, b, 5.0), rel=1e-6)


@pytest.mark.parametrize("n, block", [(13, 4), (10, 10), (300, 64), (1, 4)])
def test_blocked_info_nce_equals_the_full_one_with_gradients(n, block):
    """The training step's InfoNCE (rows in blocks, no N x N matrix) = `info_nce`, value and
    gradients of both views and the temperature, on fresh random inputs (fp32)."""
    g = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, 6, generator=g).requires_grad_() for _ in range(2))
    scale = torch.tensor([1 / 0.07], requires_grad=True)
    full = info_nce(a, b, scale)
    blocked = info_nce_blocked(a, b, scale, block_rows=block)
    assert blocked.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-6)
    # each gradient sums terms of size ~scale (the logits' slope), which fp32 rounds at scale * eps:
    # all that a gradient which cancels to zero (n = 1) can show, and a CPU's matmul kernel decides
    floor = 8 * torch.finfo(torch.float32).eps * scale.item()
    for x, y in zip(torch.autograd.grad(full, (a, b, scale)), torch.autograd.grad(blocked, (a, b, scale))):
        assert (x - y).abs().max() <= 1e-6 * max(1.0, x.abs().max().item()) + floor


def test_info_nce_prefers_matched_views_and_gradients_reach_temperature():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g)
    scale = torch.tensor([10.0], requires_grad=True)
    matched = info_nce(a, a + 0.01 * torch.randn(16, 8, generator=g), scale)
    shuffled = info_nce(a, a[torch.randperm(16, generator=g)], scale)
    assert matched < 0.1 < shuffled
    matched.backward()
    assert scale.grad is not None and scale.grad.item() < 0  # sharper logits lower a matched loss


def test_view_pairs_finds_both_views_and_refuses_single_views():
    first, second = view_pairs(torch.tensor([0, 0, 2, 1, 2, 1]))
    assert first.tolist() == [0, 3, 2] and second.tolist() == [1, 5, 4]
    with pytest.raises(ValueError, match="views=Views"):
        view_pairs(torch.tensor([0, 1, 2]))


def _batch(values, mask, targets, labels):
    t, b = len(values), labels.shape[0]
    cu = torch.tensor([0, t // 2, t], dtype=torch.int32) if b == 2 else torch.tensor([0, t], dtype=torch.int32)
    return PackedBatch(torch.arange(3, 3 + t), values, cu, t, mask, targets, labels, torch.arange(b), torch.arange(b))


def test_mlm_losses_per_mode_are_sums_over_masked_positions():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([True, False, True, True, False, False])
    targets = torch.randint(1, 9, (6,), generator=g)
    batch = _batch(targets.clone(), mask, targets, torch.zeros(2, 0, dtype=torch.long))
    logits = torch.randn(3, 9, generator=g)
    total, count = mlm_loss_sum(logits, batch, regress=False)
    expected = sum(-torch.log_softmax(logits[i], 0)[t] for i, t in enumerate(targets[mask]))
    assert count == 3 and total.detach().item() == pytest.approx(expected.item(), rel=1e-6)
    values = torch.rand(6, generator=g)
    batch = _batch(values, mask, values, torch.zeros(2, 0, dtype=torch.long))
    prediction = torch.rand(3, generator=g)
    total, _ = mlm_loss_sum(prediction, batch, regress=True)
    assert float(total) == pytest.approx(float(((prediction - values[mask]) ** 2).sum()), rel=1e-6)


def test_label_loss_skips_unknown_labels_but_keeps_the_graph():
    logits = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 2, requires_grad=True)]
    labels = torch.tensor([[0, -1], [-1, -1], [2, 1], [1, -1]])
    total, count = label_loss_sum(logits, labels)
    expected = sum(-torch.log_softmax(logits[0][i], 0)[labels[i, 0]] for i in (0, 2, 3))
    expected = expected - torch.log_softmax(logits[1][2], 0)[1]
    assert count == 4 and total.detach().item() == pytest.approx(expected.item(), rel=1e-6)
    none, n = label_loss_sum([logits[1]], torch.full((4, 1), -1))
    none.backward()  # no known label: zero, yet a function of the head (ZeRO's buckets must match)
    assert n == 0 and float(none.detach()) == 0 and logits[1].grad is not None


def test_gather_and_seeded_replay_in_one_process():
    x = torch.randn(3, 4)
    rows, offset = gather_rows(x)
    assert offset == 0 and torch.equal(rows, x)
    torch.manual_seed(0)
    expected = torch.rand(2)  # the outer stream without any replay in between
    torch.manual_seed(0)
    with seeded(chunk_seed(5, 0, 1)):
        first = torch.rand(4)
    after = torch.rand(1)
    with seeded(chunk_seed(5, 0, 1)):
        again = torch.rand(4)
    with seeded(chunk_seed(5, 1, 1)):
        other = torch.rand(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # the outer RNG moves on, untouched by the replays
    assert torch.equal(torch.cat([after, torch.rand(1)]), expected)


def test_temperature_is_clamped_and_can_be_fixed():
    model = CellModel(ModelConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, attention="sdpa"))
    learn = PretrainModule(model, ObjectiveConfig(temperature=0.07))
    fixed = PretrainModule(model, ObjectiveConfig(temperature=0.07, learnable_temperature=False))
    assert learn.log_logit_scale.requires_grad and not fixed.log_logit_scale.requires_grad
    with torch.no_grad():
        learn.log_logit_scale.fill_(20.0)
    batch = _batch(torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                   torch.zeros(2, 0, dtype=torch.long))
    assert float(learn(batch)[1].detach()) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="temperature"):
        PretrainModule(model, ObjectiveConfig(temperature=0.001))


@pytest.mark.parametrize("log_scale", [math.log(100) + 0.3, -0.3])
def test_a_temperature_past_its_bound_can_come_back(log_scale):
    """Outside [log 1, log 100] the clamped scale keeps the gradient that leads back into the range
    and drops the one that leads further out; inside, it is the plain gradient."""
    model = CellModel(ModelConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, attention="sdpa"))
    learn = PretrainModule(model, ObjectiveConfig(temperature=0.07))
    batch = _batch(torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                   torch.zeros(2, 0, dtype=torch.long))
    inward = 1.0 if log_scale > 0 else -1.0  # the sign of d loss / d scale whose descent step moves the log-scale inward
    for sign, kept in ((inward, True), (-inward, False)):
        with torch.no_grad():
            learn.log_logit_scale.fill_(log_scale)
        learn.zero_grad()
        scale = learn(batch)[1]
        (sign * scale).sum().backward()
        grad = float(learn.log_logit_scale.grad)
        assert (grad != 0) == kept and (not kept or math.copysign(1, grad) == sign)
    with torch.no_grad():
        learn.log_logit_scale.fill_(math.log(10.0))
    learn.zero_grad()
    (learn(batch)[1] * 3).sum().backward()
    assert float(learn.log_logit_scale.grad) == pytest.approx(30.0)  # d(3 e^s)/ds at e^s = 10


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("attention", ["sdpa", "favor", "varlen"])
def test_a_seeded_replay_is_the_first_pass_exactly(device, attention):
    """The gradient cache embeds a chunk without a graph, then replays it with one under the same
    seed for the backward: with dropout on (and bf16 on a GPU, where a kernel could be chosen by
    whether a graph is kept) the two passes must give the same embeddings bit for bit, or the
    cached gradients belong to other embeddings."""
    from tests.model_helpers import random_batch, small_config

    if attention == "varlen" and device == "cpu":
        pytest.skip("varlen runs on CUDA only")
    model = CellModel(small_config(attention=attention, dropout=0.1, d_model=32, favor_features=32)).to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(dtype).train()
    batch = random_batch([40, 7, 23, 55], seed=5).to(torch.device(device))
    passes = []
    for seed, graph in ((11, False), (11, True), (12, True)):  # the cache's first pass keeps no graph
        with seeded(seed), torch.set_grad_enabled(graph):
            out = model(batch)
        passes.append(torch.cat([out.contrastive.float(), out.cells.float()], dim=1).detach())
    assert torch.equal(passes[0], passes[1])
    assert not torch.equal(passes[0], passes[2])  # the seed does reach the dropout
