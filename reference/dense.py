"""The network's 1×1 and depthwise 3×3 convolutions on NHWC maps, every backend's default;
with autograd off the optional steps run in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
           residual: Tensor | None = None) -> Tensor:
    """A 1×1 convolution: x (..., C_in), weight (C_out, C_in), bias (C_out,) or None, residual
    (..., C_out) or None -> ``x·weightᵀ + bias [+ residual]`` (..., C_out)."""
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def depthwise(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, dilation: int = 1,
              gelu: bool = False, multiply: Tensor | None = None) -> Tensor:
    """Depthwise 3×3 (padding = dilation) of x (B, H, W, C), then GELU, times ``multiply``."""
    c = x.shape[-1]
    nchw = x.permute(0, 3, 1, 2)
    if dilation > 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu" \
            and torch.is_grad_enabled():
        # oneDNN's bf16 backward of a dilated depthwise convolution on a channels-last input
        # gives a wrong weight gradient (torch 2.13); a contiguous NCHW input is exact
        nchw = nchw.contiguous()
    y = F.conv2d(nchw, weight, bias, padding=dilation, dilation=dilation,
                 groups=c).permute(0, 2, 3, 1).contiguous()
    in_place = not torch.is_grad_enabled()
    if gelu:
        y = torch.ops.aten.gelu_(y) if in_place else F.gelu(y)
    if multiply is not None:
        y = y.mul_(multiply) if in_place else y * multiply
    return y
