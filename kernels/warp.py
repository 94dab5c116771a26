"""Fused deformable key ``x + warp(x, offsets)`` (spec §3.6): at inference only the hard
windows' pixels (all the attention reads); in training the whole map, forward and backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.kernels.helpers import autocast_entry, kernel_op, pixel_strides


@triton.jit
def _pixels(i_p, i_b, num_hard_ptr, order_ptr, H, W, COLS, N, HARD_ONLY: tl.constexpr,
            WS: tl.constexpr, BP: tl.constexpr):
    o_t = tl.arange(0, BP)
    if HARD_ONLY:                      # i_p = rank · (ws²/BP) + part of that window
        parts: tl.constexpr = WS * WS // BP
        rank, part = i_p // parts, i_p % parts
        win = tl.load(order_ptr + i_b.to(tl.int64) * N + rank)
        valid = tl.where(rank < tl.load(num_hard_ptr + i_b), BP, 0)
        m_p = o_t < valid
        o_t += part * BP
        py = (win // COLS) * WS + o_t // WS
        px = (win % COLS) * WS + o_t % WS
    else:
        o_p = i_p * BP + o_t
        m_p = o_p < H * W
        py = o_p // W
        px = o_p % W
    return py, px, m_p


@triton.jit
def _sample_coords(off_ptr, i_b, py, px, m_p, H, W, ACC: tl.constexpr, o_sb, o_sp, o_sc):
    # offset (b, p, c) at off_ptr + b·o_sb + p·o_sp + c·o_sc; align_corners=True
    p_off = off_ptr + i_b.to(tl.int64) * o_sb + (py * W + px).to(tl.int64) * o_sp
    sx = px.to(ACC) + tl.load(p_off, mask=m_p, other=0.0).to(ACC)
    sy = py.to(ACC) + tl.load(p_off + o_sc, mask=m_p, other=0.0).to(ACC)
    # H and W may arrive as the constant 1 (a map one pixel high or wide): tl.cast, not .to
    ix = tl.minimum(tl.maximum(sx, 0.0), tl.cast(W - 1, ACC))
    iy = tl.minimum(tl.maximum(sy, 0.0), tl.cast(H - 1, ACC))
    fx0, fy0 = tl.floor(ix), tl.floor(iy)
    x0, y0 = fx0.to(tl.int32), fy0.to(tl.int32)
    x1, y1 = tl.minimum(x0 + 1, W - 1), tl.minimum(y0 + 1, H - 1)
    return sx, sy, ix - fx0, iy - fy0, x0, y0, x1, y1


@triton.jit
def deform_key_fwd_kernel(x_ptr, off_ptr, out_ptr, num_hard_ptr, order_ptr, C, H, W, COLS, N,
                          s_b, s_p, s_c, o_sb, o_sp, o_sc, HARD_ONLY: tl.constexpr,
                          WS: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                          ACC: tl.constexpr):
    # x and out: element (b, c, pixel p) at b·s_b + p·s_p + c·s_c; the offsets likewise
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    py, px, m_p = _pixels(i_p, i_b, num_hard_ptr, order_ptr, H, W, COLS, N, HARD_ONLY, WS, BP)
    _, _, fx, fy, x0, y0, x1, y1 = _sample_coords(off_ptr, i_b, py, px, m_p, H, W, ACC, o_sb,
                                                  o_sp, o_sc)
    fx, fy = fx[None, :], fy[None, :]
    w00, w01 = (1 - fx) * (1 - fy), fx * (1 - fy)
    w10, w11 = (1 - fx) * fy, fx * fy
    o_00 = ((y0 * W + x0).to(tl.int64) * s_p)[None, :]
    o_01 = ((y0 * W + x1).to(tl.int64) * s_p)[None, :]
    o_10 = ((y1 * W + x0).to(tl.int64) * s_p)[None, :]
    o_11 = ((y1 * W + x1).to(tl.int64) * s_p)[None, :]
    o_pix = ((py * W + px).to(tl.int64) * s_p)[None, :]
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        m = (o_c < C)[:, None] & m_p[None, :]                          # [BC, BP]
        plane = i_b.to(tl.int64) * s_b + o_c[:, None].to(tl.int64) * s_c
        b_out = tl.load(x_ptr + plane + o_pix, mask=m, other=0.0).to(ACC)
        b_out += tl.load(x_ptr + plane + o_00, mask=m, other=0.0).to(ACC) * w00
        b_out += tl.load(x_ptr + plane + o_01, mask=m, other=0.0).to(ACC) * w01
        b_out += tl.load(x_ptr + plane + o_10, mask=m, other=0.0).to(ACC) * w10
        b_out += tl.load(x_ptr + plane + o_11, mask=m, other=0.0).to(ACC) * w11
        tl.store(out_ptr + plane + o_pix, b_out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def deform_key_bwd_kernel(x_ptr, off_ptr, dout_ptr, dx_ptr, doff_ptr, C, H, W,
                          BC: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr):
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    py, px, m_p = _pixels(i_p, i_b, i_b, i_b, H, W, 1, 1, False, 1, BP)
    sx, sy, fx, fy, x0, y0, x1, y1 = _sample_coords(off_ptr, i_b, py, px, m_p, H, W, ACC,
                                                    2 * H * W, 1, H * W)
    gx, gy = fx[None, :], fy[None, :]
    o_00, o_01 = (y0 * W + x0)[None, :], (y0 * W + x1)[None, :]
    o_10, o_11 = (y1 * W + x0)[None, :], (y1 * W + x1)[None, :]
    b_dsx = tl.zeros([BP], dtype=ACC)
    b_dsy = tl.zeros([BP], dtype=ACC)
    for c0 in range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        m = (o_c < C)[:, None] & m_p[None, :]
        plane = i_b.to(tl.int64) * C * H * W + o_c[:, None].to(tl.int64) * H * W
        b_g = tl.load(dout_ptr + plane + (py * W + px)[None, :], mask=m, other=0.0).to(ACC)
        b_00 = tl.load(x_ptr + plane + o_00, mask=m, other=0.0).to(ACC)
        b_01 = tl.load(x_ptr + plane + o_01, mask=m, other=0.0).to(ACC)
        b_10 = tl.load(x_ptr + plane + o_10, mask=m, other=0.0).to(ACC)
        b_11 = tl.load(x_ptr + plane + o_11, mask=m, other=0.0).to(ACC)
        tl.atomic_add(dx_ptr + plane + o_00, b_g * (1 - gx) * (1 - gy), mask=m)
        tl.atomic_add(dx_ptr + plane + o_01, b_g * gx * (1 - gy), mask=m)
        tl.atomic_add(dx_ptr + plane + o_10, b_g * (1 - gx) * gy, mask=m)
        tl.atomic_add(dx_ptr + plane + o_11, b_g * gx * gy, mask=m)
        b_dsx += tl.sum(b_g * ((b_01 - b_00) * (1 - gy) + (b_11 - b_10) * gy), axis=0)
        b_dsy += tl.sum(b_g * ((b_10 - b_00) * (1 - gx) + (b_11 - b_01) * gx), axis=0)
    # a coordinate clamped at (or beyond) the border has no gradient, as in grid_sample
    in_x = (sx > 0) & (sx < W - 1)
    in_y = (sy > 0) & (sy < H - 1)
    p_doff = doff_ptr + i_b.to(tl.int64) * 2 * H * W + py * W + px
    tl.store(p_doff, tl.where(in_x, b_dsx, 0.0), mask=m_p)
    tl.store(p_doff + H * W, tl.where(in_y, b_dsy, 0.0), mask=m_p)


def _check_inputs(x: Tensor, offsets: Tensor) -> None:
    if x.dim() != 4 or offsets.dim() != 4 or offsets.shape[1] != 2:
        raise ValueError(f"expected x (B,C,H,W) and offsets (B,2,H,W), got {tuple(x.shape)} and "
                         f"{tuple(offsets.shape)}")
    if offsets.shape[0] != x.shape[0] or offsets.shape[2:] != x.shape[2:]:
        raise ValueError(f"offsets {tuple(offsets.shape)} do not match x {tuple(x.shape)}")
    if x.device != offsets.device:
        raise ValueError(f"x is on {x.device} but offsets on {offsets.device}")
    if not x.is_floating_point() or x.dtype != offsets.dtype:
        raise ValueError(f"x and offsets must share a floating dtype, got {x.dtype}, "
                         f"{offsets.dtype}")


def _pixel_linear(t: Tensor) -> Tensor:
    return t if pixel_strides(t) is not None else t.contiguous()


def _acc(x: Tensor) -> tl.dtype:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


PIXEL_BLOCK = 64               # pixels per program: a quarter of a 16×16 window
CHANNEL_BLOCK = 16             # channels per inner step: registers bounded whatever C is
BACKWARD_CHANNEL_BLOCK = 8     # 16 spills in the backward (the JIT gate); unproven on a GPU


def deformable_key_forward(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                           order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """k_in (B, C, H, W); given ``num_hard`` and ``order`` only the hard windows' pixels."""
    _check_inputs(x, offsets)
    b, c, height, width = x.shape
    x, offsets = _pixel_linear(x), _pixel_linear(offsets)
    hard_only = num_hard is not None
    if hard_only:
        if order is None:
            raise ValueError("num_hard needs order")
        ws = window_size
        if height % ws or width % ws or ws & (ws - 1):
            raise ValueError(f"{height}x{width} map does not tile into power-of-two windows {ws}")
        n = (height // ws) * (width // ws)
        if tuple(order.shape) != (b, n) or tuple(num_hard.shape) != (b,):
            raise ValueError(f"order {tuple(order.shape)} / num_hard {tuple(num_hard.shape)} do not "
                             f"fit {b} images of {n} windows")
        block = min(PIXEL_BLOCK, ws * ws)
        grid = (n * (ws * ws // block), b)
        cols = width // ws
        num_hard, order = num_hard.contiguous(), order.contiguous()
    else:
        block = PIXEL_BLOCK
        grid = (triton.cdiv(height * width, block), b)
        n, cols, ws = 1, 1, 1
        num_hard = order = x
    out = torch.empty_like(x)
    wrap_triton(deform_key_fwd_kernel)[grid](x, offsets, out, num_hard, order, c, height,
                                              width, cols, n, *pixel_strides(x),
                                              *pixel_strides(offsets), HARD_ONLY=hard_only,
                                              WS=ws, BC=CHANNEL_BLOCK, BP=block, ACC=_acc(x))
    return out


def deformable_key_backward(x: Tensor, offsets: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """(dx (B, C, H, W), doffsets (B, 2, H, W))."""
    b, c, height, width = x.shape
    x, grad_out = x.contiguous(), grad_out.contiguous()
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    doff = torch.empty(offsets.shape, dtype=acc_dtype, device=x.device)
    grid = (triton.cdiv(height * width, PIXEL_BLOCK), b)
    wrap_triton(deform_key_bwd_kernel)[grid](x, offsets.contiguous(), grad_out, dx, doff, c,
                                              height, width, BC=BACKWARD_CHANNEL_BLOCK,
                                              BP=PIXEL_BLOCK, ACC=_acc(x))
    return (grad_out + dx).to(x.dtype), doff.to(offsets.dtype)


def _forward_fake(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                  order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    return torch.empty_like(_pixel_linear(x))


def _backward_fake(x: Tensor, offsets: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(offsets, memory_format=torch.contiguous_format))


_forward = kernel_op("triton_deformable_key", deformable_key_forward, _forward_fake)
_backward = kernel_op("triton_deformable_key_backward", deformable_key_backward, _backward_fake)


class DeformableKey(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, offsets)
        return _forward(x, offsets)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        x, offsets = ctx.saved_tensors
        return _backward(x, offsets, grad_out)


@autocast_entry("widest")
def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.warp.deformable_key` (same shapes): given the
    routing and no gradient, the hard windows' pixels only; else the whole map, differentiably.
    Under autocast it runs in the wider input dtype. ValueError for mismatched inputs."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or offsets.requires_grad)
    if num_hard is not None and not needs_grad:
        return _forward(x, offsets, num_hard, order, window_size=window_size)
    return DeformableKey.apply(x, offsets)
