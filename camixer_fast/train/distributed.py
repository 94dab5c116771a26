"""Scale-out: joining the process group ``torchrun`` describes and picking this process's
device (:func:`setup_distributed`), and reaching the model inside a DDP wrapper."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from camixer_fast.reference.model import CAMixerSR


def unwrap(net: nn.Module) -> CAMixerSR:
    """The CAMixerSR inside a DistributedDataParallel wrapper (or ``net`` itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def world_size() -> int:
    """The number of processes in the joined process group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1: NCCL on CUDA, gloo
    on the CPU) and pick this process's device (``cuda:LOCAL_RANK`` on GPUs); a plain single
    process otherwise. ``device`` None means CUDA when available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev)


__all__ = [
    "DistInfo",
    "setup_distributed",
    "unwrap",
    "world_size",
]
