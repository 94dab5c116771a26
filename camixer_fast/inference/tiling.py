"""Running the network on an image: whole or in overlapped tiles (spec §5), sized to the
memory available (``tile="auto"``), retried in smaller tiles when an allocation fails."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from camixer_fast.backends.memory import retained_bytes
from camixer_fast.inference.graphs import CUDAGraphModel
from camixer_fast.reference.model import CAMixerSR

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each tile (once, with (1, 1), when untiled)."""

BYTES_PER_PIXEL = 6000
"""Peak working memory of the network per LR pixel in flight, at fp32 (measured on the CPU for
the S model at γ = 1: about 5.3 kB at 256×256, 2.2 kB at 1024×1024; rounded up). Scaled by the
element size for fp16/bf16."""

MEMORY_FRACTION = 0.5
"""Share of the available memory that ``tile="auto"`` plans to use."""


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation on ``device``: CUDA's free memory, else the smallest of
    MemAvailable of /proc/meminfo (os.sysconf as a fallback), the room under a cgroup memory
    limit and the room under the process's address-space limit (``ulimit -v``), plus the freed
    heap the process keeps for reuse (:func:`camixer_fast.backends.memory.retained_bytes`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    amounts = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    amounts.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not amounts:
        try:
            amounts.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            amounts.append(1 << 30)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            amounts.append(max(int(limit) - usage, 0))
    address_room = _address_space_room()
    if address_room is not None:
        amounts.append(address_room)
    # freed memory this process keeps (camixer_fast.backends.memory) is counted as used above
    return min(amounts) + retained_bytes()


def _address_space_room() -> int | None:
    """Bytes left under the process's address-space limit (``ulimit -v``, RLIMIT_AS): the soft
    limit minus the current virtual size (VmSize of /proc/self/status); None when unlimited."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    used = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(soft - used, 0)


def auto_tile(height: int, width: int, *, batch: int = 1, scale: int = 4,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              budget: int | None = None) -> int | None:
    """The tile that ``tile="auto"`` uses for a (batch, 3, height, width) input: None (the whole
    image at once) when it fits the budget, else the largest multiple of 16 that fits (16 at
    least).

    budget: bytes, by default :data:`MEMORY_FRACTION` of :func:`available_memory`. The whole
    image fits when height·width·(:data:`BYTES_PER_PIXEL`·element size/4 + batch·3·scale²·4)
    <= budget (working memory plus float32 results); a tile T fits when T²·BYTES_PER_PIXEL·
    element size/4 plus the float32 output accumulator (batch·3·scale²·4 per input pixel)
    <= budget.
    """
    if budget is None:
        budget = int(MEMORY_FRACTION * available_memory(torch.device(device)))
    per_pixel = BYTES_PER_PIXEL * (torch.finfo(dtype).bits / 32)
    output_per_pixel = batch * 3 * scale * scale * 4
    if height * width * (per_pixel + output_per_pixel) <= budget:
        return None
    room = max(budget - height * width * output_per_pixel, 0)
    return max(int(math.sqrt(room / per_pixel)) // 16 * 16, 16)


def tile_origins(size: int, tile: int) -> list[int]:
    """Origins of the tiles along one dimension (spec §5): ``range(0, size - tile, stride)``
    plus ``size - tile``, with overlap ``tile // 16`` and stride ``tile - overlap``."""
    stride = tile - tile // 16
    return list(range(0, size - tile, stride)) + [size - tile]


def tiled_forward(model: CAMixerSR | CUDAGraphModel, x: Tensor, tile: int,
                  progress: ProgressCallback | None = None, *, batch: int = 1) -> Tensor:
    """The official overlapped-tile inference (spec §5): (B, 3, H, W) -> (B, 3, sH, sW) float32.

    Tiles are min(tile, H) × min(tile, W) (a thin image keeps ``tile`` along its long side);
    each goes through ``model`` alone and overlapping outputs are averaged. ``batch`` tiles are
    given to ``model`` per call (it runs them one by one, so the result does not depend on it).
    Memory: one tile's working set plus the float32 output and ``batch`` tiles' outputs.
    """
    images, _, height, width = x.shape
    scale = model.scale
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = tile_origins(height, tile_h), tile_origins(width, tile_w)
    out = torch.zeros(images, 3, height * scale, width * scale, dtype=torch.float32,
                      device=x.device)
    row_count = torch.zeros(height * scale, dtype=torch.float32, device=x.device)
    col_count = torch.zeros(width * scale, dtype=torch.float32, device=x.device)
    for i in rows:
        row_count[i * scale:(i + tile_h) * scale] += 1
    for j in cols:
        col_count[j * scale:(j + tile_w) * scale] += 1
    origins = [(i, j) for i in rows for j in cols]
    step = max(int(batch), 1)
    for start in range(0, len(origins), step):
        group = origins[start:start + step]
        patches = model(torch.cat([x[..., i:i + tile_h, j:j + tile_w] for i, j in group]))
        for k, (i, j) in enumerate(group):
            out[..., i * scale:(i + tile_h) * scale, j * scale:(j + tile_w) * scale] += \
                patches[k * images:(k + 1) * images]
        if progress is not None:
            progress(start + len(group), len(origins))
    return out.div_(row_count[:, None] * col_count[None, :])


OOM_TILE_FLOOR = 16
"""Smallest tile (LR pixels, one window) that out-of-memory recovery halves down to."""

_ALLOCATION_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                        "not enough memory", "failed to allocate")


