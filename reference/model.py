"""The CAMixerSR network (spec §1-§4), official module names, on contiguous NHWC maps; the hot
operations come from the backend (:class:`camixer_fast.backends.Ops` in :class:`MixerSettings`).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camixer_fast.backends import Ops, select_backend
from camixer_fast.reference import dense
from camixer_fast.reference.routing import (
    BlockRouting,
    Routing,
    check_gamma,
    check_routing_mode,
    check_tie_break,
    training_mask,
)
from camixer_fast.reference.windows import window_condition

PROFILE_RANGES = ("camixer.predictor", "camixer.attention", "camixer.conv", "camixer.ffn")
"""``torch.profiler`` ranges the network marks (paper Fig. 6); head, norms, tails are unmarked."""


def span(name: str):
    """A ``record_function`` range while a profiler runs, else nothing (no cost)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return nullcontext()


def nchw(t: Tensor) -> Tensor:
    """(B, H, W, C) -> the (B, C, H, W) view of the same memory (channels-last strides)."""
    return t.permute(0, 3, 1, 2)


def nhwc(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C) contiguous: a free view of a channels-last map."""
    return t.permute(0, 2, 3, 1).contiguous()


def pointwise(t: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1×1 convolution on the last dimension: (..., C_in) -> (..., C_out)."""
    return dense.linear(t, _matrix(conv), conv.bias)


def _matrix(conv: nn.Conv2d) -> Tensor:
    return conv.weight.view(conv.weight.shape[0], conv.weight.shape[1])


