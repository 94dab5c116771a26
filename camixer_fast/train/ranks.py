"""Many processes under ``torchrun`` (one machine or several with a shared filesystem): which
share of the work this process takes, its device, and the summary gathered on rank 0.

``torchrun --nproc_per_node N -m camixer_fast upscale IN -o OUT`` starts N copies of the
command; each sees the same sorted input list, takes every N-th item from its rank on
(:func:`shard`), runs on its own device (``cuda:LOCAL_RANK``, or the CPU) and writes its own
outputs; at the end every rank sends its counts to the others (:func:`all_gather`, over gloo,
which needs no GPU) and rank 0 prints the summary. No scheduler: the split is static.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

GATHER_TIMEOUT = timedelta(hours=6)
"""How long a rank that finished waits for the others at the final gather."""


@dataclass(frozen=True)
class Rank:
    """This process's place among the ``torchrun`` processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def prefix(self) -> str:
        """``"rank R: "`` in a multi-process run, else empty: put before messages."""
        return f"rank {self.rank}: " if self.world > 1 else ""


def rank_from_env() -> Rank:
    """The rank ``torchrun`` gave this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``); rank 0 of 1 when they are not set."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    world = max(number("WORLD_SIZE", 1), 1)
    return Rank(number("RANK", 0), world, number("LOCAL_RANK", 0),
                max(number("LOCAL_WORLD_SIZE", 1), 1))


def device_for(rank: Rank, device: str | None) -> str | None:
    """The device of this rank: ``device`` when given with an index (or for the CPU);
    ``cuda:LOCAL_RANK`` for "cuda" or None on a machine with GPUs in a multi-process run;
    else ``device`` unchanged (None: the default)."""
    if rank.world == 1:
        return device
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    return device


def init(rank: Rank) -> None:
    """Join the process group of a multi-process run (gloo: the gather is of small Python
    objects, and gloo needs no GPU); nothing for a single process."""
    if rank.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)


def shard(items: list[T], rank: Rank) -> list[T]:
    """This rank's share of ``items`` (in the same order on every rank): every ``world``-th
    item from position ``rank`` on, which spreads sizes evenly over a sorted list."""
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
