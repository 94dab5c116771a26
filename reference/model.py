"""The CAMixerSR network (spec §1–§4), module names equal to the official ones.

Read against ``spec/camixersr.md``: :class:`CAMixerSR` is §1, :class:`Block` §2, :class:`CAMixer`
§3 with its predictor :class:`Predictor` (§3.4), training mode §4. The three hot operations --
routing, the deformable warp and the window attention -- are not written inline: the mixer calls
them through ``self.ops`` (this package's functions by default, the fused kernels with the Triton
backend), so both backends run the very same network code.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camixer_fast.reference.routing import (
    check_gamma,
    check_routing_mode,
    check_tie_break,
    route_windows,
    training_mask,
    window_scores,
)
from camixer_fast.reference.warp import deformable_key
from camixer_fast.reference.window_attention import masked_window_attention, window_attention
from camixer_fast.reference.windows import window_condition

REFERENCE_OPS = SimpleNamespace(
    name="reference",
    route_windows=route_windows,
    window_scores=window_scores,
    deformable_key=deformable_key,
    window_attention=window_attention,
    masked_window_attention=masked_window_attention,
)
"""The operations the mixer calls; a backend provides the same five functions."""


PROFILE_RANGES = ("camixer.predictor", "camixer.attention", "camixer.conv", "camixer.ffn")
"""``torch.profiler`` ranges the network marks (paper Fig. 6): the predictor and routing, the
token mixing (deformable keys and window attention), the mixer's convolutions, the FFN. The rest
(head, norms, group tails, upsampler) is unmarked."""


def span(name: str):
    """A ``record_function`` range while a profiler runs, else nothing (no cost)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return nullcontext()


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm: per pixel over C, biased variance, eps 1e-6 (spec §2)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GatedFFN(nn.Module):
    """``ffn``: 1×1 C→2C, depthwise 3×3, gelu(a)·b, 1×1 C→C; no biases (spec §2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels,
                                bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class PredictorOutput(NamedTuple):
    hidden: Tensor    # (B, c4, H, W) in_conv output, the input of the window scores
    offsets: Tensor   # (B, 2, H, W) in pixels, 8·tanh applied
    ca: Tensor        # (B, C, 1, 1) channel attention
    sa: Tensor        # (B, 1, H, W) spatial attention


class Predictor(nn.Module):
    """``route``: the content-aware predictor (spec §3.4) up to, not including, window scoring.

    ``out_mask`` is held here (its weights are part of the checkpoint) but applied by the
    routing operation, which needs the window layout.
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

    def forward(self, x: Tensor) -> PredictorOutput:
        h = self.in_conv(x)
        offsets = torch.tanh(self.out_offsets(h)) * 8.0
        return PredictorOutput(h, offsets, self.out_CA(h), self.out_SA(h))


class MixerSettings(NamedTuple):
    """What the network passes to every mixer for one forward call."""

    gamma: float
    routing: str
    tie_break: str
    generator: torch.Generator | None
    train_noise: bool


class CAMixer(nn.Module):
    """``mixer``: content-aware mixing (spec §3)."""

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
        self.ops = REFERENCE_OPS
        self.capture: dict | None = None
        """Set to a dict to have the next forward store its intermediates there (debugging)."""
        self.last_num_hard: Tensor | None = None
        """K per image (B,) of the last inference call: the routing actually used."""
        self.last_mask_mean: Tensor | None = None
        """Mean of the training mask (B, N, 1) of the last training call, the fraction of
        windows sent to attention: a 0-dim tensor still in the autograd graph."""

    def forward(self, x: Tensor, condition_global: Tensor,
                settings: MixerSettings) -> tuple[Tensor, Tensor | None]:
        """x (B, C, H, W), condition_global (B, 2, H, W) -> (mixer output, training mask or None).

        The mask (B, N, 1) is returned in training mode only, for the ratio loss.
        """
        b, _, height, width = x.shape
        ws = self.window_size
        mlp = self.route.out_mask
        projections = (self.project_q.weight, self.project_q.bias,
                       self.project_k.weight, self.project_k.bias)
        mask = None
        with span("camixer.predictor"):
            v = self.project_v(x)
            cw = window_condition(height, width, ws, dtype=x.dtype, device=x.device)
            pred_in = torch.cat([v, condition_global, cw.expand(b, -1, -1, -1)], dim=1)
            route = self.route(pred_in)
            if self.training:
                pred = self.ops.window_scores(route.hidden, mlp[0].weight, mlp[0].bias,
                                              mlp[2].weight, mlp[2].bias, ws)
                mask = training_mask(pred, noise=settings.train_noise,
                                     generator=settings.generator)
                self.last_mask_mean = mask.mean()
            else:
                routing = self.ops.route_windows(route.hidden, mlp[0].weight, mlp[0].bias,
                                                 mlp[2].weight, mlp[2].bias, settings.gamma,
                                                 window_size=ws, routing=settings.routing,
                                                 generator=settings.generator,
                                                 tie_break=settings.tie_break)
                pred = routing.pred
                self.last_num_hard = routing.num_hard.detach()
        with span("camixer.attention"):
            if self.training:
                k_in = self.ops.deformable_key(x, route.offsets)
                attn_out = self.ops.masked_window_attention(x, k_in, v, route.sa, mask,
                                                            *projections, window_size=ws)
            else:
                k_in = self.ops.deformable_key(x, route.offsets, routing.num_hard,
                                               routing.order, window_size=ws)
                attn_out = self.ops.window_attention(x, k_in, v, route.sa, *projections,
                                                     routing.num_hard, routing.order,
                                                     window_size=ws)
        with span("camixer.conv"):
            y = self.conv_sptial(attn_out)
            out = self.project_out(F.gelu(y) * route.ca + attn_out)
        if self.capture is not None:
            self.capture.update(x=x, condition_global=condition_global, pred_score=pred,
                                offsets=route.offsets, ca=route.ca, sa=route.sa, k_in=k_in,
                                warped_x=k_in - x, attn_out=attn_out, mixer_out=out)
            if not self.training:
                self.capture.update(num_hard=routing.num_hard, order=routing.order)
        return out, mask


