"""Inference token mixing (spec §3.7): attention on hard windows (no 1/sqrt(C)), v·sa else."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from camixer_fast.reference.routing import flat_hard_windows
from camixer_fast.reference.windows import window_view
from torch import Tensor

DEFAULT_CHUNK = 128     # hard windows per step: bounds the (chunk, ws², ws²) scores


def attend(q_tokens: Tensor, k_tokens: Tensor, v_tokens: Tensor, wq: Tensor, bq: Tensor,
           wk: Tensor, bk: Tensor) -> Tensor:
    """softmax((q·Wqᵀ + bq)(k·Wkᵀ + bk)ᵀ)·v over each window: all (n, T, C) -> (n, T, C)."""
    q = F.linear(q_tokens, wq, bq)
    k = F.linear(k_tokens, wk, bk)
    scores = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return scores @ v_tokens


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, chunk: int = DEFAULT_CHUNK, shift: int = 0) -> Tensor:
    """x (queries), k_in (deformable keys), v (B, C, H, W), sa (B, 1, H, W), wq, wk (C, C), bq,
    bk (C,), num_hard (B,), order (B, N) -> attn_out (B, C, H, W) in x's dtype, computed in fp32,
    ``chunk`` hard windows at a time (ValueError for chunk < 1). ``shift``: the window grid
    starts at (shift, shift) and wraps around (CAMixerOSR's shifted windows), i.e. the maps are
    rolled by −shift, mixed, and the result rolled back."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if shift:
        x, k_in, v, sa = (torch.roll(t, (-shift, -shift), dims=(2, 3)) for t in (x, k_in, v, sa))
        out = window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                               window_size=window_size, chunk=chunk)
        return torch.roll(out, (shift, shift), dims=(2, 3))
    dtype = x.dtype
    x, k_in, v, sa = x.float(), k_in.float(), v.float(), sa.float()
    wq, bq, wk, bk = wq.float(), bq.float(), wk.float(), bk.float()
    out = (v * sa).contiguous()
    image, window = flat_hard_windows(num_hard, order)
    if image.numel() == 0:
        return out.to(dtype)
    cols = x.shape[-1] // window_size
    row_of, col_of = window // cols, window % cols
    xw, kw, vw = (window_view(t, window_size) for t in (x, k_in, v))  # [B, rows, cols, ws, ws, C]
    ow = window_view(out, window_size)
    tokens = window_size * window_size
    for start in range(0, image.numel(), chunk):
        sel = (image[start:start + chunk], row_of[start:start + chunk], col_of[start:start + chunk])
        n = sel[0].numel()
        mixed = attend(xw[sel].reshape(n, tokens, -1), kw[sel].reshape(n, tokens, -1),
                       vw[sel].reshape(n, tokens, -1), wq, bq, wk, bk)
        ow[sel] = mixed.view(n, window_size, window_size, -1)
    return out.to(dtype)

