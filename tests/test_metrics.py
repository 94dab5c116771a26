"""Metrics against hand-computed values: PSNR (Y and RGB), SSIM (BasicSR), WS-PSNR; WS-PSNR and
WS-SSIM against the official ODI-SR functions (values pinned in tests/data/odisr_official.pt)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from camixer_fast.evaluation.metrics import (
    erp_row_weights,
    psnr,
    rgb_to_y,
    ssim,
    ws_psnr,
    ws_ssim,
)
from conftest import BENCH, REPO, bench_module


def random_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def slow_ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM straight from the definition: a full 11×11 Gaussian window at every valid pixel."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * (pa - mu_a) ** 2).sum()
            var_b = (window * (pb - mu_b) ** 2).sum()
            cov = (window * (pa - mu_a) * (pb - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                          / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("y_channel", [True, False], ids=["Y", "RGB"])
def test_psnr_identical_is_inf(y_channel: bool) -> None:
    img = random_image((16, 16, 3), 0)
    assert psnr(img, img, y_channel=y_channel) == math.inf


def test_psnr_rgb_one_level_offset() -> None:
    ref = random_image((12, 10, 3), 1) // 2
    img = ref + 1                                     # every channel one level up: MSE = 1
    assert psnr(img, ref, y_channel=False) == pytest.approx(10 * math.log10(255**2), abs=1e-12)


def test_psnr_rgb_by_hand() -> None:
    ref = np.zeros((2, 2, 3), np.uint8)
    img = ref.copy()
    img[0, 0, 0] = 6                                  # MSE = 36 / 12 = 3
    assert psnr(img, ref, y_channel=False) == pytest.approx(10 * math.log10(255**2 / 3))


def test_psnr_y_one_level_grey_offset() -> None:
    ref = np.full((8, 8, 3), 100, np.uint8)
    img = ref + 1                                     # Y moves by (65.481+128.553+24.966)/255
    dy = 219.0 / 255.0
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-9)
    assert rgb_to_y(ref)[0, 0] == pytest.approx(16 + 100 * dy)


def test_psnr_border_crops() -> None:
    ref = np.zeros((10, 10), np.uint8)
    img = ref.copy()
    img[0, :] = 200                                   # only the cropped border differs
    assert psnr(img, ref, border=1) == math.inf
    assert psnr(img, ref, border=0) < 30


@pytest.mark.parametrize("y_channel", [True, False], ids=["Y", "RGB"])
def test_ssim_identical_is_one(y_channel: bool) -> None:
    img = random_image((20, 24, 3), 2)
    assert ssim(img, img, y_channel=y_channel) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images_by_hand() -> None:
    # flat images: variances and covariance vanish, SSIM = (2·a·b + C1) / (a² + b² + C1)
    a, b = np.full((13, 13), 100, np.uint8), np.full((13, 13), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), rel=1e-12)


@pytest.mark.parametrize("shape,border", [((14, 15), 0), ((17, 16, 3), 2)],
                         ids=["grey-14x15", "rgb-17x16-border2"])
def test_ssim_matches_direct_formula(shape: tuple[int, ...], border: int) -> None:
    ref = random_image(shape, 3)
    noise = np.random.default_rng(4).integers(-30, 31, size=shape)
    img = np.clip(ref.astype(int) + noise, 0, 255).astype(np.uint8)
    got_y = ssim(img, ref, border=border)
    if len(shape) == 3:
        crop = (slice(border, -border),) * 2
        want_y = slow_ssim_plane(rgb_to_y(img)[crop], rgb_to_y(ref)[crop])
        got_rgb = ssim(img, ref, border=border, y_channel=False)
        want_rgb = np.mean([slow_ssim_plane(img[crop][..., c].astype(float),
                                            ref[crop][..., c].astype(float)) for c in range(3)])
        print(f"SSIM Y {got_y:.10f} (direct {want_y:.10f}), RGB {got_rgb:.10f}")
        assert got_rgb == pytest.approx(want_rgb, abs=1e-12)
    else:
        want_y = slow_ssim_plane(img.astype(float), ref.astype(float))
        print(f"SSIM {got_y:.10f} (direct {want_y:.10f})")
    assert got_y == pytest.approx(want_y, abs=1e-12)
    assert 0.0 < got_y < 1.0


def test_ssim_too_small_is_refused() -> None:
    img = random_image((12, 12), 5)
    with pytest.raises(ValueError, match="11x11"):
        ssim(img, img, border=1)


def test_ws_psnr_weights() -> None:
    w = erp_row_weights(4)                            # rows at latitudes ±67.5°, ±22.5°
    assert w == pytest.approx([math.cos(3 * math.pi / 8), math.cos(math.pi / 8),
                               math.cos(math.pi / 8), math.cos(3 * math.pi / 8)])


@pytest.mark.parametrize("height", [1, 17, 33], ids=lambda h: f"h{h}")
def test_erp_row_weights_of_chosen_rows(height: int) -> None:
    every = erp_row_weights(height)
    assert every.shape == (height,) and every.dtype == np.float64
    assert np.all(every > 0) and np.allclose(every, every[::-1], rtol=0, atol=1e-15)
    rows = np.arange(height)[::-1].reshape(1, -1).repeat(2, axis=0)       # any shape, any order
    got = erp_row_weights(height, rows)
    assert got.shape == rows.shape and np.array_equal(got, every[rows])


def test_ws_psnr_by_hand() -> None:
    ref = np.zeros((4, 3), np.uint8)
    img = ref.copy()
    img[0, :] = 10                                    # error only in the top (polar) row
    w = erp_row_weights(4)
    wmse = w[0] * 100 * 3 / (w.sum() * 3)
    assert ws_psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / wmse), rel=1e-12)
    # the same error at the equator costs more than at the pole
    equator = ref.copy()
    equator[1, :] = 10
    assert ws_psnr(equator, ref) < ws_psnr(img, ref)


def test_ws_psnr_uniform_error_equals_psnr() -> None:
    ref = random_image((6, 8, 3), 6) // 2
    img = ref + 3                                     # same error on every row: weights cancel
    assert ws_psnr(img, ref) == pytest.approx(psnr(img, ref, y_channel=False), abs=1e-12)
    assert ws_psnr(ref, ref) == math.inf


@pytest.mark.parametrize("name", ["rgb_21x17", "rgb_32x48", "rgb_64x128"])
def test_ws_metrics_equal_the_official_functions(name: str) -> None:
    official = torch.load(REPO / "tests" / "data" / "odisr_official.pt",
                          weights_only=True)["metrics"][name]
    img, ref = bench_module("odisr_fixture", BENCH / "official").metric_images(name)
    got = {"ws_psnr": ws_psnr(img, ref), "ws_ssim": ws_ssim(img, ref)}
    print(f"{name}: {got} (official {official})")
    assert got["ws_psnr"] == pytest.approx(official["ws_psnr"], abs=1e-6)
    assert got["ws_ssim"] == pytest.approx(official["ws_ssim"], abs=1e-6)


def test_ws_ssim_weights_the_valid_map_rows() -> None:
    ref = random_image((15, 12), 7)
    img = ref.copy()
    img[-1, :] = 255 - img[-1, :]                     # only the last valid row's windows change
    ws, plain = ws_ssim(img, ref), ssim(img, ref)
    w = erp_row_weights(5)                            # the valid map has 15 - 10 = 5 rows
    row_mean = 1 - (1 - plain) * 5                    # the changed row's SSIM mean
    assert ws == pytest.approx((w[:4].sum() + w[4] * row_mean) / w.sum(), abs=1e-12)
    assert ws_ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
