"""fp32 precision modes of the Triton kernels (issue 11): parity by IEEE products or tf32x3,
plain TF32 where PyTorch's own switch allows it, asked by the launchers at every launch
(``camixer_fast.kernels.helpers.dot_precision``).

In Triton's interpreter every precision computes exact fp32 products, so on a CPU the parity
tests prove the launch paths and the GPU proves the numbers; the JIT and AOT gates prove that
every precision compiles and runs its products on tensor cores (tests/test_jit_gate.py,
tests/test_compile_gate.py).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from camixer_fast import reference
from camixer_fast.kernels import helpers
from camixer_fast.kernels import attention_inference as kattn
from camixer_fast.kernels import attention_training as ktrain
from conftest import DEVICE, assert_close, tf32_off

PARITY_TOL = 1e-4
"""The parity mode's promise: within 1e-4 of the reference."""
TF32_TOL = 3e-2
"""TF32 keeps 10 mantissa bits, as fp16: the fp16 bound of the attention tests."""


@contextmanager
def matmul_tf32(allowed: bool):
    """PyTorch's legacy TF32 switch for matrix products, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_follows_pytorchs_legacy_switches() -> None:
    with matmul_tf32(False):
        assert not helpers.pytorch_allows_tf32()
        assert helpers.dot_precision(torch.float32) == "ieee"
    with matmul_tf32(True):
        assert helpers.pytorch_allows_tf32()
        assert helpers.dot_precision(torch.float32) == "tf32"
    saved = torch.get_float32_matmul_precision()
    try:
        for setting, tf32 in (("high", True), ("medium", True), ("highest", False)):
            torch.set_float32_matmul_precision(setting)
            assert helpers.pytorch_allows_tf32() is tf32, setting
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch < 2.9 has no fp32_precision setting")
@pytest.mark.parametrize("setting, tf32", [
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'", True),
    ("torch.set_float32_matmul_precision('high'); "
     "torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
], ids=["matmul-tf32", "matmul-ieee", "global-tf32", "legacy-then-new"])
def test_tf32_follows_pytorchs_new_setting(setting: str, tf32: bool) -> None:
    """torch 2.9's fp32_precision, also mixed with the legacy calls (after which the legacy
    getters raise). In a subprocess: the mix would stay for the rest of this session."""
    code = ("import torch; from camixer_fast.kernels import helpers; " + setting +
            "; print(helpers.pytorch_allows_tf32(), helpers.dot_precision(torch.float32))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(tf32), "tf32" if tf32 else "ieee"]


def test_parity_precision_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(helpers.FP32_PARITY_VAR, raising=False)
    with matmul_tf32(False):
        assert helpers.fp32_parity_precision() == "ieee"
        monkeypatch.setenv(helpers.FP32_PARITY_VAR, " TF32x3 ")
        assert helpers.dot_precision(torch.float32) == "tf32x3"
        # half precision runs on tensor cores whatever the setting
        assert helpers.dot_precision(torch.bfloat16) == "tf32"
        monkeypatch.setenv(helpers.FP32_PARITY_VAR, "tf32")
        with pytest.raises(ValueError, match="ieee.*tf32x3"):
            helpers.dot_precision(torch.float32)
    with matmul_tf32(True):
        monkeypatch.setenv(helpers.FP32_PARITY_VAR, "tf32x3")
        assert helpers.dot_precision(torch.float32) == "tf32"


def test_tile_configs_follow_the_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (not interpreted) launches: IEEE on the FMA tiles, tf32 on the tiles proven on
    the H200, tf32x3 on its own (unproven) tiles; half precision untouched."""
    monkeypatch.setattr(kattn, "interpreting", lambda: False)
    monkeypatch.setattr(ktrain, "interpreting", lambda: False)
    f32 = torch.float32
    assert kattn.tile_config(f32, 16, precision="ieee") == kattn.FP32_TILES
    assert kattn.tile_config(f32, 16, precision="tf32") == kattn.TF32_TILES
    assert kattn.TF32_TILES.proven
    assert kattn.tile_config(f32, 16, precision="tf32x3") == kattn.TF32X3_TILES
    assert not kattn.TF32X3_TILES.proven
    assert kattn.tile_config(torch.float16, 16, precision="ieee") == kattn.HALF_TILES
    for precision, (forward, backward) in ktrain.FP32_TILES_BY_PRECISION.items():
        assert ktrain.tile_config(f32, 16, precision=precision) == forward
        assert ktrain.tile_config(f32, 16, backward=True, precision=precision) == backward
    with matmul_tf32(True):
        assert kattn.tile_config(f32, 16) == kattn.TF32_TILES
        assert ktrain.tile_config(f32, 16) == ktrain.TF32_FORWARD
    with matmul_tf32(False):
        monkeypatch.setenv(helpers.FP32_PARITY_VAR, "tf32x3")
        assert kattn.tile_config(f32, 16) == kattn.TF32X3_TILES
        # smaller windows cut the tiles to the window's tokens
        assert kattn.tile_config(f32, 4).bm == 16


