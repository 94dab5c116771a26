"""Training token mixing: dense over all windows with a 0/1 mask (spec §4).

Single head, no 1/sqrt(C) scaling; inference attends the hard windows only
(:mod:`.attention_inference`).
"""

from __future__ import annotations

from torch import Tensor

from camixer_fast.reference.attention_inference import attend
from camixer_fast.reference.windows import from_windows, to_windows


def masked_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, mask: Tensor,
                            wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, *,
                            window_size: int) -> Tensor:
    """Training token mixing, dense over all windows with a 0/1 mask (spec §4).

    x, k_in, v: (B, C, H, W); sa: (B, 1, H, W); mask: (B, N, 1) straight-through hard mask.
    Q and K come from the masked inputs (the projection biases survive the mask), V = v·M, and
    ``attn_out = softmax(QKᵀ)·V + (v·sa)·(1 − M)``. Returns (B, C, H, W), differentiable.
    """
    height, width = x.shape[-2:]
    m = mask.unsqueeze(-1)                                             # [B, N, 1, 1]
    q_tok = to_windows(x, window_size) * m                             # [B, N, T, C]
    k_tok = to_windows(k_in, window_size) * m
    v_tok = to_windows(v, window_size)
    simple = to_windows(v * sa, window_size) * (1.0 - m)
    b, n, t, c = q_tok.shape
    mixed = attend(q_tok.reshape(b * n, t, c), k_tok.reshape(b * n, t, c),
                   (v_tok * m).reshape(b * n, t, c), wq, bq, wk, bk)
    return from_windows(mixed.view(b, n, t, c) + simple, height, width)
