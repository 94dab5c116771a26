"""Benchmark evaluation, the standard SR protocol: LR = MATLAB bicubic (or a given LR file),
SR rounded to uint8, PSNR/SSIM on BT.601 Y with a ``scale``-pixel border cropped; and the ODI-SR
protocol of 360° panoramas (:func:`evaluate_odi`): PSNR, SSIM, WS-PSNR, WS-SSIM on RGB, no border,
as the official ODI-SR test options (OSRT's, which CAMixerSR's ODI-SR code follows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from camixer_fast.io.image import read_rgb
from camixer_fast.evaluation.imresize import make_lr
from camixer_fast.evaluation.metrics import psnr, ssim, ws_psnr, ws_ssim
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm")
ODI_LR_FOLDERS = ("LR_fisheye", "LR_erp", "LR", "LR_bicubic")
"""LR folders of an ODI-SR split, ``<split>/<folder>/X<scale>``, tried in this order (LAU/OSRT:
``LR_fisheye``, made by the official ``make_clean_lau_dataset.py``)."""
ODI_SPLITS = (("odisr/testing", "ODI-SR"), ("sun_test", "SUN360"))
"""The test splits of a LAU dataset root (``lau_dataset_clean``) and the paper's table names."""


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
class ODIImageScore(ImageScore):
    """One panorama at one γ: ``psnr``/``ssim`` on RGB, and the latitude-weighted WS metrics."""

    ws_psnr: float
    ws_ssim: float


