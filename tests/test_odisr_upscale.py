"""ODI-SR panoramas through upscale() and the commands: each tile with its latitude rows, the
horizontal wrap at the 0°/360° seam, crops, convert/info/spandrel, and the CAMixerSR/OSR errors.

Seeded official-layout weights (``bench/official/odisr_fixture.py``, "small": C = 24, 2×2
blocks, ×2) on small images; the seam is judged against the same panorama rolled by half its
width (its seam then lies inside), at γ = 1 (every window attended: no routing differences).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import camixer_fast
from camixer_fast.cli import main
from camixer_fast.inference import tiling
from camixer_fast.models.convert import convert_checkpoint
from camixer_fast.models.loading import (CheckpointError, build_model, build_osr_model,
                                         load_model, read_weights)
from camixer_fast.reference.odisr import latitude_condition
from conftest import BENCH, assert_close, bench_module

pytestmark = pytest.mark.usefixtures("one_thread")
fx = bench_module("odisr_fixture", BENCH / "official")
SCALE = 2


@pytest.fixture(scope="module")
def weights() -> dict:
    return fx.seeded_state_dict("small", SCALE)


@pytest.fixture(scope="module")
def model(weights):
    return build_osr_model(weights)


def panorama(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], smooth and periodic along the width."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(height).view(height, 1) / height
    x = torch.arange(width).view(1, width) * 2 * math.pi / width
    a, b = torch.rand(3, generator=g), torch.rand(3, generator=g) * 6
    return torch.stack([0.5 + 0.3 * torch.sin(x + 6 * a[c]) * torch.cos(4 * y + b[c])
                        + 0.15 * torch.cos(3 * x + b[c] * y) for c in range(3)])[None]


def run(model, x, **kwargs):
    with torch.inference_mode():
        return model(x, **kwargs).clamp(0, 1)


def test_whole_panorama_unwrapped_is_the_model(model, weights):
    x = panorama(20, 44)
    assert_close("upscale vs model", run(model, x),
                 camixer_fast.upscale(x, weights=weights, wrap=False), 0.0)


@pytest.mark.parametrize("margin", [tiling.PANORAMA_MARGIN, 16, 40],
                         ids=["default", "16", "40-wider-than-image"])
def test_wrap_runs_the_columns_modulo_the_width(model, weights, margin):
    x = panorama(17, 36)
    wrapped = x[..., torch.arange(-margin, 36 + margin) % 36]
    expected = run(model, wrapped)[..., margin * SCALE:(margin + 36) * SCALE]
    out = camixer_fast.upscale(x, weights=weights,
                               wrap=None if margin == tiling.PANORAMA_MARGIN else margin)
    assert_close(f"wrap {margin}", expected, out, 0.0)


def test_a_crop_runs_with_its_rows(model, weights):
    """rows=(top, H): a crop is conditioned on its rows of the full panorama, unwrapped."""
    x = panorama(40, 64)
    crop = x[..., 9:29, 5:37]
    condition = latitude_condition(20, 32, rows=(9, 40))
    assert_close("crop rows", run(model, crop, condition=condition),
                 camixer_fast.upscale(crop, weights=weights, rows=(9, 40)), 0.0)
    assert not torch.equal(camixer_fast.upscale(crop, weights=weights, wrap=False),
                           camixer_fast.upscale(crop, weights=weights, rows=(9, 40)))


@pytest.mark.parametrize("size,tile,rows", [((40, 56), 24, None), ((37, 50), 20, (3, 61))],
                         ids=["whole-40x56-T24", "crop-37x50-T20"])
def test_each_tile_is_its_crop_with_its_rows(model, size, tile, rows):
    """Where one tile alone covers an output pixel, it equals that crop run with its rows."""
    x = panorama(*size)
    top, full = rows or (0, size[0])
    with torch.inference_mode():
        out = tiling.tiled_forward(model, x, tile, rows=(top, full))
    tops, lefts = tiling.tile_origins(size[0], tile), tiling.tile_origins(size[1], tile)
    cover = torch.zeros(size[0] * SCALE, size[1] * SCALE)
    for i in tops:
        for j in lefts:
            cover[i * SCALE:(i + tile) * SCALE, j * SCALE:(j + tile) * SCALE] += 1
    checked = 0
    for i in tops:
        for j in lefts:
            piece = run(model, x[..., i:i + tile, j:j + tile],
                        condition=latitude_condition(tile, tile, rows=(top + i, full)))
            region = (slice(i * SCALE, (i + tile) * SCALE), slice(j * SCALE, (j + tile) * SCALE))
            alone = cover[region] == 1
            got = out[0][(slice(None), *region)][:, alone]
            assert_close(f"tile {i},{j}", piece[0][:, alone], got.clamp(0, 1), 0.0)
            checked += int(alone.sum())
    assert checked > 0


def seam_error(out: torch.Tensor, reference: torch.Tensor, columns: int) -> float:
    """Mean |out − reference| over the ``columns`` output columns on each side of the seam."""
    near = torch.cat([torch.arange(columns), torch.arange(out.shape[-1] - columns, out.shape[-1])])
    return float((out - reference)[..., near].abs().mean())


@pytest.mark.parametrize("tile", [None, 32], ids=["whole", "T32"])
def test_the_seam_is_better_wrapped(weights, tile):
    x = panorama(32, 96, seed=3)
    shift = 48
    reference = camixer_fast.upscale(x.roll(shift, -1), 1.0, weights=weights,
                                     wrap=False).roll(-shift * SCALE, -1)
    errors = {wrap: seam_error(camixer_fast.upscale(x, 1.0, weights=weights, wrap=wrap,
                                                    tile=tile), reference, 8 * SCALE)
              for wrap in (False, True)}
    print(f"seam error vs the rolled panorama ({tile}): {errors}")
    assert errors[True] < (0.2 if tile is None else 0.8) * errors[False]


def test_engine_and_batch_match_upscale(weights):
    images = [panorama(16, 40, seed=s) for s in (1, 2)]
    batch = camixer_fast.upscale_batch(images, weights=weights, tile=24)
    for image, out in zip(images, batch, strict=True):
        assert_close("batch vs upscale", camixer_fast.upscale(image, weights=weights, tile=24),
                     out, 0.0)


def test_auto_tile_uses_the_osr_figure(monkeypatch):
    budget = 600 << 20
    assert tiling.auto_tile(1024, 2048, budget=budget, panoramic=True) < \
        tiling.auto_tile(1024, 2048, budget=budget)
    use = tiling.OSR_MEMORY_USE["cpu"]
    assert tiling.forward_bytes(1000, panoramic=True) == use.overhead + 1000 * use.per_pixel


def test_cli_upscales_a_panorama(tmp_path, weights):
    path = tmp_path / "osr.pth"
    torch.save({"params_ema": weights}, path)
    pixels = (panorama(24, 48).squeeze(0).permute(1, 2, 0).numpy() * 255).round()
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "pano.png")
    for flags, wrap in (([], None), (["--no-wrap"], False)):
        out = tmp_path / f"out{len(flags)}.png"
        assert main(["upscale", str(tmp_path / "pano.png"), "-o", str(out), "--weights",
                     str(path), "--tile", "32", *flags]) == 0
        expected = camixer_fast.upscale(Image.open(tmp_path / "pano.png"), weights=weights,
                                        tile=32, wrap=wrap)
        np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_convert_and_info_take_camixerosr(tmp_path, weights, capsys):
    source = tmp_path / "osr.pth"
    torch.save({"params_ema": weights}, source)
    assert main(["convert", str(source), str(tmp_path / "osr.safetensors")]) == 0
    assert "CAMixerOSR C=24, ×2" in capsys.readouterr().out
    back = read_weights(tmp_path / "osr.safetensors")
    assert all(torch.equal(back[k], v) for k, v in weights.items())
    assert isinstance(load_model(tmp_path / "osr.safetensors"), type(build_osr_model(weights)))
    assert main(["convert", str(tmp_path / "osr.safetensors"), str(tmp_path / "again.pth")]) == 0
    capsys.readouterr()
    assert main(["info", "--weights", str(tmp_path / "again.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "CAMixerOSR" and info["scale"] == SCALE
    assert info["parameters"] == sum(v.numel() for v in weights.values())
    assert info["paper_flops_32x32"] is None and info["madds"]["dcn"] > 0
    assert info["madds"]["total"] == sum(v for k, v in info["madds"].items() if k != "total")


def test_info_of_an_absent_odisr_file_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CAMIXER_FAST_WEIGHTS", raising=False)
    assert main(["info", "--weights", "CAMixerSR-ODISR-x4"]) == 1
    err = capsys.readouterr().err
    assert "CAMixerSR_ODISR_x4.pth" in err and "ODISR/CAMixerSRx4.pth" in err


def test_errors(weights, model):
    x = panorama(16, 32)
    sr_weights = camixer_fast.CAMixerSR(n_feats=12, blocks_per_group=(1,), scale=2).state_dict()
    with pytest.raises(ValueError, match="CAMixerOSR .* only"):
        camixer_fast.upscale(x, weights=sr_weights, rows=(0, 32))
    with pytest.raises(ValueError, match="do not lie in a panorama of 20 rows"):
        camixer_fast.upscale(x, weights=weights, rows=(8, 20))
    with pytest.raises(ValueError, match="wrap must be"):
        camixer_fast.upscale(x, weights=weights, wrap=-1)
    with pytest.raises(RuntimeError, match="cuda_graph replays CAMixerSR only"):
        camixer_fast.upscale(x, weights=weights, cuda_graph=True)
    with pytest.raises(ValueError, match=r"condition must be \(B or 1, 1, 16, 32\)"):
        run(model, x, condition=latitude_condition(16, 31))
    with pytest.raises(CheckpointError, match="ODISR state dict of CAMixerOSR"):
        build_model(weights)
    with pytest.raises(CheckpointError, match="a CAMixerSR state dict"):
        build_osr_model(sr_weights)
    with pytest.raises(ValueError, match="backend must be one of"):
        load_model(weights, backend="onnx")


def test_spandrel_refuses_camixerosr_clearly(weights):
    spandrel = pytest.importorskip("test_spandrel")
    spandrel._stand_in_torchvision()
    from camixer_fast import spandrel_arch

    assert spandrel_arch.detect(weights) and spandrel_arch.is_odisr(weights)
    with pytest.raises(CheckpointError, match="camixer_fast.upscale"):
        spandrel_arch.CAMixerSRArch().load(weights)
