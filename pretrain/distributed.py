"""Process group setup that works under the `deepspeed` launcher, `torchrun` and plain `python`."""

from __future__ import annotations

import os
import socket

import torch


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
