"""``camixer_fast.upscale``: super-resolve a PIL image, a numpy array or a tensor in one call."""

from __future__ import annotations

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

from camixer_fast.inference.graphs import CUDAGraphModel
from camixer_fast.inference.tiling import ProgressCallback, auto_tile, run_network
from camixer_fast.io.image import array_to_pil, check_range, merge_array, pil_to_array, split_array
from camixer_fast.models.loading import WEIGHTS_ENV, load_model
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.routing import check_gamma

ImageLike = TypeVar("ImageLike", Image.Image, np.ndarray, Tensor)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
"""Names accepted for ``dtype``, besides torch dtypes."""

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
        """The model's :class:`~camixer_fast.inference.graphs.CUDAGraphModel` (RuntimeError with the
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


def check_tile(tile: int | str | None) -> int | str | None:
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
      first use (:class:`camixer_fast.inference.graphs.CUDAGraphModel`): far fewer launches for many
      images or tiles of one size. Needs a CUDA device and the Triton backend; RuntimeError with
      the reason otherwise (no silent fallback). Not yet proven on a GPU.
    progress: optional ``progress(done, total)`` called after each tile.
    """
    gamma, tile, dtype = check_gamma(gamma), check_tile(tile), resolve_dtype(dtype)
    job = prepare(img)
    device = resolve_device(device if device is not None else job.device)
    sr = _super_resolve(job.colour, gamma, weights, tile, device, dtype, backend, progress,
                        on_retry=lambda text: warnings.warn(text, RuntimeWarning, stacklevel=3),
                        cuda_graph=bool(cuda_graph))
    return job.finish(sr)
