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
from camixer_fast.inference.tiling import (
    ProgressCallback,
    auto_tile,
    check_rows,
    is_panoramic,
    run_network,
    wrap_margin,
)
from camixer_fast.io.image import array_to_pil, check_range, merge_array, pil_to_array, split_array
from camixer_fast.models.loading import load_model
from camixer_fast.models.weights import WEIGHTS_ENV
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR
from camixer_fast.reference.routing import check_gamma

ImageLike = TypeVar("ImageLike", Image.Image, np.ndarray, Tensor)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}

CACHE_SIZE = 8


@dataclass
class CachedModel:
    """A loaded model, the lock that serializes its calls, and its CUDA graphs once made."""

    model: CAMixerSR | CAMixerOSR
    lock: threading.Lock = field(default_factory=threading.Lock)
    graphed: CUDAGraphModel | None = None

    def graphs(self) -> CUDAGraphModel:
        """The model's :class:`~camixer_fast.inference.graphs.CUDAGraphModel` (or RuntimeError)."""
        if is_panoramic(self.model):
            raise RuntimeError("cuda_graph replays CAMixerSR only: CAMixerOSR (ODI-SR) weights "
                               "run without it")
        if self.graphed is None:
            self.graphed = CUDAGraphModel(self.model)
        return self.graphed


_cache: OrderedDict[tuple, CachedModel] = OrderedDict()
_cache_lock = threading.Lock()


def resolve_device(device: torch.device | str | None,
                   img: object = None) -> torch.device:
    """``device``, else a tensor's own device, else "cuda" if available, else "cpu"."""
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
    """The model for (weights, device, dtype, backend), loaded once (a file keyed on its path,
    mtime and size; a state dict loaded every time). Raises what :func:`load_model` raises."""
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
                   cuda_graph: bool = False, wrap: bool | int | None = None,
                   rows: tuple[int, int] | None = None) -> Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, sH, sW) clamped to [0, 1], on ``device``."""
    entry = cached_model(weights, device, dtype, backend)
    model = entry.model
    margin = wrap_margin(model, wrap, rows)
    rows = check_rows(rows, x.shape[2])
    with entry.lock:
        model.gamma = gamma
        run = entry.graphs() if cuda_graph else model
        with torch.inference_mode():
            x = x.to(device=device, dtype=dtype)
            if tile == "auto":
                tile = auto_tile(x.shape[2], x.shape[3] + 2 * margin, batch=x.shape[0],
                                 scale=model.scale, device=device, dtype=dtype,
                                 panoramic=is_panoramic(model))
            out = run_network(run, x, tile, progress=progress, on_retry=on_retry, rows=rows,
                              wrap=margin)
    return out.clamp(0, 1)


@dataclass
class Prepared:
    """An image as the network's input, and how to turn the output back into its kind."""

    colour: Tensor
    finish: Callable[[Tensor], object]
    device: torch.device | None = None


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
    """Check ``img`` (as :func:`upscale` takes) and split it into the network's input and a
    function that rebuilds a result of the same kind."""
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
            cuda_graph: bool = False, progress: ProgressCallback | None = None,
            wrap: bool | int | None = None, rows: tuple[int, int] | None = None) -> ImageLike:
    """Super-resolve ``img`` by the model's scale (×4 for CAMixerSR-S); returns the same kind.

    img: a PIL image (RGB, L, RGBA, LA, P, I;16; same mode back: grey via BT.601 luma, alpha
      upscaled bicubic, P quantized to its own palette, ICC kept); a numpy (H, W[, C]) array,
      C in 1..4, uint8/uint16/float in [0, 1]; or a (B,) 3, H, W float tensor in [0, 1] (not
      differentiable). Floats outside [0, 1] or NaN raise ValueError; outputs are clamped.
    gamma: attention ratio γ in [0, 1]. weights: a registered name, a checkpoint path or a
      state dict (models cached, :func:`cached_model`). tile: None (whole image), an int T
      (spec §5's overlapped tiles) or "auto" (:func:`auto_tile`). device: None = the tensor's,
      else CUDA when available. dtype: torch dtype or "fp32"/"fp16"/"bf16". backend: "auto",
      "reference", "cpu" or "triton". cuda_graph: replay as CUDA graphs (RuntimeError where it
      cannot). progress: ``progress(done, total)`` after each tile.
    CAMixerOSR (ODI-SR) weights: ``img`` is a whole equirectangular panorama, or its rows
      ``rows=(top, full height)`` (each tile gets its rows' latitude condition). wrap: columns
      taken from the other edge on each side, then cropped (longitude is periodic): None = on
      (:data:`~camixer_fast.inference.tiling.PANORAMA_MARGIN`) for a whole panorama, off for a
      crop and for CAMixerSR; True/False; an int margin. ``rows`` with CAMixerSR: ValueError.
    """
    gamma, tile, dtype = check_gamma(gamma), check_tile(tile), resolve_dtype(dtype)
    job = prepare(img)
    device = resolve_device(device if device is not None else job.device)
    sr = _super_resolve(job.colour, gamma, weights, tile, device, dtype, backend, progress,
                        on_retry=lambda text: warnings.warn(text, RuntimeWarning, stacklevel=3),
                        cuda_graph=bool(cuda_graph), wrap=wrap, rows=rows)
    return job.finish(sr)