class Block(nn.Module):
    """Post-norm block: x = LN1(x + mixer(x)); x = LN2(x + ffn(x)) (spec §2)."""

    def __init__(self, channels: int, window_size: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(channels)
        self.mixer = CAMixer(channels, window_size)
        self.norm2 = LayerNorm2d(channels)
        self.ffn = GatedFFN(channels)

    def forward(self, x: Tensor, condition_global: Tensor,
                settings: MixerSettings) -> tuple[Tensor, Tensor | None]:
        fused = getattr(self.mixer.ops, "block_forward", None)
        if fused is not None and not self.training:
            # the backend's own inference path for the whole block (the CPU backend's)
            return fused(self, x, condition_global, settings), None
        mixed, mask = self.mixer(x, condition_global, settings)
        x = self.norm1(x + mixed)
        with span("camixer.ffn"):
            ffn = self.ffn(x)
        return self.norm2(x + ffn), mask


class Group(nn.Module):
    """``body.j``: blocks, then a 1×1 conv, plus the group's input."""

    def __init__(self, channels: int, num_blocks: int, window_size: int) -> None:
        super().__init__()
        self.body = nn.ModuleList(Block(channels, window_size) for _ in range(num_blocks))
        self.body_tail = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, condition_global: Tensor, settings: MixerSettings,
                masks: list[Tensor]) -> Tensor:
        shortcut = x
        for block in self.body:
            x, mask = block(x, condition_global, settings)
            if mask is not None:
                masks.append(mask)
        return self.body_tail(x) + shortcut


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
    unclamped. In training mode it returns ``(sr, ratio_loss)`` (spec §4).

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
        self._memory_format = torch.contiguous_format

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
        """The backend the mixers' hot operations run on ("reference", "cpu" or "triton").

        May be set to "auto", "reference", "cpu" or "triton"; "auto" is resolved for the device
        the model's parameters are on at that moment.
        """
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        from camixer_fast.backends import backend_ops, resolve_backend

        ops = backend_ops(resolve_backend(value, self.head.weight.device))
        for module in self.mixers():
            module.ops = ops
        self._backend = ops.name
        # the layout the backend's operations want the feature maps in (channels-last on CPU)
        self._memory_format = getattr(ops, "memory_format", torch.contiguous_format)

    def mixers(self) -> list[CAMixer]:
        """The CAMixer of every block, in network order."""
        return [m for m in self.modules() if isinstance(m, CAMixer)]

    def extra_repr(self) -> str:
        return (f"n_feats={self.n_feats}, scale={self.scale}, blocks={self.blocks_per_group}, "
                f"window_size={self.window_size}, gamma={self.gamma}, routing={self.routing!r}, "
                f"tie_break={self.tie_break!r}")

    def forward(self, x: Tensor, *,
                generator: torch.Generator | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> (B, 3, sH, sW); in training mode (sr, ratio_loss).

        Inputs of any H, W >= 1 are padded on the bottom and right to multiples of the window
        size (:func:`pad_to_multiple`) and the output is cropped back. ``generator`` feeds the
        random draws: Gumbel routing at inference, the Gumbel noise of the training mask.
        At inference each image of a batch is run on its own, so its output is bit-identical
        to a solo run of that image.
        """
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected a (B, 3, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor in [0, 1], got {x.dtype}")
        if min(x.shape) == 0:
            raise ValueError(f"empty input {tuple(x.shape)}")
        settings = MixerSettings(self.gamma, self.routing, self.tie_break, generator,
                                 self.train_noise)
        if self.training or x.shape[0] == 1:
            return self._forward(x, settings)
        # Inference runs a batch image by image: CPU conv and GEMM kernels pick their blocking
        # from the batch size, which moves results by ~1e-5, so this is what makes each output
        # bit-identical to the image's solo run (batching buys little at SR image sizes).
        outs, num_hard = [], []
        for image in x.split(1):
            outs.append(self._forward(image, settings))
            num_hard.append([m.last_num_hard for m in self.mixers()])
        for i, mixer in enumerate(self.mixers()):
            mixer.last_num_hard = torch.cat([per_image[i] for per_image in num_hard])
        return torch.cat(outs)

    def _forward(self, x: Tensor, settings: MixerSettings) -> Tensor | tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size)
        # the backend's layout at inference; training always runs the reference layout
        channels_last = self._memory_format == torch.channels_last and not self.training
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f0 = self.head(x)
        condition_global = self.global_predictor(f0)
        masks: list[Tensor] = []
        feat = f0
        for group in self.body:
            feat = group(feat, condition_global, settings, masks)
        feat = self.body_tail(feat) + f0
        sr = self.tail(feat)[..., : height * self.scale, : width * self.scale]
        if channels_last:
            sr = sr.contiguous()
        if not self.training:
            return sr
        m = torch.cat([mask.flatten() for mask in masks]).mean()
        return sr, 2.0 * self.gamma * (m - 0.5) ** 2
