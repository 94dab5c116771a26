"""The network's dense operations: 1×1 projections and 3×3 depthwise convolutions of NHWC maps.

The reference twins of the CPU backend's fused forms (:mod:`camixer_fast.backends.dense`), in plain
PyTorch: what every backend's :class:`~camixer_fast.backends.Ops` supplies unless it has faster
ones. Maps are (B, H, W, C), contiguous; the spatial convolutions run on their channels-last
(B, C, H, W) views. With autograd off, the optional steps overwrite the convolution's own result
(same numbers, no new map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
           residual: Tensor | None = None) -> Tensor:
    """A 1×1 convolution as a linear map of the last dimension, plus an optional residual.

    x (..., C_in), weight (C_out, C_in), bias (C_out,) or None, residual (..., C_out) or None
    -> ``x·weightᵀ + bias [+ residual]`` (..., C_out).
    """
    out = F.linear(x, weight, bias)
    return out if residual is None else out + residual


def depthwise(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, dilation: int = 1,
              gelu: bool = False, multiply: Tensor | None = None) -> Tensor:
    """A 3×3 depthwise convolution of an NHWC map, then optionally GELU, then a product.

    x (B, H, W, C), weight (C, 1, 3, 3), bias (C,) or None; padding = dilation (the size is
    kept); ``gelu``: the exact (erf) GELU of the result; multiply (B, H, W, C) or None: the
    result times it. Returns (B, H, W, C), contiguous.
    """
    c = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=dilation, dilation=dilation,
                 groups=c).permute(0, 2, 3, 1).contiguous()
    in_place = not torch.is_grad_enabled()
    if gelu:
        y = torch.ops.aten.gelu_(y) if in_place else F.gelu(y)
    if multiply is not None:
        y = y.mul_(multiply) if in_place else y * multiply
    return y
