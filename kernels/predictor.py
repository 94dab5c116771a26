"""The block's predictor at inference (spec §3.4), NHWC: v, h, offsets, h's channel mean and
per-tile sums per pixel tile; then sa (h's halo) and ca from those sums (no atomics)."""

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
    dot_dtype,
    dot_precision,
    kernel_op,
    layer_norm,
    leaky_relu,
    load_transposed,
    pixel_tile,
    pixel_tile_config,
    tanh,
)


@triton.jit
def predictor_kernel(x_ptr, cond_ptr, wv_ptr, bv_ptr, wr_ptr, br_ptr, nw_ptr, nb_ptr, w1_ptr,
                     b1_ptr, w2_ptr, b2_ptr, v_ptr, h_ptr, mean_ptr, off_ptr, part_ptr,
                     H, W, C, C4, C8, T, v_sb, v_sy, v_sx, v_sc, o_sb, o_sy, o_sx, o_sc,
                     BP: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     BC4: tl.constexpr, BC8: tl.constexpr, DOT: tl.constexpr,
                     PRECISION: tl.constexpr):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    pix, py, px, m_p = pixel_tile(i_t, i_b, H * W, W, BP)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    o_k = tl.arange(0, BC4)
    m_k = o_k < C4
    o_j = tl.arange(0, BC8)
    m_pc = m_p[:, None] & m_c[None, :]

    b_x = tl.load(x_ptr + pix[:, None] * C + o_c[None, :], mask=m_pc, other=0.0).to(DOT)
    p_v = v_ptr + i_b.to(tl.int64) * v_sb + (py * v_sy + px * v_sx)[:, None]
    b_h = tl.zeros([BP, BC4], dtype=tl.float32)
    for n0 in range(0, BC, BK):
        # v's channels n0 ... n0 + BK, then their share of in_conv (its first C columns)
        o_n = n0 + tl.arange(0, BK)
        m_n = o_n < C
        b_v = tl.dot(b_x, load_transposed(wv_ptr, 0, C, C, o_c, o_n, DOT),
                     input_precision=PRECISION)
        b_v += tl.load(bv_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        b_v = b_v.to(dt)
        tl.store(p_v + o_n[None, :] * v_sc, b_v, mask=m_p[:, None] & m_n[None, :])
        b_wr = tl.load(wr_ptr + o_k[None, :] * (C + 4) + o_n[:, None],
                       mask=m_n[:, None] & m_k[None, :], other=0.0).to(DOT)
        b_h += tl.dot(b_v.to(DOT), b_wr, input_precision=PRECISION)   # [BP, BC4]
    for j in tl.static_range(4):
        b_cond = tl.load(cond_ptr + pix * 4 + j, mask=m_p, other=0.0).to(tl.float32)
        b_wc = tl.load(wr_ptr + o_k * (C + 4) + C + j, mask=m_k, other=0.0).to(tl.float32)
        b_h += b_cond[:, None] * b_wc[None, :]
    b_h += tl.load(br_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
    b_h = leaky_relu(layer_norm(b_h, m_k, C4, nw_ptr, nb_ptr, o_k)).to(dt)
    m_pk = m_p[:, None] & m_k[None, :]
    tl.store(h_ptr + pix[:, None] * C4 + o_k[None, :], b_h, mask=m_pk)

    b_hf = tl.where(m_pk, b_h.to(tl.float32), 0.0)
    tl.store(mean_ptr + pix, tl.sum(b_hf, axis=1) / C4, mask=m_p)
    tl.store(part_ptr + (i_b.to(tl.int64) * T + i_t) * C4 + o_k, tl.sum(b_hf, axis=0), mask=m_k)

    b_o = tl.dot(b_h.to(DOT), load_transposed(w1_ptr, 0, C8, C4, o_k, o_j, DOT),
                 input_precision=PRECISION)
    b_o = leaky_relu(b_o + tl.load(b1_ptr + o_j, mask=o_j < C8, other=0.0).to(tl.float32)[None, :])
    p_o = off_ptr + i_b.to(tl.int64) * o_sb + py * o_sy + px * o_sx
    for j in tl.static_range(2):                                       # 0: along x, 1: along y
        b_w2 = tl.load(w2_ptr + j * C8 + o_j, mask=o_j < C8, other=0.0).to(tl.float32)
        b_off = tl.sum(b_o * b_w2[None, :], axis=1) + tl.load(b2_ptr + j).to(tl.float32)
        tl.store(p_o + j * o_sc, (8.0 * tanh(b_off)).to(dt), mask=m_p)


@triton.jit
def predictor_heads_kernel(h_ptr, part_ptr, saw_ptr, sab_ptr, caw_ptr, cab_ptr, sa_ptr, ca_ptr,
                           H, W, C, C4, T, BP: tl.constexpr, BC: tl.constexpr,
                           BC4: tl.constexpr, BT: tl.constexpr):
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, BC4)
    m_k = o_k < C4
    if i_t < T:
        # sa of the pixel tile i_t: a 3×3 convolution of h, c4 -> 1, zero padding
        pix, py, px, m_p = pixel_tile(i_t, i_b, H * W, W, BP)
        p_img = h_ptr + i_b.to(tl.int64) * H * W * C4
        b_acc = tl.zeros([BP], dtype=tl.float32)
        for t in range(9):
            qy, qx = py + (t // 3 - 1), px + (t % 3 - 1)
            m_q = m_p & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            b_h = tl.load(p_img + (qy * W + qx)[:, None] * C4 + o_k[None, :],
                          mask=m_q[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            b_w = tl.load(saw_ptr + o_k * 9 + t, mask=m_k, other=0.0)
            b_acc += tl.sum(b_h * b_w.to(tl.float32)[None, :], axis=1)
        b_sa = tl.sigmoid(b_acc + tl.load(sab_ptr).to(tl.float32))
        tl.store(sa_ptr + pix, b_sa.to(sa_ptr.dtype.element_ty), mask=m_p)
    else:
        # ca of image i_b from the T partial sums of h, in tile order
        b_s = tl.zeros([BC4], dtype=tl.float32)
        for t0 in range(0, T, BT):
            o_t = t0 + tl.arange(0, BT)
            p_part = part_ptr + (i_b.to(tl.int64) * T + o_t)[:, None] * C4 + o_k[None, :]
            b_s += tl.sum(tl.load(p_part, mask=(o_t < T)[:, None] & m_k[None, :], other=0.0),
                          axis=0)
        b_mean = b_s / (H * W)
        o_c = tl.arange(0, BC)
        m_c = o_c < C
        b_wca = tl.load(caw_ptr + o_c[:, None] * C4 + o_k[None, :],
                        mask=m_c[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_ca = tl.sum(b_wca * b_mean[None, :], axis=1)
        b_ca += tl.load(cab_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
        tl.store(ca_ptr + i_b.to(tl.int64) * C + o_c, tl.sigmoid(b_ca), mask=m_c)


class PredictorMaps(NamedTuple):
    v: Tensor        # (B, H, W, C) project_v(x), x's dtype
    hidden: Tensor   # (B, H, W, c4) route.in_conv output, x's dtype
    mean: Tensor     # (B, 1, H, W) fp32: the channel mean of hidden, the window scores' input
    offsets: Tensor  # (B, H, W, 2) in pixels, 8·tanh applied
    sa: Tensor       # (B, 1, H, W) spatial attention, x's dtype
    ca: Tensor       # (B, C) fp32 channel attention


PART_BLOCK = 64     # partial sums reduced per step by the channel-attention program


def _launch(x: Tensor, condition: Tensor, v_w: Tensor, v_b: Tensor, route_w: Tensor,
            route_b: Tensor, route_norm_w: Tensor, route_norm_b: Tensor, off1_w: Tensor,
            off1_b: Tensor, off2_w: Tensor, off2_b: Tensor, ca_w: Tensor, ca_b: Tensor,
            sa_w: Tensor, sa_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, height, width, c = x.shape
    c4, c8 = route_w.shape[0], off1_w.shape[0]
    x, condition = x.contiguous(), condition.contiguous()
    v_w, route_w, off1_w, off2_w, ca_w, sa_w = (
        t.contiguous() for t in (v_w, route_w, off1_w, off2_w, ca_w, sa_w))
    pixels = height * width
    cfg = pixel_tile_config(pixels, c)
    bp = cfg.bm
    tiles = triton.cdiv(pixels, bp)
    dev = x.device
    v = torch.empty(b, height, width, c, dtype=x.dtype, device=dev)
    offsets = torch.empty(b, height, width, 2, dtype=x.dtype, device=dev)
    hidden = torch.empty(b, height, width, c4, dtype=x.dtype, device=dev)
    mean = torch.empty(b, 1, height, width, dtype=torch.float32, device=dev)
    part = torch.empty(b, tiles, c4, dtype=torch.float32, device=dev)
    sa = torch.empty(b, 1, height, width, dtype=x.dtype, device=dev)
    ca = torch.empty(b, c, dtype=torch.float32, device=dev)
    bc, bc4 = channel_block(c), channel_block(c4)
    wrap_triton(predictor_kernel)[(tiles, b)](
        x, condition, v_w, v_b, route_w, route_b, route_norm_w, route_norm_b, off1_w, off1_b,
        off2_w, off2_b, v, hidden, mean, offsets, part, height, width, c, c4, c8, tiles,
        *v.stride(), *offsets.stride(), BP=bp, BC=bc, BK=cfg.bn, BC4=bc4,
        BC8=channel_block(c8), DOT=dot_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps)
    wrap_triton(predictor_heads_kernel)[(tiles + 1, b)](
        hidden, part, sa_w, sa_b, ca_w, ca_b, sa, ca, height, width, c, c4, tiles, BP=bp,
        BC=bc, BC4=bc4, BT=PART_BLOCK, num_warps=cfg.num_warps)
    return v, hidden, mean, offsets, sa, ca


def _fake(x: Tensor, condition: Tensor, v_w: Tensor, v_b: Tensor, route_w: Tensor,
          route_b: Tensor, route_norm_w: Tensor, route_norm_b: Tensor, off1_w: Tensor,
          off1_b: Tensor, off2_w: Tensor, off2_b: Tensor, ca_w: Tensor, ca_b: Tensor,
          sa_w: Tensor, sa_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, height, width, c = x.shape
    new = x.new_empty
    return (new(b, height, width, c), new(b, height, width, route_w.shape[0]),
            new(b, 1, height, width, dtype=torch.float32), new(b, height, width, 2),
            new(b, 1, height, width), new(b, c, dtype=torch.float32))


_predictor = kernel_op("triton_predictor", _launch, _fake)


def predictor(x: Tensor, condition: Tensor, v_w: Tensor, v_b: Tensor, route_w: Tensor,
              route_b: Tensor, route_norm_w: Tensor, route_norm_b: Tensor, off1_w: Tensor,
              off1_b: Tensor, off2_w: Tensor, off2_b: Tensor, ca_w: Tensor, ca_b: Tensor,
              sa_w: Tensor, sa_b: Tensor) -> PredictorMaps:
    """x (B, H, W, C) NHWC fp32 / fp16 / bf16, condition [Cg, Cw] (B, H, W, 4), and the weights
    as in :class:`~camixer_fast.reference.model.BlockWeights`, all x's dtype ->
    :class:`PredictorMaps`. ValueError for other shapes, dtypes or devices."""
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, H, W, C), got {tuple(x.shape)}")
    if x.dtype not in MAP_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported ({', '.join(map(str, MAP_DTYPES))})")
    b, height, width, c = x.shape
    c4, c8 = route_w.shape[0], off1_w.shape[0]
    check_shapes(x, {"condition": (condition, (b, height, width, 4)),
                     "v_w": (v_w, (c, c)), "v_b": (v_b, (c,)),
                     "route_w": (route_w, (c4, c + 4)), "route_b": (route_b, (c4,)),
                     "route_norm_w": (route_norm_w, (c4,)), "route_norm_b": (route_norm_b, (c4,)),
                     "off1_w": (off1_w, (c8, c4)), "off1_b": (off1_b, (c8,)),
                     "off2_w": (off2_w, (2, c8)), "off2_b": (off2_b, (2,)),
                     "ca_w": (ca_w, (c, c4)), "ca_b": (ca_b, (c,)),
                     "sa_w": (sa_w, (1, c4, 3, 3)), "sa_b": (sa_b, (1,))}, dtype=True)
    return PredictorMaps(*_predictor(x, condition, v_w, v_b, route_w, route_b, route_norm_w,
                                     route_norm_b, off1_w, off1_b, off2_w, off2_b, ca_w, ca_b,
                                     sa_w, sa_b))
