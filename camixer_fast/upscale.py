"""``camixer_fast.upscale``: super-resolve a PIL image, a numpy array or a tensor in one call.

The package exports the function :func:`upscale` under the same name as this module, so
``camixer_fast.upscale`` is the function; reach the module itself through
``importlib.import_module("camixer_fast.upscale")`` (or ``sys.modules``).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from camixer_fast.cpu_memory import retained_bytes
from camixer_fast.graphs import CUDAGraphModel
from camixer_fast.imageio import array_to_pil, check_range, merge_array, pil_to_array, split_array
from camixer_fast.loading import WEIGHTS_ENV, load_model
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.routing import check_gamma

ImageLike = TypeVar("ImageLike", Image.Image, np.ndarray, Tensor)
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each tile (once, with (1, 1), when untiled)."""

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
"""Names accepted for ``dtype``, besides torch dtypes."""

BYTES_PER_PIXEL = 6000
"""Peak working memory of the network per LR pixel in flight, at fp32 (measured on the CPU for
the S model at γ = 1: about 5.3 kB at 256×256, 2.2 kB at 1024×1024; rounded up). Scaled by the
element size for fp16/bf16."""

MEMORY_FRACTION = 0.5
"""Share of the available memory that ``tile="auto"`` plans to use."""

CACHE_SIZE = 8
"""Most models kept by the cache of :func:`cached_model` (least recently used dropped first)."""


@dataclass
class CachedModel:
    """A loaded model and the lock that serializes its calls (``gamma`` is set per call);
    ``graphed``: its CUDA graphs, made on first use (:meth:`graphs`)."""

    model: CAMixerSR
    lock: threading.Lock = field(default_factory=threading.Lock)
    graphed: CUDAGraphModel | None = None

    def graphs(self) -> CUDAGraphModel:
        """The model's :class:`~camixer_fast.graphs.CUDAGraphModel` (RuntimeError with the
        reason where it cannot be captured)."""
        if self.graphed is None:
            self.graphed = CUDAGraphModel(self.model)
        return self.graphed


_cache: OrderedDict[tuple, CachedModel] = OrderedDict()
_cache_lock = threading.Lock()


