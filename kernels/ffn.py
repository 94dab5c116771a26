"""The gated FFN after its input projection, with LN2, in one launch (spec §2); from
u = x1·Winᵀ (B, H, W, 2C) and x1 (:mod:`.mixer_tail`):

    t   = dw3x3(u)                    (ffn.dwconv, no bias, zero padding)
    g   = gelu(t[:C])·t[C:]
    out = LN2(g·Woutᵀ + x1)           (ffn.project_out, no bias; the residual; norm2)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.kernels.helpers import (
    MAP_DTYPES,
    channel_block,
    check_shapes,
    depthwise3x3,
    dot_dtype,
    dot_precision,
    gelu,
    kernel_op,
    layer_norm,
    load_transposed,
    pixel_tile,
    pixel_tile_config,
)


@triton.jit
def ffn_tail_kernel(u_ptr, x1_ptr, dw_ptr, wo_ptr, n2w_ptr, n2b_ptr, out_ptr, H, W, C,
                    BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
                    PRECISION: tl.constexpr):
    dt = x1_ptr.dtype.element_ty
    i_b = tl.program_id(1)
    o_p, py, px, m_p = pixel_tile(tl.program_id(0), i_b, H * W, W, BP)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    m_pc = m_p[:, None] & m_c[None, :]

    p_img = i_b.to(tl.int64) * H * W * (2 * C)
    b_f = tl.zeros([BP, BC], dtype=tl.float32)
    for k0 in range(0, BC, BK):              # channel steps: the gate, then its share of Wout
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < C
        b_ta = depthwise3x3(u_ptr, dw_ptr, p_img, py, px, m_p, o_k, m_k, W * 2 * C, 2 * C, 1,
                            H, W, 1)
        b_tb = depthwise3x3(u_ptr + C, dw_ptr + 9 * C, p_img, py, px, m_p, o_k, m_k, W * 2 * C,
                            2 * C, 1, H, W, 1)
        b_g = (gelu(b_ta) * b_tb).to(dt)
        b_f += tl.dot(b_g.to(DOT), load_transposed(wo_ptr, 0, C, C, o_k, o_c, DOT),
                      input_precision=PRECISION)
    p_pc = o_p[:, None] * C + o_c[None, :]
    b_f += tl.load(x1_ptr + p_pc, mask=m_pc, other=0.0).to(tl.float32)
    b_out = layer_norm(b_f, m_c, C, n2w_ptr, n2b_ptr, o_c)
    tl.store(out_ptr + p_pc, b_out.to(dt), mask=m_pc)


def _launch(u: Tensor, x1: Tensor, ffn_dw_w: Tensor, ffn_out_w: Tensor, norm2_w: Tensor,
            norm2_b: Tensor) -> Tensor:
    b, height, width, c = x1.shape
    u, x1 = u.contiguous(), x1.contiguous()
    out = torch.empty_like(x1)
    cfg = pixel_tile_config(height * width, c)
    wrap_triton(ffn_tail_kernel)[(triton.cdiv(height * width, cfg.bm), b)](
        u, x1, ffn_dw_w.contiguous(), ffn_out_w.contiguous(), norm2_w, norm2_b, out, height,
        width, c, BP=cfg.bm, BC=channel_block(c), BK=cfg.bn, DOT=dot_dtype(x1.dtype),
        PRECISION=dot_precision(x1.dtype), num_warps=cfg.num_warps)
    return out


def _fake(u: Tensor, x1: Tensor, ffn_dw_w: Tensor, ffn_out_w: Tensor, norm2_w: Tensor,
          norm2_b: Tensor) -> Tensor:
    return x1.new_empty(x1.shape)


_ffn_tail = kernel_op("triton_ffn_tail", _launch, _fake)


def ffn_tail(u: Tensor, x1: Tensor, ffn_dw_w: Tensor, ffn_out_w: Tensor, norm2_w: Tensor,
             norm2_b: Tensor) -> Tensor:
    """The module docstring's formula: u (B, H, W, 2C), x1 (B, H, W, C) NHWC, weights as in
    :class:`~camixer_fast.reference.model.BlockWeights` -> (B, H, W, C) NHWC in x1's dtype.
    ValueError for other shapes or devices."""
    if x1.dim() != 4 or x1.dtype not in MAP_DTYPES:
        raise ValueError(f"x1: expected a (B, H, W, C) float map, got {tuple(x1.shape)} "
                         f"{x1.dtype}")
    b, height, width, c = x1.shape
    check_shapes(x1, {"u": (u, (b, height, width, 2 * c)),
                      "ffn_dw_w": (ffn_dw_w, (2 * c, 1, 3, 3)), "ffn_out_w": (ffn_out_w, (c, c)),
                      "norm2_w": (norm2_w, (c,)), "norm2_b": (norm2_b, (c,))})
    return _ffn_tail(u, x1, ffn_dw_w, ffn_out_w, norm2_w, norm2_b)
