"""Quality reproduction: Set5 ×4 Y-PSNR equals the official figures (../shared/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camixer_fast
from camixer_fast.evaluation.metrics import psnr
from conftest import load_rgb, to_uint8

SET5 = ("baby", "bird", "butterfly", "head", "woman")
OFFICIAL_MEAN = {1.0: 32.330, 0.5: 32.262, 0.25: 32.164}
OFFICIAL_GAMMA1 = {"baby": 33.831, "bird": 34.915, "butterfly": 29.021, "head": 32.981,
                   "woman": 30.901}


def set5_psnr(model: camixer_fast.CAMixerSR, shared: Path) -> dict[str, float]:
    scores = {}
    for name in SET5:
        lr = load_rgb(shared / "data" / "Set5" / "LR_bicubic" / "X4" / f"{name}x4.png")
        hr = np.asarray(Image.open(shared / "data" / "Set5" / "HR" / f"{name}.png").convert("RGB"))
        with torch.no_grad():
            sr = to_uint8(model(lr))
        hr = hr[: sr.shape[0], : sr.shape[1]]
        scores[name] = psnr(sr, hr, border=4)
    return scores


@pytest.mark.parametrize("gamma", list(OFFICIAL_MEAN), ids=lambda g: f"gamma={g}")
def test_set5_psnr(model_s: camixer_fast.CAMixerSR, shared: Path, gamma: float) -> None:
    model_s.gamma = gamma
    scores = set5_psnr(model_s, shared)
    mean = float(np.mean(list(scores.values())))
    print({k: round(v, 3) for k, v in scores.items()}, f"mean {mean:.4f}")
    assert abs(mean - OFFICIAL_MEAN[gamma]) <= 0.01
    if gamma == 1.0:
        for name, official in OFFICIAL_GAMMA1.items():
            assert abs(scores[name] - official) <= 0.01, name
