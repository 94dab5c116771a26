"""Training data: random (LR, HR) crop pairs keyed on (seed, epoch, index), so a sample is the
same whichever process draws it and whenever; the sampler sharing each global batch among the
ranks; the validation pairs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from camixer_fast.evaluation.evaluate import find_lr_file, list_images, read_rgb
from camixer_fast.evaluation.imresize import imresize_down, make_lr
from camixer_fast.evaluation.metrics import erp_row_weights
from camixer_fast.reference.odisr import latitude_condition

AUGMENTS = ("flip-rot", "hflip", "none")


class DataError(ValueError):
    """A training or validation folder cannot be used (missing, empty, unreadable, too small)."""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (NumPy's SeedSequence)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def bicubic_lr_crop(hr: np.ndarray, scale: int, top: int, left: int, size: int) -> np.ndarray:
    """``make_lr(hr, scale)[top:top+size, left:left+size]`` from a neighbourhood only: (H, W[, C])
    uint8 -> (size, size[, C]) uint8, bit-identical (a margin of ceil((2s + 2) / s) LR pixels)."""
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
    """Flip (H, W[, C]) left-right and/or top-bottom, then swap H and W (BasicSR's ``augment``)."""
    if hflip:
        arr = arr[:, ::-1]
    if vflip:
        arr = arr[::-1]
    if transpose:
        arr = arr.swapaxes(0, 1)
    return np.ascontiguousarray(arr)


def _to_tensor(img: np.ndarray) -> Tensor:
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
    """Random (LR, HR) crop pairs from a folder of HR images; DataError names every unreadable
    or too small image at construction. Images cached when ``cache`` (None: under 2 GiB). LR from
    ``lr_dir`` (``<stem>x<scale>.<ext>`` or ``<stem>.<ext>``) or :func:`bicubic_lr_crop`.
    Item ``(epoch, i)``: image ``i % n``, crop from ``derive_seed(seed, stream, epoch, i)``, a dict
    of ``lr`` (3, p, p), ``hr`` (3, s·p, s·p) float32 in [0, 1], ``top``, ``height``; with
    ``erp`` ``weight`` (1, s·p, s·p); with ``condition`` the cos-latitude ``condition`` (1, p, p)
    of the crop's rows in the whole LR panorama (CAMixerOSR), augmented as the crop.
    """

    def __init__(self, hr_dir: str | os.PathLike, *, scale: int, patch_size: int = 64,
                 lr_dir: str | os.PathLike | None = None, augment: str = "flip-rot",
                 erp: bool = False, condition: bool = False, repeat: int = 1, seed: int = 0,
                 stream: int = 0, cache: bool | None = None) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if scale < 1 or patch_size < 1 or repeat < 1:
            raise ValueError(f"scale, patch_size and repeat must be >= 1, got {scale}, "
                             f"{patch_size}, {repeat}")
        self.scale, self.patch_size, self.augment, self.erp = scale, patch_size, augment, erp
        self.condition = condition
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
            weight = erp_row_weights(image.hr_shape[0], rows).astype(np.float32)
            weight = np.repeat(weight[:, None], p * s, axis=1)
            item["weight"] = torch.from_numpy(augment_array(weight, *flags))[None]
        if self.condition:
            cond = latitude_condition(p, p, rows=(top, lr_h))[0, 0].numpy()
            item["condition"] = torch.from_numpy(augment_array(cond, *flags))[None]
        return item

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.sample(int(epoch), int(index))


class SampleStream(Sampler):
    """The endless ``(epoch, index)`` keys one rank loads from a global step on: per epoch a
    DistributedSampler share (``drop_last``), whole local batches only, so the ranks' k-th local
    batches hold the k-th global batch of a single process."""

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


__all__ = [
    "AUGMENTS",
    "DataError",
    "PairedPatches",
    "SampleStream",
    "augment_array",
    "bicubic_lr_crop",
    "derive_seed",
    "load_validation_pairs",
]