def _inputs(b: int, c: int, rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = rows * 16, cols * 16
    maps = [torch.randn(b, c, h, w, generator=g).to(DEVICE) for _ in range(3)]
    sa = torch.rand(b, 1, h, w, generator=g).to(DEVICE)
    proj = [(torch.randn(c, c, generator=g) * c ** -0.5).to(DEVICE),
            torch.randn(c, generator=g).to(DEVICE),
            (torch.randn(c, c, generator=g) * c ** -0.5).to(DEVICE),
            torch.randn(c, generator=g).to(DEVICE)]
    return maps, sa, proj


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_window_attention_in_each_precision(monkeypatch: pytest.MonkeyPatch,
                                            precision: str) -> None:
    """Parity precisions within 1e-4 of the reference, TF32 within the fp16 bound."""
    (x, k_in, v), sa, proj = _inputs(2, 36, 1, 2)
    order = torch.tensor([[1, 0], [0, 1]], device=DEVICE)
    num_hard = torch.tensor([1, 2], device=DEVICE)
    with tf32_off():
        ref = reference.window_attention(x, k_in, v, sa, *proj, num_hard, order, window_size=16)
        monkeypatch.setenv(helpers.FP32_PARITY_VAR, "ieee" if precision == "tf32" else precision)
        with matmul_tf32(precision == "tf32"):
            got = kattn.window_attention(x, k_in, v, sa, *proj, num_hard, order,
                                         window_size=16)
    assert_close(f"attn_out ({precision})", ref, got,
                 TF32_TOL if precision == "tf32" else PARITY_TOL)


def test_masked_window_attention_tf32x3_forward_and_backward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The training kernels in the tf32x3 parity mode: output and gradients as tight as the
    IEEE kernels' (tests/test_kernels.py)."""
    (x, k_in, v), sa, proj = _inputs(1, 20, 1, 2, seed=3)
    logits = torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    monkeypatch.setenv(helpers.FP32_PARITY_VAR, "tf32x3")
    results = []
    with tf32_off():
        for fn in (ktrain.masked_window_attention, reference.masked_window_attention):
            leaves = [t.clone().requires_grad_() for t in (x, k_in, v, sa, *proj)]
            mask = (logits.softmax(-1)[..., 0:1] >= 0.5).float()
            out = fn(*leaves[:4], mask, *leaves[4:], window_size=16)
            (out * grad).sum().backward()
            results.append([out] + [t.grad for t in leaves[:4]])
    for name, got, ref in zip(["out", "dx", "dk_in", "dv", "dsa"], *results):
        assert_close(name, ref, got, 2e-5, relative=True)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_model_in_each_precision(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    """A whole forward on the Triton backend (the fused block: predictor, attention, mixer
    and FFN tails all take the precision) against the reference backend."""
    import camixer_fast

    torch.manual_seed(0)
    model = camixer_fast.CAMixerSR(n_feats=12, blocks_per_group=(1, 1)).to(DEVICE).eval()
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with tf32_off(), torch.no_grad():
        ref = model(x)
        model.backend = "triton"
        monkeypatch.setenv(helpers.FP32_PARITY_VAR, "ieee" if precision == "tf32" else precision)
        with matmul_tf32(precision == "tf32"):
            got = model(x)
    assert_close(f"sr ({precision})", ref, got, TF32_TOL if precision == "tf32" else PARITY_TOL)
