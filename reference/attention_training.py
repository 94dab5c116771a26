"""Training token mixing (spec §4): dense over all windows with a 0/1 mask."""

from __future__ import annotations

from torch import Tensor

from camixer_fast.reference.attention_inference import attend
from camixer_fast.reference.windows import from_windows, to_windows


def masked_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, mask: Tensor,
                            wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, *,
                            window_size: int) -> Tensor:
    """x, k_in, v (B, C, H, W); sa (B, 1, H, W); mask (B, N, 1) straight-through hard mask ->
    ``softmax(QKᵀ)·(v·M) + (v·sa)·(1 − M)`` (B, C, H, W), Q, K projected from the masked inputs
    (biases survive the mask); differentiable."""
    height, width = x.shape[-2:]
    m = mask.unsqueeze(-1)
    q_tok = to_windows(x, window_size) * m                             # [B, N, T, C]
    k_tok = to_windows(k_in, window_size) * m
    v_tok = to_windows(v, window_size)
    simple = to_windows(v * sa, window_size) * (1.0 - m)
    b, n, t, c = q_tok.shape
    mixed = attend(q_tok.reshape(b * n, t, c), k_tok.reshape(b * n, t, c),
                   (v_tok * m).reshape(b * n, t, c), wq, bq, wk, bk)
    return from_windows(mixed.view(b, n, t, c) + simple, height, width)
