"""Running the network on an image: whole or in overlapped tiles (spec §5), sized to the
memory available (``tile="auto"``), retried in smaller tiles when an allocation fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from camixer_fast.backends.memory import retained_bytes
from camixer_fast.inference.graphs import CUDAGraphModel
from camixer_fast.reference.model import CAMixerSR

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class MemoryUse:
    """A forward of P pixels takes ``overhead + P * per_pixel`` bytes (fp32) plus its output;
    plans use ``fraction`` of the available memory."""

    per_pixel: int
    overhead: int
    fraction: float


MEMORY_USE = {"cpu": MemoryUse(per_pixel=1400, overhead=128 << 20, fraction=0.9),
              "cuda": MemoryUse(per_pixel=6000, overhead=0, fraction=0.5)}
"""CPU: measured VmPeak growth of S with a margin; CUDA: the earlier figure, not measured."""


def memory_use(device: torch.device | str) -> MemoryUse:
    return MEMORY_USE["cpu" if torch.device(device).type == "cpu" else "cuda"]


def forward_bytes(pixels: int, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, outputs: int = 0, scale: int = 4) -> int:
    """Expected bytes of a forward of ``pixels`` plus the float32 outputs of ``outputs``."""
    use = memory_use(device)
    return int(use.overhead + pixels * use.per_pixel * torch.finfo(dtype).bits / 32
               + outputs * 3 * scale * scale * 4)


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation on ``device``: CUDA's free memory, else the least of
    MemAvailable, the room under a cgroup limit and under ``ulimit -v``, plus the freed heap
    this process keeps (:func:`camixer_fast.backends.memory.retained_bytes`)."""
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
    address_room = address_space_room()
    if address_room is not None:
        amounts.append(address_room)
    return min(amounts) + retained_bytes()


def address_space_room() -> int | None:
    """RLIMIT_AS's soft limit minus VmSize (``ulimit -v`` room); None when unlimited."""
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
    """``tile="auto"`` for a (batch, 3, height, width) input: None when :func:`forward_bytes`
    of the whole fits ``budget`` (default: :class:`MemoryUse` fraction of
    :func:`available_memory`), else the largest fitting multiple of 16 (16 at least)."""
    if budget is None:
        budget = int(memory_use(device).fraction * available_memory(torch.device(device)))
    pixels = height * width

    def need(side: int | None) -> int:
        tile = pixels if side is None else min(side, height) * min(side, width)
        return forward_bytes(tile, device=device, dtype=dtype, outputs=batch * pixels,
                             scale=scale)

    if need(None) <= budget:
        return None
    tile = max(height, width) // 16 * 16
    while tile > 16 and need(tile) > budget:
        tile -= 16
    return max(tile, 16)


def tile_origins(size: int, tile: int) -> list[int]:
    """Tile origins along one dimension (spec §5): stride ``tile - tile // 16``, last at
    ``size - tile``."""
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

_ALLOCATION_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                        "not enough memory", "failed to allocate")


def is_allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: MemoryError, OutOfMemoryError, or an allocator's
    RuntimeError."""
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError",
                                                              None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower()
                                                 for text in _ALLOCATION_MESSAGES)


def halved_tile(tile: int | None, height: int, width: int) -> int | None:
    """Half the tile in use (the whole image: max(H, W)), a multiple of 16; None below
    :data:`OOM_TILE_FLOOR`."""
    current = max(height, width) if tile is None else min(tile, max(height, width))
    smaller = current // 2 // 16 * 16
    return smaller if smaller >= OOM_TILE_FLOOR else None


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_network(model: CAMixerSR | CUDAGraphModel, x: Tensor, tile: int | None, *, batch: int = 1,
                progress: ProgressCallback | None = None,
                on_retry: Callable[[str], None] | None = None) -> Tensor:
    """``model`` on (B, 3, H, W) ``x`` (on its device and dtype), whole or in tiles ->
    (B, 3, sH, sW), not clamped. Call under ``torch.inference_mode()``. A failed allocation
    halves the tile and retries (``on_retry`` hears of it), down to :data:`OOM_TILE_FLOOR`;
    then MemoryError saying the memory needed and available.
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
                pixels = height * width if tile is None else \
                    min(tile, height) * min(tile, width)
                need = forward_bytes(pixels, device=x.device, dtype=x.dtype,
                                     outputs=x.shape[0] * height * width, scale=model.scale)
                raise MemoryError(f"out of memory on a {height}x{width} input even with "
                                  f"{what}: needs about {need >> 20} MiB, "
                                  f"{available_memory(x.device) >> 20} MiB available") from None
            if on_retry is not None:
                on_retry(f"out of memory with {what} of {height}x{width}; retried in "
                         f"{smaller}x{smaller} tiles")
            tile = smaller