def is_allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed memory allocation: MemoryError, torch's OutOfMemoryError
    (CUDA), or a RuntimeError of the CPU allocator ("DefaultCPUAllocator: can't allocate
    memory") or of another device's."""
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError",
                                                              None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower()
                                                 for text in _ALLOCATION_MESSAGES)


def halved_tile(tile: int | None, height: int, width: int) -> int | None:
    """The tile to retry with after an allocation failure: half the tile in use (the whole
    image counts as max(H, W)), rounded down to a multiple of 16; None below
    :data:`OOM_TILE_FLOOR` (nothing left to try)."""
    current = max(height, width) if tile is None else min(tile, max(height, width))
    smaller = current // 2 // 16 * 16
    return smaller if smaller >= OOM_TILE_FLOOR else None


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_network(model: CAMixerSR | CUDAGraphModel, x: Tensor, tile: int | None, *, batch: int = 1,
                progress: ProgressCallback | None = None,
                on_retry: Callable[[str], None] | None = None) -> Tensor:
    """``model`` on (B, 3, H, W) ``x`` (already on the model's device and dtype), whole or in
    tiles of ``tile``; returns (B, 3, sH, sW), not clamped (clamp it outside inference mode
    to give a normal tensor).

    Out-of-memory recovery: when an allocation fails (:func:`is_allocation_failure`), the tile
    is halved (:func:`halved_tile`) and the run retried, down to :data:`OOM_TILE_FLOOR`;
    ``on_retry`` gets a sentence saying what happened. Below the floor the error is raised
    as MemoryError. Call under ``torch.inference_mode()``.
    """
    height, width = x.shape[-2:]
    while True:
        try:
            if tile is None:
                out = model(x)
                if progress is not None:
                    progress(1, 1)
            else:
                out = tiled_forward(model, x, tile, progress, batch=batch)
            return out
        except Exception as err:  # noqa: BLE001 - only allocation failures are retried
            if not is_allocation_failure(err):
                raise
            what = "the whole image" if tile is None else f"{min(tile, max(height, width))}-pixel tiles"
            _release_memory(x.device)
            smaller = halved_tile(tile, height, width)
            if smaller is None:
                cause = (str(err).splitlines() or [type(err).__name__])[0][:200]
                raise MemoryError(f"out of memory on a {height}x{width} input even with "
                                  f"{what} ({cause})") from None
            if on_retry is not None:
                on_retry(f"out of memory with {what} of {height}x{width}; retried in "
                         f"{smaller}x{smaller} tiles")
            tile = smaller

