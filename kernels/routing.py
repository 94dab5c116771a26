"""Fused window routing in two launches (the ranking needs every score): scores, then K and the
order as a comparison count per window (no sort, no host sync; ties to the lower index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.backends.ops import gumbel_noise, window_order
from camixer_fast.kernels.helpers import check_shapes, kernel_op
from camixer_fast.reference.routing import (
    WindowRouting,
    check_gamma,
    check_routing_mode,
    check_tie_break,
)


@triton.jit
def window_scores_kernel(h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pred_ptr, C4, H, W, COLS, N,
                         HID, WS: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr):
    i_w, i_b = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, WS * WS)
    pix = ((i_w // COLS) * WS + o_t // WS) * W + (i_w % COLS) * WS + o_t % WS
    o_c = tl.arange(0, BC)
    m_c = o_c < C4
    p_h = h_ptr + i_b.to(tl.int64) * C4 * H * W + o_c[:, None].to(tl.int64) * H * W + pix[None, :]
    b_h = tl.load(p_h, mask=m_c[:, None], other=0.0).to(tl.float32)  # [BC, T]
    b_m = tl.sum(b_h, axis=0) / C4                                     # [T] channel mean
    o_j = tl.arange(0, BH)
    m_j = o_j < HID
    b_w1 = tl.load(w1_ptr + o_j[:, None] * (WS * WS) + o_t[None, :], mask=m_j[:, None],
                   other=0.0).to(tl.float32)
    b_hid = tl.sum(b_w1 * b_m[None, :], axis=1)
    b_hid += tl.load(b1_ptr + o_j, mask=m_j, other=0.0).to(tl.float32)
    b_hid = tl.where(b_hid >= 0, b_hid, 0.1 * b_hid)
    l0 = tl.sum(tl.load(w2_ptr + o_j, mask=m_j, other=0.0).to(tl.float32) * b_hid)
    l1 = tl.sum(tl.load(w2_ptr + HID + o_j, mask=m_j, other=0.0).to(tl.float32) * b_hid)
    l0 += tl.load(b2_ptr).to(tl.float32)
    l1 += tl.load(b2_ptr + 1).to(tl.float32)
    top = tl.maximum(l0, l1)
    e0, e1 = tl.exp(l0 - top), tl.exp(l1 - top)
    p_pred = pred_ptr + (i_b.to(tl.int64) * N + i_w) * 2
    tl.store(p_pred, e0 / (e0 + e1))
    tl.store(p_pred + 1, e1 / (e0 + e1))


@triton.jit
def select_kernel(pred_ptr, noise_ptr, num_hard_ptr, order_ptr, N, gamma,
                  HAS_NOISE: tl.constexpr, ALL_HARD: tl.constexpr, BI: tl.constexpr,
                  BJ: tl.constexpr):
    i_blk, i_b = tl.program_id(0), tl.program_id(1)
    base = i_b.to(tl.int64) * N
    o_i = i_blk * BI + tl.arange(0, BI)
    m_i = o_i < N
    b_si = tl.load(pred_ptr + (base + o_i) * 2, mask=m_i, other=0.0)
    b_rank = tl.zeros([BI], dtype=tl.int32)
    b_r = tl.zeros([BJ], dtype=tl.float32)
    for j0 in range(0, N, BJ):
        o_j = j0 + tl.arange(0, BJ)
        m_j = o_j < N
        b_s0 = tl.load(pred_ptr + (base + o_j) * 2, mask=m_j, other=0.0)
        b_s1 = tl.load(pred_ptr + (base + o_j) * 2 + 1, mask=m_j, other=0.0)
        before = (b_s0[None, :] > b_si[:, None]) | (
            (b_s0[None, :] == b_si[:, None]) & (o_j[None, :] < o_i[:, None]))
        b_rank += tl.sum((before & m_j[None, :]).to(tl.int32), axis=1)
        if HAS_NOISE:
            b_g0 = tl.load(noise_ptr + (base + o_j) * 2, mask=m_j, other=0.0)
            b_g1 = tl.load(noise_ptr + (base + o_j) * 2 + 1, mask=m_j, other=0.0)
            hard = (b_s0 + b_g0) >= (b_s1 + b_g1)
            b_r += tl.where(m_j & hard, 1.0, 0.0)
        else:
            b_r += tl.where(m_j, tl.sigmoid(b_s0 - b_s1), 0.0)         # softmax(pred)[0]
    tl.store(order_ptr + base + b_rank, o_i.to(tl.int64), mask=m_i)
    if i_blk == 0:
        if ALL_HARD:
            k = tl.cast(N, tl.int64)     # N may arrive as the constant 1 (a single window)
        else:
            # K = int(N · r · 2γ), rounded in the official order (fp32: ((r·N)·2)·γ)
            b_frac = tl.sum(b_r) / N
            k = tl.minimum(tl.floor(b_frac * N * 2.0 * gamma).to(tl.int64), N)
        tl.store(num_hard_ptr + i_b, k)


SELECT_BLOCK = 64     # windows ranked per program and compared per step


def score_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  window_size: int) -> Tensor:
    """h (B, c4, H, W) contiguous, ``out_mask`` weights -> scores pred (B, N, 2) fp32."""
    b, c4, height, width = h.shape
    hidden = w1.shape[0]
    cols = width // window_size
    n = (height // window_size) * cols
    pred = torch.empty(b, n, 2, dtype=torch.float32, device=h.device)
    wrap_triton(window_scores_kernel)[(n, b)](h, w1, b1, w2, b2, pred, c4, height, width, cols,
                                               n, hidden, WS=window_size,
                                               BC=triton.next_power_of_2(c4),
                                               BH=triton.next_power_of_2(hidden))
    return pred


def select_windows(pred: Tensor, noise: Tensor | None, gamma: float) -> tuple[Tensor, Tensor]:
    """pred (B, N, 2) fp32, Gumbel noise or None -> (num_hard (B,), order (B, N))."""
    b, n, _ = pred.shape
    num_hard = torch.empty(b, dtype=torch.int64, device=pred.device)
    order = torch.empty(b, n, dtype=torch.int64, device=pred.device)
    wrap_triton(select_kernel)[(triton.cdiv(n, SELECT_BLOCK), b)](
        pred, pred if noise is None else noise, num_hard, order, n, gamma,
        HAS_NOISE=noise is not None, ALL_HARD=gamma == 1.0, BI=SELECT_BLOCK, BJ=SELECT_BLOCK)
    return num_hard, order


def _score_windows_fake(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                        window_size: int) -> Tensor:
    b, _, height, width = h.shape
    n = (height // window_size) * (width // window_size)
    return h.new_empty(b, n, 2, dtype=torch.float32)


def _select_windows_fake(pred: Tensor, noise: Tensor | None,
                         gamma: float) -> tuple[Tensor, Tensor]:
    b, n, _ = pred.shape
    return pred.new_empty(b, dtype=torch.int64), pred.new_empty(b, n, dtype=torch.int64)


_score_windows = kernel_op("triton_score_windows", score_windows, _score_windows_fake)
_select_windows = kernel_op("triton_select_windows", select_windows, _select_windows_fake)


def route_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma: float, *,
                  window_size: int, routing: str = "expected",
                  generator: torch.Generator | None = None,
                  tie_break: str = "index") -> WindowRouting:
    """Fused twin of :func:`camixer_fast.reference.routing.route_windows` (same shapes, pred
    fp32); ``tie_break="official"`` takes the order from ``torch.argsort``, the only unfused
    step. ValueError for bad input."""
    gamma = check_gamma(gamma)
    check_routing_mode(routing)
    check_tie_break(tie_break)
    if h.dim() != 4:
        raise ValueError(f"h: expected (B, c4, H, W), got {tuple(h.shape)}")
    _, _, height, width = h.shape
    ws = window_size
    if height % ws or width % ws:
        raise ValueError(f"h is {height}x{width}, not a multiple of the window size {ws}")
    if ws & (ws - 1):
        raise ValueError(f"window_size must be a power of two for the kernels, got {ws}")
    hidden = w1.shape[0]
    check_shapes(h, {"w1": (w1, (hidden, ws * ws)), "b1": (b1, (hidden,)),
                     "w2": (w2, (2, hidden)), "b2": (b2, (2,))})
    h, w1, b1, w2, b2 = (t.contiguous() for t in (h, w1, b1, w2, b2))
    pred = _score_windows(h, w1, b1, w2, b2, ws)
    noise = gumbel_noise(pred, generator) if routing == "gumbel" else None
    num_hard, order = _select_windows(pred, noise, gamma)
    if tie_break == "official":
        order = window_order(pred[..., 0], "official")
    return WindowRouting(pred, num_hard, order)
