"""The CAMixerSR network (spec §1–§4), module names equal to the official ones.

Read against ``spec/camixersr.md``: :class:`CAMixerSR` is §1, :class:`Block` §2, :class:`CAMixer`
§3 with its predictor :class:`Predictor` (§3.4), training mode §4.

The network owns its layouts: the body works on NHWC maps (B, H, W, C), contiguous, so that
every LayerNorm is one ``layer_norm`` over the last dimension, every 1×1 convolution one linear
map over the contiguous channels, and the spatial convolutions run on channels-last memory
(:func:`nchw` views). The hot operations -- routing, the deformable keys, the window attention
-- take (B, C, H, W) views of those maps (channels-last memory) and come from the backend
(:class:`camixer_fast.backends.Ops`) through :class:`MixerSettings`; a backend may also declare
a whole-block inference path, which gets the block's weights as :class:`BlockWeights`. Every
backend runs this very network code.
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
"""``torch.profiler`` ranges the network marks (paper Fig. 6): the predictor and routing, the
token mixing (deformable keys and window attention), the mixer's convolutions, the FFN. The rest
(head, norms, group tails, upsampler) is unmarked."""


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
    """A 1×1 convolution as the linear map it is, on the last dimension:
    (..., C_in) -> (..., C_out) (:func:`camixer_fast.reference.dense.linear`)."""
    return dense.linear(t, _matrix(conv), conv.bias)


def _matrix(conv: nn.Conv2d) -> Tensor:
    """A 1×1 convolution's weight as its (C_out, C_in) matrix (a view)."""
    return conv.weight.view(conv.weight.shape[0], conv.weight.shape[1])


