"""Latency of ``camixer_fast.upscale`` per γ on Set5, Set14 and large Urban100 inputs.

One benchmark per (set, γ): a round is the whole set, each image through ``upscale`` (uint8
arrays in and out, the default backend, which is "cpu" on the CPU). The first call of each
benchmark loads the model into upscale's cache and is not timed (warm-up round).
"""

from __future__ import annotations

import pytest
from benchlib import dataset_lr, record

import camixer_fast
from camixer_fast.backends import select_backend

GAMMAS = (1.0, 0.5, 0.25, 0.0)
SETS = {"Set5": 5, "Set14": 3, "Urban100": 1}
"""Timed rounds per set (Urban100's inputs are ~1024×700 LR, 4096×2800 out)."""

_IMAGES: dict[str, dict] = {}


def images(name: str) -> dict:
    if name not in _IMAGES:
        _IMAGES[name] = dataset_lr(name)
    return _IMAGES[name]


@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("dataset", list(SETS))
def test_upscale(benchmark, weights_path, dataset: str, gamma: float) -> None:
    lrs = images(dataset)

    def run() -> None:
        for lr in lrs.values():
            out = camixer_fast.upscale(lr, gamma, weights=weights_path)
            assert out.shape[:2] == (4 * lr.shape[0], 4 * lr.shape[1])

    benchmark.group = f"upscale {dataset}"
    record(benchmark, suite="upscale", dataset=dataset, gamma=gamma, images=len(lrs),
           lr_pixels=sum(lr.shape[0] * lr.shape[1] for lr in lrs.values()),
           backend=select_backend("auto", "cpu").name)
    benchmark.pedantic(run, rounds=SETS[dataset], warmup_rounds=1, iterations=1)
