"""Image quality metrics as the SR literature computes them (BasicSR conventions).

Images are uint8 H×W×3 (RGB) or H×W; ``border`` pixels are cropped from every side first.
:func:`psnr`, :func:`ssim`: BT.601 Y by default; :func:`ws_psnr`, :func:`ws_ssim`: latitude-
weighted, for 360° images, by default as the official ODI-SR ``odi_metric.py`` (RGB, border 0).
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
    """PSNR in dB between two uint8 images (peak 255); identical images give ``inf``."""
    a, b = _prepare(img, ref, border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps (OpenCV's ``getGaussianKernel(size, sigma)``)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation of (H, W) ``img`` with ``outer(kernel, kernel)``: (H − k + 1, W − k + 1)."""
    taps = kernel.size
    rows = img.shape[0] - taps + 1
    cols = img.shape[1] - taps + 1
    vertical = sum(kernel[i] * img[i:i + rows] for i in range(taps))            # [rows, W]
    return sum(kernel[i] * vertical[:, i:i + cols] for i in range(taps))        # [rows, cols]


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map (H − 10, W − 10) of two (H, W) float64 planes on the [0, 255] scale."""
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    kernel = _gaussian_kernel()
    mu_a, mu_b = _filter_valid(a, kernel), _filter_valid(b, kernel)
    var_a = _filter_valid(a * a, kernel) - mu_a**2
    var_b = _filter_valid(b * b, kernel) - mu_b**2
    cov = _filter_valid(a * b, kernel) - mu_a * mu_b
    return ((2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def _planes(a: np.ndarray) -> list[np.ndarray]:
    return [a] if a.ndim == 2 else [a[..., c] for c in range(a.shape[2])]


def _ssim_ready(img: np.ndarray, ref: np.ndarray, border: int,
                y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = _prepare(img, ref, border, y_channel)
    if min(a.shape[0], a.shape[1]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after the border crop, got "
                         f"{a.shape[0]}x{a.shape[1]}")
    return a, b


def ssim(img: np.ndarray, ref: np.ndarray, *, border: int = 0, y_channel: bool = True) -> float:
    """SSIM as BasicSR computes it (Y by default): float64 planes on the [0, 255] scale, 11×11
    Gaussian σ 1.5, C1 = (0.01·255)², C2 = (0.03·255)², the mean of the 'valid' SSIM map,
    channels averaged. ValueError below 11×11 after the crop; identical images give 1.0."""
    a, b = _ssim_ready(img, ref, border, y_channel)
    return float(np.mean([_ssim_map(p, q).mean() for p, q in zip(_planes(a), _planes(b))]))


def erp_row_weights(height: int, rows: np.ndarray | None = None) -> np.ndarray:
    """WS weights float64 of an ERP image of ``height`` rows: row p weighs cos((p + 0.5 − H/2)·
    π/H) (spec §4); ``rows`` None: all, (height,); else those rows (any shape, e.g. a crop's)."""
    rows = np.arange(height) if rows is None else rows
    rows = np.asarray(rows, dtype=np.float64)
    return np.cos((rows + 0.5 - height / 2.0) * np.pi / height)


def ws_psnr(img: np.ndarray, ref: np.ndarray, *, border: int = 0,
            y_channel: bool = False) -> float:
    """WS-PSNR in dB of two whole ERP uint8 images: squared errors weighted by
    :func:`erp_row_weights` of the (cropped) height, normalised by the weights' sum; RGB by
    default. Identical images give ``inf``."""
    a, b = _prepare(img, ref, border, y_channel)
    weights = erp_row_weights(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
    weights = np.broadcast_to(weights, a.shape)
    wmse = float(np.sum(weights * (a - b) ** 2) / np.sum(weights))
    return float("inf") if wmse == 0 else float(10.0 * np.log10(255.0**2 / wmse))


def ws_ssim(img: np.ndarray, ref: np.ndarray, *, border: int = 0,
            y_channel: bool = False) -> float:
    """WS-SSIM of two whole ERP uint8 images (official ODI-SR): the 'valid' SSIM map of
    :func:`ssim`, (H − 10) rows weighted by ``erp_row_weights(H − 10)``, channels averaged."""
    a, b = _ssim_ready(img, ref, border, y_channel)
    weights = erp_row_weights(a.shape[0] - 10)[:, None]
    return float(np.mean([(_ssim_map(p, q) * weights).mean() / weights.mean()
                          for p, q in zip(_planes(a), _planes(b))]))
