"""The CPU backend's operations: CAMixerSR inference on channels-last CPU tensors.

The hot operations of :class:`camixer_fast.backends.Ops` with the reference twins' signatures
and results up to fp32 rounding; the network (its own code, NHWC, see
:mod:`camixer_fast.reference.model`) calls them. What makes them fast (measured in
``bench/RESULTS.md``): they work on the hard windows only.

- :func:`deformable_key` samples the keys of the hard windows' pixels alone (one
  ``grid_sample`` over that list per image, no full-size warp).
- :func:`window_attention` gathers just those windows' tokens, projects the queries with the
  key projection folded in (:func:`folded_query`; the keys are the raw ``k_in``), runs one batched
  :func:`torch.nn.functional.scaled_dot_product_attention` per chunk of windows (4-D, so the
  fused CPU kernel runs; ``scale=1.0``, the network has no 1/sqrt(C) factor) and writes the
  results over ``v·sa`` in place.

They accept NCHW or channels-last maps and return channels-last ones. Window scoring, the
routing and the training operations are the reference's (the CPU backend ``trains_as``
"reference").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camixer_fast import cpu_dense
from camixer_fast.backends import Ops
from camixer_fast.custom_ops import NAMESPACE, needs_grad, reference_route_windows, tracing
from camixer_fast.reference.attention_inference import DEFAULT_CHUNK
from camixer_fast.reference.attention_training import masked_window_attention
from camixer_fast.reference.routing import flat_hard_windows, window_scores
from camixer_fast.reference.warp import deform_warp
from camixer_fast.reference.windows import check_window_grid


def to_nhwc(x: Tensor) -> Tensor:
    """(B, C, H, W) -> its (B, H, W, C) contiguous form: a free view of a channels-last map."""
    return x.permute(0, 2, 3, 1).contiguous()


def _channels_last_like(x: Tensor, *args: object) -> Tensor:
    """The fake kernel of both operators: a channels-last map shaped and typed like x."""
    return torch.empty_like(x, memory_format=torch.channels_last)


def hard_window_pixels(num_hard: Tensor, order: Tensor, height: int, width: int,
                       window_size: int) -> Tensor:
    """Flat pixel indices of the hard windows' tokens, (ΣK·ws²,) int64.

    Index ``b·H·W + row·W + column`` into a (B·H·W, C) NHWC map; hard windows follow each other
    as in :func:`~camixer_fast.reference.routing.flat_hard_windows` (images in order, windows by
    descending score), each as its ws² tokens row-major.
    """
    image, window = flat_hard_windows(num_hard, order)
    cols = width // window_size
    top = torch.div(window, cols, rounding_mode="floor") * window_size
    left = (window % cols) * window_size
    ramp = torch.arange(window_size, device=order.device)
    corner = image * (height * width) + top * width + left                   # [n]
    inside = ramp.view(-1, 1) * width + ramp.view(1, -1)                      # [ws, ws]
    return (corner.view(-1, 1, 1) + inside).reshape(-1)


def _sampling_grid(offsets: Tensor, pixels: Tensor, width: int, height: int) -> Tensor:
    """The reference warp's ``grid_sample`` grid at the given pixels of one image, (1, P, 1, 2).

    offsets (1, 2, H, W); pixels (P,) flat indices ``row·W + column``. The same arithmetic as
    :func:`~camixer_fast.reference.warp.deform_warp`, so the grid values are the same bits.
    """
    dtype = offsets.dtype
    rows = torch.div(pixels, width, rounding_mode="floor")
    cols = pixels - rows * width
    off = offsets.reshape(2, -1)[:, pixels]                                   # [2, P]
    gx = 2.0 * (cols.to(dtype) + off[0]) / max(width - 1, 1) - 1.0
    gy = 2.0 * (rows.to(dtype) + off[1]) / max(height - 1, 1) - 1.0
    return torch.stack((gx, gy), dim=-1).view(1, -1, 1, 2)


def hard_deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor, order: Tensor,
                        window_size: int) -> Tensor:
    """The routed case of :func:`deformable_key` (the operator ``camixer::cpu_deformable_key``)."""
    _, c, height, width = x.shape
    check_window_grid(height, width, window_size)
    xh = to_nhwc(x)
    pixels = hard_window_pixels(num_hard, order, height, width, window_size)
    area, tokens = height * width, window_size * window_size
    counts = [k * tokens for k in num_hard.tolist()]
    # where every window is hard, every pixel is written below: no copy of x first
    out = torch.empty_like(xh) if min(counts) == area else xh.clone()
    out_flat, x_flat = out.view(-1, c), xh.view(-1, c)
    start = 0
    for i, count in enumerate(counts):
        if count == 0:
            continue
        image = slice(i * area, (i + 1) * area)
        # every window hard: the pixels in raster order, so the sum can be written in place
        sel = torch.arange(image.start, image.stop, device=x.device) if count == area else \
            pixels[start:start + count]
        start += count
        grid = _sampling_grid(offsets[i:i + 1].float(), sel - i * area, width, height)
        warped = F.grid_sample(x[i:i + 1].float(), grid, mode="bilinear",
                               padding_mode="border", align_corners=True)      # [1, C, P, 1]
        warped = warped.view(c, count).t().to(x.dtype)
        if count == area and not torch.is_grad_enabled():
            torch.add(x_flat[image], warped, out=out_flat[image])
        else:
            # gather, add, index_copy_: index_add_ would run as a serial scatter
            out_flat.index_copy_(0, sel, torch.add(x_flat.index_select(0, sel), warped))
    return out.permute(0, 3, 1, 2)


_deformable_key_op = torch.library.custom_op(f"{NAMESPACE}::cpu_deformable_key",
                                             hard_deformable_key, mutates_args=())
_deformable_key_op.register_fake(_channels_last_like)


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """``k_in = x + warp(x, offsets)`` on the pixels of the hard windows, (B, C, H, W).

    x (B, C, H, W), offsets (B, 2, H, W) in pixels; ``num_hard`` (B,) and ``order`` (B, N) name
    the hard windows. Only their pixels are sampled: one ``grid_sample`` per image over the
    list of hard pixels (the reference's grid values, bilinear, border, align_corners; in fp32
    whatever x's dtype), added in place to a copy of ``x``. Elsewhere the result is ``x`` (no
    warp), which the attention never reads. Returned channels-last. Without a routing
    (training) the whole map is computed by the reference warp. One operator while traced
    (:mod:`camixer_fast.custom_ops`).
    """
    if num_hard is None or order is None:
        return x + deform_warp(x, offsets)
    if not tracing() or needs_grad(x, offsets):
        return hard_deformable_key(x, offsets, num_hard, order, window_size)
    check_window_grid(x.shape[2], x.shape[3], window_size)
    return _deformable_key_op(x, offsets, num_hard, order, window_size)


def folded_query(wq: Tensor, bq: Tensor, wk: Tensor) -> tuple[Tensor, Tensor]:
    """The key projection folded into the query's: (W, b) with Q·Kᵀ = (x·Wᵀ + b)·k_inᵀ + r.

    Q = x·Wqᵀ + bq and K = k_in·Wkᵀ + bk give Q·Kᵀ = (Q·Wk)·k_inᵀ + (Q·bk)·1ᵀ. The last term is
    the same for every key of a query's row, and a softmax over the keys drops it, so the
    attention weights are those of Q' = x·(Wkᵀ·Wq)ᵀ + Wkᵀ·bq against the raw keys k_in: one
    projection instead of two. wq, wk (C, C), bq (C,) -> W (C, C), b (C,).
    """
    return wk.t() @ wq, wk.t() @ bq


def hard_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                          bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor,
                          window_size: int, chunk: int) -> Tensor:
    """The implementation of :func:`window_attention` (the operator
    ``camixer::cpu_window_attention``)."""
    dtype = x.dtype
    _, c, height, width = x.shape
    check_window_grid(height, width, window_size)
    vh = to_nhwc(v.float())
    pixels = hard_window_pixels(num_hard, order, height, width, window_size)
    if pixels.numel() == vh.shape[0] * height * width:
        out = torch.empty_like(vh)                               # every window is attended
    else:
        out = vh * to_nhwc(sa.float())                           # v·sa on the simple windows
    if pixels.numel():
        tokens = window_size * window_size
        xf, kf, vf = (t.view(-1, c) for t in (to_nhwc(x.float()), to_nhwc(k_in.float()), vh))
        of = out.view(-1, c)
        wqk, bqk = folded_query(wq.float(), bq.float(), wk.float())
        for start in range(0, pixels.numel(), chunk * tokens):
            sel = pixels[start:start + chunk * tokens]
            n = sel.numel() // tokens
            q = cpu_dense.linear(xf.index_select(0, sel), wqk, bqk).view(n, 1, tokens, c)
            k = kf.index_select(0, sel).view(n, 1, tokens, c)
            # (windows, 1 head, tokens, C): the shape the fused CPU attention kernel takes
            v_tok = vf.index_select(0, sel).view(n, 1, tokens, c)
            mixed = F.scaled_dot_product_attention(q, k, v_tok, scale=1.0)
            of.index_copy_(0, sel, mixed.view(-1, c))
    return out.to(dtype).permute(0, 3, 1, 2)


_window_attention_op = torch.library.custom_op(f"{NAMESPACE}::cpu_window_attention",
                                               hard_window_attention, mutates_args=())
_window_attention_op.register_fake(_channels_last_like)


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Inference token mixing (spec §3.7) on channels-last maps; the reference's signature.

    x, k_in, v: (B, C, H, W); sa: (B, 1, H, W); wq, wk: (C, C); bq, bk: (C,); num_hard (B,),
    order (B, N). Only the hard windows' pixels of ``k_in`` are read. Returns attn_out
    (B, C, H, W), channels-last, in x's dtype (computed in fp32): ``v·sa`` on the simple
    windows, the hard windows' attention written in place, ``chunk`` windows per batched call.
    The key projection is folded into the query's (:func:`folded_query`), so ``bk`` drops out.
    One operator while traced (:mod:`camixer_fast.custom_ops`).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not tracing() or needs_grad(x, k_in, v, sa, wq, bq, wk, bk):
        return hard_window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                                     window_size, chunk)
    check_window_grid(x.shape[2], x.shape[3], window_size)
    return _window_attention_op(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, window_size,
                                chunk)


CPU_OPS = Ops(reference_route_windows, window_scores, deformable_key, window_attention,
              masked_window_attention, cpu_dense.linear, cpu_dense.depthwise)
"""The CPU backend's operations; training runs the reference's (the backend ``trains_as``
"reference")."""
