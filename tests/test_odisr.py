"""CAMixerOSR (ODI-SR): the reference against the official network, its DCNv2, conditions,
sizes, batches, checkpoints.

``tests/data/odisr_official.pt`` holds the official network's outputs on seeded random weights
(``bench/official/odisr_fixture.py`` regenerates it); with ``CAMIXER_OFFICIAL_ODISR_ARCH`` set,
the official file also runs live.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import camixer_fast.reference.dcn as dcn_module
import pytest
import torch
from camixer_fast.reference.dcn import modulated_deform_conv2d
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR, latitude_condition
from conftest import BENCH, REPO, assert_close, bench_module

from camixer_fast.models.loading import (
    CheckpointError,
    build_model,
    build_osr_model,
    infer_osr_config,
    is_osr_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")
fx = bench_module("odisr_fixture", BENCH / "official")
FIXTURE = REPO / "tests" / "data" / "odisr_official.pt"


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def models() -> dict:
    return {(config, scale): build_osr_model({"params_ema": fx.seeded_state_dict(config, scale)})
            for config, scale, *_ in fx.CASES.values()}


def small_model(scale: int = 2, seed: int = 1) -> CAMixerOSR:
    return build_osr_model(fx.seeded_state_dict("small", scale, seed))


def direct_dcn(x, offset, mask, weight, bias, padding):
    """DCNv2 by its formula, one output value at a time."""
    _, c_in, h, w = x.shape
    out = torch.zeros(1, weight.shape[0], h, w, dtype=torch.float64)

    def pixel(c, y, xx):
        return float(x[0, c, y, xx]) if 0 <= y < h and 0 <= xx < w else 0.0

    for o, i, j in itertools.product(range(weight.shape[0]), range(h), range(w)):
        total = float(bias[o])
        for k in range(9):
            kh, kw = divmod(k, 3)
            py = i - padding + kh + float(offset[0, 2 * k, i, j])
            px = j - padding + kw + float(offset[0, 2 * k + 1, i, j])
            y0, x0 = math.floor(py), math.floor(px)
            ly, lx = py - y0, px - x0
            for c in range(c_in):
                v = ((1 - ly) * (1 - lx) * pixel(c, y0, x0) + (1 - ly) * lx * pixel(c, y0, x0 + 1)
                     + ly * (1 - lx) * pixel(c, y0 + 1, x0) + ly * lx * pixel(c, y0 + 1, x0 + 1))
                total += float(weight[o, c, kh, kw]) * float(mask[0, k, i, j]) * v
        out[0, o, i, j] = total
    return out


def dcn_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 5, 6, generator=g)
    offset = 2.5 * torch.randn(1, 18, 5, 6, generator=g)          # many taps land outside
    mask = torch.rand(1, 9, 5, 6, generator=g)
    return x, offset, mask, torch.randn(3, 2, 3, 3, generator=g), torch.randn(3, generator=g)


@pytest.mark.parametrize("chunk", [1 << 14, 7], ids=["one-step", "row-by-row"])
def test_dcn_matches_direct_formula(chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(dcn_module, "DCN_CHUNK", chunk)
    x, offset, mask, weight, bias = dcn_inputs()
    got = modulated_deform_conv2d(x, offset, mask, weight, bias, padding=1)
    assert_close("dcn vs direct loop", direct_dcn(x, offset, mask, weight, bias, 1), got, 1e-5)


def test_dcn_zero_offsets_is_conv() -> None:
    x, offset, mask, weight, bias = dcn_inputs(1)
    got = modulated_deform_conv2d(x, torch.zeros_like(offset), torch.ones_like(mask), weight,
                                  bias)
    assert_close("dcn at zero offsets vs conv2d", torch.conv2d(x, weight, bias, padding=1),
                 got, 1e-5)


def test_dcn_matches_torchvision() -> None:
    try:
        from torchvision.ops import deform_conv2d
    except (ImportError, RuntimeError) as error:    # PyPI torchvision beside a CPU torch
        pytest.skip(f"torchvision does not import beside this torch: {error}")
    x, offset, mask, weight, bias = dcn_inputs(2)
    assert_close("dcn vs torchvision", deform_conv2d(x, offset, weight, bias, padding=1,
                                                     mask=mask),
                 modulated_deform_conv2d(x, offset, mask, weight, bias), 1e-5)


def test_dcn_bad_offsets_are_refused() -> None:
    x, offset, mask, weight, bias = dcn_inputs()
    with pytest.raises(ValueError, match="offset"):
        modulated_deform_conv2d(x, offset[:, :16], mask, weight, bias)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shift", [0, 8, 5], ids=lambda s: f"shift{s}")
def test_shifted_window_attention_is_the_rolled_one(backend: str, shift: int) -> None:
    """Windows offset by ``shift`` (wrapping) == the maps rolled by −shift, mixed, rolled back."""
    from camixer_fast.backends import select_backend

    g = torch.Generator().manual_seed(3)
    x, k_in, v = (torch.randn(2, 12, 48, 32, generator=g) for _ in range(3))
    sa = torch.rand(2, 1, 48, 32, generator=g)
    weights = [torch.randn(12, 12, generator=g) * 0.3, torch.randn(12, generator=g)] * 2
    num_hard, order = torch.tensor([6, 2]), torch.stack([torch.randperm(6, generator=g)] * 2)
    roll = lambda t, s: torch.roll(t, (s, s), dims=(2, 3))
    ops = select_backend(backend).ops
    want = roll(ops.window_attention(*(roll(t, -shift) for t in (x, k_in, v, sa)), *weights,
                                     num_hard, order, window_size=16), shift)
    got = ops.window_attention(x, k_in, v, sa, *weights, num_hard, order, window_size=16,
                               shift=shift)
    assert_close(f"{backend} shift {shift}", want, got, 1e-6)


@pytest.mark.parametrize("shift", [0, 8, 5], ids=lambda s: f"shift{s}")
def test_cpu_window_warp_is_the_warp_on_the_hard_windows(shift: int) -> None:
    """The CPU backend's window_warp == deform_warp on the (shifted) hard windows' pixels, 0 on
    the others; offsets reach past every border."""
    from camixer_fast.reference.warp import deform_warp

    from camixer_fast.backends.cpu import hard_window_pixels, window_warp

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 48, 32, generator=g)
    offsets = 6.0 * torch.randn(2, 2, 48, 32, generator=g)
    num_hard, order = torch.tensor([6, 2]), torch.stack([torch.randperm(6, generator=g)] * 2)
    pixels = hard_window_pixels(num_hard, order, 48, 32, 16, shift)
    hard = torch.zeros(2 * 48 * 32, dtype=torch.bool)
    hard[pixels] = True
    hard = hard.view(2, 1, 48, 32)
    want = torch.where(hard, deform_warp(x, offsets), torch.zeros(()))
    got = window_warp(x, offsets, num_hard, order, window_size=16, shift=shift)
    assert int(hard.sum()) == (6 + 2) * 16 * 16 == pixels.unique().numel()
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(f"window_warp shift {shift}", want, got, 1e-6)


@pytest.mark.parametrize("height,width", [(1, 1), (7, 14), (32, 64)], ids=str)
def test_latitude_condition(height: int, width: int) -> None:
    cond = latitude_condition(height, width)
    y = (2 * torch.arange(height, dtype=torch.float64) + 1) / height - 1
    want = torch.cos(y * math.pi / 2).view(1, 1, height, 1).expand(1, 1, height, width)
    assert_close("cos latitude", want, cond, 1e-6)           # float32, as OSRT computes it
    full = latitude_condition(3 * height, width)
    band = latitude_condition(height, width, rows=(height, 3 * height))
    assert torch.equal(band, full[:, :, height:2 * height])


def test_latitude_condition_outside_the_panorama() -> None:
    with pytest.raises(ValueError, match="panorama"):
        latitude_condition(8, 4, rows=(4, 10))


PARITY = [(case, gamma, backend) for case in fx.CASES for gamma in fx.GAMMAS
          for backend in ("reference", "cpu")]


@pytest.mark.parametrize("case,gamma,backend", PARITY,
                         ids=[f"{c}-g{g}-{b}" for c, g, b in PARITY])
def test_matches_official(case: str, gamma: float, backend: str, official: dict, models: dict,
                          shared: Path) -> None:
    config, scale, image, box, rows = fx.CASES[case]
    condition = latitude_condition(box[2], box[3], rows=rows)
    assert torch.equal(condition, official["network"][case]["condition"])
    model = models[(config, scale)]
    model.gamma, model.backend = gamma, backend
    with torch.no_grad():
        out = model(fx.crop(shared / "data", image, box), condition)
    assert_close(f"{case} γ={gamma} {backend} vs official", official["network"][case][f"gamma_{gamma}"],
                 out, 1e-4)


def test_seeded_weights_move_the_dcn_taps(models: dict) -> None:
    model = models[("published", 4)]
    for dcn, mlp in [(g.body_tail, g.offset_conv) for g in model.body] + [(model.dcn,
                                                                           model.offset_conv)]:
        offsets = dcn.conv_offset(mlp(latitude_condition(16, 32)))[:, :18]
        assert offsets.abs().mean() > 0.3                 # pixels: the taps leave the grid


@pytest.mark.skipif(not os.environ.get(fx.ENV_VAR), reason=f"{fx.ENV_VAR} is not set")
def test_matches_official_live(models: dict, shared: Path) -> None:
    module = fx.load_official()
    for case in ("small_x2_20x40", "published_x4_16x32"):
        config, scale, image, box, _ = fx.CASES[case]
        expected = fx.run_official(module, case, shared / "data")
        model = models[(config, scale)]
        for gamma in fx.GAMMAS:
            model.gamma = gamma
            with torch.no_grad():
                out = model(fx.crop(shared / "data", image, box), expected["condition"])
            assert_close(f"{case} γ={gamma} vs live official", expected[f"gamma_{gamma}"], out,
                         1e-4)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        small_model().backend = "dense"


def test_published_parameter_counts() -> None:
    counts = {s: sum(p.numel() for p in CAMixerOSR(scale=s).parameters()) for s in (2, 4)}
    assert counts == {2: 1_305_147, 4: 1_324_623}          # paper: 1.30M, 1.32M


def test_batch_of_two_equals_solo_runs() -> None:
    model = small_model()
    lr = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(3))
    cond = torch.cat([latitude_condition(13, 21, rows=(0, 40)),
                      latitude_condition(13, 21, rows=(20, 40))])
    with torch.no_grad():
        both, routing = model(lr, cond, return_routing=True)
        solo = [model(lr[i:i + 1], cond[i:i + 1]) for i in range(2)]
    assert torch.equal(both, torch.cat(solo))
    assert routing.num_hard().shape == (4, 2)


@pytest.mark.parametrize("height,width", [(1, 1), (5, 7), (17, 33)], ids=str)
def test_any_size_and_default_condition(height: int, width: int) -> None:
    model = small_model(scale=4)
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(lr)
        given = model(lr, latitude_condition(height, width))
    assert out.shape == (1, 3, 4 * height, 4 * width)
    assert torch.equal(out, given)


@pytest.mark.parametrize("shape", [(1, 1, 8, 9), (1, 2, 8, 8), (3, 1, 8, 8), (8, 8)], ids=str)
def test_condition_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="condition must be"):
        small_model()(torch.rand(2, 3, 8, 8), torch.rand(shape))


def test_gamma_sets_k() -> None:
    model = small_model()
    lr = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    ks = {}
    for gamma in (0.0, 0.25, 0.5, 1.0):
        model.gamma = gamma
        with torch.no_grad():
            _, routing = model(lr, return_routing=True)
        ks[gamma] = routing.num_hard()[:, 0]
        r = torch.stack([torch.softmax(b.scores, -1)[0, :, 0].mean() for b in routing.blocks])
        want = torch.full_like(ks[gamma], 6) if gamma == 1 else torch.floor(r * 6 * 2 * gamma)
        assert torch.equal(ks[gamma], want.long())
    assert ks[0.0].sum() == 0 and torch.all(ks[0.25] <= ks[0.5])


@pytest.mark.parametrize("gamma", [0.25, 1.0], ids=["0.25", "1"])
def test_gamma_per_call(gamma: float) -> None:
    """model(lr, gamma=g) == the model with γ = g, as a number or a 0-d tensor; bad γ refused."""
    model = small_model()
    lr = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        per_call = [model(lr, gamma=gamma), model(lr, gamma=torch.tensor(gamma))]
        model.gamma = gamma
        want = model(lr)
    assert all(torch.equal(want, got) for got in per_call) and model.gamma == gamma
    for bad, message in ((1.5, "gamma must be in"), (torch.ones(2), "0-d float")):
        with pytest.raises(ValueError, match=message):
            model(lr, gamma=bad)


def test_gumbel_routing_follows_the_generator() -> None:
    model = small_model()
    model.routing = "gumbel"
    lr = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        runs = [model(lr, generator=torch.Generator().manual_seed(s), return_routing=True)
                for s in (0, 0, 1)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1].num_hard(), runs[1][1].num_hard())
    assert all(0 <= k <= 6 for k in runs[2][1].num_hard().flatten().tolist())


def test_training_mode_ratio_loss() -> None:
    model = small_model().train()
    sr, loss, routing = model(torch.rand(2, 3, 16, 16), return_routing=True)
    m = torch.cat([b.mask.flatten() for b in routing.blocks]).mean()
    assert sr.shape == (2, 3, 32, 32) and loss.item() == pytest.approx((m.item() - 0.5) ** 2)
    (sr.mean() + loss).backward()
    assert model.head.weight.grad is not None


def test_checkpoints_tell_the_networks_apart() -> None:
    osr = fx.seeded_state_dict("small", 4)
    assert is_osr_state_dict(osr)
    assert infer_osr_config(osr) == {"n_feats": 24, "scale": 4, "blocks_per_group": (2, 2),
                                     "window_size": 16}
    with pytest.raises(CheckpointError, match="ODISR"):
        build_model(osr)
    camixer_sr = CAMixerSR(n_feats=16, blocks_per_group=(1,)).state_dict()
    assert not is_osr_state_dict(camixer_sr)
    with pytest.raises(CheckpointError, match="a CAMixerSR state dict"):
        infer_osr_config(camixer_sr)


def test_checkpoint_of_the_wrong_shape() -> None:
    state = fx.seeded_state_dict("small", 2)
    state["body.0.body_tail.conv_offset.weight"] = torch.zeros(27, 24, 1, 1)
    with pytest.raises(CheckpointError, match="does not fit CAMixerOSR"):
        build_osr_model({"params_ema": state})


def test_load_model_gives_camixer_osr_from_its_checkpoint(tmp_path: Path) -> None:
    import camixer_fast

    osr = fx.seeded_state_dict("small", 2)
    torch.save({"params_ema": osr}, tmp_path / "osr.pth")
    model = camixer_fast.load_model(tmp_path / "osr.pth", gamma=0.25)
    assert isinstance(model, CAMixerOSR) and not model.training and model.gamma == 0.25
    assert model.scale == 2 and model.n_feats == 24
    assert camixer_fast.load_model(osr, backend="cpu").backend == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        camixer_fast.load_model(osr, backend="onnx")


@pytest.mark.parametrize("seed,size,chunk", [(0, (5, 6), 1 << 14), (1, (7, 3), 5),
                                             (2, (1, 9), 4)], ids=["5x6", "7x3-chunked", "1x9"])
def test_cpu_deform_conv_matches_reference(seed: int, size: tuple[int, int], chunk: int,
                                           monkeypatch) -> None:
    from camixer_fast.backends import cpu

    monkeypatch.setattr(cpu, "DCN_CHUNK", chunk)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *size, generator=g)
    offset = 3.0 * torch.randn(2, 18, *size, generator=g)          # many taps land outside
    mask, weight = torch.rand(2, 9, *size, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    bias = torch.randn(5, generator=g)
    assert_close("cpu deform_conv vs reference", modulated_deform_conv2d(
        x, offset, mask, weight, bias), cpu.deform_conv(x, offset, mask, weight, bias), 1e-5)


def test_cpu_deform_conv_bad_offsets_are_refused() -> None:
    from camixer_fast.backends.cpu import deform_conv

    x, offset, mask, weight, bias = dcn_inputs()
    with pytest.raises(ValueError, match="do not fit"):
        deform_conv(x, offset[:, :16], mask, weight, bias)
