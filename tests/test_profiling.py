"""camixer_fast.evaluation.profiling: the runtime breakdown of paper Fig. 6."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import camixer_fast
from camixer_fast.evaluation.profiling import PARTS, profile_ranges, runtime_breakdown
from camixer_fast.reference.model import span


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("gamma", [1.0, 0.0], ids=lambda g: f"gamma={g}")
def test_breakdown_shares(weights_path, backend: str, gamma: float) -> None:
    model = camixer_fast.load_model(weights_path, gamma=gamma, backend=backend)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    shares = runtime_breakdown(model, x, runs=1)
    assert tuple(shares) == PARTS
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    for part in ("predictor", "attention", "conv", "ffn"):
        assert shares[part] > 0.0, part


class Marked(nn.Module):
    """Sleeps inside known ranges, so the breakdown's arithmetic can be checked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with span("camixer.attention"):
            time.sleep(0.03)
        with span("camixer.ffn"):
            time.sleep(0.01)
        time.sleep(0.01)
        return x


def test_ranges_are_summed_per_forward() -> None:
    spent = profile_ranges(Marked(), torch.zeros(1), runs=2, warmup=0)
    assert spent["attention"] == pytest.approx(0.03, abs=0.015)
    assert spent["ffn"] == pytest.approx(0.01, abs=0.01)
    assert spent["predictor"] == 0.0 and spent["conv"] == 0.0
    assert spent["total"] == pytest.approx(sum(spent[p] for p in PARTS))
    shares = runtime_breakdown(Marked(), torch.zeros(1), runs=1, warmup=0)
    assert shares["attention"] > shares["ffn"] > 0.0


def test_bad_runs() -> None:
    with pytest.raises(ValueError, match="runs"):
        profile_ranges(Marked(), torch.zeros(1), runs=0)
