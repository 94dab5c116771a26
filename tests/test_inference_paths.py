"""The network's inference-only shortcuts give the numbers of its autograd path.

With autograd off the network overwrites its own temporaries (GELU gates in place) and adds
residuals inside matrix products; the predictor works channels-first. These checks pin that
the shortcuts change no result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import camixer_fast
from camixer_fast.reference.model import GatedFFN, layer_norm
from conftest import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_half_precision_layer_norm_computes_in_fp32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 17, 33, 10, generator=gen) * 3 + 1).to(dtype)
    weight, bias = (torch.randn(10, generator=gen).to(dtype) for _ in range(2))
    expected = F.layer_norm(x.float(), (10,), weight.float(), bias.float(), 1e-6).to(dtype)
    got = layer_norm(x, weight, bias, 1e-6)
    assert got.dtype == dtype
    assert torch.equal(expected, got)


def test_ffn_residual_is_added() -> None:
    torch.manual_seed(0)
    ffn = GatedFFN(12)
    x, residual = torch.randn(2, 17, 33, 12), torch.randn(2, 17, 33, 12)
    with torch.no_grad():
        assert_close("ffn + residual", ffn(x) + residual, ffn(x, residual=residual), 1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("gamma", [1.0, 0.5], ids=lambda g: f"gamma={g}")
def test_no_grad_path_equals_autograd_path(weights_path, backend: str, gamma: float) -> None:
    model = camixer_fast.load_model(weights_path, gamma=gamma, backend=backend)
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        fast = model(x)
    with torch.enable_grad():
        slow = model(x)
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())
