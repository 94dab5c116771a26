"""Modulated deformable convolution (DCNv2, BasicSR's ``DCNv2Pack`` / torchvision's
``deform_conv2d`` with a mask), reference twin in PyTorch: the library must not need
torchvision, whose CPU builds do not match every torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DCN_CHUNK = 1 << 14      # output pixels per step: a (pixels, 9, C) map of 35 MiB at C = 60


def output_size(x: Tensor, weight: Tensor, offset: Tensor, mask: Tensor, padding: int,
                dilation: int) -> tuple[int, int]:
    """(h, w) of a stride-1 DCN of x (B, C, H, W) by weight (O, C, kh, kw); ValueError unless
    offset is (B, 2K, h, w) and mask (B, K, h, w), K = kh·kw."""
    b, _, height, width = x.shape
    _, _, kh, kw = weight.shape
    taps = kh * kw
    h_out = height + 2 * padding - dilation * (kh - 1)
    w_out = width + 2 * padding - dilation * (kw - 1)
    if offset.shape != (b, 2 * taps, h_out, w_out) or mask.shape != (b, taps, h_out, w_out):
        raise ValueError(f"offset {tuple(offset.shape)} / mask {tuple(mask.shape)} do not fit a "
                         f"{kh}x{kw} kernel on a {h_out}x{w_out} output")
    return h_out, w_out


def modulated_deform_conv2d(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                            bias: Tensor | None = None, *, padding: int = 1,
                            dilation: int = 1) -> Tensor:
    """DCNv2, stride 1: out[b,o,i,j] = bias[o] + Σ_{c,k} weight[o,c,k]·mask[b,k,i,j]·
    x[b,c](i − p + kh·d + Δy_k, j − p + kw·d + Δx_k), bilinear, zero outside; x (B, C, H, W),
    weight (O, C, kh, kw), offset (B, 2K, h, w) in (Δy, Δx) pairs per tap (torchvision's),
    mask (B, K, h, w) -> (B, O, h, w) channels-last: each tap's four neighbours gathered as
    NHWC rows and blended, one (pixels, K·C) × (K·C, O) product per DCN_CHUNK pixels."""
    b, c, height, width = x.shape
    out_c, _, kh_size, kw_size = weight.shape
    taps = kh_size * kw_size
    h_out, w_out = output_size(x, weight, offset, mask, padding, dilation)
    rows = F.pad(x.permute(0, 2, 3, 1).reshape(-1, c), (0, 0, 0, 1))   # [B·H·W + 1, C]
    zero_row = b * height * width
    matrix = weight.permute(0, 2, 3, 1).reshape(out_c, taps * c).t()    # [K·C, O] tap-major
    tap = torch.arange(taps, device=x.device)
    tap_y, tap_x = tap // kw_size * dilation - padding, tap % kw_size * dilation - padding
    offset = offset.reshape(b, taps, 2, h_out * w_out)
    mask = mask.reshape(b, taps, h_out * w_out)
    parts = []
    for image in range(b):
        for start in range(0, h_out * w_out, DCN_CHUNK):
            part = slice(start, min(start + DCN_CHUNK, h_out * w_out))
            pixel = torch.arange(part.start, part.stop, device=x.device).view(-1, 1)
            py = (pixel // w_out + tap_y) + offset[image, :, 0, part].t()   # [P, K]
            px = (pixel % w_out + tap_x) + offset[image, :, 1, part].t()
            y0, x0 = py.floor(), px.floor()
            ly, lx = py - y0, px - x0
            m = mask[image, :, part].t()
            sampled = x.new_zeros(py.shape + (c,))
            for dy, wy in ((0, 1.0 - ly), (1, ly)):
                for dx, wx in ((0, 1.0 - lx), (1, lx)):
                    yi, xi = y0 + dy, x0 + dx
                    inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
                    index = (yi.long() + image * height) * width + xi.long()
                    index = torch.where(inside, index, zero_row)
                    taken = rows.index_select(0, index.flatten()).view_as(sampled)
                    sampled.addcmul_(taken, (wy * wx * m).unsqueeze(-1))
            flat = sampled.view(-1, taps * c)
            parts.append(flat @ matrix if bias is None else torch.addmm(bias, flat, matrix))
    return torch.cat(parts).view(b, h_out, w_out, out_c).permute(0, 3, 1, 2)
