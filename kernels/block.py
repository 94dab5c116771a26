"""A whole block at inference (spec §2-§3), NHWC, no host sync; speed unmeasured on a GPU."""

from __future__ import annotations

import torch
from torch import Tensor

from camixer_fast.kernels.depthwise import depthwise_conv3x3
from camixer_fast.kernels.ffn import ffn_tail
from camixer_fast.kernels.helpers import autocast_dtype
from camixer_fast.kernels.mixer_tail import mixer_tail
from camixer_fast.kernels.predictor import predictor
from camixer_fast.kernels.routing import route_windows
from camixer_fast.kernels.warp import deformable_key
from camixer_fast.kernels.attention_inference import window_attention
from camixer_fast.reference.model import BlockWeights, MixerSettings, nchw, span
from camixer_fast.reference.routing import BlockRouting


def window_size_of(weights: BlockWeights) -> int:
    """The window size ws of a block: its ``out_mask`` first layer is (ws, ws²)."""
    ws = weights.mask1_w.shape[0]
    if tuple(weights.mask1_w.shape) != (ws, ws * ws):
        raise ValueError(f"mask1_w: expected (ws, ws²), got {tuple(weights.mask1_w.shape)}")
    return ws


def block_inference(weights: BlockWeights, x: Tensor, condition: Tensor,
                    settings: MixerSettings) -> tuple[Tensor, BlockRouting]:
    """x (B, H, W, C) NHWC, H and W multiples of ws, condition [Cg, Cw] (B, H, W, 4), maps and
    weights in one dtype (under autocast: the autocast dtype) -> (output (B, H, W, C) NHWC,
    :class:`BlockRouting`). RuntimeError where a gradient is needed; ValueError for bad shapes."""
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        raise RuntimeError(
            "the fused Triton block runs inference only: call it under torch.no_grad() or "
            "torch.inference_mode(), or train with model.train()")
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, H, W, C), got {tuple(x.shape)}")
    lower = autocast_dtype(x.device.type)
    if lower is not None:
        weights = BlockWeights(*(t.to(lower) for t in weights))
        with torch.autocast(x.device.type, enabled=False):
            return block_inference(weights, x.to(lower), condition.to(lower), settings)
    ws = window_size_of(weights)
    _, height, width, _ = x.shape
    if height % ws or width % ws:
        raise ValueError(f"x is {height}x{width}, not a multiple of the window size {ws}")
    if x.is_cuda:
        with torch.cuda.device(x.device):
            return _block(weights, x, condition, settings, ws)
    return _block(weights, x, condition, settings, ws)


def _block(w: BlockWeights, x: Tensor, condition: Tensor, settings: MixerSettings,
           ws: int) -> tuple[Tensor, BlockRouting]:
    with span("camixer.predictor"):
        maps = predictor(x, condition, w.v_w, w.v_b, w.route_w, w.route_b, w.route_norm_w,
                         w.route_norm_b, w.off1_w, w.off1_b, w.off2_w, w.off2_b, w.ca_w, w.ca_b,
                         w.sa_w, w.sa_b)
        routing = route_windows(maps.mean, w.mask1_w, w.mask1_b, w.mask2_w, w.mask2_b,
                                settings.gamma, window_size=ws, routing=settings.routing,
                                generator=settings.generator, tie_break=settings.tie_break)
    with span("camixer.attention"):
        x_map = nchw(x)
        k_in = deformable_key(x_map, nchw(maps.offsets), routing.num_hard, routing.order,
                              window_size=ws)
        attn = window_attention(x_map, k_in, nchw(maps.v), maps.sa, w.q_w, w.q_b, w.k_w,
                                w.k_b, routing.num_hard, routing.order, window_size=ws)
    with span("camixer.conv"):
        attn = attn.permute(0, 2, 3, 1)
        z = depthwise_conv3x3(attn, w.dw_w, w.dw_b)
        x1, u = mixer_tail(z, attn, x, maps.ca, w.dil_w, w.dil_b, w.out_w, w.out_b, w.norm1_w,
                           w.norm1_b, w.ffn_in_w)
    with span("camixer.ffn"):
        out = ffn_tail(u, x1, w.ffn_dw_w, w.ffn_out_w, w.norm2_w, w.norm2_b)
    return out, BlockRouting(routing.pred, routing.num_hard, routing.order, None)


__all__ = ["block_inference", "window_size_of"]
