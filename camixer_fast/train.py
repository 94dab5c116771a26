"""Training and fine-tuning CAMixerSR (spec §4) on the network that serves inference.

One code path from a laptop CPU to many GPUs:

- **data** (:class:`PairedPatches`): HR images from a folder, LR made on the fly with the
  MATLAB-compatible bicubic of :mod:`camixer_fast.imresize` (from a neighbourhood of the crop
  only, bit-identical to cropping the LR of the whole image) or read from an LR folder; random
  LR crops (64×64 by default) with the HR crop under them, flips and 90° rotations. Every crop
  and augmentation is a pure function of (seed, epoch, sample index), so a sample is the same
  whichever process draws it and whenever it is drawn.
- **objective** (:func:`training_loss`): L1 (or, for 360° equirectangular images, the
  latitude-weighted L1) + the ratio loss 2γ·(m − 0.5)², m the mean training mask over all
  blocks, windows and images of the *global* batch.
- **optimisation**: AdamW, a MultiStep schedule and an EMA of the weights, with the official
  defaults (:class:`TrainConfig`); periodic validation (Y-PSNR of the EMA weights on a held
  folder) and atomic checkpoints in the official format (``params``, ``params_ema``) plus the
  training state under extra keys, so that :func:`camixer_fast.load_model` and the official
  tooling read them and ``resume`` continues exactly where an uninterrupted run would be.
- **scale-out**: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
  DistributedDataParallel (NCCL on GPUs, gloo on CPUs) and every rank takes its share of each
  global batch through a ``DistributedSampler``; only rank 0 writes checkpoints and logs.

Multi-process runs equal single-process runs on the same global batch by design: the global
batch at step t is the same set of samples (a DistributedSampler with ``drop_last=True`` over
the same permutation, the local batches never straddle epochs), every sample's crop is keyed on
its index, the pixel loss is a mean over equally sized shards (so DDP's gradient average is the
mean over the global batch), and the ratio loss -- the square of a mean over the batch, which
averaging per-rank squares would get wrong -- is computed from the all-reduced m with a
gradient of 4γ(m − 0.5)·∇m_rank on each rank, whose DDP average is exactly 4γ(m − 0.5)·∇m.
Only the Gumbel noise of the training mask differs (it is drawn per rank); with
``train_noise=False`` the two runs agree to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from camixer_fast.backends import can_use_triton, resolve_backend
from camixer_fast.evaluate import find_lr_file, list_images, read_rgb, super_resolve
from camixer_fast.imresize import imresize_down, make_lr
from camixer_fast.loading import CheckpointError, load_model
from camixer_fast.metrics import psnr
from camixer_fast.reference.model import CAMixerSR

TRAIN_BACKENDS = ("auto", "reference", "triton")
LOSSES = ("l1", "ws-l1")
AUGMENTS = ("flip-rot", "hflip", "none")
CHECKPOINT_FORMAT = "camixer_fast.train/1"
CONTINUITY_KEYS = ("batch_size", "patch_size", "seed", "repeat", "augment", "loss", "hr_dir",
                   "lr_dir", "scale", "train_noise")
"""Settings a resumed run must share with the checkpoint to continue it exactly."""


class DataError(ValueError):
    """A training or validation folder cannot be used (missing, empty, unreadable, too small)."""


class ConfigError(ValueError):
    """A setting is out of range or cannot be honoured here (e.g. the Triton backend on a CPU)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are the official recipe (spec §4).

    ``batch_size`` is the global batch (split evenly over the ranks), ``patch_size`` the LR
    crop side (the HR crop is ``scale`` times larger). ``init`` is a registered weights name or
    a checkpoint to fine-tune; ``None`` trains from scratch a model of ``n_feats`` channels and
    ``blocks_per_group`` blocks (seeded by ``seed``). ``scale`` None means 4 from scratch and the
    checkpoint's scale when fine-tuning. ``repeat`` is how many times an epoch visits each image
    (None: enough for at least 100 global batches per epoch). ``probe`` fixed training crops
    (None: ``batch_size``) are scored with the training L1 at every validation. Intervals of 0
    disable that event; the last step is always validated and saved.
    """

    hr_dir: str
    out_dir: str
    lr_dir: str | None = None
    val_dir: str | None = None
    val_lr_dir: str | None = None
    init: str | None = None
    n_feats: int = 36
    blocks_per_group: tuple[int, ...] = (4, 4, 6, 6)
    scale: int | None = None
    gamma: float = 0.5
    val_gamma: float | None = None
    iterations: int = 500_000
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    milestones: tuple[int, ...] = (250_000, 400_000, 450_000, 475_000)
    lr_gamma: float = 0.5
    ema_decay: float = 0.999
    loss: str = "l1"
    augment: str = "flip-rot"
    repeat: int | None = None
    train_noise: bool = True
    val_every: int = 5000
    save_every: int = 5000
    log_every: int = 100
    probe: int | None = None
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    workers: int = 0
    cache: bool | None = None
    resume: str | None = None
    progress: bool | None = None

    def check(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        positive = ("iterations", "batch_size", "patch_size", "n_feats")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "save_every", "log_every", "workers", "seed"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scale is not None and self.scale < 1:
            raise ConfigError(f"scale must be >= 1, got {self.scale}")
        if self.repeat is not None and self.repeat < 1:
            raise ConfigError(f"repeat must be >= 1, got {self.repeat}")
        if self.probe is not None and self.probe < 0:
            raise ConfigError(f"probe must be >= 0, got {self.probe}")
        if not self.blocks_per_group or min(self.blocks_per_group) < 1:
            raise ConfigError("blocks_per_group must be positive counts, got "
                              f"{self.blocks_per_group}")
        for name in ("gamma", "val_gamma"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(
                m < 1 for m in self.milestones):
            raise ConfigError("milestones must be increasing positive steps, got "
                              f"{self.milestones}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.backend not in TRAIN_BACKENDS:
            raise ConfigError(f"backend must be one of {TRAIN_BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (NumPy's SeedSequence)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def erp_row_weights(rows: np.ndarray, height: int) -> np.ndarray:
    """WS weights of equirectangular rows: cos((p + 0.5 − H/2)·π/H), p the 0-based row of the
    full image and H its height (spec §4); same shape as ``rows``, float32."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.cos((rows + 0.5 - height / 2.0) * np.pi / height).astype(np.float32)


