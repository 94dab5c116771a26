"""The CPU backend's operations: CAMixerSR inference on channels-last CPU tensors, on the hard
windows only; the reference twins' signatures and results up to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camixer_fast.backends import Ops
from camixer_fast.backends import dense as cpu_dense
from camixer_fast.backends.memory import raise_mmap_threshold
from camixer_fast.backends.ops import (
    NAMESPACE,
    needs_grad,
    reference_route_windows,
    tracing,
)
from camixer_fast.reference.attention_inference import DEFAULT_CHUNK
from camixer_fast.reference.attention_training import masked_window_attention
from camixer_fast.reference.dcn import output_size
from camixer_fast.reference.routing import window_scores
from camixer_fast.reference.warp import deform_warp
from camixer_fast.reference.windows import check_window_grid


def to_nhwc(x: Tensor) -> Tensor:
    """(B, C, H, W) -> its (B, H, W, C) contiguous form: a free view of a channels-last map."""
    return x.permute(0, 2, 3, 1).contiguous()


def _channels_last_like(x: Tensor, *args: object) -> Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def hard_window_pixels(num_hard: Tensor, order: Tensor, height: int, width: int,
                       window_size: int, shift: int = 0) -> Tensor:
    """Flat indices ``b·H·W + row·W + column`` of the hard windows' tokens, (ΣK·ws²,) int64,
    windows in :func:`~camixer_fast.reference.routing.flat_hard_windows` order; ``shift``: the
    grid starts at (shift, shift) and wraps around."""
    counts = num_hard.tolist()
    parts = [(i, order[i, :k]) for i, k in enumerate(counts) if k]
    if not parts:
        return torch.empty(0, dtype=torch.long, device=order.device)
    cols = width // window_size
    ramp = torch.arange(window_size, device=order.device)
    window = parts[0][1] if len(parts) == 1 else torch.cat([w for _, w in parts])
    image = torch.cat([torch.full_like(w, i) for i, w in parts]) * (height * width)
    if not shift:
        inside = ramp.view(-1, 1) * width + ramp.view(1, -1)
        corner = image + torch.div(window, cols, rounding_mode="floor") * (window_size * width) \
            + (window % cols) * window_size
        return (corner.view(-1, 1, 1) + inside).reshape(-1)
    rows = (torch.div(window, cols, rounding_mode="floor").view(-1, 1) * window_size + ramp
            + shift) % height
    columns = ((window % cols).view(-1, 1) * window_size + ramp + shift) % width
    return (image.view(-1, 1, 1) + rows.view(-1, window_size, 1) * width
            + columns.view(-1, 1, window_size)).reshape(-1)


KEY_PIXELS = 4096  # pixels per step: their neighbours' rows stay below glibc's mmap threshold


def _bilinear_corners(offsets: Tensor, pixels: Tensor, width: int,
                      height: int) -> tuple[Tensor, Tensor, Tensor]:
    """deform_warp's sampling at ``pixels`` (P,) of one image, offsets (2, H·W): the four
    neighbours' flat indices (P, 4) (top-left, top-right, bottom-left, bottom-right) and the
    fractions wx, wy (P, 1) float32."""
    rows = torch.div(pixels, width, rounding_mode="floor")
    cols = pixels - rows * width
    off = offsets[:, pixels].float()
    # deform_warp's grid value and grid_sample's way back: the same sampling point to the bit
    gx = 2.0 * (cols + off[0]) / max(width - 1, 1) - 1.0
    gy = 2.0 * (rows + off[1]) / max(height - 1, 1) - 1.0
    sx = ((gx + 1.0) * ((width - 1) / 2)).clamp_(0, width - 1)
    sy = ((gy + 1.0) * ((height - 1) / 2)).clamp_(0, height - 1)
    x0, y0 = sx.floor(), sy.floor()
    wx, wy = (sx - x0).unsqueeze(1), (sy - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    step_x = (x0 < width - 1).long()
    step_y = (y0 < height - 1).long() * width
    corner = y0 * width + x0
    index = torch.stack((corner, corner + step_x, corner + step_y, corner + step_y + step_x), 1)
    return index, wx, wy


def _keys_at(x_flat: Tensor, offsets: Tensor, pixels: Tensor, width: int,
             height: int) -> Tensor:
    """``x + warp(x, offsets)`` at ``pixels`` (P,) of one image: x_flat (H·W, C), offsets
    (2, H·W) -> (P, C) float32, four neighbours gathered as NHWC rows (faster than grid_sample)."""
    index, wx, wy = _bilinear_corners(offsets, pixels, width, height)
    near = x_flat.index_select(0, index.view(-1)).view(-1, 4, x_flat.shape[1]).float()
    top = torch.lerp(near[:, 0], near[:, 1], wx)
    bottom = torch.lerp(near[:, 2], near[:, 3], wx)
    return torch.lerp(top, bottom, wy).add_(x_flat.index_select(0, pixels).float())


def window_warp(x: Tensor, offsets: Tensor, num_hard: Tensor, order: Tensor, *,
                window_size: int, shift: int = 0) -> Tensor:
    """``deform_warp(x, offsets)`` on the hard windows' pixels (grid offset by ``shift``),
    0 elsewhere, channels-last float32 (B, C, H, W): per pixel one ``embedding_bag`` of its
    four NHWC neighbours weighted by their bilinear weights. x (B, C, H, W), offsets
    (B, 2, H, W), num_hard (B,), order (B, N)."""
    b, c, height, width = x.shape
    check_window_grid(height, width, window_size)
    area, tokens = height * width, window_size * window_size
    x_img = to_nhwc(x.float()).view(b, area, c)
    pixels = hard_window_pixels(num_hard, order, height, width, window_size, shift)
    out = x_img.new_zeros(b, area, c)
    start = 0
    for i, count in enumerate(k * tokens for k in num_hard.tolist()):
        sel = pixels[start:start + count] - i * area
        start += count
        image_offsets = offsets[i].reshape(2, area)
        for first in range(0, count, KEY_PIXELS):
            part = sel[first:first + KEY_PIXELS]
            index, wx, wy = _bilinear_corners(image_offsets, part, width, height)
            blend = torch.cat(((1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy), 1)
            out[i].index_copy_(0, part, F.embedding_bag(index, x_img[i], mode="sum",
                                                         per_sample_weights=blend))
    return out.view(b, height, width, c).permute(0, 3, 1, 2)


def hard_deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor, order: Tensor,
                        window_size: int) -> Tensor:
    """The routed case of :func:`deformable_key` (the operator ``camixer::cpu_deformable_key``)."""
    b, c, height, width = x.shape
    check_window_grid(height, width, window_size)
    xh = to_nhwc(x)
    pixels = hard_window_pixels(num_hard, order, height, width, window_size)
    area, tokens = height * width, window_size * window_size
    counts = [k * tokens for k in num_hard.tolist()]
    out = torch.empty_like(xh) if min(counts) == area else xh.clone()
    out_flat, x_flat = out.view(b, area, c), xh.view(b, area, c)
    start = 0
    for i, count in enumerate(counts):
        if count == 0:
            continue
        sel = torch.arange(area, device=x.device) if count == area else \
            pixels[start:start + count] - i * area
        start += count
        image_offsets = offsets[i].reshape(2, area)
        for first in range(0, count, KEY_PIXELS):
            part = sel[first:first + KEY_PIXELS]
            keys = _keys_at(x_flat[i], image_offsets, part, width, height)
            if count == area:
                out_flat[i, first:first + part.numel()].copy_(keys)
            else:
                out_flat[i].index_copy_(0, part, keys.to(x.dtype))
    return out.permute(0, 3, 1, 2)


_deformable_key_op = torch.library.custom_op(f"{NAMESPACE}::cpu_deformable_key",
                                             hard_deformable_key, mutates_args=())
_deformable_key_op.register_fake(_channels_last_like)


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """``k_in = x + warp(x, offsets)`` on the hard windows' pixels, channels-last (B, C, H, W);
    ``x`` elsewhere (never read). x (B, C, H, W), offsets (B, 2, H, W), num_hard (B,), order
    (B, N); without a routing (training) the reference warp of the whole map."""
    if num_hard is None or order is None:
        return x + deform_warp(x, offsets)
    if not tracing() or needs_grad(x, offsets):
        return hard_deformable_key(x, offsets, num_hard, order, window_size)
    check_window_grid(x.shape[2], x.shape[3], window_size)
    return _deformable_key_op(x, offsets, num_hard, order, window_size)


def folded_query(wq: Tensor, bq: Tensor, wk: Tensor) -> tuple[Tensor, Tensor]:
    """wq, wk (C, C), bq (C,) -> (W, b) with Q·Kᵀ = (x·Wᵀ + b)·k_inᵀ + a term constant along
    each row, which the softmax drops: one projection instead of two."""
    return wk.t() @ wq, wk.t() @ bq


def hard_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                          bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor,
                          window_size: int, chunk: int, shift: int = 0) -> Tensor:
    """:func:`window_attention` (the operator ``camixer::cpu_window_attention``)."""
    dtype = x.dtype
    _, c, height, width = x.shape
    check_window_grid(height, width, window_size)
    vh = to_nhwc(v.float())
    pixels = hard_window_pixels(num_hard, order, height, width, window_size, shift)
    if pixels.numel() == vh.shape[0] * height * width:
        out = torch.empty_like(vh)
    else:
        out = vh * to_nhwc(sa.float())
    if pixels.numel():
        tokens = window_size * window_size
        xf, kf, vf = (t.view(-1, c) for t in (to_nhwc(x.float()), to_nhwc(k_in.float()), vh))
        of = out.view(-1, c)
        wqk, bqk = folded_query(wq.float(), bq.float(), wk.float())
        for start in range(0, pixels.numel(), chunk * tokens):
            sel = pixels[start:start + chunk * tokens]
            n = sel.numel() // tokens
            q = cpu_dense.linear(xf.index_select(0, sel), wqk, bqk).view(n, 1, tokens, c)
            k = kf.index_select(0, sel).view(n, 1, tokens, c)
            v_tok = vf.index_select(0, sel).view(n, 1, tokens, c)
            mixed = F.scaled_dot_product_attention(q, k, v_tok, scale=1.0)
            of.index_copy_(0, sel, mixed.view(-1, c))
    return out.to(dtype).permute(0, 3, 1, 2)


_window_attention_op = torch.library.custom_op(f"{NAMESPACE}::cpu_window_attention",
                                               hard_window_attention, mutates_args=())
_window_attention_op.register_fake(_channels_last_like)


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, chunk: int = DEFAULT_CHUNK, shift: int = 0) -> Tensor:
    """Inference token mixing (spec §3.7), the reference's signature: x, k_in, v (B, C, H, W),
    sa (B, 1, H, W), wq, wk (C, C), bq, bk (C,), num_hard (B,), order (B, N) -> channels-last
    (B, C, H, W) in x's dtype: ``v·sa``, the hard windows' attention (fp32) written over it;
    ``shift`` offsets the window grid (wrapping), gathered by index, no rolled copies."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not tracing() or needs_grad(x, k_in, v, sa, wq, bq, wk, bk):
        return hard_window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                                     window_size, chunk, shift)
    check_window_grid(x.shape[2], x.shape[3], window_size)
    return _window_attention_op(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, window_size,
                                chunk, shift)


