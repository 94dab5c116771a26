"""MATLAB-compatible bicubic downscaling: ``imresize(img, 1/s, 'bicubic')`` on uint8 images.

This is how the SR benchmarks make their LR inputs (Set5's ``LR_bicubic`` files included):

- kernel: Keys cubic with a = -0.5; when downscaling by s it is widened by s
  (``h(x) = cubic(x / s) / s``, support 4·s input pixels): the antialiasing of MATLAB;
- output pixel u (1-based) sits at input coordinate ``x = u·s + 0.5·(1 − s)``; it takes the
  ``ceil(4·s) + 2`` input pixels from ``floor(x − 2·s)`` on, with weights normalised to sum 1;
- borders: indices outside the image are mirrored (``1, 2, …, n, n, n−1, …, 1``, repeated);
- the two dimensions are resized one after the other, the one with the smaller scale factor
  first, ties in dimension order: with one scale for both, rows (dimension 1, the height) first,
  then columns;
- each pass is rounded to uint8 (half away from zero, saturating), as MATLAB does for uint8
  (``round_each_pass=False`` keeps the intermediate in float64 and rounds once at the end: the
  result of resizing the image as doubles, ``im2uint8(imresize(im2double(img), 1/s))``).

Against Set5's ``LR_bicubic`` files: X2, X3 and X4 are bit-identical with the uint8 pipeline
(each pass rounded); X8 is bit-identical with ``round_each_pass=False`` (those files were made
in floating point), and differs by up to 2 levels on ~7% of pixels with the uint8 pipeline.

Each pass is one matrix product with a dense (out, in) weight matrix, so there are no
per-pixel Python loops.
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (MATLAB's ``cubic``), elementwise."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return inner + outer


def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """The (out_length, in_length) float64 matrix of one MATLAB bicubic resize pass.

    ``scale`` is output/input (1/s when downscaling by s); row u holds the normalised weights
    output pixel u gives to each input pixel, mirrored border contributions folded in.
    """
    if in_length < 1 or out_length < 1:
        raise ValueError(f"lengths must be >= 1, got {in_length} -> {out_length}")
    antialias = scale < 1.0
    kernel_width = 4.0 / scale if antialias else 4.0

    def kernel(d: np.ndarray) -> np.ndarray:
        return scale * _cubic(scale * d) if antialias else _cubic(d)

    u = np.arange(1, out_length + 1, dtype=np.float64)[:, None]              # [out, 1]
    x = u / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(x - kernel_width / 2.0)
    taps = int(np.ceil(kernel_width)) + 2
    indices = left + np.arange(taps, dtype=np.float64)[None, :]              # [out, taps], 1-based
    weights = kernel(x - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    period = 2 * in_length
    mirrored = (indices.astype(np.int64) - 1) % period                       # 0-based in [0, 2n)
    mirrored = np.where(mirrored < in_length, mirrored, period - 1 - mirrored)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], mirrored.shape)
    np.add.at(matrix, (rows, mirrored), weights)
    return matrix


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: round half away from zero, saturate to [0, 255]."""
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def _resize_axis(img: np.ndarray, axis: int, out_length: int, scale: float) -> np.ndarray:
    """One float64 resize pass of ``img`` along ``axis`` (no rounding)."""
    matrix = resize_matrix(img.shape[axis], out_length, scale)
    moved = np.moveaxis(img.astype(np.float64, copy=False), axis, 0)         # [in, ...]
    flat = matrix @ moved.reshape(moved.shape[0], -1)                        # [out, rest]
    return np.moveaxis(flat.reshape((out_length,) + moved.shape[1:]), 0, axis)


def imresize_down(img_uint8: np.ndarray, scale: int, *,
                  round_each_pass: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, 1/scale, 'bicubic')`` of a uint8 image.

    img_uint8: (H, W) or (H, W, C) uint8.
    scale:     integer downscaling factor s >= 1.
    round_each_pass: round to uint8 after each of the two passes (MATLAB on a uint8 image, the
               default), or only at the end (MATLAB on the image as doubles).
    Returns (ceil(H/s), ceil(W/s)[, C]) uint8 -- exactly (H/s, W/s) when s divides both
    (see :func:`make_lr`). Rows (the height) are resized first, then columns.
    """
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
    """Benchmark LR input of an HR image: crop HR to a multiple of ``scale``, then downscale
    (:func:`imresize_down`).

    hr_uint8: (H, W) or (H, W, C) uint8. Returns (H // scale, W // scale[, C]) uint8.
    """
    hr = np.asarray(hr_uint8)
    if min(hr.shape[:2]) < scale:
        raise ValueError(f"a {hr.shape[0]}x{hr.shape[1]} image is smaller than the scale {scale}")
    return imresize_down(mod_crop(hr, scale), scale, round_each_pass=round_each_pass)
