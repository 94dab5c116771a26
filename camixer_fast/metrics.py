"""Image quality metrics as the SR literature computes them (BasicSR conventions).

Images are uint8 arrays H×W×3 (RGB) or H×W (grey); ``border`` pixels are cropped from every side
before measuring (the upscale factor, by convention).
"""

from __future__ import annotations

import numpy as np

_BT601_Y = np.array([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB uint8 image, float64 in [16, 235] (MATLAB ``rgb2ycbcr``'s Y)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {img.shape}")
    return img.astype(np.float64) @ _BT601_Y + 16.0


def _prepare(a: np.ndarray, b: np.ndarray, border: int, y_channel: bool) -> tuple[np.ndarray, ...]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if border < 0 or 2 * border >= min(a.shape[0], a.shape[1]):
        raise ValueError(f"border {border} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
    if y_channel and a.ndim == 3 and a.shape[2] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    else:
        a, b = a.astype(np.float64), b.astype(np.float64)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return a, b


def psnr(img: np.ndarray, ref: np.ndarray, *, border: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB between two uint8 images (peak 255); on the Y channel by default.

    Identical images give ``inf``.
    """
    a, b = _prepare(img, ref, border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))
