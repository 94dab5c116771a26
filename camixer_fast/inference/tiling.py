"""Running the network on an image: whole or in overlapped tiles (spec §5), sized to the
memory available (``tile="auto"``), retried in smaller tiles when an allocation fails. A
CAMixerOSR panorama gives each tile its latitude rows and wraps around horizontally (longitude
is periodic: the left and right edges are neighbours)."""

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
from camixer_fast.reference.odisr import CAMixerOSR, latitude_condition

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

OSR_MEMORY_USE = {"cpu": MemoryUse(per_pixel=5600, overhead=128 << 20, fraction=0.9),
                  "cuda": MemoryUse(per_pixel=24000, overhead=0, fraction=0.5)}
"""CAMixerOSR (C = 60): CPU, its measured VmPeak growth with a margin; CUDA: CAMixerSR's
CUDA/CPU ratio, not measured."""

PANORAMA_MARGIN = 64
"""LR columns a panorama is wrapped by on each side: four 16-pixel windows (a multiple of the
window keeps the window grid where the unwrapped run has it; docs/odisr.md has the seam)."""


def memory_use(device: torch.device | str, *, panoramic: bool = False) -> MemoryUse:
    table = OSR_MEMORY_USE if panoramic else MEMORY_USE
    return table["cpu" if torch.device(device).type == "cpu" else "cuda"]


def is_panoramic(model: object) -> bool:
    """Whether ``model`` is CAMixerOSR (ODI-SR), which takes a latitude condition."""
    return isinstance(model, CAMixerOSR)


def wrap_margin(model: object, wrap: bool | int | None, rows: tuple[int, int] | None) -> int:
    """LR columns to wrap by on each side: ``wrap`` None is :data:`PANORAMA_MARGIN` for a whole
    CAMixerOSR panorama (``rows`` None) and 0 otherwise, True the margin, False 0, an int that
    many columns. ValueError for a negative int or ``rows`` given for CAMixerSR."""
    if rows is not None and not is_panoramic(model):
        raise ValueError("rows= is the place of a crop in a panorama: it applies to CAMixerOSR "
                         "(ODI-SR) weights only, not to CAMixerSR")
    if wrap is None:
        return PANORAMA_MARGIN if is_panoramic(model) and rows is None else 0
    if isinstance(wrap, bool):
        return PANORAMA_MARGIN if wrap else 0
    if not isinstance(wrap, int) or wrap < 0:
        raise ValueError(f"wrap must be None, a bool or a margin >= 0 in LR columns, got {wrap!r}")
    return wrap


def wrap_columns(x: Tensor, margin: int) -> Tensor:
    """(..., W) -> (..., W + 2·margin): the columns -margin .. W + margin taken modulo W."""
    width = x.shape[-1]
    index = torch.arange(-margin, width + margin, device=x.device) % width
    return x.index_select(-1, index)


def check_rows(rows: tuple[int, int] | None, height: int) -> tuple[int, int] | None:
    """``rows`` = (top, full height) of an image of ``height`` rows in a panorama, or None;
    ValueError when the rows do not lie in the panorama."""
    if rows is None:
        return None
    if (not isinstance(rows, (tuple, list)) or len(rows) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows)):
        raise ValueError(f"rows must be (top, full height) ints, got {rows!r}")
    top, full = rows
    if top < 0 or top + height > full:
        raise ValueError(f"rows {top}..{top + height} do not lie in a panorama of {full} rows")
    return int(top), int(full)


def forward_bytes(pixels: int, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, outputs: int = 0, scale: int = 4,
                  panoramic: bool = False) -> int:
    """Expected bytes of a forward of ``pixels`` plus the float32 outputs of ``outputs``."""
    use = memory_use(device, panoramic=panoramic)
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
              budget: int | None = None, panoramic: bool = False) -> int | None:
    """``tile="auto"`` for a (batch, 3, height, width) input: None when :func:`forward_bytes`
    of the whole fits ``budget`` (default: :class:`MemoryUse` fraction of
    :func:`available_memory`), else the largest fitting multiple of 16 (16 at least)."""
    if budget is None:
        budget = int(memory_use(device, panoramic=panoramic).fraction
                     * available_memory(torch.device(device)))
    pixels = height * width

    def need(side: int | None) -> int:
        tile = pixels if side is None else min(side, height) * min(side, width)
        return forward_bytes(tile, device=device, dtype=dtype, outputs=batch * pixels,
                             scale=scale, panoramic=panoramic)

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