def spatial(t: Tensor, conv: nn.Module) -> Tensor:
    """A spatial convolution of an NHWC map: (B, H, W, C_in) -> (B, H, W, C_out)."""
    return nhwc(conv(nchw(t)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NHWC map (..., C), biased variance, eps 1e-6 (spec §2)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.normalized_shape = (channels,)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GatedFFN(nn.Module):
    """``ffn``: 1×1 C→2C, depthwise 3×3, gelu(a)·b, 1×1 C→C; no biases (spec §2). NHWC."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels,
                                bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor, residual: Tensor | None = None, *,
                ops: Ops | None = None) -> Tensor:
        """x (B, H, W, C) -> [residual +] ffn(x) (B, H, W, C), with the backend's ``ops``."""
        linear, depthwise = dense.linear if ops is None else ops.linear, dense.depthwise
        c = x.shape[-1]
        # the halves a, b each on their own (no (B, H, W, 2C) map); the gate is b·gelu(a)
        w_in, w_dw = _matrix(self.project_in), self.dwconv.weight
        a = depthwise(linear(x, w_in[:c]), w_dw[:c], gelu=True)
        gated = depthwise(linear(x, w_in[c:]), w_dw[c:], multiply=a)
        return linear(gated, _matrix(self.project_out), residual=residual)


class PredictorOutput(NamedTuple):
    hidden: Tensor    # (B, c4, H, W) in_conv output, channels-last: the window scores' input
    offsets: Tensor   # (B, 2, H, W) contiguous, in pixels, 8·tanh applied
    ca: Tensor        # (B, C) channel attention
    sa: Tensor        # (B, 1, H, W) spatial attention


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dimension, half precision in fp32 (as autocast; fp16 overflows)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.layer_norm(x.float(), weight.shape, weight.float(), bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class Predictor(nn.Module):
    """``route`` (spec §3.4) up to window scoring; ``out_mask`` is applied by the routing op."""

    def __init__(self, channels: int, window_size: int) -> None:
        super().__init__()
        cin = channels + 4
        c4, c8 = cin // 4, cin // 8
        self.in_conv = nn.Sequential(nn.Conv2d(cin, c4, 1), LayerNorm2d(c4), nn.LeakyReLU(0.1))
        self.out_offsets = nn.Sequential(nn.Conv2d(c4, c8, 1), nn.LeakyReLU(0.1),
                                         nn.Conv2d(c8, 2, 1))
        self.out_mask = nn.Sequential(nn.Linear(window_size * window_size, window_size),
                                      nn.LeakyReLU(0.1), nn.Linear(window_size, 2),
                                      nn.Softmax(dim=-1))
        self.out_CA = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c4, channels, 1),
                                    nn.Sigmoid())
        self.out_SA = nn.Sequential(nn.Conv2d(c4, 1, 3, padding=1), nn.Sigmoid())

    def forward(self, v: Tensor, condition: Tensor, *, ops: Ops | None = None) -> PredictorOutput:
        """v (B, H, W, C), conditions [Cg, Cw] (B, H, W, 4) -> :class:`PredictorOutput`; in_conv
        of the official ``cat([v, Cg, Cw])`` as two products (no concatenation)."""
        linear = dense.linear if ops is None else ops.linear
        b, height, width, c = v.shape
        conv, norm = self.in_conv[0], self.in_conv[1]
        weight = conv.weight.view(conv.out_channels, c + 4)
        h = linear(condition, weight[:, c:].contiguous(), conv.bias)
        h = linear(v, weight[:, :c].contiguous(), residual=h)
        h = self.in_conv[2](layer_norm(h, norm.weight, norm.bias, norm.eps))
        first, second = self.out_offsets[0], self.out_offsets[2]
        off = self.out_offsets[1](linear(h, _matrix(first), first.bias))
        off = linear(off, _matrix(second), second.bias)
        offsets = (torch.tanh(off) * 8.0).permute(0, 3, 1, 2).contiguous()
        ca = self.out_CA[2](F.linear(h.mean(dim=(1, 2)), _matrix(self.out_CA[1]),
                                     self.out_CA[1].bias))
        hidden = nchw(h)
        sa = self.out_SA(hidden)
        return PredictorOutput(hidden, offsets, ca, sa)


class MixerSettings(NamedTuple):

    gamma: float
    routing: str
    tie_break: str
    generator: torch.Generator | None
    train_noise: bool
    ops: Ops


class CAMixer(nn.Module):
    """``mixer``: content-aware mixing (spec §3), on NHWC maps."""

    def __init__(self, channels: int, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.project_v = nn.Conv2d(channels, channels, 1)
        self.project_q = nn.Linear(channels, channels)
        self.project_k = nn.Linear(channels, channels)
        self.conv_sptial = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=channels),
        )
        self.project_out = nn.Conv2d(channels, channels, 1)
        self.route = Predictor(channels, window_size)
        self.capture: dict | None = None    # a dict: the next forward stores its maps there
        self._last: BlockRouting | None = None

    def forward(self, x: Tensor, condition: Tensor, settings: MixerSettings, *,
                residual: Tensor | None = None) -> tuple[Tensor, BlockRouting]:
        """x (B, H, W, C), condition [Cg, Cw] (B, H, W, 4) -> ([residual +] mixer output
        (B, H, W, C), this block's :class:`BlockRouting`)."""
        b, _, _, c = x.shape
        ws, ops = self.window_size, settings.ops
        mlp = self.route.out_mask
        projections = (self.project_q.weight, self.project_q.bias,
                       self.project_k.weight, self.project_k.bias)
        with span("camixer.predictor"):
            v = ops.linear(x, _matrix(self.project_v), self.project_v.bias)
            route = self.route(v, condition, ops=ops)
            hidden = route.hidden
            if self.training:
                pred = ops.window_scores(hidden, mlp[0].weight, mlp[0].bias, mlp[2].weight,
                                         mlp[2].bias, ws)
                mask = training_mask(pred, noise=settings.train_noise,
                                     generator=settings.generator)
                record = BlockRouting(pred, None, None, mask)
            else:
                routing = ops.route_windows(hidden, mlp[0].weight, mlp[0].bias, mlp[2].weight,
                                            mlp[2].bias, settings.gamma, window_size=ws,
                                            routing=settings.routing,
                                            generator=settings.generator,
                                            tie_break=settings.tie_break)
                record = BlockRouting(routing.pred, routing.num_hard, routing.order, None)
        x_map, v_map = nchw(x), nchw(v)
        with span("camixer.attention"):
            if self.training:
                k_in = ops.deformable_key(x_map, route.offsets)
                attn = ops.masked_window_attention(x_map, k_in, v_map, route.sa, record.mask,
                                                   *projections, window_size=ws)
            else:
                k_in = ops.deformable_key(x_map, route.offsets, record.num_hard, record.order,
                                          window_size=ws)
                attn = ops.window_attention(x_map, k_in, v_map, route.sa, *projections,
                                            record.num_hard, record.order, window_size=ws)
            attn = nhwc(attn)
        if self.capture is None:
            del v, v_map, k_in      # freed before the convolutions allocate: a lower peak
        with span("camixer.conv"):
            dw, dil = self.conv_sptial
            y = dense.depthwise(dense.depthwise(attn, dw.weight, dw.bias), dil.weight, dil.bias,
                                dilation=2, gelu=True)
            ca = route.ca.view(b, 1, 1, c)
            if torch.is_grad_enabled():
                gated = y * ca + attn
            else:
                gated = y.mul_(ca).add_(attn)
            capturing = self.capture is not None
            out = ops.linear(gated, _matrix(self.project_out), self.project_out.bias,
                             residual=None if capturing else residual)
        if capturing:
            self.capture.update(x=x_map, condition_global=nchw(condition[..., :2]),
                                pred_score=record.scores, offsets=route.offsets,
                                ca=route.ca.view(b, c, 1, 1), sa=route.sa, k_in=k_in,
                                warped_x=k_in - x_map, attn_out=nchw(attn),
                                mixer_out=nchw(out))
            if not self.training:
                self.capture.update(num_hard=record.num_hard, order=record.order)
            if residual is not None:
                out = out + residual
        return out, record

    @property
    def last_num_hard(self) -> Tensor | None:
        """Deprecated: K (B,) of the last inference; use ``model(x, return_routing=True)``."""
        warnings.warn("CAMixer.last_num_hard is deprecated; use model(x, return_routing=True)",
                      DeprecationWarning, stacklevel=2)
        return None if self._last is None or self._last.num_hard is None else \
            self._last.num_hard.detach()

    @property
    def last_mask_mean(self) -> Tensor | None:
        """Deprecated: the last training mask's mean; use ``Routing.mask_means()``."""
        warnings.warn("CAMixer.last_mask_mean is deprecated; use model(x, return_routing=True)",
                      DeprecationWarning, stacklevel=2)
        return None if self._last is None or self._last.mask is None else self._last.mask.mean()


