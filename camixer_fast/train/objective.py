"""The training objective (spec §4): pixel L1 (or the latitude-weighted WS-L1 of 360°
equirectangular images) + the ratio loss 2γ·(m − 0.5)², m the mean training mask over all
blocks, windows and images of the *global* batch, with a gradient that DDP's average makes the
global objective's (see :func:`training_loss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from camixer_fast.train.distributed import unwrap, world_size

LOSSES = ("l1", "ws-l1")


def pixel_loss(sr: Tensor, hr: Tensor, weight: Tensor | None = None) -> Tensor:
    """L1 = mean |sr − hr| over (B, 3, H, W); with ``weight`` (B, 1, H, W), the WS-L1
    mean(weight · |sr − hr|) (unnormalised latitude weights, spec §4). Returns a 0-dim tensor."""
    diff = (sr - hr).abs()
    return diff.mean() if weight is None else (diff * weight).mean()


@dataclass
class LossTerms:
    """One training step's objective. ``total`` carries the gradient of this rank's share;
    the rest are detached values of the global batch: ``l1`` the pixel loss, ``ratio`` the
    ratio loss, ``mask_means`` (blocks,) the fraction of windows each block sent to attention."""

    total: Tensor
    l1: Tensor
    ratio: Tensor
    mask_means: Tensor

    @property
    def loss(self) -> Tensor:
        return self.l1 + self.ratio


def training_loss(net: nn.Module, lr: Tensor, hr: Tensor, weight: Tensor | None = None, *,
                  generator: torch.Generator | None = None) -> LossTerms:
    """The official objective, pixel L1 + 2γ·(m − 0.5)², on a (possibly DDP-wrapped) model in
    training mode.

    lr: (b, 3, p, p), hr: (b, 3, s·p, s·p), weight: None or (b, 1, s·p, s·p) for WS-L1.
    m is the mean training mask over all blocks, windows and images of the global batch. Under
    torch.distributed (equal local batches on every rank) the per-block mask means and the
    pixel loss are all-reduced, and the ratio term's gradient on each rank is
    4γ(m − 0.5)·∇m_rank, so that DDP's average of the ranks' gradients is the gradient of the
    global objective; in a single process this is the gradient of the model's own ratio loss.
    """
    model = unwrap(net)
    if not model.training:
        raise RuntimeError("training_loss needs the model in training mode (model.train())")
    sr, _, routing = net(lr, generator=generator, return_routing=True)
    local_means = routing.mask_means()
    pix = pixel_loss(sr, hr, weight)
    stats = torch.cat([pix.detach().reshape(1), local_means.detach().float()])
    world = world_size()
    if world > 1:
        dist.all_reduce(stats)
        stats = stats / world
    m_global = stats[1:].mean()
    m_local = local_means.mean()
    slope = 4.0 * model.gamma * (m_global - 0.5)
    ratio = 2.0 * model.gamma * (m_global - 0.5) ** 2
    total = pix + ratio + slope * (m_local - m_local.detach())
    return LossTerms(total, stats[0], ratio, stats[1:])


__all__ = [
    "LOSSES",
    "LossTerms",
    "pixel_loss",
    "training_loss",
]
