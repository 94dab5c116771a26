"""Fused hard-window attention at inference: self-attention on hard windows, ``v·sa`` on simple
ones (spec §3.7, §4).

Twin of :func:`camixer_fast.reference.attention_inference.window_attention`. One program per (rank,
query block, image) over every window of every image -- a flat list, not a padded B×K
rectangle: the window of rank r of image b is ``order[b, r]``; ranks below the image's K are
attended, the others get ``v·sa``. A program reads its window's pixels straight from the
(B, C, H, W) maps through the window index, applies ``project_q`` / ``project_k`` in the kernel,
runs an online softmax in fp32 over the window's keys, and writes its rows of ``attn_out`` in
place: no gather copy, no scatter copy, no K-dependent memory. The key projection is folded
into the queries (Q·Kᵀ = (Q·Wk)·k_inᵀ + a per-row constant that softmax drops), so the key loop
streams raw ``k_in`` tiles like flash attention. C need not be a power of two: channels are
padded inside the kernel with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from camixer_fast.backends.ops import kernel_op
from camixer_fast.kernels._autocast import autocast_entry
from camixer_fast.kernels._tiles import (
    HALF,
    TileConfig,
    channel_block,
    check_maps,
    dot_precision,
    for_window,
    whole_windows,
    window_tokens,
)
from camixer_fast.kernels.tile_math import pixel_strides
from camixer_fast.backends.triton_env import interpreting


@triton.jit
def _hard_window_attention_kernel(x_ptr, k_ptr, v_ptr, sa_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr,
                                  num_hard_ptr, order_ptr, out_ptr, C, H, W, COLS, N, s_b,
                                  s_p, s_c, WS: tl.constexpr, BC: tl.constexpr,
                                  BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    # x, k_in, v and out: element (b, c, pixel p = y·W + x) at b·s_b + p·s_p + c·s_c
    # (channels-first or channels-last memory alike; p·s_p < 2³¹, the wrapper sees to it:
    # int32 there keeps the half-precision tiles within their registers); sa: (B, 1, H, W)
    i_r, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    win = tl.load(order_ptr + i_b.to(tl.int64) * N + i_r)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * s_b + o_c.to(tl.int64) * s_c           # [BC]
    pix_m = window_tokens(win, i_m, COLS, W, WS, BM)                   # [BM]
    p_m = plane[None, :] + (pix_m * s_p)[:, None]                      # [BM, BC]
    if i_r < tl.load(num_hard_ptr + i_b):
        dt = x_ptr.dtype.element_ty
        # Q·Kᵀ = (Q·Wk)·k_inᵀ + (Q·bk)·1ᵀ, and softmax ignores a per-row constant: fold Wk
        # into the queries once, then stream raw k_in tiles (bk drops out exactly)
        m_w = m_c[:, None] & m_c[None, :]
        b_wqt = tl.load(wq_ptr + o_c[None, :] * C + o_c[:, None], mask=m_w, other=0.0).to(dt)
        b_bq = tl.load(bq_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_x = tl.load(x_ptr + p_m, mask=m_c[None, :], other=0.0)      # [BM, BC]
        b_q = (tl.dot(b_x, b_wqt, input_precision=PRECISION) + b_bq[None, :]).to(dt)
        b_wk = tl.load(wk_ptr + o_c[:, None] * C + o_c[None, :], mask=m_w, other=0.0).to(dt)
        b_q = tl.dot(b_q, b_wk, input_precision=PRECISION).to(dt)     # [BM, BC] Q·Wk
        b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_li = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, BC], dtype=tl.float32)
        for i_n in range(0, WS * WS // BN):
            pix_n = window_tokens(win, i_n, COLS, W, WS, BN) * s_p     # int32: see below
            p_n = plane[None, :] + pix_n[:, None]                      # [BN, BC]
            b_kin = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_kin), input_precision=PRECISION)  # [BM, BN] fp32
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


FP32_TILES = TileConfig(16, 32, 4, 1, proven=True)
"""fp32, IEEE products on the FMA units: ran correctly on the H200 (280 µs per call at 720p).
32×32 tiles ran there too, 7% faster (261 µs), but spill registers (144 B per thread on sm_90,
848 B on sm_80, Triton 3.6 and 3.9 alike), which the JIT gate refuses; 32×32 with 8 warps
compiles without spills and is unproven on a GPU."""
HALF_TILES = TileConfig(64, 64, 4, 2, proven=True)
"""fp16 / bf16 on tensor cores: ran correctly on the H200 (28 / 26 µs per call at 720p). 64×32
was faster (24 µs) but wrong (NaN, or an illegal memory access with 8 warps): see
:mod:`camixer_fast.kernels._tiles`."""
HALF_SMALL_WINDOWS = TileConfig(64, 64, 8, 1, proven=False)
"""fp16 / bf16 for windows under 16×16: 4 warps spill registers on 8×8 windows; unproven on a
GPU."""


HALF_CHANNELS_LAST = TileConfig(64, 64, 8, 2, proven=False)
"""fp16 / bf16 on channels-last (NHWC) maps, the fused block's: with 4 warps the tiles spill
registers on sm_80 (16-48 B, the JIT gate); unproven on a GPU."""
TF32_TILES = TileConfig(64, 32, 4, 1, proven=True)
"""fp32 with TF32 products (PyTorch's TF32 switch on): ran correctly on the H200 (51 µs per
call at 720p, 2.2e-2 from the fp32 reference on random inputs; channels-first maps)."""
TF32X3_TILES = TileConfig(32, 32, 8, 1, proven=False)
"""fp32 parity on tensor cores (``tf32x3``: three TF32 products per product, ~fp32 accuracy):
the TF32 tiles spill registers (64 B per thread on sm_90, 808 B on sm_80), 32×32 with 8 warps
spills nowhere (4 warps spill on 8×8 windows); unproven on a GPU."""
TF32_EIGHT_WARPS = TileConfig(64, 32, 8, 1, proven=False)
"""TF32 on channels-last maps and on windows under 16×16: 4 warps spill registers there (8-56 B
per thread, the gates); unproven on a GPU."""
FP32_TILE_BY_PRECISION = {"ieee": FP32_TILES, "tf32": TF32_TILES, "tf32x3": TF32X3_TILES}


def tile_config(dtype: torch.dtype, window_size: int, *, channels_last: bool = False,
                precision: str | None = None) -> TileConfig:
    """The launch configuration :func:`window_attention` uses for ``dtype`` and ``window_size``
    (on channels-last maps if ``channels_last``; fp32: for the dot ``precision``, default
    :func:`~camixer_fast.kernels._tiles.dot_precision`).

    ``proven`` says whether it ran correctly on a GPU: only the 16×16 windows of the published
    models on channels-first maps did. Under the interpreter: whole windows.
    """
    if interpreting():
        return whole_windows(window_size)
    if dtype in HALF:
        if window_size < 16:
            return for_window(HALF_SMALL_WINDOWS, window_size)
        return for_window(HALF_CHANNELS_LAST if channels_last else HALF_TILES, window_size)
    precision = precision or dot_precision(dtype)
    if precision == "tf32" and (window_size < 16 or channels_last):
        return for_window(TF32_EIGHT_WARPS, window_size)
    return for_window(FP32_TILE_BY_PRECISION[precision], window_size)


def _one_layout(x: Tensor, k_in: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x, k_in, v in one layout the kernel reads in place: channels-first or channels-last
    memory as they are, channels-first copies where they differ or where pixel offsets would
    pass int32."""
    strides = pixel_strides(x)
    height, width = x.shape[2:]
    if (strides is None or not strides == pixel_strides(k_in) == pixel_strides(v)
            or height * width * strides[1] >= 2**31):
        return x.contiguous(), k_in.contiguous(), v.contiguous()
    return x, k_in, v


