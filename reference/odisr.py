"""CAMixerOSR (ODI-SR, 360° panoramas), reference twin (fp32, NCHW) of the official
``codes/odisr/archs/CAMixerOSR_arch.py``, its module names; routing deterministic per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from camixer_fast.reference.attention_training import masked_window_attention
from camixer_fast.reference.dcn import modulated_deform_conv2d
from camixer_fast.reference.model import pad_to_multiple
from camixer_fast.reference.routing import (
    BlockRouting,
    Routing,
    check_gamma,
    check_routing_mode,
    check_tie_break,
    hard_fraction,
    num_hard_windows,
    training_mask,
    window_order,
)
from camixer_fast.reference.warp import deform_warp
from camixer_fast.reference.windows import to_windows, window_condition
from torch import Tensor, nn

from camixer_fast.backends import REGISTRY, DeformConv, Ops, select_backend

RGB_MEAN = (0.4488, 0.4371, 0.4040)
BACKENDS = ("auto", "reference", "cpu", "triton")


def latitude_condition(height: int, width: int, *, rows: tuple[int, int] | None = None,
                       device: torch.device | None = None) -> Tensor:
    """Cos-latitude condition (1, 1, height, width) float32 (OSRT): row i of an H-row panorama
    is cos(π/2 · ((2i + 1)/H − 1)); ``rows=(top, H)`` for a crop, None: the whole panorama."""
    top, full = (0, height) if rows is None else rows
    if height < 1 or width < 1 or top < 0 or top + height > full:
        raise ValueError(f"rows {top}..{top + height} of {width} columns do not lie in a "
                         f"panorama of {full} rows")
    r = 1.0 / full
    y = -1.0 + r + (2.0 * r) * torch.arange(top, top + height, device=device).float()
    return torch.cos(y * math.pi / 2).view(1, 1, height, 1).expand(1, 1, height, width)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


class DCNv2Pack(nn.Module):
    """BasicSR's ``DCNv2Pack`` (3×3): ``conv_offset`` of the guide gives 18 offsets, 9 masks."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -1 / math.sqrt(9 * channels), 1 / math.sqrt(9 * channels))
        self.conv_offset = nn.Conv2d(channels, 27, 3, padding=1)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor, feat: Tensor,
                deform_conv: DeformConv = modulated_deform_conv2d) -> Tensor:
        out = self.conv_offset(feat)
        return deform_conv(x, out[:, :18], torch.sigmoid(out[:, 18:]), self.weight, self.bias)


def condition_mlp(channels: int) -> nn.Sequential:
    """``offset_conv``: 1×1 MLP 1 → C → C, LeakyReLU 0.2."""
    return nn.Sequential(nn.Conv2d(1, channels, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.2))


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W), biased variance, eps 1e-6."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, 1e-6)
        return y.permute(0, 3, 1, 2)


class Predictor(nn.Module):
    """``route``: input [v, Cg, Cw] (C + 3 channels), LeakyReLU 0.2, no norm, raw offsets."""

    def __init__(self, channels: int, window_size: int) -> None:
        super().__init__()
        c4, c8 = (channels + 3) // 4, (channels + 3) // 8
        self.in_conv = nn.Sequential(nn.Conv2d(channels + 3, c4, 1), nn.LeakyReLU(0.2))
        self.out_offsets = nn.Sequential(nn.Conv2d(c4, c8, 1), nn.LeakyReLU(0.2),
                                         nn.Conv2d(c8, 2, 1))
        self.out_mask = nn.Sequential(nn.Linear(window_size**2, window_size), nn.LeakyReLU(0.2),
                                      nn.Linear(window_size, 2), nn.Softmax(dim=-1))
        self.out_CA = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c4, channels, 1),
                                    nn.Sigmoid())
        self.out_SA = nn.Sequential(nn.Conv2d(c4, 1, 3, padding=1), nn.Sigmoid())

    def forward(self, v: Tensor, cg: Tensor, cw: Tensor, shift: int,
                window_size: int) -> tuple[Tensor, ...]:
        """in_conv of [roll(v), cg, roll(cw)] (rolls by −shift) as a split product, v (B, C, H, W)
        cg (B or 1, 1, H, W), cw (1, 2, H, W) -> pred (B, N, 2), offsets (B, 2, H, W), ca
        (B, C, 1, 1), sa: the roll and the concat move c4 channels, not C + 3."""
        conv, c = self.in_conv[0], v.shape[1]
        weight = conv.weight
        h = F.conv2d(v, weight[:, :c]) + F.conv2d(cw, weight[:, c + 1:])
        if shift:
            h = torch.roll(h, (-shift, -shift), dims=(2, 3))
        h = self.in_conv[1](h + F.conv2d(cg, weight[:, c:c + 1], conv.bias))
        scores = to_windows(h.mean(dim=1, keepdim=True), window_size).flatten(2)
        return self.out_mask(scores), self.out_offsets(h), self.out_CA(h), self.out_SA(h)


