"""A stand-in for the official CAMixerSR code in CPU benchmarks.

The official implementation (basicsr's ``CAMixerSR_arch.py``) is not a dependency of this
project, so the benchmarks time this module instead: a re-implementation, written for this
project, of the official code's operation chain as ``spec/camixersr.md`` §3 describes it:

- the window condition rebuilt in every mixer call, ``cat([v, Cg, Cw])`` into the predictor;
- ``pred`` from the window means through ``out_mask``; ``torch.argsort`` of the hard scores;
  K = N at γ = 1, else ``min(int(N·r·2γ), N)`` with r the expected hard fraction
  ``mean(softmax(pred)[..., 0])`` over the batch and the windows (the expectation of the
  official Gumbel draw, so runs are deterministic and comparable with ``camixer_fast``);
- ``k = x + flow_warp(x, offsets)``: a full-size ``grid_sample`` of every pixel;
- per-call copies of ``cat([q, k])``, ``v`` and ``v·sa`` into the ``b (h w) (dh dw c)`` token
  layout, batch ``index_select`` gathers of the hard windows (q/k, v) and of the simple ones
  (``v·sa``);
- ``project_q`` / ``project_k`` as ``nn.Linear`` on the gathered tokens, then softmax(QKᵀ)V as
  batched matmuls over all hard windows at once (no 1/sqrt(C), single head);
- the results and ``v·sa`` written back with index fills into a clone of the token tensor and
  rearranged back to (B, C, H, W);
- every feature map NCHW, LayerNorm written out channels-first, convolutions as modules.

It marks the same ``torch.profiler`` ranges as the network (predictor, attention, conv, ffn), so
:func:`camixer_fast.evaluation.profiling.runtime_breakdown` applies to it.

In training mode (``model.train()``) it runs the official training chain (spec §4): the
predictor's straight-through ``gumbel_softmax(pred, hard=True)`` mask M (``noise=False``: no
Gumbel noise, the deterministic mask the parity checks use), Q and K projected from the masked
tokens ``qk·M``, softmax(QKᵀ)·(v·M) over every window as one batched matmul, plus
``(v·sa)·(1 − M)``; it returns ``(sr, ratio_loss)`` with ratio_loss = 2γ(m − 0.5)², m the mean
of M over all blocks, images and windows.

It loads the same state dict as :class:`camixer_fast.CAMixerSR` (same module names) and is
checked against it (``bench/test_bench_backends.py``, ``tests/test_cpu_backend.py``,
``tests/test_official_baseline.py``) before any time is taken.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from camixer_fast.reference.model import span
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """The official channels-first LayerNorm: per pixel over C of an NCHW map, written out."""

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


def tokens_of(x: Tensor, ws: int) -> Tensor:
    """``rearrange(x, 'b c (h dh) (w dw) -> b (h w) (dh dw c)')``: (B, C, H, W) -> (B, N, ws²·C)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws * c)


def map_of(t: Tensor, ws: int, h: int, w: int) -> Tensor:
    """``rearrange(t, 'b (h w) (dh dw c) -> b c (h dh) (w dw)')``: the inverse of :func:`tokens_of`."""
    b = t.shape[0]
    c = t.shape[2] // (ws * ws)
    t = t.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
    return t.reshape(b, c, h, w)


