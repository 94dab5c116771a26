"""The training objective (spec §4): pixel L1 (or WS-L1 for 360° images) + the ratio loss
w·(m − 0.5)², m the mean training mask of the *global* batch; w = 2γ for CAMixerSR, 1 for
CAMixerOSR (the official ODI-SR objective)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from camixer_fast.reference.odisr import CAMixerOSR
from camixer_fast.train.distributed import unwrap, world_size

LOSSES = ("l1", "ws-l1")


def pixel_loss(sr: Tensor, hr: Tensor, weight: Tensor | None = None) -> Tensor:
    """L1 = mean |sr − hr| over (B, 3, H, W); with ``weight`` (B, 1, H, W), the WS-L1
    mean(weight · |sr − hr|) (unnormalised latitude weights, spec §4). Returns a 0-dim tensor."""
    diff = (sr - hr).abs()
    return diff.mean() if weight is None else (diff * weight).mean()


@dataclass
class LossTerms:
    """One step's objective: ``total`` (this rank's gradient); detached global ``l1``, ``ratio``
    and ``mask_means`` (blocks,)."""

    total: Tensor
    l1: Tensor
    ratio: Tensor
    mask_means: Tensor

    @property
    def loss(self) -> Tensor:
        return self.l1 + self.ratio


def ratio_weight(model: nn.Module) -> float:
    """w of the ratio loss w·(m − 0.5)²: 2γ for CAMixerSR, 1 for CAMixerOSR (official)."""
    return 1.0 if isinstance(model, CAMixerOSR) else 2.0 * model.gamma


def training_loss(net: nn.Module, lr: Tensor, hr: Tensor, weight: Tensor | None = None, *,
                  condition: Tensor | None = None,
                  generator: torch.Generator | None = None) -> LossTerms:
    """Pixel L1 + w·(m − 0.5)² (:func:`ratio_weight`) on a (DDP-wrapped) model in training mode:
    lr (b, 3, p, p), hr (b, 3, s·p, s·p), weight None or (b, 1, s·p, s·p) for WS-L1, condition
    (b, 1, p, p) for CAMixerOSR (None: each crop taken as a whole panorama), refused for
    CAMixerSR. Under torch.distributed the mask means and L1 are all-reduced and each rank's
    ratio gradient is 2w(m − 0.5)·∇m_rank, so DDP's average is the global objective's gradient."""
    model = unwrap(net)
    if not model.training:
        raise RuntimeError("training_loss needs the model in training mode (model.train())")
    if isinstance(model, CAMixerOSR):
        sr, _, routing = net(lr, condition, generator=generator, return_routing=True)
    elif condition is not None:
        raise ValueError("a latitude condition is for CAMixerOSR; CAMixerSR takes none")
    else:
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
    w = ratio_weight(model)
    slope = 2.0 * w * (m_global - 0.5)
    ratio = w * (m_global - 0.5) ** 2
    total = pix + ratio + slope * (m_local - m_local.detach())
    return LossTerms(total, stats[0], ratio, stats[1:])


__all__ = [
    "LOSSES",
    "LossTerms",
    "pixel_loss",
    "ratio_weight",
    "training_loss",
]