class CAMixer(nn.Module):
    """``mixer``: q = k = warped x. Officially a shift rolls x (not the global condition) by
    −shift, the warp samples the unrolled x with the rolled frame's offsets and the output is
    rolled back; here only the predictor runs rolled, the attention in shifted windows."""

    def __init__(self, channels: int, window_size: int, shift: int) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.project_v = nn.Conv2d(channels, channels, 1)
        self.project_q = nn.Linear(channels, channels)
        self.project_k = nn.Linear(channels, channels)
        self.conv_sptial = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.Conv2d(channels, channels, 5, padding=2, groups=channels),
            nn.Conv2d(channels, channels, 5, padding=6, groups=channels, dilation=3))
        self.project_out = nn.Conv2d(channels, channels, 1)
        self.route = Predictor(channels, window_size)

    def roll(self, t: Tensor, sign: int) -> Tensor:
        return torch.roll(t, (sign * self.shift,) * 2, dims=(2, 3)) if self.shift else t

    def forward(self, x: Tensor, cg: Tensor, settings: dict) -> tuple[Tensor, BlockRouting]:
        ws = self.window_size
        v = self.project_v(x)                    # a 1×1 projection commutes with the roll
        cw = window_condition(*x.shape[2:], ws, dtype=x.dtype, device=x.device)
        pred, offsets, ca, sa = self.route(v, cg, cw, self.shift, ws)  # rolled frame
        weights = (self.project_q.weight, self.project_q.bias, self.project_k.weight,
                   self.project_k.bias)
        ops = settings["ops"]
        if self.training:
            mask = training_mask(pred, noise=settings["train_noise"],
                                 generator=settings["generator"])
            qk = self.roll(deform_warp(x, offsets), -1)
            attn = self.roll(masked_window_attention(qk, qk, self.roll(v, -1), sa, mask, *weights,
                                                     window_size=ws), 1)
            record = BlockRouting(pred, None, None, mask)
        else:   # the image frame: windows offset by the shift, gathered by index
            r = hard_fraction(pred, settings["routing"], settings["generator"])
            num_hard = num_hard_windows(r, pred.shape[1], settings["gamma"])
            order = window_order(pred[..., 0], settings["tie_break"])
            if ops.window_warp is None:
                qk = deform_warp(x, offsets).contiguous(memory_format=torch.channels_last)
            else:
                qk = ops.window_warp(x, offsets, num_hard, order, window_size=ws,
                                     shift=self.shift)
            attn = ops.window_attention(qk, qk, v, self.roll(sa, 1), *weights, num_hard, order,
                                        window_size=ws, shift=self.shift)
            record = BlockRouting(pred, num_hard, order, None)
        out = F.gelu(self.conv_sptial(attn)) * ca + attn
        return self.project_out(out), record


