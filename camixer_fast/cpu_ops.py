"""The CPU backend: CAMixerSR inference on channels-last CPU tensors.

The five operations of :data:`camixer_fast.reference.model.REFERENCE_OPS`, same signatures and
same results up to fp32 rounding, plus ``block_forward``, the backend's inference path for a
whole :class:`~camixer_fast.reference.model.Block`. What makes the CPU path fast (measured in
``bench/RESULTS.md``):

- **Channels-last maps.** ``memory_format = torch.channels_last`` asks the model to keep its
  feature maps in NHWC memory; :func:`block_forward` then runs every 1×1 convolution as one GEMM
  over the contiguous channels, each LayerNorm as one ``layer_norm``, the depthwise
  convolutions on channels-last maps (vectorised over channels by oneDNN) and the elementwise
  tails fused (``addcmul``, in-place residual adds). NCHW 1×1 and depthwise convolutions are
  several times slower on the CPU, and ``conv2d`` itself switches layouts for one thread.
- **Work on the hard windows only.** :func:`deformable_key` samples the keys of the hard
  windows' pixels alone (four gathered bilinear taps, no full-size ``grid_sample``);
  :func:`window_attention` gathers just those windows' tokens, runs one batched
  :func:`torch.nn.functional.scaled_dot_product_attention` per chunk of windows (4-D, so the
  fused flash kernel runs; ``scale=1.0``, the network has no 1/sqrt(C) factor) and writes the
  results over ``v·sa`` in place.

The operations accept NCHW or channels-last maps and return channels-last ones. Training
(``window_scores``, ``masked_window_attention``, ``deformable_key`` without a routing, and the
model's own block code) runs the reference computation: the CPU backend is an inference path.
"""

from __future__ import annotations

import functools
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from camixer_fast.reference.model import MixerSettings, span
from camixer_fast.reference.routing import WindowRouting, flat_hard_windows, window_scores
from camixer_fast.reference.routing import route_windows as _reference_route_windows
from camixer_fast.reference.warp import deform_warp
from camixer_fast.reference.window_attention import DEFAULT_CHUNK, masked_window_attention
from camixer_fast.reference.windows import check_window_grid, window_condition


def to_nhwc(x: Tensor) -> Tensor:
    """(B, C, H, W) -> its (B, H, W, C) contiguous form: a free view of a channels-last map."""
    return x.permute(0, 2, 3, 1).contiguous()


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


def route_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma: float, *,
                  window_size: int, routing: str = "expected",
                  generator: torch.Generator | None = None,
                  tie_break: str = "official") -> WindowRouting:
    """The routing step, hidden map (B, c4, H, W) -> :class:`WindowRouting` (as the reference).

    A few thousand multiply-adds per window; the reference function is already cheap, and using
    it keeps the window order (ties included) exactly the reference's for equal scores.
    """
    return _reference_route_windows(h, w1, b1, w2, b2, gamma, window_size=window_size,
                                    routing=routing, generator=generator, tie_break=tie_break)


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


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """``k_in = x + warp(x, offsets)`` on the pixels of the hard windows, (B, C, H, W).

    x (B, C, H, W), offsets (B, 2, H, W) in pixels; ``num_hard`` (B,) and ``order`` (B, N) name
    the hard windows. Only their pixels are sampled: one ``grid_sample`` per image over the
    list of hard pixels (the reference's grid values, bilinear, border, align_corners; in fp32
    whatever x's dtype), added in place to a copy of ``x``. Elsewhere the result is ``x`` (no
    warp), which the attention never reads. Returned channels-last. Without a routing (training) the whole map
    is computed by the reference warp.
    """
    if num_hard is None or order is None:
        return x + deform_warp(x, offsets)
    _, c, height, width = x.shape
    check_window_grid(height, width, window_size)
    xh = to_nhwc(x)
    pixels = hard_window_pixels(num_hard, order, height, width, window_size)
    out = xh.clone()
    out_flat = out.view(-1, c)
    start = 0
    for i, k in enumerate(num_hard.tolist()):
        count = k * window_size * window_size
        if count == 0:
            continue
        sel = pixels[start:start + count]
        start += count
        grid = _sampling_grid(offsets[i:i + 1].float(), sel - i * height * width, width,
                              height)
        warped = F.grid_sample(x[i:i + 1].float(), grid, mode="bilinear",
                               padding_mode="border", align_corners=True)      # [1, C, P, 1]
        out_flat.index_add_(0, sel, warped.view(c, count).t().to(x.dtype))
    return out.permute(0, 3, 1, 2)


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Inference token mixing (spec §3.7) on channels-last maps; the reference's signature.

    x, k_in, v: (B, C, H, W); sa: (B, 1, H, W); wq, wk: (C, C); bq, bk: (C,); num_hard (B,),
    order (B, N). Only the hard windows' pixels of ``k_in`` are read. Returns attn_out
    (B, C, H, W), channels-last, in x's dtype (computed in fp32): ``v·sa`` on the simple
    windows, the hard windows' attention written in place, ``chunk`` windows per batched call.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
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
        wq, bq, wk, bk = wq.float(), bq.float(), wk.float(), bk.float()
        for start in range(0, pixels.numel(), chunk * tokens):
            sel = pixels[start:start + chunk * tokens]
            n = sel.numel() // tokens
            q = F.linear(xf.index_select(0, sel), wq, bq).view(n, 1, tokens, c)
            k = F.linear(kf.index_select(0, sel), wk, bk).view(n, 1, tokens, c)
            # (windows, 1 head, tokens, C): the shape the fused CPU attention kernel takes
            v_tok = vf.index_select(0, sel).view(n, 1, tokens, c)
            mixed = F.scaled_dot_product_attention(q, k, v_tok, scale=1.0)
            of.index_copy_(0, sel, mixed.view(-1, c))
    return out.to(dtype).permute(0, 3, 1, 2)