def hard_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                          bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor,
                          window_size: int) -> Tensor:
    """Launch the kernel on checked inputs (:func:`window_attention`): attn_out (B, C, H, W)
    in x's dtype, in the memory format of the maps as read (see :func:`_one_layout`)."""
    b, c, height, width = x.shape
    ws = window_size
    cols = width // ws
    n = (height // ws) * cols
    x, k_in, v = _one_layout(x, k_in, v)
    strides = pixel_strides(x)
    sa, wq, bq, wk, bk, num_hard, order = (
        t.contiguous() for t in (sa, wq, bq, wk, bk, num_hard, order))
    out = torch.empty_like(x)                                          # x's memory format
    precision = dot_precision(x.dtype)
    cfg = tile_config(x.dtype, ws, channels_last=strides[2] == 1 and c > 1, precision=precision)
    grid = (n, ws * ws // cfg.bm, b)
    wrap_triton(_hard_window_attention_kernel)[grid](
        x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, out, c, height, width, cols, n,
        *strides, WS=ws, BC=channel_block(c, x.dtype), BM=cfg.bm, BN=cfg.bn,
        PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _hard_window_attention_fake(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                                bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor,
                                order: Tensor, window_size: int) -> Tensor:
    return torch.empty_like(_one_layout(x, k_in, v)[0])


_hard_window_attention = kernel_op("triton_window_attention", hard_window_attention,
                                   _hard_window_attention_fake)


@autocast_entry("lower")
def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.attention_inference.window_attention`.

    x, k_in, v: (B, C, H, W); sa: (B, 1, H, W); wq, wk: (C, C); bq, bk: (C,);
    num_hard: (B,) int64; order: (B, N) int64. Returns attn_out (B, C, H, W) in x's dtype.
    Only the hard windows' pixels of ``k_in`` are read; the kernel's memory does not depend on
    K (the reference's ``chunk`` has no counterpart here).
    Compiled, the kernel is the operator ``camixer::triton_window_attention``. Under
    ``torch.autocast`` the floating inputs are cast to the autocast dtype and the kernel runs
    in it (:mod:`camixer_fast.kernels._autocast`).
    """
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
    return _hard_window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, window_size)