def conditioned(model: CAMixerSR | CAMixerOSR | CUDAGraphModel, x: Tensor,
                tops: list[int], rows: tuple[int, int] | None) -> Tensor:
    """``model`` on (k·B, 3, h, w) ``x``, k pieces of B images; a CAMixerOSR gives piece i the
    latitude of its rows from ``rows[0] + tops[i]`` on in a ``rows[1]``-row panorama."""
    if rows is None:
        return model(x)
    height, width = x.shape[-2:]
    condition = torch.cat([latitude_condition(height, width, rows=(rows[0] + top, rows[1]),
                                              device=x.device) for top in tops])
    return model(x, condition=condition.repeat_interleave(x.shape[0] // len(tops), dim=0))


def tiled_forward(model: CAMixerSR | CAMixerOSR | CUDAGraphModel, x: Tensor, tile: int,
                  progress: ProgressCallback | None = None, *, batch: int = 1,
                  rows: tuple[int, int] | None = None) -> Tensor:
    """The official overlapped-tile inference (spec §5): (B, 3, H, W) -> (B, 3, sH, sW) float32.

    Tiles are min(tile, H) × min(tile, W) (a thin image keeps ``tile`` along its long side);
    each goes through ``model`` alone and overlapping outputs are averaged. ``batch`` tiles are
    given to ``model`` per call (it runs them one by one, so the result does not depend on it).
    Memory: one tile's working set plus the float32 output and ``batch`` tiles' outputs.
    rows: for CAMixerOSR, (top, full height) of ``x`` in its panorama (each tile gets its rows'
    condition; None: all of it); None for CAMixerSR.
    """
    images, _, height, width = x.shape
    if rows is None and is_panoramic(model):
        rows = (0, height)
    scale = model.scale
    tile_h, tile_w = min(tile, height), min(tile, width)
    tops, lefts = tile_origins(height, tile_h), tile_origins(width, tile_w)
    out = torch.zeros(images, 3, height * scale, width * scale, dtype=torch.float32,
                      device=x.device)
    row_count = torch.zeros(height * scale, dtype=torch.float32, device=x.device)
    col_count = torch.zeros(width * scale, dtype=torch.float32, device=x.device)
    for i in tops:
        row_count[i * scale:(i + tile_h) * scale] += 1
    for j in lefts:
        col_count[j * scale:(j + tile_w) * scale] += 1
    origins = [(i, j) for i in tops for j in lefts]
    step = max(int(batch), 1)
    for start in range(0, len(origins), step):
        group = origins[start:start + step]
        patches = conditioned(model, torch.cat([x[..., i:i + tile_h, j:j + tile_w]
                                                for i, j in group]), [i for i, _ in group], rows)
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


def run_network(model: CAMixerSR | CAMixerOSR | CUDAGraphModel, x: Tensor, tile: int | None, *,
                batch: int = 1, progress: ProgressCallback | None = None,
                on_retry: Callable[[str], None] | None = None,
                rows: tuple[int, int] | None = None, wrap: int = 0) -> Tensor:
    """``model`` on (B, 3, H, W) ``x`` (on its device and dtype), whole or in tiles ->
    (B, 3, sH, sW), not clamped. Call under ``torch.inference_mode()``. A failed allocation
    halves the tile and retries (``on_retry`` hears of it), down to :data:`OOM_TILE_FLOOR`;
    then MemoryError saying the memory needed and available. CAMixerOSR: ``x`` is rows
    ``rows`` = (top, full height) of a panorama (None: all of it), each piece run with its
    rows' condition. ``wrap``: columns added on each side from the other edge, then cropped
    (:func:`wrap_margin`); ``tile`` applies to the wrapped image.
    """
    if is_panoramic(model):
        rows = check_rows(rows, x.shape[-2]) or (0, x.shape[-2])
    elif rows is not None:
        raise ValueError("rows= applies to CAMixerOSR (ODI-SR) weights only")
    width = x.shape[-1]
    if wrap:
        x = wrap_columns(x, wrap)
    out = _run_retrying(model, x, tile, batch, progress, on_retry, rows)
    return out[..., wrap * model.scale:(wrap + width) * model.scale] if wrap else out


def _run_retrying(model: CAMixerSR | CAMixerOSR | CUDAGraphModel, x: Tensor, tile: int | None,
                  batch: int, progress: ProgressCallback | None,
                  on_retry: Callable[[str], None] | None,
                  rows: tuple[int, int] | None) -> Tensor:
    height, width = x.shape[-2:]
    while True:
        try:
            if tile is None:
                out = conditioned(model, x, [0], rows)
                if progress is not None:
                    progress(1, 1)
            else:
                out = tiled_forward(model, x, tile, progress, batch=batch, rows=rows)
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
                                     outputs=x.shape[0] * height * width, scale=model.scale,
                                     panoramic=rows is not None)
                raise MemoryError(f"out of memory on a {height}x{width} input even with "
                                  f"{what}: needs about {need >> 20} MiB, "
                                  f"{available_memory(x.device) >> 20} MiB available") from None
            if on_retry is not None:
                on_retry(f"out of memory with {what} of {height}x{width}; retried in "
                         f"{smaller}x{smaller} tiles")
            tile = smaller