DCN_CHUNK = 1 << 11      # output pixels per step: the (pixels, 9·C) columns stay in cache
_CORNER = torch.tensor([0.0, 1.0])


def deform_conv(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                bias: Tensor | None = None, *, padding: int = 1, dilation: int = 1) -> Tensor:
    """:func:`modulated_deform_conv2d` (same shapes, errors and channels-last result): each
    chunk's K sampling points per pixel are four NHWC rows summed with their bilinear weight ×
    mask by one ``embedding_bag`` (a corner outside weighs 0, as DCNv2's zeros on finite x),
    then one (P, K·C) × (K·C, O) GEMM."""
    b, c, height, width = x.shape
    out_c, _, kh_size, kw_size = weight.shape
    taps = kh_size * kw_size
    h_out, w_out = output_size(x, weight, offset, mask, padding, dilation)
    rows = to_nhwc(x).view(-1, c)                  # [B·H·W, C]: no copy when x is channels-last
    matrix = weight.permute(0, 2, 3, 1).reshape(out_c, taps * c).t()    # [K·C, O] tap-major
    tap = torch.arange(taps, device=x.device, dtype=x.dtype)
    tap_y = torch.div(tap, kw_size, rounding_mode="floor") * dilation - padding
    tap_x = torch.remainder(tap, kw_size) * dilation - padding
    corner = _CORNER.to(x)
    corner_y, corner_x = corner.repeat_interleave(2), corner.repeat(2)  # [4]: (0,0) (0,1) (1,0) (1,1)
    offset = offset.reshape(b, taps, 2, h_out * w_out)
    mask = mask.reshape(b, taps, h_out * w_out)
    out = x.new_empty(b, h_out * w_out, out_c)
    for image in range(b):
        for start in range(0, h_out * w_out, DCN_CHUNK):
            part = slice(start, min(start + DCN_CHUNK, h_out * w_out))
            pixel = torch.arange(part.start, part.stop, device=x.device).view(-1, 1)
            row_ = torch.div(pixel, w_out, rounding_mode="floor")       # int64: exact past 2**24
            py = (row_.to(x.dtype) + tap_y) + offset[image, :, 0, part].t()  # [P, K]
            px = ((pixel - row_ * w_out).to(x.dtype) + tap_x) + offset[image, :, 1, part].t()
            y0, x0 = py.floor(), px.floor()
            ly, lx = (py - y0).unsqueeze(-1), (px - x0).unsqueeze(-1)
            yi, xi = y0.unsqueeze(-1) + corner_y, x0.unsqueeze(-1) + corner_x  # [P, K, 4]
            inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
            index = torch.where(inside, (yi.long() + image * height) * width + xi.long(), 0)
            blend = (torch.where(corner_y > 0, ly, 1 - ly) * torch.where(corner_x > 0, lx, 1 - lx)
                     * mask[image, :, part].t().unsqueeze(-1)) * inside   # outside: weight 0
            cols = F.embedding_bag(index.view(-1, 4), rows, mode="sum",
                                   per_sample_weights=blend.view(-1, 4)).view(-1, taps * c)
            out[image, part] = cols @ matrix if bias is None else torch.addmm(bias, cols, matrix)
    return out.view(b, h_out, w_out, out_c).permute(0, 3, 1, 2)


CPU_OPS = Ops(reference_route_windows, window_scores, deformable_key, window_attention,
              masked_window_attention, cpu_dense.linear, deform_conv, window_warp)

raise_mmap_threshold()  # imported at the first CPU forward: glibc keeps freed maps from then on
