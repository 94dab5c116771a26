"""Benchmark evaluation, the standard SR protocol: LR = MATLAB bicubic (or a given LR file),
SR rounded to uint8, PSNR/SSIM on BT.601 Y with a ``scale``-pixel border cropped."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from camixer_fast.io.image import read_rgb
from camixer_fast.evaluation.imresize import make_lr
from camixer_fast.evaluation.metrics import psnr, ssim
from camixer_fast.reference.model import CAMixerSR

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class ImageScore:
    """One image at one γ. ``k_fraction``: mean over blocks of K / N actually used."""

    name: str
    lr_size: tuple[int, int]
    psnr: float
    ssim: float
    k_fraction: float
    seconds: float


@dataclass
class GammaScore:
    """All images at one γ, with their means."""

    gamma: float
    images: list[ImageScore] = field(default_factory=list)

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([s.psnr for s in self.images]))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([s.ssim for s in self.images]))

    @property
    def mean_k_fraction(self) -> float:
        return float(np.mean([s.k_fraction for s in self.images]))

    @property
    def seconds(self) -> float:
        return float(sum(s.seconds for s in self.images))

    def to_dict(self) -> dict:
        return {"gamma": self.gamma, "mean_psnr": self.mean_psnr, "mean_ssim": self.mean_ssim,
                "mean_k_fraction": self.mean_k_fraction, "seconds": self.seconds,
                "images": [asdict(s) for s in self.images]}


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def find_lr_file(lr_dir: str | Path, hr_path: Path, scale: int) -> Path:
    """``<stem>x<scale>.<ext>`` or ``<stem>.<ext>`` in ``lr_dir`` (any image extension)."""
    lr_dir = Path(lr_dir)
    for stem in (f"{hr_path.stem}x{scale}", hr_path.stem):
        for ext in (hr_path.suffix, *IMAGE_EXTENSIONS):
            candidate = lr_dir / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no LR file for {hr_path.name} in {lr_dir} "
                            f"(tried {hr_path.stem}x{scale}.* and {hr_path.stem}.*)")


def super_resolve(model: CAMixerSR, lr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """lr (h, w, 3) uint8 -> (SR (s·h, s·w, 3) uint8, mean K / N over blocks, seconds)."""
    param = next(model.parameters())
    x = torch.from_numpy(np.array(lr, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).to(param.device, param.dtype) / 255.0
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)
    start = time.perf_counter()
    with torch.inference_mode():
        sr, routing = model(x, return_routing=True)
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)
    seconds = time.perf_counter() - start
    k_fraction = routing.k_fraction().mean().item()
    out = sr[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return out, k_fraction, seconds


def evaluate(model: CAMixerSR, hr_dir: str | Path, gammas: list[float], *,
             lr_dir: str | Path | None = None, border: int | None = None,
             progress: Callable[[ImageScore], None] | None = None) -> list[GammaScore]:
    """PSNR / SSIM of ``model`` on every image of ``hr_dir`` once per γ (``model.gamma`` left
    at the last); LR by :func:`make_lr` or from ``lr_dir``; ``progress(score)`` per image."""
    scale = model.scale
    border = scale if border is None else border
    pairs = []
    for hr_path in list_images(hr_dir):
        hr = read_rgb(hr_path)
        if lr_dir is None:
            lr = make_lr(hr, scale)
        else:
            lr = read_rgb(find_lr_file(lr_dir, hr_path, scale))
            need = (lr.shape[0] * scale, lr.shape[1] * scale)
            if hr.shape[0] < need[0] or hr.shape[1] < need[1]:
                raise ValueError(f"{hr_path.name}: HR {hr.shape[0]}x{hr.shape[1]} is smaller "
                                 f"than {scale} × its LR {lr.shape[0]}x{lr.shape[1]}")
        pairs.append((hr_path.stem, lr, hr[: lr.shape[0] * scale, : lr.shape[1] * scale]))
    results = []
    for gamma in gammas:
        model.gamma = gamma
        scores = GammaScore(model.gamma)
        for name, lr, hr in pairs:
            sr, k_fraction, seconds = super_resolve(model, lr)
            score = ImageScore(name, (lr.shape[0], lr.shape[1]),
                               psnr(sr, hr, border=border), ssim(sr, hr, border=border),
                               k_fraction, seconds)
            scores.images.append(score)
            if progress is not None:
                progress(score)
        results.append(scores)
    return results
