"""Image quality metrics as the SR literature computes them (BasicSR conventions).

Images are uint8 arrays H×W×3 (RGB) or H×W (grey); ``border`` pixels are cropped from every side
before measuring (the upscale factor, by convention). :func:`psnr` and :func:`ssim` work on the
BT.601 Y channel by default (``y_channel=False``: all channels); :func:`ws_psnr` and
:func:`ws_ssim` are the latitude-weighted metrics of equirectangular (360°) images, by default
as the official ODI-SR code (``codes/odisr/metrics/odi_metric.py``) measures them.
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


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps (OpenCV's ``getGaussianKernel(size, sigma)``)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation of (H, W) ``img`` with ``outer(kernel, kernel)``, 'valid' part.

    Returns (H - k + 1, W - k + 1) for k taps; a loop over the taps, vectorised over pixels.
    """
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
    """SSIM between two uint8 images as BasicSR computes it; on the Y channel by default.

    img, ref: (H, W, 3) RGB or (H, W) grey uint8, same shape. ``border`` pixels are cropped from
    every side first. The planes are float64 on the [0, 255] scale (Y in [16, 235]); the window
    is an 11×11 Gaussian with σ = 1.5, C1 = (0.01·255)², C2 = (0.03·255)², only the 'valid'
    part of the filtered maps is used, and the result is the mean of the SSIM map (for RGB with
    ``y_channel=False``, the mean over the three channels of each channel's mean SSIM).
    The cropped image must be at least 11×11. Identical images give 1.0.
    """
    a, b = _ssim_ready(img, ref, border, y_channel)
    return float(np.mean([_ssim_map(p, q).mean() for p, q in zip(_planes(a), _planes(b))]))


def erp_row_weights(height: int, rows: np.ndarray | None = None) -> np.ndarray:
    """WS weights of the rows of an equirectangular image of ``height`` rows, float64.

    Row p (0-based, of the full image) weighs cos((p + 0.5 − H/2)·π/H): ~1 at the equator, ~0
    at the poles (spec §4; WS-PSNR and the WS-L1 training loss). ``rows`` None gives all rows,
    (height,); else the weights of ``rows`` (any shape, e.g. the rows of a crop), same shape.
    """
    rows = np.arange(height) if rows is None else rows
    rows = np.asarray(rows, dtype=np.float64)
    return np.cos((rows + 0.5 - height / 2.0) * np.pi / height)


def ws_psnr(img: np.ndarray, ref: np.ndarray, *, border: int = 0,
            y_channel: bool = False) -> float:
    """WS-PSNR in dB of two equirectangular (ERP) uint8 images (peak 255).

    img, ref: (H, W, 3) RGB or (H, W) grey uint8 holding the full ERP image. After cropping
    ``border`` pixels from every side, the squared error of row p is weighted by
    :func:`erp_row_weights` of the cropped height and the weighted sum normalised by the sum of
    the weights over the same pixels. Every channel counts by default; ``y_channel=True``
    measures the BT.601 Y channel instead. Identical images give ``inf``.
    """
    a, b = _prepare(img, ref, border, y_channel)
    weights = erp_row_weights(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
    weights = np.broadcast_to(weights, a.shape)
    wmse = float(np.sum(weights * (a - b) ** 2) / np.sum(weights))
    return float("inf") if wmse == 0 else float(10.0 * np.log10(255.0**2 / wmse))


def ws_ssim(img: np.ndarray, ref: np.ndarray, *, border: int = 0,
            y_channel: bool = False) -> float:
    """WS-SSIM of two equirectangular (ERP) uint8 images, as the official ODI-SR code has it.

    The SSIM map of :func:`ssim` ('valid' part, (H − 10) × (W − 10) after the ``border`` crop),
    its rows weighted by :func:`erp_row_weights` of the map's own height H − 10; the weighted
    mean per channel, channels averaged (RGB by default). Identical images give 1.0.
    """
    a, b = _ssim_ready(img, ref, border, y_channel)
    weights = erp_row_weights(a.shape[0] - 10)[:, None]
    return float(np.mean([(_ssim_map(p, q) * weights).mean() / weights.mean()
                          for p, q in zip(_planes(a), _planes(b))]))
