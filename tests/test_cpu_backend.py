"""The CPU backend (camixer_fast.backends.cpu): parity with the reference and the official outputs."""

from __future__ import annotations

import pytest
import torch
from camixer_fast.reference import deformable_key, window_attention
from camixer_fast.reference.windows import to_windows
from conftest import assert_close

import camixer_fast
from camixer_fast.backends import (
    BACKENDS,
    REGISTRY,
    backend_ops,
    can_use_cpu,
    resolve_backend,
    select_backend,
)
from camixer_fast.backends import cpu as cpu_ops

OUTPUT_TOL = 1e-4
GAMMAS = (1.0, 0.5, 0.25, 0.0)


def golden_cases() -> list[str]:
    return [f"{name}@gamma={g}" for g in ("1.0", "0.5", "0.25", "0.0")
            for name in ("butterfly_x4_lr", "butterfly_crop_45x61", "baby_x4_lr")
            if not (name == "baby_x4_lr" and g in ("0.25", "0.0"))]


@pytest.fixture(scope="module")
def model_cpu(weights_path) -> camixer_fast.CAMixerSR:
    return camixer_fast.load_model(weights_path, backend="cpu")


@pytest.mark.parametrize("case", golden_cases())
def test_golden_outputs(golden: dict, model_cpu: camixer_fast.CAMixerSR, case: str) -> None:
    name, gamma = case.split("@gamma=")
    model_cpu.gamma = float(gamma)
    with torch.inference_mode():
        out = model_cpu(golden["inputs"][name])
    assert out.is_contiguous()
    assert_close(case, golden["outputs"][case], out, OUTPUT_TOL)


def test_every_golden_output_is_covered(golden: dict) -> None:
    assert sorted(golden["outputs"]) == sorted(golden_cases())


@pytest.mark.parametrize("block", ["body.0.body.0", "body.3.body.5"])
def test_block_intermediates(golden: dict, model_cpu: camixer_fast.CAMixerSR, block: str) -> None:
    record = golden["blocks@gamma=0.5"][block]
    mixer = model_cpu.get_submodule(f"{block}.mixer")
    model_cpu.gamma = 0.5
    mixer.capture = {}
    try:
        with torch.inference_mode():
            model_cpu(golden["inputs"]["butterfly_x4_lr"])
        got = dict(mixer.capture)
    finally:
        mixer.capture = None
    k = int(got["num_hard"][0])
    assert k == record["K"]
    assert torch.equal(got["order"][:, :k], record["idx1"]), "hard windows differ"
    assert torch.equal(got["order"][:, k:], record["idx2"]), "simple windows differ"
    assert_close(f"{block}.x", record["x"], got["x"], OUTPUT_TOL)
    for key in ("condition_global", "pred_score", "offsets", "ca", "sa", "warped_x", "attn_out",
                "mixer_out"):
        ref, out = record[key], got[key]
        if key == "warped_x":
            # the CPU backend samples the deformable keys of the hard windows only
            hard = record["idx1"][0]
            ref, out = to_windows(ref, 16)[:, hard], to_windows(out, 16)[:, hard]
        assert_close(f"{block}.{key}", ref, out, OUTPUT_TOL)


SIZES = [(1, 1), (5, 7), (8, 8), (16, 16), (17, 33), (33, 17), (40, 72)]


@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_sizes_match_reference(model_s: camixer_fast.CAMixerSR,
                                   model_cpu: camixer_fast.CAMixerSR, size: tuple[int, int],
                                   gamma: float) -> None:
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 100 + size[1]))
    model_s.gamma = model_cpu.gamma = gamma
    with torch.inference_mode():
        ref, ref_routing = model_s(x, return_routing=True)
        out, out_routing = model_cpu(x, return_routing=True)
    assert out.shape == (1, 3, 4 * size[0], 4 * size[1])
    assert torch.equal(out_routing.num_hard(), ref_routing.num_hard())
    assert_close(f"{size}@{gamma}", ref, out, OUTPUT_TOL)


