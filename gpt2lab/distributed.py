"""Processes and devices: the only reader of torchrun's RANK / LOCAL_RANK / WORLD_SIZE.

Multi-node runs use torchrun's own rendezvous (--nnodes, --rdzv-endpoint, ...); nothing here is
home-made: torchrun sets the environment, init_process_group reads it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2lab.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this process's GPU under torchrun (cuda:LOCAL_RANK), else cuda, mps, cpu in that order."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, dev)


def teardown() -> None:
    """Leave the process group. First a pause with the GIL released: a gloo worker thread frees the
    last collective's tensors after the collective returns, which needs the GIL, while the group's
    destructor joins those threads holding it. Without the pause a run could hang at its very end
    (seen: a 2-process run whose last all-reduce came just before its exit, on a busy CPU)."""
    if dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless a process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over all processes (t itself when not distributed)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_process(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any process: every rank takes the same decision (stop, save)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
