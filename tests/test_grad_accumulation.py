"""The gradient cache's chunks are a step's micro-steps, whose gradients DeepSpeed sums. Under bf16
it sums them in bf16 unless told otherwise, about 1 % off at 64 chunks; `deepspeed_engine` has
ZeRO 2 and 3 sum them in fp32, and says so where it does not (ZeRO 1)."""

from __future__ import annotations

import logging

import pytest
import torch

CHUNKS = 64
SHAPES = ((31, 17), (5,), (64, 3))  # odd sizes: partitions split parameters, buckets flush mid-backward


class _Weights(torch.nn.Module):
    """outputs w_i * g_i: a micro-step's loss sum_i sum(w_i * g_i), built outside the engine as
    `train_step` builds its loss, has gradient g_i, so the step's sum is known."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES])

    def forward(self, *g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(w * x for w, x in zip(self.w, g))


def _world_of_one(monkeypatch) -> None:
    import deepspeed
    import torch.distributed as dist

    from pretrain.distributed import _free_port

    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    if not dist.is_initialized():  # a world of one, left initialized: DeepSpeed keeps its groups
        deepspeed.init_distributed(dist_backend="gloo")


def test_the_engine_does_not_synchronize_the_device_each_micro_step(monkeypatch):
    """DeepSpeed's throughput timer (on by default) synchronizes the device at every forward and
    optimizer step, idling the GPU while the host prepares the next one; the trainer measures its
    own throughput, so the engine runs with the timer off."""
    from deepspeed.accelerator import get_accelerator

    from pretrain.config import DeepSpeedConfig
    from pretrain.distributed import deepspeed_engine

    _world_of_one(monkeypatch)
    syncs = []
    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: syncs.append(1))
    module = _Weights()
    ds = DeepSpeedConfig(zero_stage=2, bf16=False, gradient_clipping=0.0)
    engine, _ = deepspeed_engine(module, torch.optim.SGD(module.parameters(), lr=0.1), ds, torch.device("cpu"),
                                 micro_steps=3)
    try:
        for _ in range(5 * 3):
            loss = sum(out.sum() for out in engine(*(torch.ones(shape) for shape in SHAPES)))
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
        assert not syncs  # (destroy synchronizes once, at the end)
    finally:
        engine.destroy()


def _summed_error(stage: int, overrides: dict, monkeypatch) -> float:
    """Relative error of one bf16 step's summed gradient (SGD, lr 1: the fp32 master weights become
    minus the sum) over `CHUNKS` micro-steps whose gradients are exact in bf16."""
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.config import DeepSpeedConfig
    from pretrain.distributed import deepspeed_engine

    _world_of_one(monkeypatch)
    module = _Weights()
    small_buckets = {"zero_optimization": {"reduce_bucket_size": 100, "allgather_bucket_size": 100}}
    ds = DeepSpeedConfig(zero_stage=stage, bf16=True, gradient_clipping=0.0, overrides={**small_buckets, **overrides})
    engine, bf16 = deepspeed_engine(module, torch.optim.SGD(module.parameters(), lr=1.0), ds, torch.device("cpu"),
                                    micro_steps=CHUNKS)
    try:
        assert bf16
        generator = torch.Generator().manual_seed(stage)
        grads = [[torch.randn(shape, generator=generator).bfloat16() for shape in SHAPES] for _ in range(CHUNKS)]
        for g in grads:  # as `train_step` runs its chunks
            loss = sum(out.float().sum() for out in engine(*g))
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
        exact = torch.cat([-sum(g[i].double() for g in grads).flatten() for i in range(len(SHAPES))])
        got = torch.cat([safe_get_full_fp32_param(w).double().flatten() for w in engine.module.w])
    finally:
        engine.destroy()
    return float((got - exact).norm() / exact.norm())


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_sum_the_chunks_in_fp32(stage, monkeypatch):
    assert _summed_error(stage, {}, monkeypatch) < 1e-6
    # what DeepSpeed does unless told: the sum in bf16 (an override still decides)
    assert _summed_error(stage, {"data_types": {"grad_accum_dtype": "bf16"}}, monkeypatch) > 1e-3


def test_zero_1_sums_in_bf16_and_says_so(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="pretrain.distributed"):
        error = _summed_error(1, {}, monkeypatch)
    assert 1e-3 < error < 0.05
    assert "sums the 64 chunks of each step's gradient cache in bf16" in caplog.text