@pytest.mark.parametrize("gamma", [1.0, 0.5], ids=lambda g: f"gamma={g}")
def test_batch_is_per_image(model_cpu: camixer_fast.CAMixerSR, gamma: float) -> None:
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(7))
    model_cpu.gamma = gamma
    with torch.inference_mode():
        both = model_cpu(x)
        solo = [model_cpu(x[i:i + 1]) for i in range(3)]
    for i in range(3):
        assert torch.equal(both[i:i + 1], solo[i]), f"image {i} depends on its batch"


def test_real_images_match_reference(shared, model_s: camixer_fast.CAMixerSR,
                                     model_cpu: camixer_fast.CAMixerSR) -> None:
    """Whole Set5 LR images at γ = 0.5: same K in every block, outputs within 1e-4."""
    from conftest import load_rgb

    model_s.gamma = model_cpu.gamma = 0.5
    for name in ("bird", "head", "woman"):
        x = load_rgb(shared / "data" / "Set5" / "LR_bicubic" / "X4" / f"{name}x4.png")
        with torch.inference_mode():
            (ref, ref_routing), (out, out_routing) = (model_s(x, return_routing=True),
                                                      model_cpu(x, return_routing=True))
        assert torch.equal(out_routing.num_hard(), ref_routing.num_hard())
        assert_close(name, ref, out, OUTPUT_TOL)


# --- the operations on their own ---------------------------------------------------------------

def _maps(b: int, c: int, rows: int, cols: int, seed: int, channels_last: bool):
    gen = torch.Generator().manual_seed(seed)
    h, w = rows * 16, cols * 16
    x, k_in, v = (torch.randn(b, c, h, w, generator=gen) for _ in range(3))
    sa = torch.rand(b, 1, h, w, generator=gen)
    offsets = torch.randn(b, 2, h, w, generator=gen) * 6
    offsets[..., ::5] = offsets[..., ::5].round()          # integer offsets, exact borders
    if channels_last:
        x, k_in, v, offsets = (t.contiguous(memory_format=torch.channels_last)
                               for t in (x, k_in, v, offsets))
    weights = [torch.randn(c, c, generator=gen) / c**0.5, torch.randn(c, generator=gen),
               torch.randn(c, c, generator=gen) / c**0.5, torch.randn(c, generator=gen)]
    return x, k_in, v, sa, offsets, weights


ROUTINGS = {"none": [0, 0], "all": [6, 6], "mixed": [2, 5], "one-image": [0, 6]}


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_ops_match_reference(routing: str, layout: str) -> None:
    x, _, v, sa, offsets, weights = _maps(2, 36, 2, 3, seed=3,
                                          channels_last=layout == "channels-last")
    order = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i))
                         for i in range(2)])
    num_hard = torch.tensor(ROUTINGS[routing])
    ref_key = deformable_key(x, offsets)
    key = cpu_ops.deformable_key(x, offsets, num_hard, order, window_size=16)
    for i in range(2):
        hard = order[i, :num_hard[i]]
        assert_close(f"key[{i}]", to_windows(ref_key[i:i + 1], 16)[:, hard],
                     to_windows(key[i:i + 1], 16)[:, hard], 1e-5)
    ref = window_attention(x, ref_key, v, sa, *weights, num_hard, order, window_size=16)
    for chunk in (1, 4, 128):
        out = cpu_ops.window_attention(x, key, v, sa, *weights, num_hard, order,
                                       window_size=16, chunk=chunk)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(f"attention chunk={chunk}", ref, out, OUTPUT_TOL)


def test_attention_has_no_sqrt_c_scaling() -> None:
    """One window, K = 1: the result is softmax(QKᵀ)V with no 1/sqrt(C) factor."""
    x, k_in, v, sa, _, (wq, bq, wk, bk) = _maps(1, 8, 1, 1, seed=5, channels_last=False)
    out = cpu_ops.window_attention(x, k_in, v, sa, wq, bq, wk, bk, torch.tensor([1]),
                                   torch.tensor([[0]]), window_size=16)
    def tok(t: torch.Tensor) -> torch.Tensor:                       # [256, C]
        return to_windows(t, 16)[0, 0]

    q, k = tok(x) @ wq.T + bq, tok(k_in) @ wk.T + bk
    expected = torch.softmax(q @ k.T, dim=-1) @ tok(v)
    assert_close("window", expected, tok(out), 1e-5)