def bicubic_lr_crop(hr: np.ndarray, scale: int, top: int, left: int, size: int) -> np.ndarray:
    """``make_lr(hr, scale)[top:top+size, left:left+size]`` computed from a neighbourhood only.

    hr: (H, W, C) or (H, W) uint8. Returns (size, size[, C]) uint8, bit-identical to the crop of
    the whole image's LR: each LR pixel depends on at most 2s + 2 HR pixels either side of its
    own s×s block, so a margin of ceil((2s + 2) / s) LR pixels (clipped at the image borders,
    where the mirroring is the whole image's) makes the interior exact.
    """
    lr_h, lr_w = hr.shape[0] // scale, hr.shape[1] // scale
    if top < 0 or left < 0 or top + size > lr_h or left + size > lr_w:
        raise ValueError(f"crop {size}x{size} at ({top}, {left}) is outside the {lr_h}x{lr_w} LR")
    if scale == 1:
        return hr[top: top + size, left: left + size].copy()
    margin = -(-(2 * scale + 2) // scale)
    y0, x0 = max(0, top - margin), max(0, left - margin)
    y1, x1 = min(lr_h, top + size + margin), min(lr_w, left + size + margin)
    region = imresize_down(hr[y0 * scale: y1 * scale, x0 * scale: x1 * scale], scale)
    return region[top - y0: top - y0 + size, left - x0: left - x0 + size]


def augment_array(arr: np.ndarray, hflip: bool, vflip: bool, transpose: bool) -> np.ndarray:
    """Flip (H, W[, C]) left-right and/or top-bottom, then swap H and W (with the flips, the
    eight symmetries of the square, as BasicSR's ``augment``)."""
    if hflip:
        arr = arr[:, ::-1]
    if vflip:
        arr = arr[::-1]
    if transpose:
        arr = arr.swapaxes(0, 1)
    return np.ascontiguousarray(arr)


def _to_tensor(img: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


@dataclass
class _Image:
    path: Path
    hr_shape: tuple[int, int]
    lr_path: Path | None
    hr: np.ndarray | None = None
    lr: np.ndarray | None = None


def _read_image(path: Path, what: str) -> np.ndarray:
    try:
        return read_rgb(path)
    except Exception as err:  # PIL raises OSError, ValueError, DecompressionBombError, ...
        raise DataError(f"{what} {path} cannot be read: {err}") from err


class PairedPatches(Dataset):
    """Random (LR, HR) crop pairs from a folder of HR images, for training.

    Every image of ``hr_dir`` is read once at construction, so that unreadable files and images
    smaller than the crop are reported (all of them, by name) before training starts; they are
    kept in memory when ``cache`` is True (None: when they take under 2 GiB). LR comes from
    ``lr_dir`` (``<stem>x<scale>.<ext>`` or ``<stem>.<ext>``, HR cropped to scale × LR) or is
    made with the benchmark bicubic (:func:`bicubic_lr_crop`). An epoch visits each image
    ``repeat`` times; item ``(epoch, i)`` is a crop of image ``i % n`` drawn from
    ``derive_seed(seed, stream, epoch, i)``, so it does not depend on which process loads it.

    Items are dicts: ``lr`` (3, p, p) and ``hr`` (3, s·p, s·p) float32 in [0, 1]; ``top`` and
    ``height``, the crop's first HR row in the full image and the HR height; with ``erp``,
    ``weight`` (1, s·p, s·p), the WS weight of each HR pixel, augmented with the images.
    """

    def __init__(self, hr_dir: str | os.PathLike, *, scale: int, patch_size: int = 64,
                 lr_dir: str | os.PathLike | None = None, augment: str = "flip-rot",
                 erp: bool = False, repeat: int = 1, seed: int = 0, stream: int = 0,
                 cache: bool | None = None) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if scale < 1 or patch_size < 1 or repeat < 1:
            raise ValueError(f"scale, patch_size and repeat must be >= 1, got {scale}, "
                             f"{patch_size}, {repeat}")
        self.scale, self.patch_size, self.augment, self.erp = scale, patch_size, augment, erp
        self.repeat, self.seed, self.stream = repeat, seed, stream
        try:
            paths = list_images(hr_dir)
        except FileNotFoundError as err:
            raise DataError(f"training data: {err}") from None
        self.images: list[_Image] = []
        problems: list[str] = []
        total_bytes = 0
        for path in paths:
            try:
                image, nbytes = self._scan(path, lr_dir)
            except (DataError, FileNotFoundError) as err:
                problems.append(str(err))
                continue
            total_bytes += nbytes
            self.images.append(image)
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... ({len(problems)} in all)" if len(problems) > 10 else ""
            raise DataError(f"{len(problems)} of the {len(paths)} images in {hr_dir} cannot be "
                            f"used for training:\n  {shown}{more}")
        self.cached = total_bytes < 2 << 30 if cache is None else bool(cache)
        if not self.cached:
            for image in self.images:
                image.hr = image.lr = None

    def _scan(self, path: Path, lr_dir: str | os.PathLike | None) -> tuple[_Image, int]:
        s, p = self.scale, self.patch_size
        hr = _read_image(path, "HR image")
        if lr_dir is None:
            if hr.shape[0] // s < p or hr.shape[1] // s < p:
                raise DataError(f"{path}: {hr.shape[0]}x{hr.shape[1]} is smaller than the HR "
                                f"crop {s * p}x{s * p} (LR patch {p} × scale {s})")
            return _Image(path, hr.shape[:2], None, hr, None), hr.nbytes
        lr_path = find_lr_file(lr_dir, path, s)
        lr = _read_image(lr_path, "LR image")
        if lr.shape[0] < p or lr.shape[1] < p:
            raise DataError(f"{lr_path}: {lr.shape[0]}x{lr.shape[1]} is smaller than the LR "
                            f"patch {p}x{p}")
        if hr.shape[0] < s * lr.shape[0] or hr.shape[1] < s * lr.shape[1]:
            raise DataError(f"{path}: HR {hr.shape[0]}x{hr.shape[1]} is smaller than {s} × "
                            f"its LR {lr.shape[0]}x{lr.shape[1]} ({lr_path.name})")
        return _Image(path, hr.shape[:2], lr_path, hr, lr), hr.nbytes + lr.nbytes

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def with_stream(self, stream: int) -> PairedPatches:
        """The same images with other random crops (another ``stream`` key), sharing memory."""
        other = copy.copy(self)
        other.stream = stream
        return other

    def _arrays(self, image: _Image) -> tuple[np.ndarray, np.ndarray | None]:
        if image.hr is not None:
            return image.hr, image.lr
        hr = _read_image(image.path, "HR image")
        lr = None if image.lr_path is None else _read_image(image.lr_path, "LR image")
        return hr, lr

    def sample(self, epoch: int, index: int) -> dict[str, Any]:
        """The crop pair of item ``index`` in ``epoch`` (deterministic); see the class doc."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of a {len(self)}-item dataset")
        image = self.images[index % len(self.images)]
        rng = np.random.default_rng(derive_seed(self.seed, self.stream, epoch, index))
        s, p = self.scale, self.patch_size
        hr, lr = self._arrays(image)
        lr_h, lr_w = (hr.shape[0] // s, hr.shape[1] // s) if lr is None else lr.shape[:2]
        top = int(rng.integers(0, lr_h - p + 1))
        left = int(rng.integers(0, lr_w - p + 1))
        hr_crop = hr[top * s: (top + p) * s, left * s: (left + p) * s]
        if lr is None:
            lr_crop = bicubic_lr_crop(hr, s, top, left, p)
        else:
            lr_crop = lr[top: top + p, left: left + p]
        flags = (False, False, False)
        if self.augment == "flip-rot":
            flags = tuple(bool(b) for b in rng.random(3) < 0.5)
        elif self.augment == "hflip":
            flags = (bool(rng.random() < 0.5), False, False)
        item: dict[str, Any] = {
            "lr": _to_tensor(augment_array(lr_crop, *flags)),
            "hr": _to_tensor(augment_array(hr_crop, *flags)),
            "top": top * s,
            "height": int(image.hr_shape[0]),
        }
        if self.erp:
            rows = np.arange(top * s, (top + p) * s)
            weight = np.repeat(erp_row_weights(rows, image.hr_shape[0])[:, None], p * s, axis=1)
            item["weight"] = torch.from_numpy(augment_array(weight, *flags))[None]
        return item

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.sample(int(epoch), int(index))


class SampleStream(Sampler):
    """The endless ``(epoch, index)`` keys one rank loads, from a given global step on.

    Each epoch is a DistributedSampler permutation (``drop_last=True``) of which this rank
    takes its share; only whole local batches are used, so the k-th local batches of all ranks
    together hold the same samples as the k-th global batch of a single process.
    """

    def __init__(self, dataset: Dataset, *, world_size: int, rank: int, local_batch: int,
                 seed: int, start_batch: int = 0) -> None:
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.local_batch = local_batch
        self.batches_per_epoch = len(self.sampler) // local_batch
        if self.batches_per_epoch < 1:
            raise DataError(f"an epoch of {len(dataset)} samples holds no global batch of "
                            f"{local_batch * world_size}; raise repeat or lower the batch size")
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[: self.batches_per_epoch * self.local_batch]
            for index in indices[skip * self.local_batch:]:
                yield epoch, index
            epoch, skip = epoch + 1, 0


def load_validation_pairs(hr_dir: str | os.PathLike, scale: int,
                          lr_dir: str | os.PathLike | None = None
                          ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, LR (h, w, 3) uint8, HR (s·h, s·w, 3) uint8) of every image of ``hr_dir``: LR by
    :func:`make_lr` or read from ``lr_dir`` (HR cropped to scale × LR), as ``camixer-fast eval``."""
    try:
        paths = list_images(hr_dir)
    except FileNotFoundError as err:
        raise DataError(f"validation data: {err}") from None
    pairs = []
    for path in paths:
        hr = _read_image(path, "validation HR image")
        if lr_dir is None:
            if min(hr.shape[:2]) < 2 * scale + 1:
                raise DataError(f"validation image {path} ({hr.shape[0]}x{hr.shape[1]}) is too "
                                f"small for ×{scale} with a border of {scale}")
            lr = make_lr(hr, scale)
        else:
            try:
                lr = _read_image(find_lr_file(lr_dir, path, scale), "validation LR image")
            except FileNotFoundError as err:
                raise DataError(str(err)) from None
            if hr.shape[0] < scale * lr.shape[0] or hr.shape[1] < scale * lr.shape[1]:
                raise DataError(f"validation image {path}: HR {hr.shape[0]}x{hr.shape[1]} is "
                                f"smaller than {scale} × its LR {lr.shape[0]}x{lr.shape[1]}")
        pairs.append((path.stem, lr, hr[: lr.shape[0] * scale, : lr.shape[1] * scale]))
    return pairs


def pixel_loss(sr: Tensor, hr: Tensor, weight: Tensor | None = None) -> Tensor:
    """L1 = mean |sr − hr| over (B, 3, H, W); with ``weight`` (B, 1, H, W), the WS-L1
    mean(weight · |sr − hr|) (unnormalised latitude weights, spec §4). Returns a 0-dim tensor."""
    diff = (sr - hr).abs()
    return diff.mean() if weight is None else (diff * weight).mean()


def unwrap(net: nn.Module) -> CAMixerSR:
    """The CAMixerSR inside a DistributedDataParallel wrapper (or ``net`` itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class LossTerms:
    """One training step's objective. ``total`` carries the gradient of this rank's share;
    the rest are detached values of the global batch: ``l1`` the pixel loss, ``ratio`` the
    ratio loss, ``mask_means`` (blocks,) the fraction of windows each block sent to attention."""

    total: Tensor
    l1: Tensor
    ratio: Tensor
    mask_means: Tensor

    @property
    def loss(self) -> Tensor:
        return self.l1 + self.ratio


def training_loss(net: nn.Module, lr: Tensor, hr: Tensor, weight: Tensor | None = None, *,
                  generator: torch.Generator | None = None) -> LossTerms:
    """The official objective, pixel L1 + 2γ·(m − 0.5)², on a (possibly DDP-wrapped) model in
    training mode.

    lr: (b, 3, p, p), hr: (b, 3, s·p, s·p), weight: None or (b, 1, s·p, s·p) for WS-L1.
    m is the mean training mask over all blocks, windows and images of the global batch. Under
    torch.distributed (equal local batches on every rank) the per-block mask means and the
    pixel loss are all-reduced, and the ratio term's gradient on each rank is
    4γ(m − 0.5)·∇m_rank, so that DDP's average of the ranks' gradients is the gradient of the
    global objective; in a single process this is the gradient of the model's own ratio loss.
    """
    model = unwrap(net)
    if not model.training:
        raise RuntimeError("training_loss needs the model in training mode (model.train())")
    sr, _ = net(lr, generator=generator)
    local_means = torch.stack([mixer.last_mask_mean for mixer in model.mixers()])
    pix = pixel_loss(sr, hr, weight)
    stats = torch.cat([pix.detach().reshape(1), local_means.detach().float()])
    world = _world()
    if world > 1:
        dist.all_reduce(stats)
        stats = stats / world
    m_global = stats[1:].mean()
    m_local = local_means.mean()
    slope = 4.0 * model.gamma * (m_global - 0.5)
    ratio = 2.0 * model.gamma * (m_global - 0.5) ** 2
    total = pix + ratio + slope * (m_local - m_local.detach())
    return LossTerms(total, stats[0], ratio, stats[1:])


class EMA:
    """Exponential moving average of a model's state: ema ← decay·ema + (1 − decay)·weights
    after every optimiser step (floating tensors; others copied), starting at the weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            ema = self.state[key]
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                ema.copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.state) ^ set(state)
        if missing:
            raise CheckpointError(f"EMA state keys differ from the model's: {sorted(missing)[:5]}")
        for key, value in state.items():
            self.state[key].copy_(value)


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """``torch.save(payload, path)`` atomically: written to a temporary file in the same
    folder, flushed to disk and moved into place, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_name, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint written by :class:`Trainer` (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for non-checkpoint files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    needed = ("params", "params_ema", "optimizer", "scheduler", "step", "model_config")
    missing = [k for k in needed if not isinstance(obj, Mapping) or k not in obj]
    if missing:
        raise CheckpointError(f"{path} has no training state to resume from (missing "
                              f"{missing}); use it as --init to fine-tune instead")
    return dict(obj)


class ProgressLine:
    """A one-line training progress bar on a terminal stream, redrawn at most 4 times a
    second; nothing on anything else."""

    def __init__(self, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        isatty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = isatty if enabled is None else enabled
        self.last = 0.0

    def update(self, step: int, text: str, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.last < 0.25):
            return
        self.last = time.monotonic()
        filled = 24 * step // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (24 - filled)}] {step}/{self.total} {text}"
        self.stream.write("\r" + line[:150] + "\x1b[K")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1: NCCL on CUDA, gloo
    on the CPU) and pick this process's device (``cuda:LOCAL_RANK`` on GPUs); a plain single
    process otherwise. ``device`` None means CUDA when available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev)


def training_backend(backend: str, device: torch.device | str) -> str:
    """The backend a training run uses: "auto" is "triton" on a CUDA device the kernels
    support (their autograd Functions), else "reference"; "triton" where it cannot run
    (a CPU without ``TRITON_INTERPRET=1``, an old GPU) raises ConfigError saying why."""
    if backend not in TRAIN_BACKENDS:
        raise ConfigError(f"training backend must be one of {TRAIN_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and can_use_triton(device)[0] else "reference"
    try:
        return resolve_backend(backend, device)
    except RuntimeError as err:
        raise ConfigError(str(err)) from None


def _model_config(model: CAMixerSR) -> dict[str, Any]:
    return {"n_feats": model.n_feats, "scale": model.scale,
            "blocks_per_group": list(model.blocks_per_group), "window_size": model.window_size}


class Trainer:
    """A training run: builds the data, model, optimiser, schedule and EMA from a
    :class:`TrainConfig` (resuming from ``config.resume`` when set); :meth:`run` trains to
    ``config.iterations``. Data and validation folders are checked in the constructor, so bad
    data fails before any training step; so is an output folder that already holds a
    checkpoint when ``config.resume`` is not set (nothing is overwritten by accident).

    Files written by rank 0 in ``config.out_dir``: ``last.pth`` (every ``save_every`` steps and
    at the end) and ``best.pth`` (best validation PSNR), both official-format checkpoints with
    the training state under extra keys; ``log.jsonl``, one JSON object per line.
    """

    def __init__(self, config: TrainConfig, dist_info: DistInfo | None = None) -> None:
        config.check()
        self.config = config
        self.dist = dist_info if dist_info is not None else setup_distributed(config.device)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"batch size {config.batch_size} is not divisible by the "
                              f"{self.dist.world_size} processes")
        self.local_batch = config.batch_size // self.dist.world_size
        self.out_dir = Path(config.out_dir)
        checkpoint = self._resume_checkpoint()
        model = self._build_model(checkpoint)
        self.scale = model.scale
        self.repeat = config.repeat
        self.data = PairedPatches(config.hr_dir, scale=self.scale, patch_size=config.patch_size,
                                  lr_dir=config.lr_dir, augment=config.augment,
                                  erp=config.loss == "ws-l1", repeat=1, seed=config.seed,
                                  cache=config.cache)
        if self.repeat is None:
            self.repeat = max(1, math.ceil(100 * config.batch_size / len(self.data.images)))
        self.data.repeat = self.repeat
        probe_count = config.batch_size if config.probe is None else config.probe
        self.probe_keys = [(0, i % len(self.data)) for i in range(probe_count)]
        self.probe_data = self.data.with_stream(1)
        self.val_pairs = (load_validation_pairs(config.val_dir, self.scale, config.val_lr_dir)
                          if config.val_dir else [])
        self.model = model
        self.ema = EMA(model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                           betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.milestones), gamma=config.lr_gamma)
        self.step = 0
        self.best_psnr: float | None = None
        if checkpoint is not None:
            self._load_state(checkpoint)
        self.net: nn.Module = model
        if self.dist.world_size > 1:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
        self.noise = torch.Generator(device=self.dist.device)
        self.eval_model: CAMixerSR | None = None

    def _resume_checkpoint(self) -> dict[str, Any] | None:
        resume = self.config.resume
        if not resume:
            if (self.out_dir / "last.pth").exists():
                raise ConfigError(f"{self.out_dir} already holds a training checkpoint "
                                  "(last.pth): resume it, or choose another output folder")
            return None
        path = self.out_dir / "last.pth" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            return None
        return read_checkpoint(path)

    def _build_model(self, checkpoint: Mapping[str, Any] | None) -> CAMixerSR:
        cfg, device = self.config, self.dist.device
        if checkpoint is not None:
            shape = dict(checkpoint["model_config"])
            shape["blocks_per_group"] = tuple(shape["blocks_per_group"])
            model = CAMixerSR(**shape, gamma=cfg.gamma)
        elif cfg.init is not None:
            model = load_model(cfg.init, gamma=cfg.gamma, backend="reference")
        else:
            torch.manual_seed(cfg.seed)
            model = CAMixerSR(n_feats=cfg.n_feats, scale=cfg.scale or 4,
                              blocks_per_group=tuple(cfg.blocks_per_group), gamma=cfg.gamma)
        if cfg.scale is not None and cfg.scale != model.scale:
            raise ConfigError(f"scale {cfg.scale} was asked for but the model is ×{model.scale}")
        model = model.to(device).train()
        model.backend = training_backend(cfg.backend, device)
        model.train_noise = cfg.train_noise
        return model

    def _load_state(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get("train_config") or {}
        current = self.config.to_dict()
        if saved.get("repeat") is None:
            saved = dict(saved, repeat=checkpoint.get("repeat"))
        current["repeat"] = self.repeat
        differ = [k for k in CONTINUITY_KEYS if k in saved and saved[k] != current.get(k)]
        if checkpoint.get("world_size") != self.dist.world_size:
            differ.append("world_size (the Gumbel noise is drawn per process)")
        if differ and self.dist.is_main:
            print(f"camixer-fast train: warning: resuming with settings that differ from the "
                  f"checkpoint's ({', '.join(differ)}); the run will not continue exactly as "
                  "the interrupted one", file=sys.stderr)
        self.model.load_state_dict(checkpoint["params"], strict=True)
        self.ema.load_state_dict(checkpoint["params_ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step = int(checkpoint["step"])
        best = checkpoint.get("best_psnr")
        self.best_psnr = None if best is None else float(best)

    def checkpoint_payload(self) -> dict[str, Any]:
        """The checkpoint dict: ``params`` and ``params_ema`` (official format) and the
        training state (optimiser, schedule, step, best PSNR, configuration)."""
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "params_ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "best_psnr": self.best_psnr,
            "model_config": _model_config(self.model),
            "train_config": self.config.to_dict(),
            "repeat": self.repeat,
            "world_size": self.dist.world_size,
            "format": CHECKPOINT_FORMAT,
        }

    def save(self, name: str = "last.pth") -> Path | None:
        """Write the checkpoint to ``out_dir / name`` (rank 0 only; others return None)."""
        if not self.dist.is_main:
            return None
        path = self.out_dir / name
        save_checkpoint(path, self.checkpoint_payload())
        return path

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``out_dir/log.jsonl`` (rank 0 only)."""
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def loader(self) -> DataLoader:
        """Batches of this rank from the current step on (endless)."""
        stream = SampleStream(self.data, world_size=self.dist.world_size, rank=self.dist.rank,
                              local_batch=self.local_batch, seed=self.config.seed,
                              start_batch=self.step)
        return DataLoader(self.data, batch_size=self.local_batch, sampler=stream,
                          num_workers=self.config.workers,
                          pin_memory=self.dist.device.type == "cuda",
                          persistent_workers=self.config.workers > 0)

    def train_step(self, batch: Mapping[str, Tensor]) -> LossTerms:
        """One optimiser step on this rank's batch; advances ``step``, the schedule and the
        EMA. The Gumbel noise is seeded from (seed, step, rank)."""
        device = self.dist.device
        lr = batch["lr"].to(device, non_blocking=True)
        hr = batch["hr"].to(device, non_blocking=True)
        weight = batch.get("weight")
        weight = None if weight is None else weight.to(device, non_blocking=True)
        self.noise.manual_seed(derive_seed(self.config.seed, 2, self.step, self.dist.rank))
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = training_loss(self.net, lr, hr, weight, generator=self.noise)
        if not torch.isfinite(terms.loss):
            raise FloatingPointError(f"the loss is {terms.loss.item()} at step {self.step + 1}; "
                                     "lower the learning rate or check the data")
        terms.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return terms

    @torch.no_grad()
    def probe_l1(self) -> float | None:
        """Training L1 (training mode, no Gumbel noise) of the current weights on the fixed
        probe crops, or None without probe crops."""
        if not self.probe_keys:
            return None
        model, device = self.model, self.dist.device
        noise = model.train_noise
        model.train_noise = False
        total = 0.0
        try:
            for start in range(0, len(self.probe_keys), self.local_batch):
                keys = self.probe_keys[start:start + self.local_batch]
                items = [self.probe_data[k] for k in keys]
                lr = torch.stack([it["lr"] for it in items]).to(device)
                hr = torch.stack([it["hr"] for it in items]).to(device)
                weight = (torch.stack([it["weight"] for it in items]).to(device)
                          if "weight" in items[0] else None)
                sr, _ = model(lr)
                total += pixel_loss(sr, hr, weight).item() * len(items)
        finally:
            model.train_noise = noise
        return total / len(self.probe_keys)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean Y-PSNR (border = scale) of the EMA weights on the validation pairs at
        ``val_gamma``, SR clamped and rounded to uint8; None without a validation folder."""
        if not self.val_pairs:
            return None
        if self.eval_model is None:
            shape = _model_config(self.model)
            shape["blocks_per_group"] = tuple(shape["blocks_per_group"])
            self.eval_model = CAMixerSR(**shape).to(self.dist.device).eval()
            self.eval_model.backend = self.model.backend
        gamma = self.config.val_gamma if self.config.val_gamma is not None else self.config.gamma
        self.eval_model.gamma = gamma
        self.eval_model.load_state_dict(self.ema.state)
        scores = [psnr(super_resolve(self.eval_model, lr)[0], hr, border=self.scale)
                  for _, lr, hr in self.val_pairs]
        return float(np.mean(scores))

    def evaluate_and_log(self, progress: ProgressLine) -> None:
        """Probe L1 and validation PSNR (rank 0), logged; ``best.pth`` on a new best PSNR."""
        if not self.dist.is_main:
            return
        start = time.perf_counter()
        probe = self.probe_l1()
        val = self.validate()
        if probe is None and val is None:
            return
        record = {"event": "val", "step": self.step, "probe_l1": probe, "val_psnr": val,
                  "seconds": round(time.perf_counter() - start, 3)}
        self.log(record)
        parts = [f"step {self.step}"]
        if probe is not None:
            parts.append(f"probe L1 {probe:.5f}")
        if val is not None:
            parts.append(f"val PSNR {val:.3f} dB (EMA)")
        progress.message("camixer-fast train: " + ", ".join(parts))
        if val is not None and (self.best_psnr is None or val > self.best_psnr):
            self.best_psnr = val
            if self.step > 0:
                self.save("best.pth")

    def run(self) -> dict[str, Any]:
        """Train until ``config.iterations``; returns a summary (steps, last losses, first
        and last probe L1 / validation PSNR, checkpoint path)."""
        cfg = self.config
        progress = ProgressLine(cfg.iterations, enabled=cfg.progress if self.dist.is_main
                                else False)
        self.log({"event": "start", "step": self.step, "world_size": self.dist.world_size,
                  "device": str(self.dist.device), "backend": self.model.backend,
                  "repeat": self.repeat, "images": len(self.data.images),
                  "config": cfg.to_dict()})
        first = {}
        if self.step == 0 and (self.val_pairs or self.probe_keys):
            self.evaluate_and_log(progress)
            first = self._last_val()
        window: list[LossTerms] = []
        last_terms: LossTerms | None = None
        tick = time.perf_counter()
        batches = iter(self.loader()) if self.step < cfg.iterations else iter(())
        validated = saved = self.step >= cfg.iterations
        while self.step < cfg.iterations:
            last_terms = self.train_step(next(batches))
            window.append(last_terms)
            validated = saved = False
            progress.update(self.step, f"loss {last_terms.loss.item():.5f} "
                            f"K/N {last_terms.mask_means.mean().item():.3f} "
                            f"lr {self.scheduler.get_last_lr()[0]:.2e}")
            if cfg.log_every and self.step % cfg.log_every == 0:
                now = time.perf_counter()
                self._log_window(window, (now - tick) / len(window))
                window, tick = [], now
            if cfg.val_every and self.step % cfg.val_every == 0:
                self.evaluate_and_log(progress)
                validated = True
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
                saved = True
        if window:
            self._log_window(window, (time.perf_counter() - tick) / len(window))
        if not validated:
            self.evaluate_and_log(progress)
            saved = False
        if not saved or not (self.out_dir / "last.pth").exists():
            self.save()
        progress.close()
        last = self._last_val()
        summary = {"step": self.step, "checkpoint": str(self.out_dir / "last.pth"),
                   "probe_l1_first": first.get("probe_l1"), "probe_l1_last": last.get("probe_l1"),
                   "val_psnr_first": first.get("val_psnr"), "val_psnr_last": last.get("val_psnr"),
                   "best_psnr": self.best_psnr}
        if last_terms is not None:
            summary.update(loss=last_terms.loss.item(), l1=last_terms.l1.item(),
                           ratio_loss=last_terms.ratio.item())
        self.log({"event": "end", **summary})
        return summary

    def _last_val(self) -> dict[str, Any]:
        path = self.out_dir / "log.jsonl"
        if not self.dist.is_main or not path.is_file():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        vals = [r for r in records if r.get("event") == "val"]
        return vals[-1] if vals else {}

    def _log_window(self, window: Sequence[LossTerms], seconds_per_step: float) -> None:
        masks = torch.stack([t.mask_means for t in window]).mean(0)
        self.log({
            "event": "train", "step": self.step, "lr": self.scheduler.get_last_lr()[0],
            "loss": float(np.mean([t.loss.item() for t in window])),
            "l1": float(np.mean([t.l1.item() for t in window])),
            "ratio_loss": float(np.mean([t.ratio.item() for t in window])),
            "k_fraction": [round(v, 6) for v in masks.tolist()],
            "k_mean": masks.mean().item(),
            "sec_per_step": round(seconds_per_step, 4),
        })

    def close(self) -> None:
        """Leave the process group, if this run joined one."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a whole training (:class:`Trainer`) and return its summary; the process group
    joined under torchrun is left again however the run ends."""
    config.check()
    dist_info = setup_distributed(config.device)
    try:
        return Trainer(config, dist_info).run()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


__all__ = [
    "EMA",
    "ConfigError",
    "DataError",
    "LossTerms",
    "PairedPatches",
    "SampleStream",
    "TrainConfig",
    "Trainer",
    "augment_array",
    "bicubic_lr_crop",
    "derive_seed",
    "erp_row_weights",
    "load_validation_pairs",
    "pixel_loss",
    "read_checkpoint",
    "save_checkpoint",
    "setup_distributed",
    "train",
    "training_backend",
    "training_loss",
    "unwrap",
]