def _linear_1x1(t: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """A 1×1 convolution applied to an NHWC map (..., C_in) as a GEMM: (..., C_out)."""
    weight = conv.weight
    return F.linear(t, weight.view(weight.shape[0], weight.shape[1]), conv.bias)


def _conv_nhwc(t: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """A spatial convolution of an NHWC map (B, H, W, C_in) -> (B, H, W, C_out), channels-last."""
    return to_nhwc(conv(t.permute(0, 3, 1, 2)))


def _layer_norm(t: Tensor, norm: torch.nn.Module) -> Tensor:
    """``LayerNorm2d`` on an NHWC map: one layer_norm over the contiguous channels."""
    return F.layer_norm(t, (t.shape[-1],), norm.weight, norm.bias, norm.eps)


def _nchw(t: Tensor) -> Tensor:
    """(B, H, W, C) -> the (B, C, H, W) channels-last view of the same memory."""
    return t.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=8)
def _window_condition_nhwc(height: int, width: int, window_size: int, dtype: torch.dtype,
                           device: torch.device) -> Tensor:
    """The window condition Cw as a (1, H, W, 2) NHWC map, built once per size (a constant)."""
    return to_nhwc(window_condition(height, width, window_size, dtype=dtype, device=device))


_CONDITION_CACHE: list = [None]
"""(weak reference to Cg, [Cg, Cw] NHWC): the condition of the last forward, valid while that
very Cg tensor lives (every block of a forward gets the same Cg; the network never changes it)."""


def _condition_nhwc(condition_global: Tensor, window_size: int) -> Tensor:
    """[Cg, Cw] as one (B, H, W, 4) NHWC map, built once per forward and reused by its blocks."""
    cached = _CONDITION_CACHE[0]
    if cached is not None and cached[0]() is condition_global:
        return cached[1]
    b, _, height, width = condition_global.shape
    cw = _window_condition_nhwc(height, width, window_size, condition_global.dtype,
                                condition_global.device)
    cond = torch.cat([to_nhwc(condition_global), cw.expand(b, -1, -1, -1)], dim=-1)
    _CONDITION_CACHE[0] = (weakref.ref(condition_global), cond)
    return cond


def block_forward(block: torch.nn.Module, x: Tensor, condition_global: Tensor,
                  settings: MixerSettings) -> Tensor:
    """One :class:`~camixer_fast.reference.model.Block` at inference, on NHWC maps.

    x (B, C, H, W) (any layout), condition_global (B, 2, H, W) -> (B, C, H, W) channels-last.
    The same computation as ``Block.forward`` (spec §2-§3) with the block's own parameters:
    1×1 convolutions as GEMMs over the contiguous channels (whatever the thread count, where
    ``conv2d`` would pick a layout-changing kernel for one thread), LayerNorm as one
    ``layer_norm``, the spatial convolutions on channels-last maps, the elementwise tails fused
    into ``addcmul`` and in-place residual adds; the hot operations come from ``block.mixer.ops``.
    Sets ``mixer.last_num_hard`` and fills ``mixer.capture`` as the reference mixer does.
    """
    mixer = block.mixer
    route, ops, ws = mixer.route, mixer.ops, mixer.window_size
    mlp = route.out_mask
    b, c, height, width = x.shape
    xh = to_nhwc(x)
    with span("camixer.predictor"):
        v = _linear_1x1(xh, mixer.project_v)                                  # [B, H, W, C]
        # in_conv(cat[v, Cg, Cw]) as [Cg, Cw]·W_gᵀ + bias + v·W_vᵀ: no (C+4)-channel copy
        in_conv = route.in_conv[0]
        weight = in_conv.weight.view(in_conv.out_channels, c + 4)
        hidden = F.linear(_condition_nhwc(condition_global, ws), weight[:, c:], in_conv.bias)
        hidden = torch.addmm(hidden.view(-1, in_conv.out_channels), v.view(-1, c),
                             weight[:, :c].t())
        hidden = _layer_norm(hidden.view(b, height, width, -1), route.in_conv[1])
        hidden = F.leaky_relu_(hidden, 0.1)                                   # [B, H, W, c4]
        off = F.leaky_relu_(_linear_1x1(hidden, route.out_offsets[0]), 0.1)
        offsets = _nchw(torch.tanh_(_linear_1x1(off, route.out_offsets[2])).mul_(8.0))
        ca = torch.sigmoid_(_linear_1x1(hidden.mean(dim=(1, 2)), route.out_CA[1]))  # [B, C]
        sa = torch.sigmoid_(route.out_SA[0](_nchw(hidden)))                   # [B, 1, H, W]
        routing = ops.route_windows(_nchw(hidden), mlp[0].weight, mlp[0].bias, mlp[2].weight,
                                    mlp[2].bias, settings.gamma, window_size=ws,
                                    routing=settings.routing, generator=settings.generator,
                                    tie_break=settings.tie_break)
        mixer.last_num_hard = routing.num_hard.detach()
    with span("camixer.attention"):
        x_map = _nchw(xh)
        k_in = ops.deformable_key(x_map, offsets, routing.num_hard, routing.order,
                                  window_size=ws)
        attn = ops.window_attention(x_map, k_in, _nchw(v), sa, mixer.project_q.weight,
                                    mixer.project_q.bias, mixer.project_k.weight,
                                    mixer.project_k.bias, routing.num_hard, routing.order,
                                    window_size=ws)
        attn = to_nhwc(attn)
    with span("camixer.conv"):
        y = _conv_nhwc(_conv_nhwc(attn, mixer.conv_sptial[0]), mixer.conv_sptial[1])
        mixed = _linear_1x1(torch.addcmul(attn, F.gelu(y), ca.view(b, 1, 1, c)),
                            mixer.project_out)
    if mixer.capture is not None:
        mixer.capture.update(x=x, condition_global=condition_global, pred_score=routing.pred,
                             offsets=offsets, ca=ca.view(b, c, 1, 1), sa=sa, k_in=k_in,
                             warped_x=k_in - x_map, attn_out=_nchw(attn),
                             mixer_out=_nchw(mixed.clone()), num_hard=routing.num_hard,
                             order=routing.order)
    xh = _layer_norm(mixed.add_(xh), block.norm1)
    with span("camixer.ffn"):
        ffn = block.ffn
        t = _conv_nhwc(_linear_1x1(xh, ffn.project_in), ffn.dwconv)           # [B, H, W, 2C]
        # gelu of a contiguous copy of the first half: on the strided half it is slower
        t = F.gelu(t[..., :c].contiguous()).mul_(t[..., c:])
        t = _linear_1x1(t, ffn.project_out)
    return _nchw(_layer_norm(t.add_(xh), block.norm2))


CPU_OPS = SimpleNamespace(
    name="cpu",
    memory_format=torch.channels_last,
    route_windows=route_windows,
    window_scores=window_scores,
    deformable_key=deformable_key,
    window_attention=window_attention,
    masked_window_attention=masked_window_attention,
    block_forward=block_forward,
)
"""The CPU backend's operation table; ``memory_format`` asks the model for channels-last maps."""
