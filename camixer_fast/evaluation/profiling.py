"""Where the time goes: the runtime breakdown of paper Fig. 6 from ``torch.profiler``.

The network marks four ranges while a profiler runs (``PROFILE_RANGES`` of
:mod:`camixer_fast.reference.model`): the predictor with the routing, the token mixing
(deformable keys and window attention), the mixer's convolutions, the FFN. Everything else
(head, norms, group tails, upsampler, padding) is "rest". The profiler adds a small cost per
operation, so the shares lean slightly towards the parts made of many small operations.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

RANGES = {"predictor": "camixer.predictor", "attention": "camixer.attention",
          "conv": "camixer.conv", "ffn": "camixer.ffn"}
"""Breakdown keys and the ``record_function`` ranges they sum."""

PARTS = (*RANGES, "rest")


def profile_ranges(model: nn.Module, x: Tensor, *, runs: int = 3,
                   warmup: int = 1) -> dict[str, float]:
    """Seconds per forward spent in each marked range, and the whole forward's wall time.

    model: a CAMixerSR (or anything marking the same ranges); x: its (B, 3, H, W) input.
    Runs ``warmup`` unprofiled forwards, then ``runs`` profiled ones under
    ``torch.inference_mode()``, and returns the mean per forward of each range's wall time
    (``{"predictor", "attention", "conv", "ffn"}``), ``"rest"`` (the forward minus those) and
    ``"total"``.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                model(x)
            total = (time.perf_counter() - start) / runs
    spent = dict.fromkeys(RANGES, 0.0)
    names = {name: key for key, name in RANGES.items()}
    for event in prof.events():
        key = names.get(event.name)
        if key is not None:
            spent[key] += event.time_range.elapsed_us() * 1e-6 / runs
    spent["rest"] = max(total - sum(spent.values()), 0.0)
    spent["total"] = total
    return spent


def runtime_breakdown(model: nn.Module, x: Tensor, *, runs: int = 3,
                      warmup: int = 1) -> dict[str, float]:
    """Share of one forward's time in each part (paper Fig. 6), summing to 1.

    model: a CAMixerSR on any backend; x: (B, 3, H, W). Returns ``{"predictor", "attention",
    "conv", "ffn", "rest"}`` as fractions of the profiled forward's wall time (see
    :func:`profile_ranges`; "conv" is the mixer's depthwise convolutions and output
    projection, "ffn" the gated feed-forward network).
    """
    spent = profile_ranges(model, x, runs=runs, warmup=warmup)
    total = sum(spent[part] for part in PARTS)
    return {part: spent[part] / total for part in PARTS}