def test_bad_chunk() -> None:
    x, k_in, v, sa, _, weights = _maps(1, 4, 1, 1, seed=0, channels_last=False)
    with pytest.raises(ValueError, match="chunk"):
        cpu_ops.window_attention(x, k_in, v, sa, *weights, torch.tensor([1]),
                                 torch.tensor([[0]]), window_size=16, chunk=0)


def test_hard_window_pixels_are_window_major() -> None:
    order = torch.tensor([[3, 0, 1, 2], [1, 2, 0, 3]])
    pixels = cpu_ops.hard_window_pixels(torch.tensor([1, 2]), order, 32, 32, 16)
    assert pixels.shape == (3 * 256,)
    # image 0, window 3 (bottom right): first token at row 16, column 16
    assert int(pixels[0]) == 16 * 32 + 16 and int(pixels[255]) == 31 * 32 + 31
    # image 1, window 1 (top right), then window 2 (bottom left)
    assert int(pixels[256]) == 32 * 32 + 16 and int(pixels[512]) == 32 * 32 + 16 * 32


# --- backend choice ---------------------------------------------------------------------------

def test_backend_names_and_resolution() -> None:
    assert "cpu" in BACKENDS
    assert select_backend("auto", "cpu").name == "cpu"
    assert select_backend("auto").name == "cpu"
    assert select_backend("cpu", "cpu").name == "cpu"
    assert select_backend("reference", "cpu").name == "reference"
    assert select_backend("cpu").ops is cpu_ops.CPU_OPS
    assert REGISTRY["cpu"].unsupported(torch.device("cpu"), torch.float32, False) is None
    assert REGISTRY["cpu"].unsupported(torch.device("cuda"), torch.float32, False)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here"):
        select_backend("cpu", "cuda")


def test_deprecated_backend_functions_still_work() -> None:
    with pytest.deprecated_call():
        assert resolve_backend("auto", "cpu") == "cpu"
    with pytest.deprecated_call():
        assert backend_ops("cpu") is cpu_ops.CPU_OPS
    with pytest.deprecated_call():
        assert can_use_cpu("cpu")[0] and not can_use_cpu("cuda")[0]


def test_model_backend_switch(weights_path) -> None:
    model = camixer_fast.load_model(weights_path, gamma=0.5)
    assert model.backend == "cpu"                                   # "auto" on the CPU
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fast = model(x)
        model.backend = "reference"
        assert model.backend == "reference"
        ref = model(x)
        model.backend = "cpu"
        again = model(x)
    assert torch.equal(fast, again)
    assert_close("switch", ref, fast, OUTPUT_TOL)


def test_bfloat16_model_runs(weights_path) -> None:
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    ref = camixer_fast.load_model(weights_path, backend="reference")
    fast = camixer_fast.load_model(weights_path, backend="cpu", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = fast(x.bfloat16())
        expected = ref(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().mean() < 0.02


def test_training_runs_the_reference_path(weights_path, golden: dict) -> None:
    """In training mode the CPU backend's model runs the reference computation, bit for bit."""
    record = golden["train@gamma=0.5"]
    losses = {}
    for backend in ("reference", "cpu"):
        model = camixer_fast.load_model(weights_path, gamma=0.5, backend=backend).train()
        model.train_noise = False
        x = record["input"].clone().requires_grad_(True)
        out, ratio_loss = model(x)
        (out.abs().mean() + ratio_loss).backward()
        losses[backend] = (out.detach(), x.grad)
    assert torch.equal(losses["reference"][0], losses["cpu"][0])
    assert torch.equal(losses["reference"][1], losses["cpu"][1])


def test_count_madds_is_backend_independent(model_s: camixer_fast.CAMixerSR,
                                            model_cpu: camixer_fast.CAMixerSR) -> None:
    from camixer_fast.evaluation.cost import count_madds

    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    model_s.gamma = model_cpu.gamma = 0.5
    assert count_madds(model_cpu, x) == count_madds(model_s, x)
    assert model_cpu.backend == "cpu"
