"""The Triton operations on channels-last maps, the layout the network hands them (NHWC memory):
the same values and gradients as on contiguous (B, C, H, W) maps."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, assert_close

kernels = pytest.importorskip("camixer_fast.kernels")

pytestmark = pytest.mark.usefixtures("no_tf32")     # IEEE convolutions on CUDA: layouts compared


def _maps(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(DEVICE) for shape in shapes]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    out = t.contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous() or t.shape[1] == 1
    return out


def test_deformable_key_gradients_on_channels_last_maps() -> None:
    x, offsets = _maps(0, (2, 5, 16, 32), (2, 2, 16, 32))
    offsets = offsets * 3.0
    grads = {}
    for layout in ("contiguous", "channels_last"):
        xi = (x if layout == "contiguous" else _channels_last(x)).clone().requires_grad_(True)
        oi = (offsets if layout == "contiguous" else _channels_last(offsets)).clone()
        oi.requires_grad_(True)
        out = kernels.deformable_key(xi, oi)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
        grads[layout] = (out.detach(), xi.grad, oi.grad)
    for name, a, b in zip(("out", "dx", "doffsets"), grads["contiguous"], grads["channels_last"],
                          strict=True):
        assert_close(name, a, b, 1e-6)


def test_masked_attention_gradients_on_channels_last_maps() -> None:
    c = 8
    x, k_in, v, sa, wq, bq, wk, bk = _maps(1, (1, c, 16, 32), (1, c, 16, 32), (1, c, 16, 32),
                                          (1, 1, 16, 32), (c, c), (c,), (c, c), (c,))
    mask = torch.tensor([[[1.0], [0.0]]], device=DEVICE)
    grads = {}
    for layout in ("contiguous", "channels_last"):
        maps = [t if layout == "contiguous" else _channels_last(t) for t in (x, k_in, v)]
        maps = [t.clone().requires_grad_(True) for t in maps]
        out = kernels.masked_window_attention(*maps, sa, mask, wq, bq, wk, bk, window_size=16)
        out.square().sum().backward()
        grads[layout] = (out.detach(), *(t.grad for t in maps))
    for name, a, b in zip(("out", "dx", "dk_in", "dv"), grads["contiguous"],
                          grads["channels_last"], strict=True):
        assert_close(name, a, b, 1e-5, relative=True)     # conv2d rounds by layout