def spatial(t: Tensor, conv: nn.Module) -> Tensor:
    """A spatial convolution (or a sequence of them) of an NHWC map, run on channels-last memory:
    (B, H, W, C_in) -> (B, H, W, C_out)."""
    return nhwc(conv(nchw(t)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NHWC map (..., C): per pixel, biased variance, eps 1e-6
    (spec §2; the official module normalises the channels of an NCHW map, the same numbers)."""

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
        """x (B, H, W, C) -> (B, H, W, C); with ``residual`` (B, H, W, C), residual + ffn(x).

        ``ops``: the backend's operations (default: the reference's linear maps)."""
        linear, depthwise = dense.linear if ops is None else ops.linear, dense.depthwise
        c = x.shape[-1]
        # the two halves a, b of project_in and of the depthwise conv, each on its own: no
        # (B, H, W, 2C) maps and no copy of the strided half a; the gate is b·gelu(a)
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
    """LayerNorm over the last dimension of (..., C), biased variance.

    Half-precision maps are normalised in fp32, as ``F.layer_norm`` is under ``torch.autocast``:
    in fp16 the variance's backward overflows (rsqrt of ~1e-6) and bf16 statistics keep 8 bits.
    The result has x's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.layer_norm(x.float(), weight.shape, weight.float(), bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class Predictor(nn.Module):
    """``route``: the content-aware predictor (spec §3.4) up to, not including, window scoring.

    ``out_mask`` is held here (its weights are part of the checkpoint) but applied by the
    routing operation, which needs the window layout. Its maps (c4 = (C + 4) // 4 channels) are
    NHWC like the rest of the block: the 1×1 convolutions are the backend's linear maps.
    """

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
        """v (B, H, W, C) and the conditions [Cg, Cw] (B, H, W, 4), NHWC.

        ``in_conv`` of the official ``cat([v, Cg, Cw])`` is W_v·vᵀ + W_g·[Cg, Cw]ᵀ + bias: two
        products, the second accumulating onto the first (no (C+4)-channel concatenation per
        block). Its maps stay NHWC; ``hidden`` is returned as the channels-last (B, c4, H, W)
        view. ``ops``: the backend's dense operations (default: the reference's).
        """
        linear = dense.linear if ops is None else ops.linear
        b, height, width, c = v.shape
        conv, norm = self.in_conv[0], self.in_conv[1]
        weight = conv.weight.view(conv.out_channels, c + 4)
        h = linear(condition, weight[:, c:].contiguous(), conv.bias)
        h = linear(v, weight[:, :c].contiguous(), residual=h)                   # [B, H, W, c4]
        h = self.in_conv[2](layer_norm(h, norm.weight, norm.bias, norm.eps))
        first, second = self.out_offsets[0], self.out_offsets[2]
        off = self.out_offsets[1](linear(h, _matrix(first), first.bias))
        off = linear(off, _matrix(second), second.bias)
        offsets = (torch.tanh(off) * 8.0).permute(0, 3, 1, 2).contiguous()     # [B, 2, H, W]
        ca = self.out_CA[2](F.linear(h.mean(dim=(1, 2)), _matrix(self.out_CA[1]),
                                     self.out_CA[1].bias))                      # [B, C]
        hidden = nchw(h)
        sa = self.out_SA(hidden)                                                # [B, 1, H, W]
        return PredictorOutput(hidden, offsets, ca, sa)


class MixerSettings(NamedTuple):
    """What the network passes to every block for one forward call."""

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
        self.capture: dict | None = None
        """Set to a dict to have the next forward store its intermediates there (debugging;
        maps as (B, C, H, W))."""
        self._last: BlockRouting | None = None

    def forward(self, x: Tensor, condition: Tensor, settings: MixerSettings, *,
                residual: Tensor | None = None) -> tuple[Tensor, BlockRouting]:
        """x (B, H, W, C), condition [Cg, Cw] (B, H, W, 4) -> (mixer output (B, H, W, C),
        the routing this block used); with ``residual`` (B, H, W, C), residual + the mixer
        output (added in the output projection)."""
        b, _, _, c = x.shape
        ws, ops = self.window_size, settings.ops
        mlp = self.route.out_mask
        projections = (self.project_q.weight, self.project_q.bias,
                       self.project_k.weight, self.project_k.bias)
        with span("camixer.predictor"):
            v = ops.linear(x, _matrix(self.project_v), self.project_v.bias)    # [B, H, W, C]
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
            # v and the keys are spent: their memory goes back before the convolutions allocate
            # (a smaller peak, which glibc's heap then keeps instead of trimming and refaulting)
            del v, v_map, k_in
        with span("camixer.conv"):
            dw, dil = self.conv_sptial
            y = dense.depthwise(dense.depthwise(attn, dw.weight, dw.bias), dil.weight, dil.bias,
                                dilation=2, gelu=True)
            ca = route.ca.view(b, 1, 1, c)
            if torch.is_grad_enabled():
                gated = y * ca + attn
            else:   # autograd is off: y is this call's own, overwrite it
                gated = y.mul_(ca).add_(attn)
            capturing = self.capture is not None
            out = ops.linear(gated, _matrix(self.project_out), self.project_out.bias,
                             residual=None if capturing else residual)
        if capturing:                              # the capture holds the mixer's own output
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
        """Deprecated: K per image (B,) of the last inference call; use
        ``model(x, return_routing=True)`` (:class:`~camixer_fast.reference.routing.Routing`)."""
        warnings.warn("CAMixer.last_num_hard is deprecated; use model(x, return_routing=True)",
                      DeprecationWarning, stacklevel=2)
        return None if self._last is None or self._last.num_hard is None else \
            self._last.num_hard.detach()

    @property
    def last_mask_mean(self) -> Tensor | None:
        """Deprecated: the mean training mask of the last training call (in the autograd
        graph); use ``model(x, return_routing=True)`` and ``Routing.mask_means()``."""
        warnings.warn("CAMixer.last_mask_mean is deprecated; use model(x, return_routing=True)",
                      DeprecationWarning, stacklevel=2)
        return None if self._last is None or self._last.mask is None else self._last.mask.mean()


class BlockWeights(NamedTuple):
    """A block's parameters by role, as a block-level backend path receives them.

    1×1 convolutions are given as (C_out, C_in) matrices, the spatial ones as their
    (C_out, C_in/groups, 3, 3) kernels. C channels, c4 = (C + 4) // 4, c8 = (C + 4) // 8,
    ws the window size. The LayerNorms' eps is 1e-6.
    """

    v_w: Tensor          # (C, C)      mixer.project_v
    v_b: Tensor          # (C,)
    route_w: Tensor      # (c4, C + 4) route.in_conv.0: columns [v | Cg | Cw]
    route_b: Tensor      # (c4,)
    route_norm_w: Tensor  # (c4,)      route.in_conv.1
    route_norm_b: Tensor  # (c4,)
    off1_w: Tensor       # (c8, c4)    route.out_offsets.0
    off1_b: Tensor       # (c8,)
    off2_w: Tensor       # (2, c8)     route.out_offsets.2
    off2_b: Tensor       # (2,)
    mask1_w: Tensor      # (ws, ws²)   route.out_mask.0
    mask1_b: Tensor      # (ws,)
    mask2_w: Tensor      # (2, ws)     route.out_mask.2
    mask2_b: Tensor      # (2,)
    ca_w: Tensor         # (C, c4)     route.out_CA.1
    ca_b: Tensor         # (C,)
    sa_w: Tensor         # (1, c4, 3, 3) route.out_SA.0
    sa_b: Tensor         # (1,)
    q_w: Tensor          # (C, C)      mixer.project_q
    q_b: Tensor          # (C,)
    k_w: Tensor          # (C, C)      mixer.project_k
    k_b: Tensor          # (C,)
    dw_w: Tensor         # (C, 1, 3, 3) mixer.conv_sptial.0 (padding 1)
    dw_b: Tensor         # (C,)
    dil_w: Tensor        # (C, 1, 3, 3) mixer.conv_sptial.1 (dilation 2, padding 2)
    dil_b: Tensor        # (C,)
    out_w: Tensor        # (C, C)      mixer.project_out
    out_b: Tensor        # (C,)
    norm1_w: Tensor      # (C,)
    norm1_b: Tensor      # (C,)
    ffn_in_w: Tensor     # (2C, C)     ffn.project_in (no bias)
    ffn_dw_w: Tensor     # (2C, 1, 3, 3) ffn.dwconv (no bias)
    ffn_out_w: Tensor    # (C, C)      ffn.project_out (no bias)
    norm2_w: Tensor      # (C,)
    norm2_b: Tensor      # (C,)


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
        del mixed                                  # not held through the FFN
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
    """Pad (B, C, H, W) on the bottom and right up to multiples of ``multiple``.

    Where reflect padding is defined (pad < size) this *is* ``F.pad(x, ..., mode='reflect')``,
    the official behaviour. For smaller inputs (a dimension of ``multiple // 2`` pixels or fewer)
    the reflection is continued periodically -- the mirror image of the mirror image, and so on,
    the same rule as repeating reflect padding until the size is reached; a dimension of 1 pixel
    is repeated.
    """
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
    """CAMixerSR (spec §1). Keyword-only hyperparameters; official state dicts load strictly.

    ``model(x)`` takes (B, 3, H, W) RGB in [0, 1], any H, W >= 1, and returns (B, 3, sH, sW),
    unclamped. In training mode it returns ``(sr, ratio_loss)`` (spec §4). With
    ``return_routing=True`` the :class:`~camixer_fast.reference.routing.Routing` record of the
    call is appended to what it returns.

    Attributes that may be changed at any time: ``gamma`` (in [0, 1]), ``routing``
    ("expected" or "gumbel"), ``tie_break`` ("official" or "index": the order of windows with
    equal scores, see :func:`~camixer_fast.reference.routing.window_order`), ``train_noise``
    (Gumbel noise in the training mask), ``backend``.
    """

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
        """The backend that runs the model where its parameters are now, in its current mode
        ("reference", "cpu" or "triton"; see :func:`camixer_fast.backends.select_backend`).

        May be set to "auto", "reference", "cpu" or "triton". The request is kept and chosen
        again for the device, dtype and mode of each call; setting it checks at once that it
        can run where the parameters are (RuntimeError with the reason otherwise).
        """
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
        """(B, 3, H, W) in [0, 1] -> (B, 3, sH, sW); in training mode (sr, ratio_loss).

        With ``return_routing`` the call returns ``(sr, routing)`` at inference and
        ``(sr, ratio_loss, routing)`` in training mode, ``routing`` the
        :class:`~camixer_fast.reference.routing.Routing` of every block (K, window order and
        scores per image; the training masks).

        Inputs of any H, W >= 1 are padded on the bottom and right to multiples of the window
        size (:func:`pad_to_multiple`) and the output is cropped back. ``generator`` feeds the
        random draws: Gumbel routing at inference, the Gumbel noise of the training mask.
        At inference the backend decides whether a batch runs as one call
        (``Ops.whole_batch``) or image by image; routing is per image either way, and image by
        image each output is bit-identical to a solo run of that image.
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
            # CPU conv and GEMM kernels pick their blocking from the batch size, which moves
            # results by ~1e-5: image by image, each output is bit-identical to its solo run
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
        # a fresh channels-last copy (3 channels: cheap): whatever the caller's strides, the
        # convolutions then see one layout and round the same way
        x = x.clone(memory_format=torch.channels_last)
        b, _, ph, pw = x.shape
        f0 = self.head(x)                                            # channels-last
        cw = nhwc(window_condition(ph, pw, self.window_size, dtype=f0.dtype, device=f0.device))
        condition = torch.cat([nhwc(self.global_predictor(f0)), cw.expand(b, -1, -1, -1)],
                              dim=-1)                                # [B, H, W, 4]: Cg, Cw
        records: list[BlockRouting] = []
        feat = nhwc(f0)
        for group in self.body:
            feat = group(feat, condition, settings, records)
        feat = self.body_tail(nchw(feat)) + f0
        sr = self.tail(feat)[..., : height * self.scale, : width * self.scale]
        return sr.contiguous(), Routing(tuple(records))
