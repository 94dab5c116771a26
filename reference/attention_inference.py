"""Inference token mixing: self-attention on the hard windows, ``v·sa`` on the simple ones.

Spec §3.7 (top-K routing). Single head, no 1/sqrt(C) scaling, softmax over the window's ws² keys.
The training form (dense over all windows, with a mask) is :mod:`.attention_training`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camixer_fast.reference.routing import flat_hard_windows
from camixer_fast.reference.windows import window_view

DEFAULT_CHUNK = 128
"""Hard windows attended per step: bounds the (chunk, ws², ws²) score tensor (32 MiB at ws=16)."""


def attend(q_tokens: Tensor, k_tokens: Tensor, v_tokens: Tensor, wq: Tensor, bq: Tensor,
           wk: Tensor, bk: Tensor) -> Tensor:
    """softmax((q·Wqᵀ + bq)(k·Wkᵀ + bk)ᵀ)·v over each window: all (n, T, C) -> (n, T, C)."""
    q = F.linear(q_tokens, wq, bq)                                     # [n, T, C]
    k = F.linear(k_tokens, wk, bk)                                     # [n, T, C]
    scores = torch.softmax(q @ k.transpose(-2, -1), dim=-1)            # [n, T, T]
    return scores @ v_tokens                                           # [n, T, C]


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Inference token mixing with top-K routing (spec §3.7).

    x:        (B, C, H, W) query input (q_in = x); H, W multiples of ``window_size``.
    k_in:     (B, C, H, W) deformable key input (:func:`deformable_key`).
    v:        (B, C, H, W) values (``project_v(x)``).
    sa:       (B, 1, H, W) spatial attention of the predictor.
    wq, wk:   (C, C) and bq, bk: (C,) -- ``project_q`` / ``project_k`` (per-token Linear).
    num_hard: (B,) K per image; order: (B, N) windows by descending score (see ``routing``).
    Returns attn_out (B, C, H, W) in x's dtype, computed in fp32. Hard windows are attended
    ``chunk`` at a time, so memory stays bounded whatever K is.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = x.dtype
    x, k_in, v, sa = x.float(), k_in.float(), v.float(), sa.float()
    wq, bq, wk, bk = wq.float(), bq.float(), wk.float(), bk.float()
    out = (v * sa).contiguous()                                        # simple windows
    image, window = flat_hard_windows(num_hard, order)
    if image.numel() == 0:
        return out.to(dtype)
    cols = x.shape[-1] // window_size
    row_of, col_of = window // cols, window % cols
    xw, kw, vw = (window_view(t, window_size) for t in (x, k_in, v))  # [B, rows, cols, ws, ws, C]
    ow = window_view(out, window_size)                                 # writes land in `out`
    tokens = window_size * window_size
    for start in range(0, image.numel(), chunk):
        sel = (image[start:start + chunk], row_of[start:start + chunk], col_of[start:start + chunk])
        n = sel[0].numel()
        mixed = attend(xw[sel].reshape(n, tokens, -1), kw[sel].reshape(n, tokens, -1),
                       vw[sel].reshape(n, tokens, -1), wq, bq, wk, bk)
        ow[sel] = mixed.view(n, window_size, window_size, -1)
    return out.to(dtype)

