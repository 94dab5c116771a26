"""CAMixerOSR's Triton path against the reference: the shifted-window attention kernel, the
DCNv2 kernel and the whole network with backend="triton" (Triton's interpreter on a CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from camixer_fast.reference.attention_inference import window_attention as ref_attention
from camixer_fast.reference.dcn import modulated_deform_conv2d
from camixer_fast.reference.odisr import CAMixerOSR
from conftest import DEVICE, assert_close

from camixer_fast.backends import REGISTRY, select_backend
from camixer_fast.kernels import attention_inference as kattn
from camixer_fast.kernels import dcn as kdcn

pytestmark = pytest.mark.usefixtures("no_tf32", "one_thread")
FP32_TOL = 1e-4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(DEVICE)


@pytest.mark.parametrize("shift", [0, 8, 5], ids=lambda s: f"shift{s}")
def test_shifted_window_attention_matches_reference(shift: int) -> None:
    b, c, h, w, ws = 2, 20, 48, 32, 16
    x, k_in, v = (rand(b, c, h, w, seed=s) for s in (1, 2, 3))
    sa = torch.rand(b, 1, h, w, generator=gen(4)).to(DEVICE)
    proj = [rand(c, c, seed=5, scale=c ** -0.5), rand(c, seed=6),
            rand(c, c, seed=7, scale=c ** -0.5), rand(c, seed=8)]
    n = (h // ws) * (w // ws)
    order = torch.stack([torch.randperm(n, generator=gen(9 + i)) for i in range(b)]).to(DEVICE)
    num_hard = torch.tensor([4, 1], device=DEVICE)
    got = kattn.window_attention(x, k_in, v, sa, *proj, num_hard, order, window_size=ws,
                                 shift=shift)
    ref = ref_attention(x, k_in, v, sa, *proj, num_hard, order, window_size=ws, shift=shift)
    assert_close(f"attn_out shift {shift}", ref, got, FP32_TOL)


def tiny_osr(seed: int = 3) -> CAMixerOSR:
    """n_feats 16, one group of two blocks (shift 0 and 8), window 16, x2; weights seeded
    like ``bench/official/odisr_fixture.seeded_state_dict`` (DCN offsets of about a pixel)."""
    model = CAMixerOSR(n_feats=16, blocks_per_group=(2,), window_size=16, scale=2)
    g = gen(seed)
    state = {}
    for key, value in sorted(model.state_dict().items()):
        t = torch.randn(value.shape, generator=g)
        if t.dim() > 1:
            t = t / math.sqrt(t[0].numel())
            t = t / 4.0 if key.endswith(("project_q.weight", "project_k.weight")) else t
        elif "norm" in key and key.endswith("weight"):
            t = 1.0 + 0.1 * t
        else:
            t = (0.5 if "conv_offset" in key else 0.1) * t
        state[key] = t
    model.load_state_dict(state)
    return model.eval().to(DEVICE)


@pytest.fixture(scope="module")
def osr() -> CAMixerOSR:
    return tiny_osr()


@pytest.mark.parametrize("size", [(17, 33), (32, 64)], ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("gamma", [0.5, 1.0], ids=lambda g: f"gamma={g}")
def test_osr_triton_matches_reference(osr: CAMixerOSR, size: tuple[int, int],
                                      gamma: float) -> None:
    lr = torch.rand(1, 3, *size, generator=gen(11)).to(DEVICE)
    osr.gamma = gamma
    outs = {}
    for backend in ("reference", "triton"):
        osr.backend = backend
        with torch.no_grad():
            outs[backend] = osr(lr)
    assert_close(f"sr {size} gamma {gamma}", outs["reference"], outs["triton"], FP32_TOL)


def test_osr_auto_backend(osr: CAMixerOSR, monkeypatch: pytest.MonkeyPatch) -> None:
    osr.backend = "auto"
    assert osr.ops(torch.device("cpu")) == select_backend("cpu").ops
    cuda = torch.device("cuda")
    monkeypatch.setitem(REGISTRY, "triton", dataclasses.replace(
        REGISTRY["triton"], unsupported=lambda device, dtype, training: None))
    assert osr.ops(cuda) == REGISTRY["triton"].ops
    osr.train()
    try:
        assert osr.ops(cuda) == REGISTRY["reference"].ops     # the DCN kernel has no backward
    finally:
        osr.eval()
    monkeypatch.setitem(REGISTRY, "triton", dataclasses.replace(
        REGISTRY["triton"], unsupported=lambda device, dtype, training: "no GPU"))
    assert osr.ops(cuda) == REGISTRY["reference"].ops


DCN_CASES = [(2, 16, 12, 17, 33, 2.0, False), (1, 5, 7, 1, 1, 3.0, False),
             (1, 24, 24, 9, 10, 40.0, True), (1, 70, 20, 6, 5, 1.5, True)]


@pytest.mark.parametrize("case", DCN_CASES,
                         ids=lambda c: "B{}-C{}-O{}-{}x{}-off{}-{}".format(
                             *c[:6], "nhwc" if c[6] else "nchw"))
def test_deform_conv_matches_reference(case: tuple) -> None:
    b, c, o, h, w, spread, channels_last = case
    x = rand(b, c, h, w, seed=21)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    offset = rand(b, 18, h, w, seed=22, scale=spread)      # many taps land outside
    mask = torch.rand(b, 9, h, w, generator=gen(23)).to(DEVICE)
    weight = rand(o, c, 3, 3, seed=24, scale=(9 * c) ** -0.5)
    bias = rand(o, seed=25)
    for b_ in (bias, None):
        got = kdcn.deform_conv(x, offset, mask, weight, b_)
        ref = modulated_deform_conv2d(x, offset, mask, weight, b_)
        assert_close(f"dcn bias={b_ is not None}", ref, got, FP32_TOL)


def test_deform_conv_rejects_bad_inputs_and_gradients() -> None:
    x, offset, mask = rand(1, 4, 5, 6, seed=1), rand(1, 18, 5, 6, seed=2), rand(1, 9, 5, 6, seed=3)
    weight = rand(8, 4, 3, 3, seed=4)
    with pytest.raises(ValueError, match="do not fit"):
        kdcn.deform_conv(x, offset[:, :16], mask, weight)
    with pytest.raises(ValueError, match="bias"):
        kdcn.deform_conv(x, offset, mask, weight, rand(7, seed=5))
    with pytest.raises(RuntimeError, match="does not differentiate"):
        kdcn.deform_conv(x, offset, mask, weight.requires_grad_())
