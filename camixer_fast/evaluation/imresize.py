"""MATLAB-compatible bicubic downscaling, ``imresize(img, 1/s, 'bicubic')`` on uint8 images, as
the SR benchmarks make their LR inputs (bit-identical to Set5's X2-X4 ``LR_bicubic`` files; X8
with ``round_each_pass=False``).
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return inner + outer


def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """The (out_length, in_length) float64 matrix of one bicubic pass; ``scale`` = out/in."""
    if in_length < 1 or out_length < 1:
        raise ValueError(f"lengths must be >= 1, got {in_length} -> {out_length}")
    antialias = scale < 1.0
    kernel_width = 4.0 / scale if antialias else 4.0

    def kernel(d: np.ndarray) -> np.ndarray:
        return scale * _cubic(scale * d) if antialias else _cubic(d)

    u = np.arange(1, out_length + 1, dtype=np.float64)[:, None]
    x = u / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(x - kernel_width / 2.0)
    taps = int(np.ceil(kernel_width)) + 2
    indices = left + np.arange(taps, dtype=np.float64)[None, :]  # 1-based
    weights = kernel(x - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    period = 2 * in_length
    mirrored = (indices.astype(np.int64) - 1) % period
    mirrored = np.where(mirrored < in_length, mirrored, period - 1 - mirrored)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], mirrored.shape)
    np.add.at(matrix, (rows, mirrored), weights)
    return matrix


def _round_uint8(x: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def _resize_axis(img: np.ndarray, axis: int, out_length: int, scale: float) -> np.ndarray:
    matrix = resize_matrix(img.shape[axis], out_length, scale)
    moved = np.moveaxis(img.astype(np.float64, copy=False), axis, 0)         # [in, ...]
    flat = matrix @ moved.reshape(moved.shape[0], -1)                        # [out, rest]
    return np.moveaxis(flat.reshape((out_length,) + moved.shape[1:]), 0, axis)


def imresize_down(img_uint8: np.ndarray, scale: int, *,
                  round_each_pass: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, 1/scale, 'bicubic')``: (H, W[, C]) uint8, integer scale >= 1 ->
    (ceil(H/s), ceil(W/s)[, C]) uint8. Raises TypeError/ValueError for other input."""
    img = np.asarray(img_uint8)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    scale = int(scale)
    if scale == 1:
        return img.copy()
    factor = 1.0 / scale
    out_h, out_w = (-(-n // scale) for n in img.shape[:2])
    out = _resize_axis(img, 0, out_h, factor)
    if round_each_pass:
        out = _round_uint8(out)
    return _round_uint8(_resize_axis(out, 1, out_w, factor))


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop (H, W[, C]) on the bottom and right to multiples of ``scale``."""
    height, width = img.shape[:2]
    return img[: height - height % scale, : width - width % scale]


def make_lr(hr_uint8: np.ndarray, scale: int, *, round_each_pass: bool = True) -> np.ndarray:
    """Benchmark LR input: (H, W[, C]) uint8 HR cropped to a multiple of ``scale``, then
    :func:`imresize_down` -> (H // scale, W // scale[, C]) uint8."""
    hr = np.asarray(hr_uint8)
    if min(hr.shape[:2]) < scale:
        raise ValueError(f"a {hr.shape[0]}x{hr.shape[1]} image is smaller than the scale {scale}")
    return imresize_down(mod_crop(hr, scale), scale, round_each_pass=round_each_pass)
