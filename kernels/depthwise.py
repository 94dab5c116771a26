"""The mixer's first depthwise 3×3 (``mixer.conv_sptial.0``, spec §3.8) on the attention
output; the dilated second is in :mod:`.mixer_tail` (each needs the other's halo)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.kernels.helpers import (
    MAP_DTYPES,
    channel_block,
    depthwise3x3,
    kernel_op,
    pixel_tile,
    pixel_tile_config,
)


@triton.jit
def depthwise3x3_kernel(src_ptr, w_ptr, b_ptr, out_ptr, H, W, C, s_b, s_y, s_x, s_c,
                        BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    i_b = tl.program_id(1)
    o_p, py, px, m_p = pixel_tile(tl.program_id(0), i_b, H * W, W, BP)
    for k0 in tl.static_range(0, BC, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < C
        b_z = depthwise3x3(src_ptr, w_ptr, i_b.to(tl.int64) * s_b, py, px, m_p, o_k, m_k, s_y,
                           s_x, s_c, H, W, 1)
        b_z += tl.load(b_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_p[:, None] * C + o_k[None, :], b_z.to(out_ptr.dtype.element_ty),
                 mask=m_p[:, None] & m_k[None, :])


def _launch(src: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, height, width, c = src.shape
    out = torch.empty(b, height, width, c, dtype=src.dtype, device=src.device)
    cfg = pixel_tile_config(height * width, c)
    wrap_triton(depthwise3x3_kernel)[(triton.cdiv(height * width, cfg.bm), b)](
        src, weight.contiguous(), bias, out, height, width, c, *src.stride(), BP=cfg.bm,
        BC=channel_block(c), BK=cfg.bn, num_warps=cfg.num_warps)
    return out


def _fake(src: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return src.new_empty(src.shape)


_depthwise = kernel_op("triton_depthwise_conv3x3", _launch, _fake)


def depthwise_conv3x3(src: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """src (B, H, W, C) any strides, weight (C, 1, 3, 3), bias (C,) -> conv2d(padding=1,
    groups=C) as NHWC (B, H, W, C) in src's dtype. ValueError for other shapes."""
    if src.dim() != 4:
        raise ValueError(f"src: expected (B, H, W, C), got {tuple(src.shape)}")
    if src.dtype not in MAP_DTYPES:
        raise ValueError(f"src: dtype {src.dtype} not supported")
    b, height, width, c = src.shape
    if tuple(weight.shape) != (c, 1, 3, 3) or tuple(bias.shape) != (c,):
        raise ValueError(f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                         f"{c} channels")
    return _depthwise(src, weight, bias)
