"""Where the time goes (paper Fig. 6): seconds per forward in each range the network marks
under ``torch.profiler`` (predictor, attention, conv, ffn) and the rest."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

RANGES = {"predictor": "camixer.predictor", "attention": "camixer.attention",
          "conv": "camixer.conv", "ffn": "camixer.ffn"}
PARTS = (*RANGES, "rest")


def profile_ranges(model: nn.Module, x: Tensor, *, runs: int = 3,
                   warmup: int = 1) -> dict[str, float]:
    """Mean seconds per forward of ``model(x)`` in each range of :data:`RANGES`, "rest" and
    "total", over ``runs`` profiled forwards after ``warmup`` (inference mode)."""
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
    """Share of one forward's time in each part of :data:`PARTS`, summing to 1."""
    spent = profile_ranges(model, x, runs=runs, warmup=warmup)
    total = sum(spent[part] for part in PARTS)
    return {part: spent[part] / total for part in PARTS}
