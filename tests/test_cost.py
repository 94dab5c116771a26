"""Cost accounting: parameter counts (spec §6), the paper's FLOPs (spec §7, Table 2) and
measured multiply-adds of actual forwards (Table 3: 77.9G for B on 320×180 at γ = 1)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import camixer_fast
from camixer_fast.cli import main
from camixer_fast.evaluation.cost import (
    count_madds,
    madds_breakdown,
    measure_madds,
    paper_flops,
    parameter_count,
)

PAPER_FLOPS = {  # Table 2, one 32×32 LR input: C -> {γ: FLOPs as printed}
    36: {1.0: 894e6, 0.5: 652e6, 0.25: 532e6, 0.0: 410e6},
    48: {1.0: 1.37e9, 0.5: 1.03e9, 0.25: 858e6, 0.0: 686e6},
    60: {1.0: 1.96e9, 0.5: 1.49e9, 0.25: 1.26e9, 0.0: 1.03e9},
}
SIZE_NAME = {36: "S", 48: "M", 60: "B"}


pytestmark = pytest.mark.usefixtures("one_thread")


def three_figures(x: float) -> float:
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return math.floor(x / step + 0.5) * step


@pytest.mark.parametrize("n_feats,scale,expected",
                         [(36, 4, 351_238), (48, 4, 534_558), (60, 4, 765_322), (60, 2, 745_846)],
                         ids=["S-x4", "M-x4", "B-x4", "lightweight-x2"])
def test_parameter_count(n_feats: int, scale: int, expected: int) -> None:
    model = camixer_fast.CAMixerSR(n_feats=n_feats, scale=scale)
    assert parameter_count(model) == expected


def test_parameter_count_of_official_weights(model_s: camixer_fast.CAMixerSR) -> None:
    assert parameter_count(model_s) == 351_238


def test_paper_flops_by_hand() -> None:
    # S, γ = 0, 32×32, term by term (see paper_flops): per block mixer 7,593,984 + FFN 9,289,728
    hw, c = 1024, 36
    mixer = (hw * 40 * 40 // 4 * 2 + hw * 10 * 3 * 2 + hw * 10 * 2 * 2 + 4 * 256 * 16 * 2
             + 4 * 16 * 2 * 16 * 2 + hw * c * c * 2 + 2 * hw * c * 9 * 2 + hw * c * c * 2)
    ffn = hw * c * 2 * c * 2 + hw * 2 * c * 9 * 2 + hw * c * c * 2
    assert (mixer, ffn) == (7_593_984, 9_289_728)
    rest = (hw * 3 * c * 9 * 2 + hw * 8 * (c + 2) * 9 * 2 + 4 * hw * c * c * 2
            + hw * c * c * 9 * 2 + hw * c * 48 * 9 * 2)
    assert paper_flops(36, 4, 0.0) == 20 * (mixer + ffn) + rest == 411_623_424
    # each γ step adds the q/k projections (2·2·HW·C²·γ) and int(4γ) windows of 2·256²·C, ×20
    per_window = 20 * 2 * 256**2 * c
    assert paper_flops(36, 4, 1.0) - paper_flops(36, 4, 0.0) == 20 * 4 * hw * c * c + 4 * per_window


@pytest.mark.parametrize("n_feats", [36, 48, 60], ids=lambda c: SIZE_NAME[c])
def test_paper_flops_against_table2(n_feats: int) -> None:
    rows = []
    for gamma, printed in PAPER_FLOPS[n_feats].items():
        got = paper_flops(n_feats, 4, gamma)
        rows.append(f"γ={gamma}: {got / 1e6:.2f}M (3 s.f. {three_figures(got) / 1e6:g}M, "
                    f"paper {printed / 1e6:g}M, {100 * (got / printed - 1):+.2f}%)")
        assert abs(got / printed - 1) < 0.0075
    print(f"{SIZE_NAME[n_feats]}: " + "; ".join(rows))


def test_table2_is_not_linear_in_gamma() -> None:
    """Why no γ-linear formula gives all twelve figures: for 32×32 every term of one is linear
    in γ ∈ {0, 0.25, 0.5} (int(4γ) windows included), so F(0.25) = (F(0) + F(0.5)) / 2; the
    S row rounds to 410 / 532 / 652, and (410.5 + 652.5) / 2 = 531.5 cannot round up to 532
    when both ends are strictly below .5."""
    s = PAPER_FLOPS[36]
    assert (s[0.0] + 0.5e6 + s[0.5] + 0.5e6) / 2 <= s[0.25] - 0.5e6
    for c in (36, 48, 60):
        f = {g: paper_flops(c, 4, g) for g in (0.0, 0.25, 0.5)}
        assert f[0.25] == (f[0.0] + f[0.5]) / 2


def expected_madds(n_feats: int, scale: int, hp: int, wp: int, hard: list[int],
                   ws: int = 16) -> int:
    """Multiply-adds by hand for one image padded to hp×wp with ``hard[i]`` hard windows in
    block i (spec §1–§3 layer by layer)."""
    c, c4, c8 = n_feats, (n_feats + 4) // 4, (n_feats + 4) // 8
    px, windows, tokens = hp * wp, (hp // ws) * (wp // ws), ws * ws
    per_pixel_block = (c * c                                    # project_v
                       + (c + 4) * c4 + c4 * c8 + c8 * 2        # in_conv, out_offsets
                       + c4 * 9                                 # out_SA
                       + 2 * 9 * c + c * c                      # conv_sptial, project_out
                       + 2 * c * c + 2 * c * 9 + c * c)         # FFN
    per_block = px * per_pixel_block + c4 * c + windows * (tokens * ws + ws * 2)  # + out_CA, out_mask
    total = len(hard) * per_block
    total += sum(k * tokens * 2 * c * c + k * 2 * tokens * tokens * c for k in hard)
    total += px * (3 * c * 9 + c * 8 + 8 * 2 * 9                # head, global predictor
                   + 4 * c * c + c * c * 9 + c * 3 * scale * scale * 9)  # group tails, tails
    return total


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0], ids=lambda g: f"gamma={g}")
def test_count_madds_follows_routing(model_s: camixer_fast.CAMixerSR, golden: dict,
                                     gamma: float) -> None:
    lr = golden["inputs"]["butterfly_crop_45x61"]              # padded to 48×64: 12 windows
    model_s.gamma = gamma
    got, routing = measure_madds(model_s, lr)
    hard = routing.num_hard()[:, 0].tolist()
    assert madds_breakdown(model_s, lr) == got
    print(f"γ={gamma}: K per block {hard}, {got}")
    assert got["total"] == expected_madds(36, 4, 48, 64, hard)
    assert got["linear"] == 0                                  # every Linear is applied functionally
    if gamma == 0.0:
        assert got["attention"] == got["qk_projection"] == 0
    if gamma == 1.0:
        assert hard == [12] * 20
    assert count_madds(model_s, lr) == got["total"]


def test_count_madds_batch_is_sum_of_images(model_s: camixer_fast.CAMixerSR,
                                            golden: dict) -> None:
    a = golden["inputs"]["butterfly_x4_lr"]
    b = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model_s.gamma = 0.5
    assert count_madds(model_s, torch.cat([a, b])) == count_madds(model_s, a) + count_madds(model_s, b)


@pytest.mark.slow
def test_count_madds_b_model_320x180() -> None:
    """Table 3: the B model (C = 60, ×4) on a 320×180 input (1280×720 output) at γ = 1."""
    torch.manual_seed(0)
    model = camixer_fast.CAMixerSR(n_feats=60, scale=4, gamma=1.0)
    got = count_madds(model, torch.rand(1, 3, 180, 320))
    want = expected_madds(60, 4, 192, 320, [240] * 20)          # padded 192×320: 240 windows
    print(f"B ×4 320×180 γ=1: {got / 1e9:.3f}G multiply-adds (paper 77.9G, "
          f"{100 * (got / 77.9e9 - 1):+.2f}%)")
    assert got == want
    assert abs(got / 77.9e9 - 1) <= 0.02


def test_info_random_model_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "M", "--gamma", "0.5", "--lr-size", "40x20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 534_558 and info["n_feats"] == 48 and info["scale"] == 4
    assert info["paper_flops_32x32"] == paper_flops(48, 4, 0.5)
    assert info["windows"] == 6 and len(info["hard_windows_per_block"]) == 20
    assert info["madds"]["total"] == expected_madds(48, 4, 48, 32, info["hard_windows_per_block"])


def test_info_weights_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--weights", "CAMixerSR-S", "--gamma", "1"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "351,238" in out and "895.3M" in out
    assert f"{expected_madds(36, 4, 32, 32, [4] * 20) / 1e9:,.3f}G" in out


def test_info_x2_lightweight(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "B", "--scale", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 745_846


@pytest.mark.parametrize("args", [["--lr-size", "0x5"], ["--lr-size", "32"],
                                  ["--model", "S", "--weights", "CAMixerSR-S"],
                                  ["--gamma", "-0.1"], ["--model", "XL"]],
                         ids=["zero-size", "no-x", "model-and-weights", "bad-gamma", "bad-model"])
def test_info_bad_arguments(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["info", *args])
    assert exit_info.value.code == 2


def test_info_scale_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--weights", "CAMixerSR-S", "--scale", "2"]) == 2
    assert "×4" in capsys.readouterr().err


def expected_osr_madds(c: int, scale: int, hp: int, wp: int, hard: list[int], groups: int,
                       ws: int = 8) -> int:
    """CAMixerOSR's multiply-adds by hand, one image padded to hp×wp (the official file's layers:
    k = 3 extra predictor inputs, the spatial branch 1×1 → dw 5×5 → dw 5×5, a DCNv2 per group
    and after the body, each with a 1 → C → C condition MLP and a 3×3 C → 27 offset conv)."""
    c4, c8 = (c + 3) // 4, (c + 3) // 8
    px, windows, tokens = hp * wp, (hp // ws) * (wp // ws), ws * ws
    per_pixel_block = (c * c + (c + 3) * c4 + c4 * c8 + c8 * 2 + c4 * 9     # v, predictor
                       + c * c + 2 * 25 * c + c * c                         # spatial, out
                       + 2 * c * c + 2 * c * 25 + c * c)                    # FFN
    per_block = px * per_pixel_block + c4 * c + windows * (tokens * ws + ws * 2)
    total = len(hard) * per_block
    total += sum(k * tokens * 2 * c * c + k * 2 * tokens * tokens * c for k in hard)
    dcns = groups + 1
    total += px * (3 * c * 9 + dcns * (c + c * c + c * 27 * 9 + c * c * 9)
                   + c * c * 9 + c * 3 * scale * scale * 9)                 # head, DCNs, tails
    return total


@pytest.mark.parametrize("gamma", [0.5, 1.0], ids=lambda g: f"gamma={g}")
def test_count_madds_of_camixerosr(gamma: float) -> None:
    from camixer_fast.reference.odisr import CAMixerOSR

    torch.manual_seed(0)
    model = CAMixerOSR(n_feats=12, scale=2, blocks_per_group=(2, 1), window_size=8, gamma=gamma)
    lr = torch.rand(1, 3, 13, 30, generator=torch.Generator().manual_seed(1))  # padded 16×32
    got, routing = measure_madds(model, lr)
    hard = routing.num_hard()[:, 0].tolist()
    print(f"γ={gamma}: K per block {hard}, {got}")
    assert got["total"] == expected_osr_madds(12, 2, 16, 32, hard, groups=2)
    assert got["dcn"] == 3 * 16 * 32 * 12 * 12 * 9 and got["linear"] == 0
    if gamma == 1.0:
        assert hard == [8, 8, 8]
