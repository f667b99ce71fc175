"""Process group setup that works under the `deepspeed` launcher, `torchrun` and plain `python`, and
the DeepSpeed engine that pretraining and fine-tuning build from their `deepspeed.*` keys."""

from __future__ import annotations

import logging
import os
import socket

import torch

from .config import merge_nested

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Plain `python` (no launcher variables) runs as a world of one.
    NCCL on CUDA, gloo on CPU."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python launch/pretrain.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():  # NCCL takes one GPU per rank
            raise RuntimeError(f"local rank {local_rank} but {torch.cuda.device_count()} GPU(s) on this node: launch "
                               "at most one process per GPU (--nproc_per_node / --num_gpus), or hide the GPUs "
                               "(CUDA_VISIBLE_DEVICES=) to run the ranks on the CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


_HOST_GROUPS: dict = {}


def host_group():
    """A process group for small CPU tensors (gloo): a sum of host numbers over ranks that neither
    waits for the device nor stages through it. The default group where it is gloo already; under
    NCCL a gloo group made on the first call (a collective: every rank calls it, in the same order)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())  # a new default group (a re-init) gets its own
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def host_all_reduce(values: list[float]) -> list[float]:
    """Sums over ranks of host numbers: one CPU collective through `host_group`, no device sync."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, group=host_group())
    return t.tolist()


def launched() -> bool:
    """Whether a launcher (`deepspeed`, `torchrun`) started this process: it sets RANK."""
    return "RANK" in os.environ


def deepspeed_engine(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ds, device: torch.device,
                     micro_steps: int = 1, scheduler=None):
    """(DeepSpeed engine over ``module`` and the client ``optimizer`` (its parameter groups kept),
    whether bf16 is on) from ``ds`` (a `pretrain.config.DeepSpeedConfig`): one micro-batch per rank
    per micro-step, ``micro_steps`` of them per optimizer step."""
    import deepspeed

    bf16 = ds.bf16 if ds.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds_config = merge_nested({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": micro_steps,
                        "zero_optimization": {"stage": ds.zero_stage}, "bf16": {"enabled": bool(bf16)},
                        "gradient_clipping": ds.gradient_clipping, "zero_allow_untested_optimizer": True,
                        "steps_per_print": 10**12, "wall_clock_breakdown": False,
                        # its throughput timer (on by default) synchronizes the device at every forward and
                        # step: the GPU would idle while the host prepares the next batch; the trainer measures
                        # its own throughput
                        "timers": {"throughput": {"enabled": False}}}, ds.overrides)
    # what DeepSpeed will run, overrides included (zero_optimization.overlap_comm alone keeps the stage)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    half = bf16 or bool(ds_config.get("fp16", {}).get("enabled", False))
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and not half:
        raise ValueError("deepspeed.zero_stage=0 in fp32 applies updates whose gradients are NaN (DeepSpeed skips "
                         "them only with ZeRO 1-3 or bf16): use deepspeed.zero_stage=1 or more")
    if bf16 and micro_steps > 1 and "grad_accum_dtype" not in ds_config.get("data_types", {}):
        # DeepSpeed sums a step's micro-steps (the gradient cache's chunks) in the parameters' dtype unless
        # told otherwise: in bf16 a sum of 64 chunks is off by ~1 % (tests/test_grad_accumulation.py), and each
        # chunk is a smaller share of it the more chunks a step has. ZeRO 2-3 then sum in fp32 exactly, in
        # their partitions. ZeRO 1 would switch optimizer (BF16_Optimizer: a gradient buffer of every
        # parameter in fp32 on each rank, a checkpoint layout its earlier runs could not resume from, and
        # sums measured 0.2 % off there): it keeps DeepSpeed's default, and says so
        if stage in (2, 3):
            ds_config = merge_nested(ds_config, {"data_types": {"grad_accum_dtype": "fp32"}})
        else:
            logger.warning(f"bf16 under ZeRO stage {stage} sums the {micro_steps} chunks of each step's gradient "
                           "cache in bf16 (about 1 % off at 64 chunks): deepspeed.zero_stage=2 sums them in fp32")
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, bf16

