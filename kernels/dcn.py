"""DCNv2 forward, fused (CAMixerOSR's tails): one program per (pixel block, output-channel block,
image) samples each tap's four neighbours in place, blends them with the mask and accumulates
(pixels, C)·(C, O) products, so the (pixels, K·C) sampled map of the reference never exists."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.backends.triton_env import interpreting
from camixer_fast.kernels.helpers import HALF, dot_dtype, dot_precision, kernel_op
from camixer_fast.reference.dcn import output_size


@triton.jit
def corner(x_ptr, p_c, m_c, m_p, y, x, b_wgt, H, W, s_xh, s_xw):
    """[BP, BC] fp32: x at rows y, columns x (zero outside the map) times b_wgt."""
    inside = m_p & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    p_n = y.to(tl.int64) * s_xh + x.to(tl.int64) * s_xw
    b_x = tl.load(x_ptr + p_c[None, :] + p_n[:, None], mask=inside[:, None] & m_c[None, :],
                  other=0.0)
    return b_x.to(tl.float32) * b_wgt[:, None]


@triton.jit
def deform_conv_kernel(x_ptr, off_ptr, mask_ptr, w_ptr, bias_ptr, out_ptr, C, H, W, O, H_OUT,
                       W_OUT, s_xb, s_xc, s_xh, s_xw, PAD, DIL, KH: tl.constexpr,
                       KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr,
                       DT: tl.constexpr, PRECISION: tl.constexpr):
    # offsets (B, 2K, P), mask (B, K, P), weight (K, C, O), out (B, P, O): contiguous
    i_p, i_o, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    P = H_OUT * W_OUT
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    o_o = i_o * BO + tl.arange(0, BO)
    m_o = o_o < O
    b_py = (o_p // W_OUT).to(tl.float32)
    b_px = (o_p % W_OUT).to(tl.float32)
    p_img = i_b.to(tl.int64) * s_xb
    p_off = i_b.to(tl.int64) * (2 * KH * KW) * P + o_p
    p_mask = i_b.to(tl.int64) * (KH * KW) * P + o_p
    b_acc = tl.zeros([BP, BO], dtype=tl.float32)
    for k in range(KH * KW):
        b_dy = tl.load(off_ptr + p_off + (2 * k) * P, mask=m_p, other=0.0).to(tl.float32)
        b_dx = tl.load(off_ptr + p_off + (2 * k + 1) * P, mask=m_p, other=0.0).to(tl.float32)
        b_m = tl.load(mask_ptr + p_mask + k * P, mask=m_p, other=0.0).to(tl.float32)
        b_y = b_py + (k // KW * DIL - PAD) + b_dy
        b_x = b_px + (k % KW * DIL - PAD) + b_dx
        # far outside every neighbour is zero: clamping keeps the indices small
        b_y = tl.minimum(tl.maximum(b_y, -2.0), H + 1.0)
        b_x = tl.minimum(tl.maximum(b_x, -2.0), W + 1.0)
        b_y0 = tl.floor(b_y)
        b_x0 = tl.floor(b_x)
        b_ly = b_y - b_y0
        b_lx = b_x - b_x0
        y0 = b_y0.to(tl.int32)
        x0 = b_x0.to(tl.int32)
        for c0 in range(0, C, BC):
            o_c = c0 + tl.arange(0, BC)
            m_c = o_c < C
            p_c = p_img + o_c.to(tl.int64) * s_xc
            b_s = corner(x_ptr, p_c, m_c, m_p, y0, x0, (1.0 - b_ly) * (1.0 - b_lx) * b_m,
                         H, W, s_xh, s_xw)
            b_s += corner(x_ptr, p_c, m_c, m_p, y0, x0 + 1, (1.0 - b_ly) * b_lx * b_m,
                          H, W, s_xh, s_xw)
            b_s += corner(x_ptr, p_c, m_c, m_p, y0 + 1, x0, b_ly * (1.0 - b_lx) * b_m,
                          H, W, s_xh, s_xw)
            b_s += corner(x_ptr, p_c, m_c, m_p, y0 + 1, x0 + 1, b_ly * b_lx * b_m,
                          H, W, s_xh, s_xw)
            p_w = (k * C + o_c.to(tl.int64))[:, None] * O + o_o[None, :]
            b_w = tl.load(w_ptr + p_w, mask=m_c[:, None] & m_o[None, :], other=0.0)
            b_acc += tl.dot(b_s.to(DT), b_w.to(DT), input_precision=PRECISION)
    b_acc += tl.load(bias_ptr + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    p_out = (i_b.to(tl.int64) * P + o_p)[:, None] * O + o_o[None, :]
    tl.store(out_ptr + p_out, b_acc.to(out_ptr.dtype.element_ty),
             mask=m_p[:, None] & m_o[None, :])


PIXELS = 16


def _block(channels: int, dtype: torch.dtype, precision: str) -> int:
    """Channel block: a power of two, tensor-core rows of >= 128 bytes on a GPU (narrower
    wgmma operands are swizzled narrower, which the JIT gate rejects), <= 128 bytes."""
    most = 64 if dtype in HALF else 32
    least = 16 if interpreting() or precision == "ieee" else most
    return min(max(least, triton.next_power_of_2(channels)), most)


def _deform_conv(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor,
                 padding: int, dilation: int) -> Tensor:
    b, c, height, width = x.shape
    out_c, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[2:]
    out = torch.empty(b, h_out, w_out, out_c, dtype=x.dtype, device=x.device)
    w_t = weight.permute(2, 3, 1, 0).reshape(kh * kw, c, out_c).contiguous()
    precision = dot_precision(x.dtype)
    bc, bo = _block(c, x.dtype, precision), _block(out_c, x.dtype, precision)
    pixels = 64 if interpreting() else PIXELS
    grid = (triton.cdiv(h_out * w_out, pixels), triton.cdiv(out_c, bo), b)
    wrap_triton(deform_conv_kernel)[grid](
        x, offset.contiguous(), mask.contiguous(), w_t, bias.contiguous(), out, c, height,
        width, out_c, h_out, w_out, *x.stride(), padding, dilation, KH=kh, KW=kw, BP=pixels,
        BC=bc, BO=bo, DT=dot_dtype(x.dtype), PRECISION=precision, num_warps=4,
        num_stages=1)
    return out.permute(0, 3, 1, 2)


def _deform_conv_fake(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor,
                      padding: int, dilation: int) -> Tensor:
    b, out_c, (h_out, w_out) = x.shape[0], weight.shape[0], offset.shape[2:]
    return x.new_empty(b, h_out, w_out, out_c).permute(0, 3, 1, 2)


_deform_conv_op = kernel_op("triton_deform_conv", _deform_conv, _deform_conv_fake)


def deform_conv(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                bias: Tensor | None = None, *, padding: int = 1, dilation: int = 1) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.dcn.modulated_deform_conv2d` (stride 1): x
    (B, C, H, W) any layout, offset (B, 2K, h, w) as (Δy, Δx) per tap, mask (B, K, h, w), weight
    (O, C, kh, kw) -> (B, O, h, w) channels-last, fp32 accumulation. ValueError for shapes that
    do not fit; RuntimeError where a gradient is needed (inference only)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, offset, mask, weight, bias)):
        raise RuntimeError("the Triton DCNv2 does not differentiate: run inference under "
                           "torch.no_grad() or torch.inference_mode(), or use "
                           "backend='reference'")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} / weight {tuple(weight.shape)}: expected "
                         "(B, C, H, W) and (O, C, kh, kw)")
    output_size(x, weight, offset, mask, padding, dilation)
    out_c = weight.shape[0]
    if bias is None:
        bias = x.new_zeros(out_c)
    elif tuple(bias.shape) != (out_c,):
        raise ValueError(f"bias: expected ({out_c},), got {tuple(bias.shape)}")
    return _deform_conv_op(x, offset, mask, weight, bias, int(padding), int(dilation))
