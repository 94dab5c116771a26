"""Fused window attention: self-attention on hard windows, ``v·sa`` on simple ones (spec §3.7, §4).

Twin of :mod:`camixer_fast.reference.window_attention`. Inference: one program per (rank,
query block, image) over every window of every image -- a flat list, not a padded B×K
rectangle: the window of rank r of image b is ``order[b, r]``; ranks below the image's K are
attended, the others get ``v·sa``. A program reads its window's pixels straight from the
(B, C, H, W) maps through the window index, applies ``project_q`` / ``project_k`` in the kernel,
runs an online softmax in fp32 over the window's keys, and writes its rows of ``attn_out`` in
place: no gather copy, no scatter copy, no K-dependent memory. The key projection is folded
into the queries (Q·Kᵀ = (Q·Wk)·k_inᵀ + a per-row constant that softmax drops), so the key loop
streams raw ``k_in`` tiles like flash attention.

Training (dense masked form over all windows): the projections and masks are a few elementwise
and linear PyTorch ops; the attention itself -- softmax(QKᵀ)V per window, forward and backward --
runs in the kernels below on the (B, C, H, W) maps, wrapped in a ``torch.autograd.Function``.
C need not be a power of two: channels are padded inside the kernels with masks.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _window_tokens(win, i_blk, COLS, W, WS: tl.constexpr, BT: tl.constexpr):
    """Flat pixel offsets [BT] of tokens i_blk·BT ... of window ``win`` (row-major tokens)."""
    o_t = i_blk * BT + tl.arange(0, BT)
    return ((win // COLS) * WS + o_t // WS) * W + (win % COLS) * WS + o_t % WS


@triton.jit
def _hard_window_attention_kernel(x_ptr, k_ptr, v_ptr, sa_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr,
                                  num_hard_ptr, order_ptr, out_ptr, C, H, W, COLS, N,
                                  WS: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
                                  BN: tl.constexpr, PRECISION: tl.constexpr):
    i_r, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    win = tl.load(order_ptr + i_b.to(tl.int64) * N + i_r)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W   # [BC]
    pix_m = _window_tokens(win, i_m, COLS, W, WS, BM)                  # [BM]
    p_m = plane[None, :] + pix_m[:, None]                              # [BM, BC]
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
            p_n = plane[None, :] + _window_tokens(win, i_n, COLS, W, WS, BN)[:, None]  # [BN, BC]
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


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class AttentionConfig(NamedTuple):
    bm: int          # query tokens per program
    bn: int          # key tokens per inner step
    num_warps: int


def attention_config(dtype: torch.dtype, window_size: int, *,
                     backward: bool = False) -> AttentionConfig:
    """The launch configuration the wrappers use for ``dtype`` and ``window_size``.

    On a GPU: the largest tiles that compile without register spills on sm_80 and sm_90 (the
    compile gate checks every one): fp32 with IEEE products runs on the FMA units and needs
    small 16×32 tiles (16×16 in the backward); fp16 / bf16 use tensor cores with 64×32 tiles and
    8 warps. Under the interpreter, whole windows: fewer, larger programs run faster there.
    """
    tokens = window_size * window_size
    if interpreting():
        return AttentionConfig(tokens, tokens, 4)
    if dtype == torch.float32:
        return AttentionConfig(min(16, tokens), min(16 if backward else 32, tokens), 4)
    return AttentionConfig(min(64, tokens), min(32, tokens), 8)


def channel_block(channels: int) -> int:
    """Channels padded (with masks, in the kernel) to a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(channels))


