"""Window routing (spec §3.4 scores, §3.5 inference, §4 training mask): hidden map -> window
scores -> per-image K -> window order. Image b's hard windows are ``order[b, :num_hard[b]]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ROUTING_MODES = ("expected", "gumbel")
TIE_BREAKS = ("official", "index")


class WindowRouting(NamedTuple):
    """pred (B, N, 2) scores (``[..., 0]`` hard); num_hard (B,) K; order (B, N) by hard score."""

    pred: Tensor
    num_hard: Tensor
    order: Tensor


class BlockRouting(NamedTuple):
    """One block's routing: scores (B, N, 2); num_hard (B,), order (B, N) at inference; the
    straight-through mask (B, N, 1) in training (else None)."""

    scores: Tensor
    num_hard: Tensor | None
    order: Tensor | None
    mask: Tensor | None


class Routing(NamedTuple):
    """Every block's routing in one forward, in network order."""

    blocks: tuple[BlockRouting, ...]

    @property
    def num_windows(self) -> int:
        return self.blocks[0].scores.shape[1]

    def num_hard(self) -> Tensor:
        """K of every block and image, (blocks, B) int64 (inference)."""
        if self.blocks[0].num_hard is None:
            raise ValueError("a training-mode forward has masks, not K (see mask_means)")
        return torch.stack([b.num_hard for b in self.blocks])

    def k_fraction(self) -> Tensor:
        """Fraction of windows attended, (blocks, B) float32, detached."""
        if self.blocks[0].mask is not None:
            return torch.stack([b.mask.detach().float().mean(dim=(1, 2)) for b in self.blocks])
        return self.num_hard().float() / self.num_windows

    def mask_means(self) -> Tensor:
        """Mean training mask per block, (blocks,), in the autograd graph (the ratio loss's m)."""
        if self.blocks[0].mask is None:
            raise ValueError("an inference forward has no training masks (see num_hard)")
        return torch.stack([b.mask.mean() for b in self.blocks])

    @staticmethod
    def cat(parts: list[Routing]) -> Routing:
        """The record of a batch from the records of its parts (images in order)."""
        if len(parts) == 1:
            return parts[0]

        def join(tensors: list[Tensor | None]) -> Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors)

        blocks = []
        for per_block in zip(*(p.blocks for p in parts), strict=True):
            blocks.append(BlockRouting(*(join(list(field)) for field in zip(*per_block,
                                                                           strict=True))))
        return Routing(tuple(blocks))


def check_gamma(gamma: float) -> float:
    """Return γ as a float, or raise ValueError if it is not a number in [0, 1]."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    return value


def check_routing_mode(routing: str) -> str:
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    return routing


def check_tie_break(tie_break: str) -> str:
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    return tie_break


def window_order(score: Tensor, tie_break: str = "official") -> Tensor:
    """score (B, N) -> order (B, N) int64, descending. Ties (common: scores saturate at 1.0) as
    ``torch.argsort`` orders them ("official", the goldens') or by lower index ("index")."""
    check_tie_break(tie_break)
    if tie_break == "official":
        return torch.argsort(score, dim=1, descending=True)
    return torch.sort(score, dim=1, descending=True, stable=True).indices


def window_scores(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  window_size: int) -> Tensor:
    """Window scores (spec §3.4, ``out_mask``): h (B, c4, H, W), H, W multiples of ws;
    w1 (ws, ws²), b1 (ws,), w2 (2, ws), b2 (2,) -> pred (B, N, 2), softmax per window."""
    m = h.mean(dim=1, keepdim=True)                                    # [B, 1, H, W]
    b, _, height, width = m.shape
    rows, cols = height // window_size, width // window_size
    m = m.reshape(b, rows, window_size, cols, window_size).permute(0, 1, 3, 2, 4)
    m = m.reshape(b, rows * cols, window_size * window_size)         # [B, N, ws²]
    hidden = F.leaky_relu(F.linear(m, w1, b1), 0.1)
    return torch.softmax(F.linear(hidden, w2, b2), dim=-1)


def hard_fraction(pred: Tensor, routing: str = "expected",
                  generator: torch.Generator | None = None) -> Tensor:
    """Hard fraction r (B,): "expected" mean(softmax(pred)[..., 0]), or the official Gumbel draw."""
    check_routing_mode(routing)
    pred = pred.float()
    if routing == "expected":
        return torch.softmax(pred, dim=-1)[..., 0].mean(dim=-1)
    noisy = pred + gumbel_noise(pred, generator)
    return (noisy[..., 0] >= noisy[..., 1]).float().mean(dim=-1)


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise shaped like ``like``, drawn from ``generator`` if given."""
    e = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return -e.exponential_(generator=generator).log().to(like.dtype)


def num_hard_windows(r: Tensor, num_windows: Tensor | int, gamma: float | Tensor) -> Tensor:
    """K per image, (B,) int64: N if γ = 1, else min(int(N·r·2γ), N) (spec §3.5); γ a number
    in [0, 1] or a 0-d tensor (clipped to [0, 1]: an ONNX graph input), N traceable."""
    r = r.float()   # fp32 in the official order: another rounding can land just below N·r
    if not torch.is_tensor(gamma):
        gamma = check_gamma(gamma)
        if gamma == 1.0:
            return torch.zeros_like(r, dtype=torch.int64) + num_windows
        k = torch.floor(r * num_windows * 2.0 * gamma).to(torch.int64)
        return torch.minimum(k.clamp(min=0), torch.zeros_like(k) + num_windows)
    g = gamma.float().clamp(0.0, 1.0)
    k = torch.floor(r * num_windows * 2.0 * g).to(torch.int64)
    everything = torch.zeros_like(k) + num_windows
    return torch.where(g >= 1.0, everything, torch.minimum(k.clamp(min=0), everything))


def select_windows(pred: Tensor, gamma: float, *, routing: str = "expected",
                   generator: torch.Generator | None = None,
                   tie_break: str = "official") -> tuple[Tensor, Tensor]:
    """From window scores (B, N, 2) to (num_hard (B,), order (B, N)); see :class:`WindowRouting`."""
    r = hard_fraction(pred, routing, generator)
    num_hard = num_hard_windows(r, pred.shape[1], gamma)
    return num_hard, window_order(pred[..., 0], tie_break)


def route_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma: float, *,
                  window_size: int, routing: str = "expected",
                  generator: torch.Generator | None = None,
                  tie_break: str = "official") -> WindowRouting:
    """The whole routing step: hidden map (B, c4, H, W) -> :class:`WindowRouting`."""
    pred = window_scores(h, w1, b1, w2, b2, window_size)
    num_hard, order = select_windows(pred, gamma, routing=routing, generator=generator,
                                     tie_break=tie_break)
    return WindowRouting(pred, num_hard, order)


def flat_hard_windows(num_hard: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's hard windows as (image index, window index), each (ΣK,), in order."""
    b, n = order.shape
    rank = torch.arange(n, device=order.device)
    is_hard = rank.unsqueeze(0) < num_hard.unsqueeze(1)
    image = torch.arange(b, device=order.device).unsqueeze(1).expand(b, n)
    return image[is_hard], order[is_hard]


def training_mask(pred: Tensor, *, noise: bool = True,
                  generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-softmax hard mask (B, N, 1), spec §4 (tau = 1; ``noise=False``:
    no Gumbel noise, the goldens')."""
    logits = pred + gumbel_noise(pred, generator) if noise else pred
    soft = torch.softmax(logits, dim=-1)
    hard = (soft[..., 0:1] >= soft[..., 1:2]).to(soft.dtype)
    return hard - soft[..., 0:1].detach() + soft[..., 0:1]