class BlockWeights(NamedTuple):
    """A block's parameters by role (1×1 convolutions as matrices, ``*_b`` the bias of the
    ``*_w`` before it; c4 = (C + 4) // 4, c8 = (C + 4) // 8): mixer v_w, q_w, k_w, out_w (C, C);
    dw_w, dil_w (C, 1, 3, 3) conv_sptial.0 / .1; route_w (c4, C + 4) in_conv.0 (columns
    [v | Cg | Cw]); off1_w (c8, c4), off2_w (2, c8); mask1_w (ws, ws²), mask2_w (2, ws);
    ca_w (C, c4); sa_w (1, c4, 3, 3); ffn_in_w (2C, C), ffn_dw_w (2C, 1, 3, 3), ffn_out_w (C, C)."""

    v_w: Tensor
    v_b: Tensor
    route_w: Tensor
    route_b: Tensor
    route_norm_w: Tensor
    route_norm_b: Tensor
    off1_w: Tensor
    off1_b: Tensor
    off2_w: Tensor
    off2_b: Tensor
    mask1_w: Tensor
    mask1_b: Tensor
    mask2_w: Tensor
    mask2_b: Tensor
    ca_w: Tensor
    ca_b: Tensor
    sa_w: Tensor
    sa_b: Tensor
    q_w: Tensor
    q_b: Tensor
    k_w: Tensor
    k_b: Tensor
    dw_w: Tensor
    dw_b: Tensor
    dil_w: Tensor
    dil_b: Tensor
    out_w: Tensor
    out_b: Tensor
    norm1_w: Tensor
    norm1_b: Tensor
    ffn_in_w: Tensor
    ffn_dw_w: Tensor
    ffn_out_w: Tensor
    norm2_w: Tensor
    norm2_b: Tensor


