"""Windows and tokens row-major: ``rearrange(x, 'b c (h dh) (w dw) -> b (h w) (dh dw) c')``."""

from __future__ import annotations

import torch
from torch import Tensor


def check_window_grid(height: int, width: int, window_size: int) -> tuple[int, int]:
    """Return the window grid (rows, cols) of an (height, width) map; raise if it does not tile."""
    if height % window_size or width % window_size:
        raise ValueError(
            f"feature map {height}x{width} is not a multiple of the window size {window_size}; "
            "the model pads its input before the body, so callers of the ops must do the same"
        )
    return height // window_size, width // window_size


def to_windows(x: Tensor, window_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, ws·ws, C), a copy in window-major, token-major order."""
    b, c, h, w = x.shape
    rows, cols = check_window_grid(h, w, window_size)
    x = x.reshape(b, c, rows, window_size, cols, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, window_size * window_size, c)


def from_windows(t: Tensor, height: int, width: int) -> Tensor:
    """(B, N, ws·ws, C) -> (B, C, H, W), the inverse of :func:`to_windows`."""
    b, n, tokens, c = t.shape
    window_size = int(round(tokens**0.5))
    rows, cols = check_window_grid(height, width, window_size)
    if rows * cols != n or window_size * window_size != tokens:
        raise ValueError(f"{n} windows of {tokens} tokens do not tile a {height}x{width} map")
    t = t.reshape(b, rows, cols, window_size, window_size, c)
    return t.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def window_view(x: Tensor, window_size: int) -> Tensor:
    """(B, C, H, W) -> a strided view (B, rows, cols, ws, ws, C); writes through it land in x."""
    b, c, h, w = x.shape
    rows, cols = check_window_grid(h, w, window_size)
    return x.view(b, c, rows, window_size, cols, window_size).permute(0, 2, 4, 3, 5, 1)


def window_condition(height: int, width: int, window_size: int, *, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """The window condition Cw (spec §3.2) tiled over the map: (1, 2, H, W)."""
    rows, cols = check_window_grid(height, width, window_size)
    ramp = torch.linspace(-1.0, 1.0, window_size, dtype=torch.float32, device=device)
    row = ramp.view(window_size, 1).expand(window_size, window_size)
    col = ramp.view(1, window_size).expand(window_size, window_size)
    cw = torch.stack([row, col]).repeat(1, rows, cols)
    return cw.unsqueeze(0).to(dtype)
