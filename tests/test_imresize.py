"""MATLAB bicubic downscaling against Set5's LR_bicubic files (made by MATLAB from Set5/HR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camixer_fast.evaluation.imresize import imresize_down, make_lr, mod_crop, resize_matrix

SET5 = ("baby", "bird", "butterfly", "head", "woman")


def compare_set5(shared: Path, scale: int, round_each_pass: bool) -> tuple[float, int]:
    """(% of pixels identical, largest difference) of make_lr vs the LR files at ``scale``."""
    same = total = worst = 0
    for name in SET5:
        hr = np.asarray(Image.open(shared / "data" / "Set5" / "HR" / f"{name}.png").convert("RGB"))
        ref = np.asarray(Image.open(shared / "data" / "Set5" / "LR_bicubic" / f"X{scale}"
                                    / f"{name}x{scale}.png").convert("RGB"))
        lr = make_lr(hr, scale, round_each_pass=round_each_pass)
        assert lr.shape == ref.shape, name
        diff = np.abs(lr.astype(np.int16) - ref.astype(np.int16))
        same += int((diff == 0).sum())
        total += diff.size
        worst = max(worst, int(diff.max()))
    return 100.0 * same / total, worst


@pytest.mark.parametrize("scale", [2, 3, 4], ids=lambda s: f"x{s}")
def test_matches_set5_lr(shared: Path, scale: int) -> None:
    identical, worst = compare_set5(shared, scale, round_each_pass=True)
    print(f"x{scale}: {identical:.4f}% of pixels identical, largest difference {worst}")
    assert identical >= 99.0 and worst <= 1
    assert identical == 100.0                          # in fact bit-exact


def test_x8_files_are_the_float_pipeline(shared: Path) -> None:
    """The X8 files were resized in floating point (rounded once at the end), not as uint8:
    with that pipeline they match bit-exactly; the uint8 pipeline is off by up to 2 levels."""
    identical, worst = compare_set5(shared, 8, round_each_pass=False)
    uint8_identical, uint8_worst = compare_set5(shared, 8, round_each_pass=True)
    print(f"x8: float pipeline {identical:.4f}% identical (max diff {worst}); "
          f"uint8 pipeline {uint8_identical:.4f}% (max diff {uint8_worst})")
    assert identical == 100.0
    assert uint8_identical < 99.0


@pytest.mark.parametrize("in_length,scale", [(16, 4), (7, 2), (5, 3), (40, 8)],
                         ids=["16-x4", "7-x2", "5-x3", "40-x8"])
def test_resize_matrix_rows_sum_to_one(in_length: int, scale: int) -> None:
    out_length = -(-in_length // scale)
    m = resize_matrix(in_length, out_length, 1.0 / scale)
    assert m.shape == (out_length, in_length)
    assert np.allclose(m.sum(axis=1), 1.0, atol=1e-12)


def test_resize_matrix_x2_by_hand() -> None:
    # ×1/2: output pixel u sits at x = 2u − 0.5 (1-based); the kernel cubic(d/2)/2 has taps at
    # distances ±0.5, ±1.5, ±2.5, ±3.5 -> weights (k(0.25), k(0.75), k(1.25), k(1.75)) / 2
    def k(t: float) -> float:
        return (1.5 * t**3 - 2.5 * t**2 + 1) if t <= 1 else (-0.5 * t**3 + 2.5 * t**2 - 4 * t + 2)

    taps = np.array([k(1.75), k(1.25), k(0.75), k(0.25), k(0.25), k(0.75), k(1.25), k(1.75)]) / 2
    taps /= taps.sum()
    m = resize_matrix(16, 8, 0.5)
    assert np.allclose(m[3, 3:11], taps, atol=1e-15)   # output 4 (1-based): inputs 4..11
    # the first row mirrors: 1-based taps -2..5 are pixels 3, 2, 1, 1, 2, 3, 4, 5
    folded = np.zeros(16)
    for pixel, w in zip([2, 1, 0, 0, 1, 2, 3, 4], taps):
        folded[pixel] += w
    assert np.allclose(m[0], folded, atol=1e-15)


def test_constant_image_stays_constant() -> None:
    img = np.full((24, 20, 3), 77, np.uint8)
    out = imresize_down(img, 4)
    assert out.shape == (6, 5, 3) and (out == 77).all()


def test_grey_and_rgb_agree() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(33, 29, 3), dtype=np.uint8)
    out = imresize_down(rgb, 3)
    assert out.shape == (11, 10, 3)
    for c in range(3):
        assert np.array_equal(imresize_down(rgb[..., c], 3), out[..., c])


def test_make_lr_crops_to_multiple() -> None:
    hr = np.random.default_rng(1).integers(0, 256, size=(35, 42, 3), dtype=np.uint8)
    lr = make_lr(hr, 4)
    assert lr.shape == (8, 10, 3)
    assert np.array_equal(lr, imresize_down(mod_crop(hr, 4), 4))


def test_bad_inputs() -> None:
    with pytest.raises(TypeError):
        imresize_down(np.zeros((8, 8), np.float32), 2)
    with pytest.raises(ValueError):
        imresize_down(np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(ValueError):
        make_lr(np.zeros((3, 8), np.uint8), 4)
