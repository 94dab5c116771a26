"""Many processes under ``torchrun``: where this process stands (:class:`Rank`) and its device,
the process group, each rank's share of the work (a static split) and the gather on rank 0."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from camixer_fast.reference.model import CAMixerSR

T = TypeVar("T")

GATHER_TIMEOUT = timedelta(hours=6)  # a finished rank waits this long for the others


@dataclass(frozen=True)
class Rank:
    """This process's place among the ``torchrun`` processes (0 of 1 without) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.world

    @property
    def prefix(self) -> str:
        return f"rank {self.rank}: " if self.world > 1 else ""


def rank_from_env() -> Rank:
    """The rank torchrun's environment gives (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    world = max(number("WORLD_SIZE", 1), 1)
    return Rank(number("RANK", 0), world, number("LOCAL_RANK", 0),
                max(number("LOCAL_WORLD_SIZE", 1), 1))


def device_for(rank: Rank, device: str | None) -> str | None:
    """``cuda:LOCAL_RANK`` for "cuda"/None in a multi-process run with GPUs, else ``device``."""
    if rank.world == 1:
        return device
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    return device


def setup_distributed(device: str | None = None) -> Rank:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and pick the device
    (None: ``cuda:LOCAL_RANK`` when available, else the CPU)."""
    rank = rank_from_env()
    dev = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", rank.local_rank if rank.world > 1
                           else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if rank.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank = replace(rank, rank=dist.get_rank(), world=dist.get_world_size())
    return replace(rank, device=dev)


def init(rank: Rank) -> None:
    """Join the gloo group of a multi-process run (small Python objects, no GPU needed)."""
    if rank.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)


def shard(items: list[T], rank: Rank) -> list[T]:
    """Every ``world``-th item from position ``rank`` on (even sizes over a sorted list)."""
    return items[rank.rank::rank.world]


def all_gather(obj: T, rank: Rank) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` for a single process)."""
    if rank.world == 1 or not dist.is_initialized():
        return [obj]
    gathered: list = [None] * rank.world
    dist.all_gather_object(gathered, obj)
    return gathered


def close() -> None:
    """Leave the process group, if joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(net: nn.Module) -> CAMixerSR:
    """The CAMixerSR inside a DistributedDataParallel wrapper (or ``net`` itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def world_size() -> int:
    """Processes in the joined process group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
