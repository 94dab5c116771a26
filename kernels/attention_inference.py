"""Fused hard-window attention (spec §3.7): one program per (rank, query block, image) reads
window ``order[b, rank]`` in place and attends it if rank < K, else writes ``v·sa``; a
``shift`` offsets the window grid by index arithmetic, wrapping (no rolled copies)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.backends.triton_env import interpreting
from camixer_fast.kernels.helpers import (
    HALF,
    TileConfig,
    autocast_entry,
    channel_block,
    check_maps,
    dot_precision,
    for_window,
    kernel_op,
    pixel_strides,
    whole_windows,
    window_tokens,
)


@triton.jit
def shifted_tokens(win, i_blk, COLS, H, W, SHIFT_H, SHIFT_W, WS: tl.constexpr,
                   BT: tl.constexpr):
    """Pixel offsets [BT] of tokens i_blk·BT ... of window ``win`` of the grid starting at
    (SHIFT_H, SHIFT_W) mod (H, W), wrapping around the map; H <= SHIFT_H < 2H, likewise W."""
    o_t = i_blk * BT + tl.arange(0, BT)
    row0 = ((win // COLS) * WS + SHIFT_H) % H        # scalars: one modulo per program
    col0 = ((win % COLS) * WS + SHIFT_W) % W
    o_row = row0 + o_t // WS
    o_col = col0 + o_t % WS
    return tl.where(o_row >= H, o_row - H, o_row) * W + tl.where(o_col >= W, o_col - W, o_col)


@triton.jit
def hard_window_attention_kernel(x_ptr, k_ptr, v_ptr, sa_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr,
                                 num_hard_ptr, order_ptr, out_ptr, C, H, W, COLS, N,
                                 SHIFT_H, SHIFT_W, s_b, s_p, s_c, WS: tl.constexpr,
                                 BC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                 PRECISION: tl.constexpr, SHIFTED: tl.constexpr):
    # maps: (b, c, pixel p) at b·s_b + p·s_p + c·s_c, p·s_p < 2³¹ (int32: fewer registers)
    i_r, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    win = tl.load(order_ptr + i_b.to(tl.int64) * N + i_r)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * s_b + o_c.to(tl.int64) * s_c
    if SHIFTED:   # CAMixerSR's launches compile without the wrapping (its registers)
        pix_m = shifted_tokens(win, i_m, COLS, H, W, SHIFT_H, SHIFT_W, WS, BM)
    else:
        pix_m = window_tokens(win, i_m, COLS, W, WS, BM)
    p_m = plane[None, :] + (pix_m * s_p)[:, None]                      # [BM, BC]
    if i_r < tl.load(num_hard_ptr + i_b):
        dt = x_ptr.dtype.element_ty
        # Q·Kᵀ = (Q·Wk)·k_inᵀ + a per-row constant softmax drops: fold Wk into the queries
        m_w = m_c[:, None] & m_c[None, :]
        b_wqt = tl.load(wq_ptr + o_c[None, :] * C + o_c[:, None], mask=m_w, other=0.0).to(dt)
        b_bq = tl.load(bq_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_x = tl.load(x_ptr + p_m, mask=m_c[None, :], other=0.0)
        b_q = (tl.dot(b_x, b_wqt, input_precision=PRECISION) + b_bq[None, :]).to(dt)
        b_wk = tl.load(wk_ptr + o_c[:, None] * C + o_c[None, :], mask=m_w, other=0.0).to(dt)
        b_q = tl.dot(b_q, b_wk, input_precision=PRECISION).to(dt)     # [BM, BC] Q·Wk
        b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_li = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, BC], dtype=tl.float32)
        for i_n in range(0, WS * WS // BN):
            if SHIFTED:
                pix_n = shifted_tokens(win, i_n, COLS, H, W, SHIFT_H, SHIFT_W, WS, BN) * s_p
            else:
                pix_n = window_tokens(win, i_n, COLS, W, WS, BN) * s_p
            p_n = plane[None, :] + pix_n[:, None]
            b_kin = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_kin), input_precision=PRECISION)  # [BM, BN]
            b_mnew = tl.maximum(b_mi, tl.max(b_s, axis=1))
            b_alpha = tl.exp(b_mi - b_mnew)
            b_p = tl.exp(b_s - b_mnew[:, None])
            b_li = b_li * b_alpha + tl.sum(b_p, axis=1)
            b_v = tl.load(v_ptr + p_n, mask=m_c[None, :], other=0.0)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(dt), b_v, input_precision=PRECISION)
            b_mi = b_mnew
        b_out = b_acc / b_li[:, None]
    else:
        b_v = tl.load(v_ptr + p_m, mask=m_c[None, :], other=0.0).to(tl.float32)
        b_sa = tl.load(sa_ptr + i_b.to(tl.int64) * H * W + pix_m).to(tl.float32)
        b_out = b_v * b_sa[:, None]
    tl.store(out_ptr + p_m, b_out.to(out_ptr.dtype.element_ty), mask=m_c[None, :])


# proven: ran on an H200 (issue 9); the others avoid the spills the JIT gate found there
FP32_TILES = TileConfig(16, 32, 4, 1, proven=True)
HALF_TILES = TileConfig(64, 64, 4, 2, proven=True)
HALF_SMALL_WINDOWS = TileConfig(64, 64, 8, 1, proven=False)
HALF_CHANNELS_LAST = TileConfig(64, 64, 8, 2, proven=False)
TF32_TILES = TileConfig(64, 32, 4, 1, proven=True)
TF32X3_TILES = TileConfig(32, 32, 8, 1, proven=False)
TF32_EIGHT_WARPS = TileConfig(64, 32, 8, 1, proven=False)     # channels-last, windows < 16×16
FP32_TILE_BY_PRECISION = {"ieee": FP32_TILES, "tf32": TF32_TILES, "tf32x3": TF32X3_TILES}


def tile_config(dtype: torch.dtype, window_size: int, *, channels_last: bool = False,
                precision: str | None = None, shifted: bool = False) -> TileConfig:
    """Launch configuration of :func:`window_attention` (fp32 ``precision`` default: this
    launch's :func:`.helpers.dot_precision`; ``shifted``: a wrapped window grid)."""
    if interpreting():
        return whole_windows(window_size)
    if dtype in HALF:
        if window_size < 16:
            return for_window(HALF_SMALL_WINDOWS, window_size)
        wide = channels_last or shifted        # 4 warps spilled there on sm_80 (JIT gate)
        return for_window(HALF_CHANNELS_LAST if wide else HALF_TILES, window_size)
    precision = precision or dot_precision(dtype)
    if precision == "tf32" and (window_size < 16 or channels_last):
        return for_window(TF32_EIGHT_WARPS, window_size)
    return for_window(FP32_TILE_BY_PRECISION[precision], window_size)


def _one_layout(x: Tensor, k_in: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    strides = pixel_strides(x)
    height, width = x.shape[2:]
    if (strides is None or not strides == pixel_strides(k_in) == pixel_strides(v)
            or height * width * strides[1] >= 2**31):
        return x.contiguous(), k_in.contiguous(), v.contiguous()
    return x, k_in, v


def hard_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                          bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor,
                          window_size: int, shift: int = 0) -> Tensor:
    """:func:`window_attention` on checked inputs, in the maps' common layout."""
    b, c, height, width = x.shape
    ws = window_size
    cols = width // ws
    n = (height // ws) * cols
    x, k_in, v = _one_layout(x, k_in, v)
    strides = pixel_strides(x)
    sa, wq, bq, wk, bk, num_hard, order = (
        t.contiguous() for t in (sa, wq, bq, wk, bk, num_hard, order))
    out = torch.empty_like(x)
    # the shifts go in as H + shift, W + shift: never 1, whose JIT specialization spilled
    precision = dot_precision(x.dtype)
    shifted = shift % height > 0 or shift % width > 0
    cfg = tile_config(x.dtype, ws, channels_last=strides[2] == 1 and c > 1, precision=precision,
                      shifted=shifted)
    grid = (n, ws * ws // cfg.bm, b)
    wrap_triton(hard_window_attention_kernel)[grid](
        x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, out, c, height, width, cols, n,
        height + shift % height, width + shift % width, *strides, WS=ws,
        BC=channel_block(c, x.dtype), BM=cfg.bm, BN=cfg.bn, PRECISION=precision,
        SHIFTED=shifted, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _hard_window_attention_fake(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                                bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor,
                                order: Tensor, window_size: int, shift: int = 0) -> Tensor:
    return torch.empty_like(_one_layout(x, k_in, v)[0])


_hard_window_attention = kernel_op("triton_window_attention", hard_window_attention,
                                   _hard_window_attention_fake)


@autocast_entry("lower")
def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, shift: int = 0) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.attention_inference.window_attention` (same
    shapes; ``k_in`` read at the hard windows only; ``shift``: the window grid starts at
    (shift, shift) and wraps). Under autocast it runs in the autocast dtype. ValueError for
    mismatched inputs; RuntimeError where a gradient is needed."""
    b, c, height, width = check_maps(x, {"k_in": k_in, "v": v, "sa": sa, "wq": wq, "bq": bq,
                                          "wk": wk, "bk": bk, "num_hard": num_hard,
                                          "order": order}, window_size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, k_in, v, sa, wq, bq, wk, bk)):
        raise RuntimeError(
            "the Triton inference attention does not differentiate (top-K routing is not "
            "differentiable): run inference under torch.no_grad() or torch.inference_mode(), "
            "train with model.train() (the dense masked form has kernels with a backward), or "
            "use backend='reference'")
    for name, t in (("k_in", k_in), ("v", v)):
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected {tuple(x.shape)}, got {tuple(t.shape)}")
    if tuple(sa.shape) != (b, 1, height, width):
        raise ValueError(f"sa: expected {(b, 1, height, width)}, got {tuple(sa.shape)}")
    if tuple(wq.shape) != (c, c) or tuple(wk.shape) != (c, c):
        raise ValueError(f"wq, wk: expected ({c}, {c}), got {tuple(wq.shape)}, {tuple(wk.shape)}")
    if tuple(bq.shape) != (c,) or tuple(bk.shape) != (c,):
        raise ValueError(f"bq, bk: expected ({c},), got {tuple(bq.shape)}, {tuple(bk.shape)}")
    n = (height // window_size) * (width // window_size)
    if tuple(num_hard.shape) != (b,) or tuple(order.shape) != (b, n):
        raise ValueError(f"num_hard {tuple(num_hard.shape)} / order {tuple(order.shape)} do not "
                         f"fit {b} images of {n} windows")
    return _hard_window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, window_size,
                                  int(shift))