@dataclass
class GammaScore:
    """All images at one γ, with their means."""

    gamma: float
    images: list[ImageScore] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        """The mean of one field of the image scores ("psnr", "ws_ssim", "k_fraction", ...)."""
        return float(np.mean([getattr(s, metric) for s in self.images]))

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
        odi = bool(self.images) and all(isinstance(s, ODIImageScore) for s in self.images)
        metrics = ("psnr", "ssim", "ws_psnr", "ws_ssim") if odi else ("psnr", "ssim")
        return {"gamma": self.gamma, **{f"mean_{m}": self.mean(m) for m in metrics},
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


def super_resolve(model: CAMixerSR | CAMixerOSR, lr: np.ndarray) -> tuple[np.ndarray, float, float]:
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


def evaluate(model: CAMixerSR | CAMixerOSR, hr_dir: str | Path, gammas: list[float], *,
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

    def score(name: str, lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, k_fraction: float,
              seconds: float) -> ImageScore:
        return ImageScore(name, (lr.shape[0], lr.shape[1]), psnr(sr, hr, border=border),
                          ssim(sr, hr, border=border), k_fraction, seconds)
    return _score_all(model, pairs, gammas, score, progress)


def odi_pairs(hr_dir: str | Path, scale: int,
              lr_dir: str | Path | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, LR, HR) uint8 RGB panoramas of ``hr_dir``, LR by :func:`make_lr` or the file of
    the same name in ``lr_dir`` (:func:`find_lr_file`). Whole panoramas only (a crop would
    change the latitude weights and the condition): ValueError for an HR size not divisible by
    ``scale``, an LR that is not exactly HR / scale, or LR files without an HR image;
    FileNotFoundError for a missing LR file."""
    hr_paths = list_images(hr_dir)
    lr_paths: dict[Path, Path] = {}
    if lr_dir is not None:
        lr_paths = {hr_path: find_lr_file(lr_dir, hr_path, scale) for hr_path in hr_paths}
        unpaired = sorted(set(p.name for p in list_images(lr_dir))
                          - {p.name for p in lr_paths.values()})
        if unpaired:
            raise ValueError(f"{len(unpaired)} LR file(s) in {lr_dir} have no HR image in "
                             f"{hr_dir}: {', '.join(unpaired[:5])}")
    pairs = []
    for hr_path in hr_paths:
        hr = read_rgb(hr_path)
        if hr.shape[0] % scale or hr.shape[1] % scale:
            raise ValueError(f"{hr_path.name}: HR {hr.shape[0]}x{hr.shape[1]} is not divisible "
                             f"by the scale {scale} (ODI-SR evaluates whole panoramas)")
        lr = make_lr(hr, scale) if lr_dir is None else read_rgb(lr_paths[hr_path])
        if lr.shape[:2] != (hr.shape[0] // scale, hr.shape[1] // scale):
            raise ValueError(f"{hr_path.name}: LR {lr_paths[hr_path].name} is "
                             f"{lr.shape[0]}x{lr.shape[1]}, not HR {hr.shape[0]}x{hr.shape[1]}"
                             f" / {scale}")
        pairs.append((hr_path.stem, lr, hr))
    return pairs


def evaluate_odi(model: CAMixerSR | CAMixerOSR, hr_dir: str | Path, gammas: list[float], *,
                 lr_dir: str | Path | None = None,
                 progress: Callable[[ImageScore], None] | None = None) -> list[GammaScore]:
    """PSNR, SSIM, WS-PSNR, WS-SSIM (:class:`ODIImageScore`) of ``model`` on the panoramas of
    ``hr_dir`` (:func:`odi_pairs`) once per γ, as the official ODI-SR test: RGB, border 0, SR of
    the whole LR panorama (CAMixerOSR: its cos-latitude condition; CAMixerSR: none)."""
    def score(name: str, lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, k_fraction: float,
              seconds: float) -> ODIImageScore:
        return ODIImageScore(name, (lr.shape[0], lr.shape[1]), psnr(sr, hr, y_channel=False),
                             ssim(sr, hr, y_channel=False), k_fraction, seconds,
                             ws_psnr(sr, hr), ws_ssim(sr, hr))
    return _score_all(model, odi_pairs(hr_dir, model.scale, lr_dir), gammas, score, progress)


@dataclass(frozen=True)
class ODIDataset:
    """One ODI-SR test set: its table name, its HR folder and its LR folder (None: bicubic)."""

    name: str
    hr_dir: Path
    lr_dir: Path | None


def find_odi_datasets(root: str | Path, scale: int) -> list[ODIDataset]:
    """The splits of a LAU-style folder: ``root`` is a split (``HR/`` and
    ``<LR folder>/X<scale>/``, :data:`ODI_LR_FOLDERS`) or a dataset root holding the splits of
    :data:`ODI_SPLITS`. FileNotFoundError, naming what was tried, when neither or no LR."""
    root = Path(root)
    if (root / "HR").is_dir():
        splits = [(root.name, root)]
    else:
        splits = [(label, root / sub) for sub, label in ODI_SPLITS if (root / sub / "HR").is_dir()]
    if not splits:
        raise FileNotFoundError(f"{root}: no HR/ folder, nor a LAU dataset root with "
                                f"{' or '.join(f'{sub}/HR' for sub, _ in ODI_SPLITS)}")
    datasets = []
    for name, split in splits:
        tried = [split / folder / f"X{scale}" for folder in ODI_LR_FOLDERS]
        lr_dir = next((p for p in tried if p.is_dir()), None)
        if lr_dir is None:
            raise FileNotFoundError(f"{split}: no LR folder for ×{scale} (tried "
                                    f"{', '.join(str(p.relative_to(split)) for p in tried)}); "
                                    f"--hr-dir {split / 'HR'} makes bicubic LR")
        datasets.append(ODIDataset(name, split / "HR", lr_dir))
    return datasets


def _score_all(model: CAMixerSR | CAMixerOSR, pairs: list[tuple[str, np.ndarray, np.ndarray]],
               gammas: list[float], score: Callable[..., ImageScore],
               progress: Callable[[ImageScore], None] | None) -> list[GammaScore]:
    results = []
    for gamma in gammas:
        model.gamma = gamma
        scores = GammaScore(model.gamma)
        for name, lr, hr in pairs:
            sr, k_fraction, seconds = super_resolve(model, lr)
            image_score = score(name, lr, sr, hr, k_fraction, seconds)
            scores.images.append(image_score)
            if progress is not None:
                progress(image_score)
        results.append(scores)
    return results