def _precision(x: Tensor) -> str:
    # IEEE fp32 products where parity is tested; tensor cores for fp16 / bf16 inputs
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check_maps(x: Tensor, others: dict[str, Tensor], window_size: int) -> tuple[int, ...]:
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W), got {tuple(x.shape)}")
    b, c, height, width = x.shape
    ws = window_size
    if height % ws or width % ws:
        raise ValueError(f"x is {height}x{width}, not a multiple of the window size {ws}")
    if ws & (ws - 1) or ws < 4:
        raise ValueError(f"window_size must be a power of two >= 4 for the kernels, got {ws}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x: dtype {x.dtype} not supported (float32, float16, bfloat16)")
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.is_floating_point() and t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype}, x is {x.dtype}")
    return b, c, height, width


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, chunk: int | None = None) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.window_attention.window_attention`.

    x, k_in, v: (B, C, H, W); sa: (B, 1, H, W); wq, wk: (C, C); bq, bk: (C,);
    num_hard: (B,) int64; order: (B, N) int64. Returns attn_out (B, C, H, W) in x's dtype.
    Only the hard windows' pixels of ``k_in`` are read. ``chunk`` is accepted for signature
    compatibility and ignored: the kernel's memory does not depend on K.
    """
    b, c, height, width = _check_maps(x, {"k_in": k_in, "v": v, "sa": sa, "wq": wq, "bq": bq,
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
    ws = window_size
    cols = width // ws
    n = (height // ws) * cols
    if tuple(num_hard.shape) != (b,) or tuple(order.shape) != (b, n):
        raise ValueError(f"num_hard {tuple(num_hard.shape)} / order {tuple(order.shape)} do not "
                         f"fit {b} images of {n} windows")
    x, k_in, v, sa, wq, bq, wk, bk, num_hard, order = (
        t.contiguous() for t in (x, k_in, v, sa, wq, bq, wk, bk, num_hard, order))
    out = torch.empty_like(x)
    cfg = attention_config(x.dtype, ws)
    grid = (n, ws * ws // cfg.bm, b)
    _hard_window_attention_kernel[grid](x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, out,
                                        c, height, width, cols, n, WS=ws,
                                        BC=channel_block(c), BM=cfg.bm, BN=cfg.bn,
                                        PRECISION=_precision(x), num_warps=cfg.num_warps,
                                        num_stages=1)
    return out


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, C, H, W, COLS, N,
                          WS: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, PRECISION: tl.constexpr):
    """softmax(QKᵀ)V of window ``i_w``'s query block ``i_m``; Q, K, V already projected."""
    i_w, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W   # [BC]
    p_m = plane[None, :] + _window_tokens(i_w, i_m, COLS, W, WS, BM)[:, None]   # [BM, BC]
    b_q = tl.load(q_ptr + p_m, mask=m_c[None, :], other=0.0)          # [BM, BC]
    b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BC], dtype=tl.float32)
    for i_n in range(0, WS * WS // BN):
        p_n = plane[None, :] + _window_tokens(i_w, i_n, COLS, W, WS, BN)[:, None]
        b_k = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BM, BN]
        b_mnew = tl.maximum(b_mi, tl.max(b_s, axis=1))
        b_alpha = tl.exp(b_mi - b_mnew)
        b_p = tl.exp(b_s - b_mnew[:, None])
        b_li = b_li * b_alpha + tl.sum(b_p, axis=1)
        b_v = tl.load(v_ptr + p_n, mask=m_c[None, :], other=0.0)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v,
                                                  input_precision=PRECISION)
        b_mi = b_mnew
    tl.store(out_ptr + p_m, (b_acc / b_li[:, None]).to(out_ptr.dtype.element_ty),
             mask=m_c[None, :])
    o_m = i_m * BM + tl.arange(0, BM)
    tl.store(lse_ptr + (i_b.to(tl.int64) * N + i_w) * WS * WS + o_m, b_mi + tl.log(b_li))


@triton.jit
def _attention_bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                              C, H, W, COLS, N, WS: tl.constexpr, BC: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of window ``i_w``'s key block ``i_n``, summed over its query blocks."""
    i_w, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W
    p_n = plane[None, :] + _window_tokens(i_w, i_n, COLS, W, WS, BN)[:, None]   # [BN, BC]
    b_k = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
    b_v = tl.load(v_ptr + p_n, mask=m_c[None, :], other=0.0)
    b_dk = tl.zeros([BN, BC], dtype=tl.float32)
    b_dv = tl.zeros([BN, BC], dtype=tl.float32)
    row = (i_b.to(tl.int64) * N + i_w) * WS * WS
    for i_m in range(0, WS * WS // BM):
        p_m = plane[None, :] + _window_tokens(i_w, i_m, COLS, W, WS, BM)[:, None]
        o_m = i_m * BM + tl.arange(0, BM)
        b_q = tl.load(q_ptr + p_m, mask=m_c[None, :], other=0.0)
        b_do = tl.load(do_ptr + p_m, mask=m_c[None, :], other=0.0)
        b_p = tl.exp(tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
                     - tl.load(lse_ptr + row + o_m)[:, None])          # [BM, BN]
        b_dv += tl.dot(tl.trans(b_p).to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - tl.load(delta_ptr + row + o_m)[:, None])
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(dk_ptr + p_n, b_dk.to(dk_ptr.dtype.element_ty), mask=m_c[None, :])
    tl.store(dv_ptr + p_n, b_dv.to(dv_ptr.dtype.element_ty), mask=m_c[None, :])


@triton.jit
def _attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                             C, H, W, COLS, N, WS: tl.constexpr, BC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of window ``i_w``'s query block ``i_m`` (a second pass: no atomics, deterministic)."""
    i_w, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W
    p_m = plane[None, :] + _window_tokens(i_w, i_m, COLS, W, WS, BM)[:, None]   # [BM, BC]
    o_m = i_m * BM + tl.arange(0, BM)
    row = (i_b.to(tl.int64) * N + i_w) * WS * WS
    b_q = tl.load(q_ptr + p_m, mask=m_c[None, :], other=0.0)
    b_do = tl.load(do_ptr + p_m, mask=m_c[None, :], other=0.0)
    b_lse = tl.load(lse_ptr + row + o_m)
    b_delta = tl.load(delta_ptr + row + o_m)
    b_dq = tl.zeros([BM, BC], dtype=tl.float32)
    for i_n in range(0, WS * WS // BN):
        p_n = plane[None, :] + _window_tokens(i_w, i_n, COLS, W, WS, BN)[:, None]
        b_k = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
        b_v = tl.load(v_ptr + p_n, mask=m_c[None, :], other=0.0)
        b_p = tl.exp(tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) - b_lse[:, None])
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(dq_ptr + p_m, b_dq.to(dq_ptr.dtype.element_ty), mask=m_c[None, :])


def _launch_args(q: Tensor, window_size: int, backward: bool = False) -> tuple[tuple, dict]:
    b, c, height, width = q.shape
    cols = width // window_size
    n = (height // window_size) * cols
    cfg = attention_config(q.dtype, window_size, backward=backward)
    meta = dict(WS=window_size, BC=channel_block(c), BM=cfg.bm, BN=cfg.bn,
                PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=1)
    return (c, height, width, cols, n), meta


def window_attention_core_forward(q: Tensor, k: Tensor, v: Tensor, *,
                                  window_size: int) -> tuple[Tensor, Tensor]:
    """Per-window softmax(QKᵀ)V on projected (B, C, H, W) maps: (out, lse (B, N, ws²) fp32)."""
    dims, meta = _launch_args(q, window_size)
    b, n = q.shape[0], dims[4]
    out = torch.empty_like(q)
    lse = torch.empty(b, n, window_size * window_size, dtype=torch.float32, device=q.device)
    grid = (n, window_size * window_size // meta["BM"], b)
    _attention_fwd_kernel[grid](q, k, v, out, lse, *dims, **meta)
    return out, lse


def window_attention_core_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                   grad_out: Tensor, *,
                                   window_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) of :func:`window_attention_core_forward`, all (B, C, H, W)."""
    dims, meta = _launch_args(q, window_size, backward=True)
    b, n = q.shape[0], dims[4]
    grad_out = grad_out.contiguous()
    # Δ = rowsum(dO ⊙ O) per token, in the lse layout (B, N, ws²)
    delta = (grad_out.float() * out.float()).sum(1)
    rows, cols = q.shape[2] // window_size, q.shape[3] // window_size
    delta = delta.view(b, rows, window_size, cols, window_size).permute(0, 1, 3, 2, 4)
    delta = delta.reshape(b, n, window_size * window_size).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tokens = window_size * window_size
    _attention_bwd_dkv_kernel[(n, tokens // meta["BN"], b)](q, k, v, grad_out, lse, delta, dk,
                                                             dv, *dims, **meta)
    _attention_bwd_dq_kernel[(n, tokens // meta["BM"], b)](q, k, v, grad_out, lse, delta, dq,
                                                            *dims, **meta)
    return dq, dk, dv


class WindowAttentionCore(torch.autograd.Function):
    """Autograd wrapper of the dense per-window attention kernels (training)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, window_size: int) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = window_attention_core_forward(q, k, v, window_size=window_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window_size = window_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = window_attention_core_backward(q, k, v, out, lse, grad_out,
                                                    window_size=ctx.window_size)
        return dq, dk, dv, None


def masked_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, mask: Tensor,
                            wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, *,
                            window_size: int) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.window_attention.masked_window_attention`.

    x, k_in, v: (B, C, H, W); sa: (B, 1, H, W); mask: (B, N, 1) straight-through 0/1 mask.
    ``attn_out = softmax(QKᵀ)·(v·M) + (v·sa)·(1 − M)`` with Q, K projected from the masked
    inputs; differentiable in every input.
    """
    b, c, height, width = _check_maps(x, {"k_in": k_in, "v": v, "sa": sa, "mask": mask},
                                      window_size)
    ws = window_size
    rows, cols = height // ws, width // ws
    if tuple(mask.shape) != (b, rows * cols, 1):
        raise ValueError(f"mask: expected {(b, rows * cols, 1)}, got {tuple(mask.shape)}")
    m = mask.view(b, 1, rows, 1, cols, 1).expand(b, 1, rows, ws, cols, ws)
    m = m.reshape(b, 1, height, width)                                 # the mask per pixel
    q = torch.nn.functional.conv2d(x * m, wq[:, :, None, None], bq)    # per-token Linear
    k = torch.nn.functional.conv2d(k_in * m, wk[:, :, None, None], bk)
    mixed = WindowAttentionCore.apply(q, k, v * m, ws)
    return mixed + v * sa * (1.0 - m)
