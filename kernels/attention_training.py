"""Fused dense masked window attention for training (spec §4); the backward recomputes from the
log-sum-exp, dK and dV per key block, then dQ per query block (no atomics: deterministic)."""

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
    whole_windows,
    window_tokens,
)


@triton.jit
def attention_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, C, H, W, COLS, N,
                         WS: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, PRECISION: tl.constexpr):
    i_w, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W
    p_m = plane[None, :] + window_tokens(i_w, i_m, COLS, W, WS, BM)[:, None]   # [BM, BC]
    b_q = tl.load(q_ptr + p_m, mask=m_c[None, :], other=0.0)
    b_mi = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BC], dtype=tl.float32)
    for i_n in range(0, WS * WS // BN):
        p_n = plane[None, :] + window_tokens(i_w, i_n, COLS, W, WS, BN)[:, None]
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
def attention_bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                             C, H, W, COLS, N, WS: tl.constexpr, BC: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    i_w, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W
    p_n = plane[None, :] + window_tokens(i_w, i_n, COLS, W, WS, BN)[:, None]   # [BN, BC]
    b_k = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
    b_v = tl.load(v_ptr + p_n, mask=m_c[None, :], other=0.0)
    b_dk = tl.zeros([BN, BC], dtype=tl.float32)
    b_dv = tl.zeros([BN, BC], dtype=tl.float32)
    row = (i_b.to(tl.int64) * N + i_w) * WS * WS
    for i_m in range(0, WS * WS // BM):
        p_m = plane[None, :] + window_tokens(i_w, i_m, COLS, W, WS, BM)[:, None]
        o_m = i_m * BM + tl.arange(0, BM)
        b_q = tl.load(q_ptr + p_m, mask=m_c[None, :], other=0.0)
        b_do = tl.load(do_ptr + p_m, mask=m_c[None, :], other=0.0)
        b_p = tl.exp(tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
                     - tl.load(lse_ptr + row + o_m)[:, None])
        b_dv += tl.dot(tl.trans(b_p).to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - tl.load(delta_ptr + row + o_m)[:, None])
        b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(dk_ptr + p_n, b_dk.to(dk_ptr.dtype.element_ty), mask=m_c[None, :])
    tl.store(dv_ptr + p_n, b_dv.to(dv_ptr.dtype.element_ty), mask=m_c[None, :])


@triton.jit
def attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                            C, H, W, COLS, N, WS: tl.constexpr, BC: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    i_w, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    plane = i_b.to(tl.int64) * C * H * W + o_c.to(tl.int64) * H * W
    p_m = plane[None, :] + window_tokens(i_w, i_m, COLS, W, WS, BM)[:, None]
    o_m = i_m * BM + tl.arange(0, BM)
    row = (i_b.to(tl.int64) * N + i_w) * WS * WS
    b_q = tl.load(q_ptr + p_m, mask=m_c[None, :], other=0.0)
    b_do = tl.load(do_ptr + p_m, mask=m_c[None, :], other=0.0)
    b_lse = tl.load(lse_ptr + row + o_m)
    b_delta = tl.load(delta_ptr + row + o_m)
    b_dq = tl.zeros([BM, BC], dtype=tl.float32)
    for i_n in range(0, WS * WS // BN):
        p_n = plane[None, :] + window_tokens(i_w, i_n, COLS, W, WS, BN)[:, None]
        b_k = tl.load(k_ptr + p_n, mask=m_c[None, :], other=0.0)
        b_v = tl.load(v_ptr + p_n, mask=m_c[None, :], other=0.0)
        b_p = tl.exp(tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) - b_lse[:, None])
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(dq_ptr + p_m, b_dq.to(dq_ptr.dtype.element_ty), mask=m_c[None, :])


# proven: issue 9's H200 run; the others spill nowhere in the JIT gate, unproven on a GPU
FP32_FORWARD = TileConfig(16, 32, 4, 1, proven=True)
FP32_BACKWARD = TileConfig(16, 16, 4, 1, proven=True)
HALF_FORWARD = TileConfig(64, 64, 4, 1, proven=False)
HALF_BACKWARD = TileConfig(64, 64, 4, 1, proven=False)
TF32_FORWARD = TileConfig(64, 32, 4, 1, proven=False)
TF32_BACKWARD = TileConfig(64, 32, 8, 1, proven=False)
TF32X3_FORWARD = TileConfig(16, 32, 4, 1, proven=False)
TF32X3_BACKWARD = TileConfig(16, 32, 4, 1, proven=False)
FP32_TILES_BY_PRECISION = {"ieee": (FP32_FORWARD, FP32_BACKWARD),
                           "tf32": (TF32_FORWARD, TF32_BACKWARD),
                           "tf32x3": (TF32X3_FORWARD, TF32X3_BACKWARD)}


def tile_config(dtype: torch.dtype, window_size: int, *, backward: bool = False,
                precision: str | None = None) -> TileConfig:
    """Launch configuration of the training kernels (fp32 ``precision`` default: this launch's
    :func:`.helpers.dot_precision`)."""
    if interpreting():
        return whole_windows(window_size)
    if dtype in HALF:
        return for_window(HALF_BACKWARD if backward else HALF_FORWARD, window_size)
    forward, backward_cfg = FP32_TILES_BY_PRECISION[precision or dot_precision(dtype)]
    return for_window(backward_cfg if backward else forward, window_size)


def _launch_args(q: Tensor, window_size: int, backward: bool = False) -> tuple[tuple, dict]:
    b, c, height, width = q.shape
    cols = width // window_size
    n = (height // window_size) * cols
    precision = dot_precision(q.dtype)
    cfg = tile_config(q.dtype, window_size, backward=backward, precision=precision)
    meta = dict(WS=window_size, BC=channel_block(c, q.dtype), BM=cfg.bm, BN=cfg.bn,
                PRECISION=precision, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    return (c, height, width, cols, n), meta


def window_attention_core_forward(q: Tensor, k: Tensor, v: Tensor, *,
                                  window_size: int) -> tuple[Tensor, Tensor]:
    """Per-window softmax(QKᵀ)V on projected (B, C, H, W) maps: (out, lse (B, N, ws²) fp32)."""
    dims, meta = _launch_args(q, window_size)
    b, n = q.shape[0], dims[4]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(b, n, window_size * window_size, dtype=torch.float32, device=q.device)
    grid = (n, window_size * window_size // meta["BM"], b)
    wrap_triton(attention_fwd_kernel)[grid](q, k, v, out, lse, *dims, **meta)
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
    wrap_triton(attention_bwd_dkv_kernel)[(n, tokens // meta["BN"], b)](
        q, k, v, grad_out, lse, delta, dk, dv, *dims, **meta)
    wrap_triton(attention_bwd_dq_kernel)[(n, tokens // meta["BM"], b)](
        q, k, v, grad_out, lse, delta, dq, *dims, **meta)
    return dq, dk, dv


def _core_forward_fake(q: Tensor, k: Tensor, v: Tensor, *,
                       window_size: int) -> tuple[Tensor, Tensor]:
    b, _, height, width = q.shape
    n = (height // window_size) * (width // window_size)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(b, n, window_size * window_size, dtype=torch.float32))


def _core_backward_fake(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        grad_out: Tensor, *, window_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_core_forward = kernel_op("triton_window_attention_core", window_attention_core_forward,
                          _core_forward_fake)
_core_backward = kernel_op("triton_window_attention_core_backward",
                           window_attention_core_backward, _core_backward_fake)


class WindowAttentionCore(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, window_size: int) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _core_forward(q, k, v, window_size=window_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window_size = window_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _core_backward(q, k, v, out, lse, grad_out, window_size=ctx.window_size)
        return dq, dk, dv, None


@autocast_entry("lower")
def masked_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, mask: Tensor,
                            wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, *,
                            window_size: int) -> Tensor:
    """Fused twin of :func:`camixer_fast.reference.attention_training.masked_window_attention`
    (same shapes), differentiable in every input; under autocast it runs in the autocast dtype.
    ValueError for mismatched inputs."""
    b, c, height, width = check_maps(x, {"k_in": k_in, "v": v, "sa": sa, "mask": mask},
                                     window_size)
    ws = window_size
    rows, cols = height // ws, width // ws
    if tuple(mask.shape) != (b, rows * cols, 1):
        raise ValueError(f"mask: expected {(b, rows * cols, 1)}, got {tuple(mask.shape)}")
    m = mask.view(b, 1, rows, 1, cols, 1).expand(b, 1, rows, ws, cols, ws)
    m = m.reshape(b, 1, height, width)
    q = torch.nn.functional.conv2d(x * m, wq[:, :, None, None], bq)
    k = torch.nn.functional.conv2d(k_in * m, wk[:, :, None, None], bk)
    mixed = WindowAttentionCore.apply(q, k, v * m, ws)
    return mixed + v * sa * (1.0 - m)