def batch_index_select(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (B, n) of each image of x (B, N, D) -> (B, n, D), one flat index_select."""
    b, n, d = x.shape
    flat = idx + torch.arange(b, device=x.device).view(b, 1) * n
    return x.reshape(b * n, d).index_select(0, flat.reshape(-1)).reshape(b, idx.shape[1], d)


def batch_index_fill(x: Tensor, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor) -> Tensor:
    """Write x1 (B, n1, D) at rows idx1 and x2 (B, n2, D) at rows idx2 of x (B, N, D), in place."""
    b, n, d = x.shape
    offset = torch.arange(b, device=x.device).view(b, 1) * n
    flat = x.view(b * n, d)
    flat[(idx1 + offset).reshape(-1)] = x1.reshape(-1, d)
    flat[(idx2 + offset).reshape(-1)] = x2.reshape(-1, d)
    return x


def flow_warp(x: Tensor, flow: Tensor) -> Tensor:
    """basicsr's ``flow_warp``: bilinear, border padding, align_corners; flow (B, H, W, 2)."""
    _, _, h, w = x.shape
    grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=x.dtype, device=x.device),
                                    torch.arange(w, dtype=x.dtype, device=x.device),
                                    indexing="ij")
    vgrid = torch.stack((grid_x, grid_y), 2) + flow
    vgrid_x = 2.0 * vgrid[..., 0] / max(w - 1, 1) - 1.0
    vgrid_y = 2.0 * vgrid[..., 1] / max(h - 1, 1) - 1.0
    grid = torch.stack((vgrid_x, vgrid_y), dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class Predictor(nn.Module):
    """``route`` (PredictorLG), ending in the official top-K selection."""

    def __init__(self, dim: int, window_size: int) -> None:
        super().__init__()
        cdim = dim + 4
        self.window_size = window_size
        self.in_conv = nn.Sequential(nn.Conv2d(cdim, cdim // 4, 1),
                                     LayerNorm2d(cdim // 4), nn.LeakyReLU(0.1))
        self.out_offsets = nn.Sequential(nn.Conv2d(cdim // 4, cdim // 8, 1), nn.LeakyReLU(0.1),
                                         nn.Conv2d(cdim // 8, 2, 1))
        self.out_mask = nn.Sequential(nn.Linear(window_size**2, window_size), nn.LeakyReLU(0.1),
                                      nn.Linear(window_size, 2), nn.Softmax(dim=-1))
        self.out_CA = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cdim // 4, dim, 1),
                                    nn.Sigmoid())
        self.out_SA = nn.Sequential(nn.Conv2d(cdim // 4, 1, 3, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor, gamma: float, noise: bool = True
                ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        """-> (idx1 (B, K) hard windows, idx2 (B, N-K) simple ones, offsets, ca, sa); in
        training mode (mask (B, N, 1), None, offsets, ca, sa)."""
        x = self.in_conv(x)
        offsets = self.out_offsets(x).tanh().mul(8.0)
        ca = self.out_CA(x)
        sa = self.out_SA(x)
        x = tokens_of(torch.mean(x, keepdim=True, dim=1), self.window_size)
        pred_score = self.out_mask(x)                                   # [B, N, 2]
        if self.training:
            if noise:
                mask = F.gumbel_softmax(pred_score, hard=True, dim=2)[:, :, 0:1]
            else:
                soft = torch.softmax(pred_score, dim=2)
                hard = (soft[..., 0:1] >= soft[..., 1:2]).to(soft.dtype)
                mask = hard - soft[..., 0:1].detach() + soft[..., 0:1]
            return mask, None, offsets, ca, sa
        score = pred_score[:, :, 0]
        _, n = score.shape
        r = torch.softmax(pred_score, dim=-1)[..., 0].mean()            # expected Gumbel draw
        num_keep = n if gamma == 1 else min(int(n * r * 2 * gamma), n)
        idx = torch.argsort(score, dim=1, descending=True)
        return idx[:, :num_keep], idx[:, num_keep:], offsets, ca, sa


class CAMixer(nn.Module):
    """``mixer``: the official op chain (see the module docstring)."""

    def __init__(self, dim: int, window_size: int) -> None:
        super().__init__()
        self.dim, self.window_size = dim, window_size
        self.project_v = nn.Conv2d(dim, dim, 1)
        self.project_q = nn.Linear(dim, dim)
        self.project_k = nn.Linear(dim, dim)
        self.conv_sptial = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                                         nn.Conv2d(dim, dim, 3, padding=2, groups=dim,
                                                   dilation=2))
        self.project_out = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.route = Predictor(dim, window_size)

    def forward(self, x: Tensor, condition_global: Tensor, gamma: float,
                noise: bool = True) -> tuple[Tensor, Tensor | None]:
        """-> (mixer output, the training mask (B, N, 1) in training mode, else None)."""
        b, _, h, w = x.shape
        ws = self.window_size
        with span("camixer.predictor"):
            v = self.project_v(x)
            ramp = torch.linspace(-1, 1, ws)
            condition_wind = torch.stack(torch.meshgrid(ramp, ramp, indexing="ij")).type_as(x)
            condition_wind = condition_wind.unsqueeze(0).repeat(b, 1, h // ws, w // ws)
            condition = torch.cat([v, condition_global, condition_wind], dim=1)
            idx1, idx2, offsets, ca, sa = self.route(condition, gamma, noise)
        if self.training:
            return self._train_mixing(x, v, idx1, offsets, ca, sa), idx1
        with span("camixer.attention"):
            q = x
            k = x + flow_warp(x, offsets.permute(0, 2, 3, 1))
            qk = torch.cat([q, k], dim=1)
            vs = v * sa
            v, vs, qk = tokens_of(v, ws), tokens_of(vs, ws), tokens_of(qk, ws)
            n = v.shape[1]
            v1, v2 = batch_index_select(v, idx1), batch_index_select(vs, idx2)
            qk1 = batch_index_select(qk, idx1)
            k_windows = idx1.shape[1]
            # 'b n (dh dw c) -> (b n) (dh dw) c' and 'b n (dh dw c) -> b (n dh dw) c'
            v1 = v1.reshape(b * k_windows, ws * ws, self.dim)
            qk1 = qk1.reshape(b, k_windows * ws * ws, 2 * self.dim)
            q1, k1 = torch.chunk(qk1, 2, dim=2)
            q1 = self.project_q(q1).reshape(b * k_windows, ws * ws, self.dim)
            k1 = self.project_k(k1).reshape(b * k_windows, ws * ws, self.dim)
            attn = (q1 @ k1.transpose(-2, -1)).softmax(dim=-1)
            f_attn = (attn @ v1).reshape(b, k_windows, ws * ws * self.dim)
            attn_out = batch_index_fill(v.clone(), f_attn, v2.clone(), idx1, idx2)
            attn_out = map_of(attn_out.reshape(b, n, -1), ws, h, w)
        return self._tail(attn_out, ca), None

    def _train_mixing(self, x: Tensor, v: Tensor, mask: Tensor, offsets: Tensor, ca: Tensor,
                      sa: Tensor) -> Tensor:
        """The official training chain: every window attended, masked by M (B, N, 1)."""
        b, _, h, w = x.shape
        ws = self.window_size
        with span("camixer.attention"):
            k = x + flow_warp(x, offsets.permute(0, 2, 3, 1))
            qk = tokens_of(torch.cat([x, k], dim=1), ws)
            vs = tokens_of(v * sa, ws)
            v = tokens_of(v, ws)
            n = v.shape[1]
            v1, v2 = v * mask, vs * (1 - mask)
            qk1 = (qk * mask).reshape(b, n * ws * ws, 2 * self.dim)
            q1, k1 = torch.chunk(qk1, 2, dim=2)
            q1 = self.project_q(q1).reshape(b * n, ws * ws, self.dim)
            k1 = self.project_k(k1).reshape(b * n, ws * ws, self.dim)
            attn = (q1 @ k1.transpose(-2, -1)).softmax(dim=-1)
            f_attn = (attn @ v1.reshape(b * n, ws * ws, self.dim)).reshape(b, n, -1)
            attn_out = map_of(f_attn + v2, ws, h, w)
        return self._tail(attn_out, ca)

    def _tail(self, attn_out: Tensor, ca: Tensor) -> Tensor:
        with span("camixer.conv"):
            out = self.act(self.conv_sptial(attn_out)) * ca + attn_out
            return self.project_out(out)


class GatedFFN(nn.Module):
    """``ffn``: project_in, depthwise 3×3, gelu(a)·b, project_out; no biases."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim: int, window_size: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.mixer = CAMixer(dim, window_size)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GatedFFN(dim)

    def forward(self, x: Tensor, condition_global: Tensor, gamma: float,
                noise: bool = True) -> tuple[Tensor, Tensor | None]:
        mixed, mask = self.mixer(x, condition_global, gamma, noise)
        x = self.norm1(x + mixed)
        with span("camixer.ffn"):
            ffn = self.ffn(x)
        return self.norm2(x + ffn), mask


class Group(nn.Module):
    def __init__(self, dim: int, num_blocks: int, window_size: int) -> None:
        super().__init__()
        self.body = nn.ModuleList(Block(dim, window_size) for _ in range(num_blocks))
        self.body_tail = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, condition_global: Tensor, gamma: float, noise: bool,
                masks: list[Tensor]) -> Tensor:
        shortcut = x
        for block in self.body:
            x, mask = block(x, condition_global, gamma, noise)
            if mask is not None:
                masks.append(mask)
        return self.body_tail(x) + shortcut


class OfficialCAMixerSR(nn.Module):
    """The official network; ``gamma`` and ``train_noise`` may be changed between calls.

    (B, 3, H, W) in [0, 1] -> (B, 3, sH, sW); in training mode (sr, ratio_loss), the mask
    drawn with Gumbel noise unless ``train_noise`` is False. Reflect padding to multiples of
    16 as the official ``check_image_size`` (so H and W must be above 8 where they are padded).
    """

    def __init__(self, *, n_feats: int = 36, scale: int = 4,
                 blocks_per_group: tuple[int, ...] = (4, 4, 6, 6), window_size: int = 16,
                 gamma: float = 0.5) -> None:
        super().__init__()
        self.scale, self.window_size, self.gamma = scale, window_size, gamma
        self.train_noise = True
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.global_predictor = nn.Sequential(nn.Conv2d(n_feats, 8, 1), nn.LeakyReLU(0.1),
                                              nn.Conv2d(8, 2, 3, padding=1), nn.LeakyReLU(0.1))
        self.body = nn.ModuleList(Group(n_feats, n, window_size) for n in blocks_per_group)
        self.body_tail = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.tail = nn.Sequential(nn.Conv2d(n_feats, 3 * scale * scale, 3, padding=1),
                                  nn.PixelShuffle(scale))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        ws = self.window_size
        x = F.pad(x, (0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws), mode="reflect")
        f0 = self.head(x)
        condition_global = self.global_predictor(f0)
        feat = f0
        masks: list[Tensor] = []
        for group in self.body:
            feat = group(feat, condition_global, self.gamma, self.train_noise, masks)
        feat = self.body_tail(feat) + f0
        sr = self.tail(feat)[..., : h * self.scale, : w * self.scale]
        if not self.training:
            return sr
        m = torch.cat([mask.flatten() for mask in masks]).mean()
        return sr, 2.0 * self.gamma * (m - 0.5) ** 2


def load_official_baseline(state_dict: dict[str, Tensor], *, gamma: float = 0.5,
                           scale: int | None = None) -> OfficialCAMixerSR:
    """Build the baseline from a CAMixerSR state dict (strict), in eval mode on the CPU."""
    n_feats = state_dict["head.weight"].shape[0]
    if scale is None:
        scale = round(math.sqrt(state_dict["tail.0.weight"].shape[0] / 3))
    groups: dict[int, int] = {}
    for key in state_dict:
        parts = key.split(".")
        if parts[0] == "body" and len(parts) > 3 and parts[2] == "body":
            group, block = int(parts[1]), int(parts[3])
            groups[group] = max(groups.get(group, 0), block + 1)
    blocks = tuple(groups[g] for g in sorted(groups))
    window_size = round(math.sqrt(
        state_dict["body.0.body.0.mixer.route.out_mask.0.weight"].shape[1]))
    model = OfficialCAMixerSR(n_feats=n_feats, scale=scale, blocks_per_group=blocks,
                              window_size=window_size, gamma=gamma)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
