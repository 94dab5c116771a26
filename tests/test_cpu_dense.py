"""The CPU backend's oneDNN 1×1 projections against their reference twin.

``camixer_fast.backends.dense.linear`` runs them through oneDNN with the bias and the residual in
the product's epilogue; ``camixer_fast.reference.dense.linear`` is plain PyTorch. Same numbers
up to fp32 rounding, the same forward with autograd on or off, the reference's gradients, and
the twin itself where oneDNN cannot run.
"""

from __future__ import annotations

import pytest
import torch

from camixer_fast.reference import dense
from camixer_fast.backends import dense as cpu_dense
from conftest import assert_close

pytestmark = pytest.mark.skipif(cpu_dense.unsupported() is not None,
                                reason=str(cpu_dense.unsupported()))

FP32_TOL = 1e-5
SIZES = [(1, 1), (17, 33), (32, 48)]


def _size_id(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _operands(size: tuple[int, int], channels: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    return {
        "x": torch.randn(2, h, w, channels, generator=gen),
        "other": torch.randn(2, h, w, channels, generator=gen),
        "weight": torch.randn(channels, channels, generator=gen) / channels**0.5,
        "bias": torch.randn(channels, generator=gen),
    }


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_linear_matches_reference(size: tuple[int, int], bias: bool, residual: bool) -> None:
    t = _operands(size, 21, seed=1)
    args = (t["x"], t["weight"], t["bias"] if bias else None)
    extra = {"residual": t["other"]} if residual else {}
    with torch.no_grad():
        expected = dense.linear(*args, **extra)
        got = cpu_dense.linear(*args, **extra)
    assert got.shape == expected.shape
    assert_close(f"linear {size}", expected, got, FP32_TOL)


def test_forward_does_not_depend_on_grad_mode() -> None:
    t = _operands((17, 33), 36, seed=3)
    weight, bias = t["weight"].requires_grad_(), t["bias"].requires_grad_()
    with torch.no_grad():
        fast = cpu_dense.linear(t["x"], weight, bias, residual=t["other"])
    slow = cpu_dense.linear(t["x"], weight, bias, residual=t["other"])
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_gradient_is_the_reference_gradient(bias: bool) -> None:
    t = _operands((17, 33), 12, seed=4)
    grads = []
    for module in (dense, cpu_dense):
        x, weight, b, other = (t[k].clone().requires_grad_()
                               for k in ("x", "weight", "bias", "other"))
        out = module.linear(x, weight, b if bias else None, residual=other)
        out.pow(2).sum().backward()
        grads.append([p.grad for p in (x, weight, other)] + ([b.grad] if bias else []))
    for name, ref, got in zip(("x", "weight", "residual", "bias"), *grads, strict=False):
        assert_close(f"linear grad {name}", ref, got, FP32_TOL, relative=True)


def test_without_onednn_the_reference_runs(monkeypatch) -> None:
    t = _operands((17, 33), 36, seed=5)
    # the two agree to the bit on this machine: that the twin ran is checked by the call
    monkeypatch.setattr(cpu_dense, "_linear_forward", lambda *a: pytest.fail("oneDNN ran"))
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert "switched off" in (cpu_dense.unsupported() or "")
        assert torch.equal(cpu_dense.linear(t["x"], t["weight"], t["bias"]),
                           dense.linear(t["x"], t["weight"], t["bias"]))
    assert cpu_dense.unsupported() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_the_reference(monkeypatch, dtype: torch.dtype) -> None:
    t = {k: v.to(dtype) for k, v in _operands((17, 33), 36, seed=6).items()}
    monkeypatch.setattr(cpu_dense, "_linear_forward", lambda *a: pytest.fail("oneDNN ran"))
    with torch.no_grad():
        assert torch.equal(cpu_dense.linear(t["x"], t["weight"], t["bias"]),
                           dense.linear(t["x"], t["weight"], t["bias"]))


@pytest.mark.parametrize("dilation", [1, 3], ids=lambda d: f"dilation{d}")
def test_bf16_depthwise_weight_gradient(dilation: int) -> None:
    """oneDNN's bf16 backward of a dilated depthwise convolution on a channels-last input gave
    a weight gradient 99% off (torch 2.13); the reference feeds it NCHW."""
    gen = torch.Generator().manual_seed(dilation)
    x, w, b = (torch.randn(1, 24, 40, 36, generator=gen), torch.randn(36, 1, 3, 3, generator=gen),
               torch.randn(36, generator=gen))

    def weight_grad(dtype: torch.dtype) -> torch.Tensor:
        ww = w.to(dtype).requires_grad_()
        dense.depthwise(x.to(dtype), ww, b.to(dtype), dilation=dilation).float().square().sum() \
            .backward()
        return ww.grad.double()

    ref, got = weight_grad(torch.float64), weight_grad(torch.bfloat16)
    error = ((got - ref).norm() / ref.norm()).item()
    print(f"dilation {dilation}: relative L2 error of the bf16 weight gradient {error:.2e}")
    assert error < 2e-2
