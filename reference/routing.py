"""Window routing: the predictor's per-pixel map -> window scores -> per-image K -> hard/simple lists.

Spec §3.4 (window scores) and §3.5 (routing at inference); spec §4 for the training mask.

The routing result is kept in a ragged-friendly form: ``order`` (B, N) lists every image's windows
by descending hard score, ``num_hard`` (B,) says how many of them (a prefix) are hard. The hard
windows of image b are ``order[b, :num_hard[b]]`` and its simple windows ``order[b, num_hard[b]:]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ROUTING_MODES = ("expected", "gumbel")
TIE_BREAKS = ("official", "index")


class WindowRouting(NamedTuple):
    """Which windows of each image go through attention.

    pred:     (B, N, 2) window scores after the softmax; ``pred[..., 0]`` is the "hard" score.
    num_hard: (B,) int64, K per image, 0 <= K <= N.
    order:    (B, N) int64 window indices by descending ``pred[..., 0]``; equal scores are
              ordered by the ``tie_break`` rule (see :func:`window_order`).
    """

    pred: Tensor
    num_hard: Tensor
    order: Tensor


class BlockRouting(NamedTuple):
    """The routing one block used in a forward, as ``model(x, return_routing=True)`` returns it.

    scores:   (B, N, 2) window scores (``pred``), softmax over the two classes.
    num_hard: (B,) int64 K per image at inference; None in training mode.
    order:    (B, N) int64 windows by descending hard score at inference; None in training.
    mask:     (B, N, 1) the straight-through training mask (in the autograd graph) in training
              mode; None at inference.
    """

    scores: Tensor
    num_hard: Tensor | None
    order: Tensor | None
    mask: Tensor | None


class Routing(NamedTuple):
    """The per-block routing record of one forward, blocks in network order."""

    blocks: tuple[BlockRouting, ...]

    @property
    def num_windows(self) -> int:
        """N, the windows per image."""
        return self.blocks[0].scores.shape[1]

    def num_hard(self) -> Tensor:
        """K of every block and image, (blocks, B) int64 (inference)."""
        if self.blocks[0].num_hard is None:
            raise ValueError("a training-mode forward has masks, not K (see mask_means)")
        return torch.stack([b.num_hard for b in self.blocks])

    def k_fraction(self) -> Tensor:
        """The fraction of windows each block sent to attention, per image: (blocks, B) float32
        (K/N at inference, the mean of the training mask in training mode; detached)."""
        if self.blocks[0].mask is not None:
            return torch.stack([b.mask.detach().float().mean(dim=(1, 2)) for b in self.blocks])
        return self.num_hard().float() / self.num_windows

    def mask_means(self) -> Tensor:
        """The mean training mask of every block over its windows and images, (blocks,), in the
        autograd graph: the ``m`` of the ratio loss (training mode)."""
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
    """Windows by descending hard score: score (B, N) -> order (B, N) int64.

    Equal scores are common, not rare: a saturated predictor gives many windows a softmax score
    of exactly 1.0, and K then cuts through the tie. The two rules:

    - ``"official"``: the order of ``torch.argsort(score, dim=1, descending=True)``, the call the
      official code makes. Deterministic for a given device and PyTorch build (each row is sorted
      on its own, so batch-invariant), but the order of ties is the sort algorithm's, not a
      documented rule. It reproduces the official outputs, the golden files included.
    - ``"index"``: equal scores by lower window index first. Portable and simple; what the fused
      kernels implement.
    """
    check_tie_break(tie_break)
    if tie_break == "official":
        return torch.argsort(score, dim=1, descending=True)
    # a stable descending sort keeps equal scores in window order: lower index first
    return torch.sort(score, dim=1, descending=True, stable=True).indices


def window_scores(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  window_size: int) -> Tensor:
    """Score every window from the predictor's hidden map (spec §3.4, ``out_mask``).

    h:  (B, c4, H, W) the output of ``route.in_conv``; H, W multiples of ``window_size``.
    w1: (16, ws²), b1: (16,)  -- ``out_mask.0``;  w2: (2, 16), b2: (2,) -- ``out_mask.2``.
    Returns pred (B, N, 2): softmax over the two classes, per window.
    """
    m = h.mean(dim=1, keepdim=True)                                    # [B, 1, H, W]
    b, _, height, width = m.shape
    rows, cols = height // window_size, width // window_size
    m = m.reshape(b, rows, window_size, cols, window_size).permute(0, 1, 3, 2, 4)
    m = m.reshape(b, rows * cols, window_size * window_size)         # [B, N, ws²]
    hidden = F.leaky_relu(F.linear(m, w1, b1), 0.1)                  # [B, N, 16]
    return torch.softmax(F.linear(hidden, w2, b2), dim=-1)           # [B, N, 2]


def hard_fraction(pred: Tensor, routing: str = "expected",
                  generator: torch.Generator | None = None) -> Tensor:
    """r per image, (B,) float32: the fraction of windows the predictor marks hard.

    expected: r = mean(softmax(pred, -1)[..., 0]), the expectation of the official random draw.
    gumbel:   the official draw, ``gumbel_softmax(pred, hard=True)`` (the probabilities used as
              logits), averaged per image instead of over the whole batch.
    """
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


def num_hard_windows(r: Tensor, num_windows: int, gamma: float) -> Tensor:
    """K per image, (B,) int64: N if γ = 1, else min(int(N·r·2γ), N) (spec §3.5)."""
    gamma = check_gamma(gamma)
    if gamma == 1.0:
        return torch.full(r.shape, num_windows, dtype=torch.int64, device=r.device)
    # in float32 and in this order, as the official ``int(N * r * 2 * ratio)`` on a float32 r:
    # when N·r is a whole number (the Gumbel draw) another rounding can land just below it
    k = torch.floor(r.float() * num_windows * 2.0 * gamma).to(torch.int64)
    return k.clamp(0, num_windows)


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
    """The ragged hard-window list of a batch, flattened: (image index, window index), each (ΣK,).

    Images follow each other; inside an image the windows keep their descending-score order.
    """
    b, n = order.shape
    rank = torch.arange(n, device=order.device)
    is_hard = rank.unsqueeze(0) < num_hard.unsqueeze(1)                 # [B, N]
    image = torch.arange(b, device=order.device).unsqueeze(1).expand(b, n)
    return image[is_hard], order[is_hard]


def training_mask(pred: Tensor, *, noise: bool = True,
                  generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-softmax hard mask (B, N, 1) of spec §4 (tau = 1).

    Forward value: 1 where the (noisy) hard score wins, else 0; gradient: that of
    softmax(pred + g). ``noise=False`` uses g = 0, the deterministic mask of the golden record.
    """
    logits = pred + gumbel_noise(pred, generator) if noise else pred
    soft = torch.softmax(logits, dim=-1)
    # first index wins ties, as argmax does
    hard = (soft[..., 0:1] >= soft[..., 1:2]).to(soft.dtype)
    return hard - soft[..., 0:1].detach() + soft[..., 0:1]
