"""Network behaviour: determinism, batch invariance, γ extremes, odd sizes, routing modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import camixer_fast
from camixer_fast.reference import pad_to_multiple
from conftest import assert_close


@pytest.fixture()
def lr(golden: dict) -> torch.Tensor:
    return golden["inputs"]["butterfly_crop_45x61"]


def test_deterministic(model_s: camixer_fast.CAMixerSR, lr: torch.Tensor) -> None:
    model_s.gamma = 0.5
    with torch.no_grad():
        a, b = model_s(lr), model_s(lr)
    assert torch.equal(a, b)


def test_batch_invariance(model_s: camixer_fast.CAMixerSR, golden: dict) -> None:
    butterfly = golden["inputs"]["butterfly_x4_lr"]
    baby = golden["inputs"]["baby_x4_lr"][..., 32:96, 40:104]
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = torch.cat([butterfly, baby, noise])
    model_s.gamma = 0.5
    with torch.no_grad():
        together, routing = model_s(batch, return_routing=True)
        ks = routing.num_hard()                                       # [blocks, B]
        for i in range(batch.shape[0]):
            solo, solo_routing = model_s(batch[i:i + 1], return_routing=True)
            assert_close(f"image {i}", solo, together[i:i + 1], 0.0)
            solo_ks = solo_routing.num_hard()
            assert torch.equal(solo_ks[:, 0], ks[:, i]), f"image {i}: K differs from its solo run"
    assert not torch.equal(ks[:, 0], ks[:, 1]), "the images of this batch should differ in K"


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (17, 33), (8, 9), (16, 16), (2, 31)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0], ids=lambda g: f"gamma={g}")
def test_odd_sizes(model_s: camixer_fast.CAMixerSR, size: tuple[int, int], gamma: float) -> None:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    model_s.gamma = gamma
    with torch.no_grad():
        y = model_s(x)
    assert y.shape == (2, 3, 4 * size[0], 4 * size[1])
    assert torch.isfinite(y).all()


def test_gamma_extremes_route_all_or_nothing(model_s: camixer_fast.CAMixerSR, lr) -> None:
    for gamma, expected in ((0.0, 0), (1.0, 12)):      # 48x64 padded map: 3x4 windows
        model_s.gamma = gamma
        with torch.no_grad():
            _, routing = model_s(lr, return_routing=True)
        assert set(routing.num_hard()[:, 0].tolist()) == {expected}


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half", None])
def test_bad_gamma(model_s: camixer_fast.CAMixerSR, bad) -> None:
    with pytest.raises(ValueError, match="gamma"):
        model_s.gamma = bad


def test_bad_settings(model_s: camixer_fast.CAMixerSR) -> None:
    with pytest.raises(ValueError, match="routing"):
        model_s.routing = "random"
    with pytest.raises(ValueError, match="tie_break"):
        model_s.tie_break = "stable"
    with pytest.raises(ValueError, match="backend"):
        model_s.backend = "cuda"


@pytest.mark.parametrize("x, error", [
    (torch.rand(3, 16, 16), ValueError), (torch.rand(1, 4, 16, 16), ValueError),
    (torch.zeros(1, 3, 0, 16), ValueError), (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError),
], ids=["3d", "4-channels", "empty", "uint8"])
def test_bad_input(model_s: camixer_fast.CAMixerSR, x: torch.Tensor, error: type) -> None:
    with pytest.raises(error):
        model_s(x)


def test_gumbel_routing_follows_generator(model_s: camixer_fast.CAMixerSR, lr) -> None:
    model_s.gamma, model_s.routing = 0.5, "gumbel"
    try:
        with torch.no_grad():
            a = model_s(lr, generator=torch.Generator().manual_seed(3))
            b = model_s(lr, generator=torch.Generator().manual_seed(3))
            draws = {tuple(model_s(lr, generator=torch.Generator().manual_seed(seed),
                                   return_routing=True)[1].num_hard()[:, 0].tolist())
                     for seed in range(6)}
    finally:
        model_s.routing = "expected"
    assert torch.equal(a, b)
    assert len(draws) > 1, "the Gumbel draw should change K from seed to seed"


def test_tie_break_index_differs_only_on_ties(model_s: camixer_fast.CAMixerSR, golden) -> None:
    x = golden["inputs"]["butterfly_x4_lr"]       # no tie crosses K here
    model_s.gamma = 0.5
    with torch.no_grad():
        official = model_s(x)
        model_s.tie_break = "index"
        try:
            index = model_s(x)
        finally:
            model_s.tie_break = "official"
    assert torch.equal(official, index)


def test_training_mode_returns_ratio_loss(model_s: camixer_fast.CAMixerSR, lr) -> None:
    model_s.train()
    model_s.gamma = 0.5
    try:
        sr, ratio_loss = model_s(lr, generator=torch.Generator().manual_seed(0))
        sr2, _ = model_s(lr, generator=torch.Generator().manual_seed(0))
        model_s.train_noise = False
        quiet = [model_s(lr)[0] for _ in range(2)]
    finally:
        model_s.train_noise = True
        model_s.eval()
    assert sr.shape == (1, 3, 180, 244) and ratio_loss.dim() == 0
    assert 0.0 <= ratio_loss.item() <= 2 * 0.5 * 0.25
    assert torch.equal(sr, sr2)
    assert torch.equal(quiet[0], quiet[1])


@pytest.mark.parametrize("size", [9, 10, 15, 16, 17, 31, 33], ids=lambda s: f"size{s}")
def test_padding_is_reflect_where_defined(size: int) -> None:
    x = torch.rand(1, 2, size, size + 3)
    out = pad_to_multiple(x, 16)
    pad_h, pad_w = (-size) % 16, (-(size + 3)) % 16
    assert out.shape[-2:] == (size + pad_h, size + 3 + pad_w)
    if pad_h < size and pad_w < size + 3:
        assert torch.equal(out, F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"))


def test_padding_small_inputs_mirror_periodically() -> None:
    row = torch.arange(3.0).view(1, 1, 1, 3)
    assert pad_to_multiple(row, 16)[0, 0, :, :].tolist()[0] == [0, 1, 2, 1] * 4
    assert pad_to_multiple(torch.ones(1, 1, 1, 1), 16).shape == (1, 1, 16, 16)


def test_output_does_not_depend_on_input_strides(model_s: camixer_fast.CAMixerSR) -> None:
    """An (H, W, 3) array read transposed, or a batch stride of 3 (an HWC image unsqueezed),
    gives the same bits as a contiguous input: the model copies its input to one layout."""
    hwc = torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(5))
    plain = hwc.permute(2, 0, 1).unsqueeze(0)                          # strides (3, 1, 144, 3)
    transposed = hwc.transpose(0, 1).contiguous().transpose(0, 1).permute(2, 0, 1)[None]
    model_s.gamma = 0.5
    with torch.no_grad():
        ref = model_s(plain.contiguous())
        for x in (plain, transposed):
            assert_close("strides", ref, model_s(x), 0.0)