class GatedFFN(nn.Module):
    """``ffn``: 1×1 C → 2C, depthwise 5×5, gelu(a)·b, 1×1 C → C, with biases."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(channels, 2 * channels, 1)
        self.dwconv = nn.Conv2d(2 * channels, 2 * channels, 5, padding=2, groups=2 * channels)
        self.project_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        a = a.contiguous(memory_format=torch.channels_last)   # a strided half takes gelu's slow path
        return self.project_out(F.gelu(a).mul_(b))


class Block(nn.Module):
    """Post-norm block: x = LN1(x + mixer(x)); x = LN2(x + ffn(x))."""

    def __init__(self, channels: int, window_size: int, shift: int) -> None:
        super().__init__()
        self.norm1 = ChannelNorm(channels)
        self.mixer = CAMixer(channels, window_size, shift)
        self.norm2 = ChannelNorm(channels)
        self.ffn = GatedFFN(channels)

    def forward(self, x: Tensor, cg: Tensor, settings: dict) -> tuple[Tensor, BlockRouting]:
        res, record = self.mixer(x, cg, settings)
        x = self.norm1(x + res)
        return self.norm2(x + self.ffn(x)), record


class Group(nn.Module):
    """``body.j``: blocks (odd ones shifted by ws/2), then a DCNv2 guided by the condition."""

    def __init__(self, channels: int, num_blocks: int, window_size: int) -> None:
        super().__init__()
        self.body = nn.ModuleList(Block(channels, window_size, (i % 2) * (window_size // 2))
                                  for i in range(num_blocks))
        self.offset_conv = condition_mlp(channels)
        self.body_tail = DCNv2Pack(channels)

    def forward(self, x: Tensor, cg: Tensor, settings: dict,
                records: list[BlockRouting]) -> Tensor:
        shortcut = x
        for block in self.body:
            x, record = block(x, cg, settings)
            records.append(record)
        return self.body_tail(x, self.offset_conv(cg), settings["ops"].deform_conv) + shortcut


class CAMixerOSR(nn.Module):
    """CAMixerOSR; ``model(lr, condition=None)``: lr (B, 3, H, W) in [0, 1], any H, W >= 1 ->
    (B, 3, sH, sW); training: (sr, (m − 0.5)²), m the mean mask. condition (B or 1, 1, H, W)
    cos-latitude, None: lr is a whole panorama. Image and condition are padded by one index map
    (:func:`pad_to_multiple`): a padded pixel keeps the latitude of the pixel it copies.
    K = N if γ = 1 else min(int(N·r·2γ), N), r = mean(softmax(pred)[..., 0]) per image: the
    official int(N·r) with r its Gumbel draw's expectation is γ = 0.5; ``gamma=``: this call's
    γ instead of :attr:`gamma` (a 0-d tensor is clipped to [0, 1]). ``return_routing``
    appends the :class:`Routing` record. ``backend`` ("reference", "cpu", "triton", "auto")
    supplies the window attention and the DCNv2 at inference."""

    def __init__(self, *, n_feats: int = 60, scale: int = 4,
                 blocks_per_group: tuple[int, ...] = (6, 6, 6, 6), window_size: int = 16,
                 gamma: float = 0.5, routing: str = "expected",
                 tie_break: str = "official", backend: str = "auto") -> None:
        super().__init__()
        self.n_feats, self.scale, self.window_size = n_feats, scale, window_size
        self.blocks_per_group = tuple(blocks_per_group)
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.norm = ChannelNorm(n_feats)
        self.body = nn.ModuleList(Group(n_feats, n, window_size) for n in self.blocks_per_group)
        self.offset_conv = condition_mlp(n_feats)
        self.body_tail = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.dcn = DCNv2Pack(n_feats)
        self.tail = nn.Sequential(nn.Conv2d(n_feats, 3 * scale * scale, 3, padding=1),
                                  nn.PixelShuffle(scale))
        self.gamma, self.routing, self.tie_break = gamma, routing, tie_break
        self.train_noise, self.backend = True, backend

    def __setattr__(self, name: str, value) -> None:
        checks = {"gamma": check_gamma, "routing": check_routing_mode,
                  "tie_break": check_tie_break, "backend": check_backend}
        super().__setattr__(name, checks[name](value) if name in checks else value)

    def extra_repr(self) -> str:
        return (f"n_feats={self.n_feats}, scale={self.scale}, blocks={self.blocks_per_group}, "
                f"window_size={self.window_size}, gamma={self.gamma}, routing={self.routing!r}, "
                f"backend={self.backend!r}")

    def forward(self, lr: Tensor, condition: Tensor | None = None, *,
                gamma: float | Tensor | None = None, generator: torch.Generator | None = None,
                return_routing: bool = False):
        if not torch.is_tensor(lr) or lr.dim() != 4 or lr.shape[1] != 3 or min(lr.shape) == 0:
            shape = tuple(lr.shape) if torch.is_tensor(lr) else type(lr).__name__
            raise ValueError(f"expected a non-empty (B, 3, H, W) tensor, got {shape}")
        if not lr.is_floating_point():
            raise TypeError(f"expected a floating-point tensor in [0, 1], got {lr.dtype}")
        b, _, height, width = lr.shape
        if condition is None:
            condition = latitude_condition(height, width, device=lr.device)
        if not torch.is_tensor(condition) or condition.dim() != 4 or \
                condition.shape[1:] != (1, height, width) or condition.shape[0] not in (1, b):
            shape = tuple(condition.shape) if torch.is_tensor(condition) else type(condition)
            raise ValueError(f"condition must be (B or 1, 1, {height}, {width}) for an input "
                             f"{tuple(lr.shape)}, got {shape}")
        condition = condition.to(lr.device, torch.float32).expand(b, -1, -1, -1)
        if gamma is None:
            gamma = self.gamma
        elif not torch.is_tensor(gamma):
            gamma = check_gamma(gamma)
        elif gamma.dim() != 0 or not gamma.is_floating_point():
            raise ValueError(f"a gamma tensor must be a 0-d float, got {gamma.dtype} "
                             f"{tuple(gamma.shape)}")
        settings = {"ops": self.ops(lr.device), "gamma": gamma, "routing": self.routing,
                    "tie_break": self.tie_break, "generator": generator,
                    "train_noise": self.train_noise}
        if self.training or b == 1:
            sr, routing = self._forward(lr.float(), condition, settings)
        else:   # image by image: each output is bit-identical to its solo run
            parts = [self._forward(lr[i:i + 1].float(), condition[i:i + 1], settings)
                     for i in range(b)]
            sr, routing = torch.cat([p[0] for p in parts]), Routing.cat([p[1] for p in parts])
        if not self.training:
            return (sr, routing) if return_routing else sr
        m = torch.cat([record.mask.flatten() for record in routing.blocks]).mean()
        return (sr, (m - 0.5) ** 2, routing) if return_routing else (sr, (m - 0.5) ** 2)

    def mixers(self) -> list[CAMixer]:
        """The CAMixer of every block, in network order."""
        return [block.mixer for group in self.body for block in group.body]

    def ops(self, device: torch.device) -> Ops:
        """The operations of :attr:`backend` on ``device`` in the current mode."""
        name = self.backend
        if name == "auto":
            # training: the Triton DCN has no backward
            triton_ok = (device.type == "cuda" and not self.training and
                         REGISTRY["triton"].unsupported(device, torch.float32, False) is None)
            name = "cpu" if device.type == "cpu" else "triton" if triton_ok else "reference"
        return select_backend(name, device, training=self.training).ops

    def _forward(self, lr: Tensor, condition: Tensor,
                 settings: dict) -> tuple[Tensor, Routing]:
        height, width = lr.shape[-2:]
        # a copy: a (1, 3, H, W) input's batch stride would otherwise reach the convs' layouts
        lr = pad_to_multiple(lr, self.window_size).clone(memory_format=torch.channels_last)
        x = self.head(lr - self.mean)                     # channels-last maps: 2-3x faster convs
        cg = pad_to_multiple(condition, self.window_size).clone(memory_format=torch.channels_last)
        records: list[BlockRouting] = []
        feat = self.norm(x)
        for group in self.body:
            feat = group(feat, cg, settings, records)
        feat = self.dcn(self.body_tail(feat), self.offset_conv(cg),
                        settings["ops"].deform_conv) + x
        sr = self.tail(feat) + self.mean
        return sr[..., :height * self.scale, :width * self.scale], Routing(tuple(records))