class Block(nn.Module):
    """Post-norm block: x = LN1(x + mixer(x)); x = LN2(x + ffn(x)) (spec §2). NHWC."""

    def __init__(self, channels: int, window_size: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(channels)
        self.mixer = CAMixer(channels, window_size)
        self.norm2 = LayerNorm2d(channels)
        self.ffn = GatedFFN(channels)

    def weights(self) -> BlockWeights:
        """This block's parameters by role (views, no copies)."""
        m, r, f = self.mixer, self.mixer.route, self.ffn
        return BlockWeights(
            _matrix(m.project_v), m.project_v.bias, _matrix(r.in_conv[0]), r.in_conv[0].bias,
            r.in_conv[1].weight, r.in_conv[1].bias, _matrix(r.out_offsets[0]),
            r.out_offsets[0].bias, _matrix(r.out_offsets[2]), r.out_offsets[2].bias,
            r.out_mask[0].weight, r.out_mask[0].bias, r.out_mask[2].weight, r.out_mask[2].bias,
            _matrix(r.out_CA[1]), r.out_CA[1].bias, r.out_SA[0].weight, r.out_SA[0].bias,
            m.project_q.weight, m.project_q.bias, m.project_k.weight, m.project_k.bias,
            m.conv_sptial[0].weight, m.conv_sptial[0].bias, m.conv_sptial[1].weight,
            m.conv_sptial[1].bias, _matrix(m.project_out), m.project_out.bias,
            self.norm1.weight, self.norm1.bias, _matrix(f.project_in), f.dwconv.weight,
            _matrix(f.project_out), self.norm2.weight, self.norm2.bias)

    def forward(self, x: Tensor, condition: Tensor,
                settings: MixerSettings) -> tuple[Tensor, BlockRouting]:
        """x (B, H, W, C), condition (B, H, W, 4) -> (B, H, W, C) and the block's routing."""
        path = settings.ops.block_inference
        if path is not None and not self.training and self.mixer.capture is None:
            return path(self.weights(), x, condition, settings)
        mixed, record = self.mixer(x, condition, settings, residual=x)
        x = self.norm1(mixed)
        del mixed
        with span("camixer.ffn"):
            x = self.norm2(self.ffn(x, x, ops=settings.ops))
        return x, record


class Group(nn.Module):
    """``body.j``: blocks, then a 1×1 conv, plus the group's input. NHWC."""

    def __init__(self, channels: int, num_blocks: int, window_size: int) -> None:
        super().__init__()
        self.body = nn.ModuleList(Block(channels, window_size) for _ in range(num_blocks))
        self.body_tail = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, condition: Tensor, settings: MixerSettings,
                records: list[BlockRouting]) -> Tensor:
        shortcut = x
        for block in self.body:
            x, record = block(x, condition, settings)
            records.append(record)
        return settings.ops.linear(x, _matrix(self.body_tail), self.body_tail.bias,
                                   residual=shortcut)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad (B, C, H, W) on the bottom and right up to multiples of ``multiple``: the official
    reflect padding, continued periodically where the pad exceeds the size (1 pixel repeats)."""
    height, width = x.shape[-2:]
    out = x
    for dim, size in ((-2, height), (-1, width)):
        pad = (-size) % multiple
        if pad == 0:
            continue
        index = torch.arange(size + pad, device=x.device)
        if size > 1:
            period = 2 * (size - 1)
            index = index % period
            index = torch.where(index < size, index, period - index)
        else:
            index = torch.zeros_like(index)
        out = out.index_select(dim, index)
    return out


class CAMixerSR(nn.Module):
    """CAMixerSR (spec §1); official state dicts load strictly. Settable any time: ``gamma`` in
    [0, 1], ``routing`` ("expected", "gumbel"), ``tie_break`` ("official", "index":
    :func:`~camixer_fast.reference.routing.window_order`), ``train_noise``, ``backend``."""

    def __init__(self, *, n_feats: int = 36, scale: int = 4,
                 blocks_per_group: tuple[int, ...] = (4, 4, 6, 6), window_size: int = 16,
                 gamma: float = 0.5, routing: str = "expected",
                 tie_break: str = "official") -> None:
        super().__init__()
        self.n_feats, self.scale, self.window_size = n_feats, scale, window_size
        self.blocks_per_group = tuple(blocks_per_group)
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.global_predictor = nn.Sequential(
            nn.Conv2d(n_feats, 8, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(8, 2, 3, padding=1), nn.LeakyReLU(0.1),
        )
        self.body = nn.ModuleList(Group(n_feats, n, window_size) for n in self.blocks_per_group)
        self.body_tail = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.tail = nn.Sequential(nn.Conv2d(n_feats, 3 * scale * scale, 3, padding=1),
                                  nn.PixelShuffle(scale))
        self.gamma = gamma
        self.routing = routing
        self.tie_break = tie_break
        self.train_noise = True
        self._backend = "reference"

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = check_gamma(value)

    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, value: str) -> None:
        self._routing = check_routing_mode(value)

    @property
    def tie_break(self) -> str:
        return self._tie_break

    @tie_break.setter
    def tie_break(self, value: str) -> None:
        self._tie_break = check_tie_break(value)

    @property
    def backend(self) -> str:
        """The backend running the model now; set "auto", "reference", "cpu" or "triton" (chosen
        again per call; RuntimeError with the reason if it cannot run on the parameters)."""
        return self._select(self.head.weight.device, self.head.weight.dtype).name

    @backend.setter
    def backend(self, value: str) -> None:
        select_backend(value, self.head.weight.device, self.head.weight.dtype,
                       training=self.training)
        self._backend = value

    def _select(self, device: torch.device, dtype: torch.dtype):
        return select_backend(self._backend, device, dtype, training=self.training)

    def mixers(self) -> list[CAMixer]:
        """The CAMixer of every block, in network order."""
        return [block.mixer for group in self.body for block in group.body]

    def extra_repr(self) -> str:
        return (f"n_feats={self.n_feats}, scale={self.scale}, blocks={self.blocks_per_group}, "
                f"window_size={self.window_size}, gamma={self.gamma}, routing={self.routing!r}, "
                f"tie_break={self.tie_break!r}")

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None,
                return_routing: bool = False):
        """(B, 3, H, W) RGB in [0, 1], any H, W >= 1 -> (B, 3, sH, sW) unclamped; in training
        mode (sr, ratio_loss) (spec §4); ``return_routing`` appends the
        :class:`~camixer_fast.reference.routing.Routing`. ``generator`` feeds the Gumbel draws.
        Per image, outputs are bit-identical to solo runs. ValueError / TypeError for bad input.
        """
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected a (B, 3, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor in [0, 1], got {x.dtype}")
        if min(x.shape) == 0:
            raise ValueError(f"empty input {tuple(x.shape)}")
        ops = self._select(x.device, self.head.weight.dtype).ops
        settings = MixerSettings(self.gamma, self.routing, self.tie_break, generator,
                                 self.train_noise, ops)
        if self.training or x.shape[0] == 1 or ops.whole_batch:
            sr, routing = self._forward(x, settings)
        else:
            parts = [self._forward(image, settings) for image in x.split(1)]
            sr = torch.cat([p[0] for p in parts])
            routing = Routing.cat([p[1] for p in parts])
        for mixer, record in zip(self.mixers(), routing.blocks, strict=True):
            mixer._last = record
        if not self.training:
            return (sr, routing) if return_routing else sr
        m = torch.cat([b.mask.flatten() for b in routing.blocks]).mean()
        ratio_loss = 2.0 * self.gamma * (m - 0.5) ** 2
        return (sr, ratio_loss, routing) if return_routing else (sr, ratio_loss)

    def _forward(self, x: Tensor, settings: MixerSettings) -> tuple[Tensor, Routing]:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size)
        # one layout whatever the caller's strides: the convolutions round the same way
        x = x.clone(memory_format=torch.channels_last)
        b, _, ph, pw = x.shape
        f0 = self.head(x)
        cw = nhwc(window_condition(ph, pw, self.window_size, dtype=f0.dtype, device=f0.device))
        condition = torch.cat([nhwc(self.global_predictor(f0)), cw.expand(b, -1, -1, -1)],
                              dim=-1)                                # [B, H, W, 4]
        records: list[BlockRouting] = []
        feat = nhwc(f0)
        for group in self.body:
            feat = group(feat, condition, settings, records)
        feat = self.body_tail(nchw(feat)) + f0
        sr = self.tail(feat)[..., : height * self.scale, : width * self.scale]
        return sr.contiguous(), Routing(tuple(records))