def resolve_device(device: torch.device | str | None,
                   img: object = None) -> torch.device:
    """``device``, or when None the tensor's own device for a tensor ``img``, else "cuda" if
    available, else "cpu"."""
    if device is None:
        if torch.is_tensor(img):
            return img.device
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` as a floating torch dtype; None means float32, strings as in :data:`DTYPES`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def _weights_key(weights: str | os.PathLike) -> tuple:
    path = Path(os.fspath(weights)).expanduser()
    if path.is_file():
        stat = path.stat()
        return ("file", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return ("name", os.fspath(weights), os.environ.get(WEIGHTS_ENV))


def cached_model(weights: str | os.PathLike | Mapping, device: torch.device | str,
                 dtype: torch.dtype, backend: str) -> CachedModel:
    """The model for (weights, device, dtype, backend), loaded on first use and then reused.

    A weights file is keyed on its resolved path, modification time and size, a registered name
    on itself and ``$CAMIXER_FAST_WEIGHTS``; an in-memory state dict (a Mapping) is loaded every
    time. Raises what :func:`camixer_fast.load_model` raises (CheckpointError for an unknown
    name or a bad checkpoint, FileNotFoundError for a missing file).
    """
    device = torch.device(device)
    if isinstance(weights, Mapping):
        return CachedModel(load_model(weights, backend=backend, device=device, dtype=dtype))
    key = (_weights_key(weights), str(device), dtype, backend)
    with _cache_lock:
        entry = _cache.get(key)
        if entry is None:
            entry = CachedModel(load_model(weights, backend=backend, device=device, dtype=dtype))
            _cache[key] = entry
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
        return entry


def clear_model_cache() -> None:
    """Forget every model loaded by :func:`cached_model`."""
    with _cache_lock:
        _cache.clear()


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation on ``device``: CUDA's free memory, else the smallest of
    MemAvailable of /proc/meminfo (os.sysconf as a fallback), the room under a cgroup memory
    limit and the room under the process's address-space limit (``ulimit -v``), plus the freed
    heap the process keeps for reuse (:func:`camixer_fast.cpu_memory.retained_bytes`)."""
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
    # freed memory this process keeps (camixer_fast.cpu_memory) is counted as used above
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

    The tile is ``min(tile, H, W)``; every tile goes through ``model`` alone and overlapping
    outputs are averaged. ``batch`` tiles (all of the same size) are given to ``model`` in one
    call, which runs them one by one at inference, so the result does not depend on ``batch``.
    Memory: one tile's working set plus the float32 output and ``batch`` tiles' outputs.
    Every tile has the same size: a :class:`~camixer_fast.graphs.CUDAGraphModel` captures one
    graph per number of tiles in a call.
    """
    images, _, height, width = x.shape
    scale = model.scale
    tile = min(tile, height, width)
    rows, cols = tile_origins(height, tile), tile_origins(width, tile)
    out = torch.zeros(images, 3, height * scale, width * scale, dtype=torch.float32,
                      device=x.device)
    row_count = torch.zeros(height * scale, dtype=torch.float32, device=x.device)
    col_count = torch.zeros(width * scale, dtype=torch.float32, device=x.device)
    for i in rows:
        row_count[i * scale:(i + tile) * scale] += 1
    for j in cols:
        col_count[j * scale:(j + tile) * scale] += 1
    origins = [(i, j) for i in rows for j in cols]
    step = max(int(batch), 1)
    for start in range(0, len(origins), step):
        group = origins[start:start + step]
        patches = model(torch.cat([x[..., i:i + tile, j:j + tile] for i, j in group]))
        for k, (i, j) in enumerate(group):
            out[..., i * scale:(i + tile) * scale, j * scale:(j + tile) * scale] += \
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
    current = max(height, width) if tile is None else min(tile, height, width)
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
            what = "the whole image" if tile is None else f"{min(tile, height, width)}-pixel tiles"
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


def _check_tile(tile: int | str | None) -> int | str | None:
    if tile is None or (isinstance(tile, str) and tile == "auto"):
        return tile
    if isinstance(tile, (bool, np.bool_)) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be None, 'auto' or a positive int, got {tile!r}")
    return int(tile)


def _super_resolve(x: Tensor, gamma: float, weights: str | os.PathLike | Mapping,
                   tile: int | str | None, device: torch.device, dtype: torch.dtype,
                   backend: str, progress: ProgressCallback | None,
                   on_retry: Callable[[str], None] | None = None,
                   cuda_graph: bool = False) -> Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, sH, sW) clamped to [0, 1], on ``device``."""
    entry = cached_model(weights, device, dtype, backend)
    model = entry.model
    with entry.lock:
        model.gamma = gamma
        run = entry.graphs() if cuda_graph else model
        with torch.inference_mode():
            x = x.to(device=device, dtype=dtype)
            if tile == "auto":
                tile = auto_tile(x.shape[2], x.shape[3], batch=x.shape[0], scale=model.scale,
                                 device=device, dtype=dtype)
            out = run_network(run, x, tile, progress=progress, on_retry=on_retry)
    return out.clamp(0, 1)


@dataclass
class Prepared:
    """An image brought to the network's input, and how to turn the network's output back into
    the kind of thing it was (see :func:`prepare`)."""

    colour: Tensor
    """(B, 3, H, W) float in [0, 1]: B = 1 for PIL images and arrays."""
    finish: Callable[[Tensor], object]
    """SR colour (B, 3, sH, sW) clamped to [0, 1] (any device) -> the result."""
    device: torch.device | None = None
    """The input tensor's device (where ``device=None`` runs it), None for other kinds."""


def _prepare_array(arr: np.ndarray, to_pil: Callable[[np.ndarray], Image.Image] | None = None
                   ) -> Prepared:
    colour, alpha, layout = split_array(arr)

    def finish(sr: Tensor) -> np.ndarray | Image.Image:
        scaled = alpha
        if scaled is not None:
            scaled = F.interpolate(scaled, size=sr.shape[-2:], mode="bicubic",
                                   align_corners=False)
        out = merge_array(sr, scaled, layout)
        return out if to_pil is None else to_pil(out)

    return Prepared(colour, finish)


def _prepare_tensor(x: Tensor) -> Prepared:
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) RGB tensor, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a float tensor in [0, 1], got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"empty tensor of shape {tuple(x.shape)}")
    check_range(x.detach(), "a tensor")

    def finish(sr: Tensor) -> Tensor:
        sr = sr.to(device=x.device, dtype=x.dtype)
        return sr if x.dim() == 4 else sr[0]

    return Prepared(x if x.dim() == 4 else x[None], finish, x.device)


def prepare(img: ImageLike) -> Prepared:
    """Check ``img`` (a PIL image, numpy array or tensor, as :func:`upscale` takes) and split
    it into the network's input and a function that rebuilds a result of the same kind.
    Raises what :func:`upscale` raises for bad inputs."""
    if isinstance(img, Image.Image):
        arr, info = pil_to_array(img)
        return _prepare_array(arr, lambda out: array_to_pil(out, info))
    if isinstance(img, np.ndarray):
        return _prepare_array(img)
    if torch.is_tensor(img):
        return _prepare_tensor(img)
    raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got "
                    f"{type(img).__name__}")


def upscale(img: ImageLike, gamma: float = 0.5, *,
            weights: str | os.PathLike | Mapping = "CAMixerSR-S",
            tile: int | str | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | str | None = None, backend: str = "auto",
            cuda_graph: bool = False, progress: ProgressCallback | None = None) -> ImageLike:
    """Super-resolve ``img`` by the model's scale (×4 for CAMixerSR-S); returns the same kind.

    img:
      - a PIL image of mode RGB, L, RGBA, LA, P or I;16, returned in the same mode. Grey is run
        as RGB (replicated) and brought back with the BT.601 luma; alpha is upscaled on its own
        with bicubic interpolation and reattached; P runs as RGB (RGBA if its palette has
        transparency) and is quantized back to its own palette (nearest entry, no dithering);
        I;16 keeps its 16 bits. The ICC profile is kept.
      - a numpy array (H, W) or (H, W, C), C = 1 (grey), 2 (grey + alpha), 3 (RGB) or
        4 (RGBA); uint8, uint16 (full 16-bit range) or float (any float dtype, values in
        [0, 1]) -> (sH, sW[, C]) of the same dtype.
      - a torch tensor (3, H, W) or (B, 3, H, W), float in [0, 1] -> (3, sH, sW) or
        (B, 3, sH, sW) on the input's device and in its dtype. Not differentiable (the network
        runs under ``torch.inference_mode()``); use :func:`camixer_fast.load_model` to train.
      Float inputs with values outside [0, 1] (or NaN) raise ValueError rather than being
      clipped: they usually mean 0..255 data. Outputs are clamped to [0, 1]; integer outputs
      are rounded to the nearest level (round(x·255), round(x·65535)).
    gamma: attention ratio γ in [0, 1] (ValueError otherwise).
    weights: a registered name ("CAMixerSR-S", resolved as :func:`camixer_fast.load_model`
      does), a checkpoint path, or a loaded state dict. Unknown names raise CheckpointError.
      Models are cached per (weights, device, dtype, backend), see :func:`cached_model`.
    tile: None runs the whole image at once; an int T runs the official overlapped tiles of
      spec §5 (T LR pixels, overlap T//16, outputs averaged; T = min(T, H, W)), which bounds
      memory by a tile's working set plus the output; "auto" picks T with :func:`auto_tile`
      (whole image when it fits in half the available memory, else the largest multiple of 16
      that does).
    device: where the network runs; None: the tensor's device for a tensor, else "cuda" when
      available, else "cpu".
    dtype: the network's dtype (torch dtype or "fp32"/"fp16"/"bf16"); None: float32.
    backend: "auto", "reference", "cpu" or "triton" (see :mod:`camixer_fast.backends`; "auto"
      is "cpu" on the CPU, "triton" on a CUDA device that runs the kernels).
    cuda_graph: replay the network as CUDA graphs, one per input (or tile) size, captured on
      first use (:class:`camixer_fast.graphs.CUDAGraphModel`): far fewer launches for many
      images or tiles of one size. Needs a CUDA device and the Triton backend; RuntimeError with
      the reason otherwise (no silent fallback). Not yet proven on a GPU.
    progress: optional ``progress(done, total)`` called after each tile.
    """
    gamma, tile, dtype = check_gamma(gamma), _check_tile(tile), resolve_dtype(dtype)
    job = prepare(img)
    device = resolve_device(device if device is not None else job.device)
    sr = _super_resolve(job.colour, gamma, weights, tile, device, dtype, backend, progress,
                        on_retry=lambda text: warnings.warn(text, RuntimeWarning, stacklevel=3),
                        cuda_graph=bool(cuda_graph))
    return job.finish(sr)
