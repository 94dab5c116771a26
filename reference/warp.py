"""Deformable bilinear warp of the key features (spec §3.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def deform_warp(x: Tensor, offsets: Tensor) -> Tensor:
    """x (B, C, H, W) sampled bilinearly at (column + offsets[:, 0], row + offsets[:, 1]),
    offsets (B, 2, H, W) in pixels, coordinates clamped to the map (``grid_sample`` with
    ``align_corners=True, padding_mode='border'``): (B, C, H, W). ValueError for bad shapes."""
    if x.dim() != 4 or offsets.dim() != 4 or offsets.shape[1] != 2:
        raise ValueError(f"expected x (B,C,H,W) and offsets (B,2,H,W), got {tuple(x.shape)} and "
                         f"{tuple(offsets.shape)}")
    if offsets.shape[0] != x.shape[0] or offsets.shape[2:] != x.shape[2:]:
        raise ValueError(f"offsets {tuple(offsets.shape)} do not match x {tuple(x.shape)}")
    _, _, height, width = x.shape
    # fp32 at least: bf16 grids are off by up to 1/16 pixel, CPU half grid_sample is inexact
    dtype = torch.promote_types(torch.promote_types(x.dtype, offsets.dtype), torch.float32)
    offsets = offsets.to(dtype)
    rows = torch.arange(height, dtype=dtype, device=offsets.device).view(1, height, 1)
    cols = torch.arange(width, dtype=dtype, device=offsets.device).view(1, 1, width)
    px = cols + offsets[:, 0]
    py = rows + offsets[:, 1]
    gx = 2.0 * px / max(width - 1, 1) - 1.0
    gy = 2.0 * py / max(height - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.to(x.dtype)


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """``k_in = x + deform_warp(x, offsets)`` (B, C, H, W) at every pixel (routing unused)."""
    return x + deform_warp(x, offsets)
