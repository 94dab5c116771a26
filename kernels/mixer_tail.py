"""The mixer's tail, LN1 and the FFN's input projection in one launch (spec §2, §3.8):

    y  = dilated3x3(z) + b            (mixer.conv_sptial.1: dilation 2, zero padding 2)
    m  = gelu(y)·ca + attn
    x1 = LN1(m·Woutᵀ + bout + x)      (mixer.project_out, the residual, norm1)
    u  = x1·Winᵀ                      (ffn.project_in, C -> 2C, no bias)

from z = dw3x3(attn) (:mod:`.depthwise`); x1 and u feed :mod:`.ffn` (its dw3x3 needs u's halo).
"""

from __future__ import annotations

from typing import NamedTuple

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
def mixer_tail_kernel(z_ptr, a_ptr, x_ptr, ca_ptr, dil_w_ptr, dil_b_ptr, wo_ptr, bo_ptr,
                      n1w_ptr, n1b_ptr, wi_ptr, x1_ptr, u_ptr, H, W, C, a_sb, a_sy, a_sx,
                      a_sc, BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      DOT: tl.constexpr, PRECISION: tl.constexpr):
    dt = x_ptr.dtype.element_ty
    i_b = tl.program_id(1)
    o_p, py, px, m_p = pixel_tile(tl.program_id(0), i_b, H * W, W, BP)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    m_pc = m_p[:, None] & m_c[None, :]
    p_pc = o_p[:, None] * C + o_c[None, :]

    p_z = i_b.to(tl.int64) * H * W * C
    p_a = a_ptr + i_b.to(tl.int64) * a_sb + (py * a_sy + px * a_sx)[:, None]
    b_o = tl.zeros([BP, BC], dtype=tl.float32)
    for k0 in range(0, BC, BK):      # channel steps: m = gelu(y)·ca + attn, its share of Wout
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < C
        b_y = depthwise3x3(z_ptr, dil_w_ptr, p_z, py, px, m_p, o_k, m_k, W * C, C, 1, H, W, 2)
        b_y += tl.load(dil_b_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        b_a = tl.load(p_a + o_k[None, :] * a_sc, mask=m_p[:, None] & m_k[None, :], other=0.0)
        b_ca = tl.load(ca_ptr + i_b.to(tl.int64) * C + o_k, mask=m_k, other=0.0)
        b_m = (b_a.to(tl.float32) + gelu(b_y) * b_ca[None, :]).to(dt)
        b_o += tl.dot(b_m.to(DOT), load_transposed(wo_ptr, 0, C, C, o_k, o_c, DOT),
                      input_precision=PRECISION)
    b_o += tl.load(bo_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    b_o += tl.load(x_ptr + p_pc, mask=m_pc, other=0.0).to(tl.float32)
    b_x1 = layer_norm(b_o, m_c, C, n1w_ptr, n1b_ptr, o_c).to(dt)
    tl.store(x1_ptr + p_pc, b_x1, mask=m_pc)

    p_u = u_ptr + o_p[:, None] * (2 * C)
    for half in tl.static_range(2):
        for n0 in range(0, BC, BK):
            o_n = n0 + tl.arange(0, BK)
            b_u = tl.dot(b_x1.to(DOT), load_transposed(wi_ptr, half * C, C, C, o_c, o_n, DOT),
                         input_precision=PRECISION)
            tl.store(p_u + half * C + o_n[None, :], b_u.to(dt),
                     mask=m_p[:, None] & (o_n < C)[None, :])


class MixerTail(NamedTuple):
    x1: Tensor   # (B, H, W, C)
    u: Tensor    # (B, H, W, 2C)


def _launch(z: Tensor, attn: Tensor, x: Tensor, ca: Tensor, dil_w: Tensor, dil_b: Tensor,
            out_w: Tensor, out_b: Tensor, norm1_w: Tensor, norm1_b: Tensor,
            ffn_in_w: Tensor) -> tuple[Tensor, Tensor]:
    b, height, width, c = x.shape
    x, z, ca = x.contiguous(), z.contiguous(), ca.float().contiguous()
    x1 = torch.empty_like(x)
    u = torch.empty(b, height, width, 2 * c, dtype=x.dtype, device=x.device)
    cfg = pixel_tile_config(height * width, c)
    wrap_triton(mixer_tail_kernel)[(triton.cdiv(height * width, cfg.bm), b)](
        z, attn, x, ca, dil_w.contiguous(), dil_b, out_w.contiguous(), out_b, norm1_w, norm1_b,
        ffn_in_w.contiguous(), x1, u, height, width, c, *attn.stride(), BP=cfg.bm,
        BC=channel_block(c), BK=cfg.bn, DOT=dot_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps)
    return x1, u


def _fake(z: Tensor, attn: Tensor, x: Tensor, ca: Tensor, dil_w: Tensor, dil_b: Tensor,
          out_w: Tensor, out_b: Tensor, norm1_w: Tensor, norm1_b: Tensor,
          ffn_in_w: Tensor) -> tuple[Tensor, Tensor]:
    b, height, width, c = x.shape
    return x.new_empty(x.shape), x.new_empty(b, height, width, 2 * c)


_mixer_tail = kernel_op("triton_mixer_tail", _launch, _fake)


def mixer_tail(z: Tensor, attn: Tensor, x: Tensor, ca: Tensor, dil_w: Tensor, dil_b: Tensor,
               out_w: Tensor, out_b: Tensor, norm1_w: Tensor, norm1_b: Tensor,
               ffn_in_w: Tensor) -> MixerTail:
    """The module docstring's formulas: z, x (B, H, W, C) NHWC, attn (B, H, W, C) any strides,
    ca (B, C) fp32, weights as in :class:`~camixer_fast.reference.model.BlockWeights`, one dtype
    -> :class:`MixerTail`. ValueError for other shapes or devices."""
    if x.dim() != 4 or x.dtype not in MAP_DTYPES:
        raise ValueError(f"x: expected a (B, H, W, C) float map, got {tuple(x.shape)} {x.dtype}")
    b, height, width, c = x.shape
    check_shapes(x, {"z": (z, x.shape), "attn": (attn, x.shape), "ca": (ca, (b, c)),
                     "dil_w": (dil_w, (c, 1, 3, 3)), "dil_b": (dil_b, (c,)),
                     "out_w": (out_w, (c, c)), "out_b": (out_b, (c,)), "norm1_w": (norm1_w, (c,)),
                     "norm1_b": (norm1_b, (c,)), "ffn_in_w": (ffn_in_w, (2 * c, c))})
    return MixerTail(*_mixer_tail(z, attn, x, ca, dil_w, dil_b, out_w, out_b, norm1_w,
                                  norm1_b, ffn_in_w))
