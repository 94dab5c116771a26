"""Deformable bilinear warp of the key features (spec §3.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def deform_warp(x: Tensor, offsets: Tensor) -> Tensor:
    """Sample ``x`` bilinearly at every pixel displaced by ``offsets``.

    x:       (B, C, H, W) features.
    offsets: (B, 2, H, W) displacements in pixels (already ``8·tanh``-ed): channel 0 moves along
             the columns (x), channel 1 along the rows (y).
    Returns (B, C, H, W): x sampled at (column j + off_x, row i + off_y), each coordinate clamped
    into [0, W-1] × [0, H-1] -- ``grid_sample(..., align_corners=True, padding_mode='border')``.
    """
    if x.dim() != 4 or offsets.dim() != 4 or offsets.shape[1] != 2:
        raise ValueError(f"expected x (B,C,H,W) and offsets (B,2,H,W), got {tuple(x.shape)} and "
                         f"{tuple(offsets.shape)}")
    if offsets.shape[0] != x.shape[0] or offsets.shape[2:] != x.shape[2:]:
        raise ValueError(f"offsets {tuple(offsets.shape)} do not match x {tuple(x.shape)}")
    _, _, height, width = x.shape
    # in fp32 at least, as the reference computes everywhere: the grid (a bf16 column index
    # above 16 is off by up to 1/16 pixel) and the sampling (CPU grid_sample in fp16/bf16 is
    # inexact, and NaN on channels-last maps in torch 2.13)
    dtype = torch.promote_types(torch.promote_types(x.dtype, offsets.dtype), torch.float32)
    offsets = offsets.to(dtype)
    rows = torch.arange(height, dtype=dtype, device=offsets.device).view(1, height, 1)
    cols = torch.arange(width, dtype=dtype, device=offsets.device).view(1, 1, width)
    px = cols + offsets[:, 0]                                          # [B, H, W] column
    py = rows + offsets[:, 1]                                          # [B, H, W] row
    # pixel -> [-1, 1] with align_corners=True: -1 is pixel 0, +1 is pixel W-1
    gx = 2.0 * px / max(width - 1, 1) - 1.0
    gy = 2.0 * py / max(height - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1)                               # [B, H, W, 2]
    out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.to(x.dtype)


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """The deformable key input ``k_in = x + deform_warp(x, offsets)``, (B, C, H, W).

    ``num_hard`` (B,), ``order`` (B, N) and ``window_size`` name the hard windows, the only
    pixels whose keys the attention reads; a backend may compute just those. This reference
    computes every pixel.
    """
    return x + deform_warp(x, offsets)
