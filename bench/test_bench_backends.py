"""Latency per backend × γ × input size, the official op chain included.

Backends: "official" (bench/official_baseline.py, the official code's op chain, standing in
for the official implementation), "reference" and "cpu". Inputs are real images: Set5's
butterfly LR crop (64×64), baby LR (128×128) and a 256×256 crop of Urban100 img_001. Before a
backend is timed on an input, its output there is checked against the reference model's
(max abs difference <= 1e-4): a wrong fast path never gets a time. ``extra_info`` records the
measured multiply-adds of that forward (``camixer_fast.evaluation.cost.count_madds``) and the K of every
block.
"""

from __future__ import annotations

import pytest
import torch
from benchlib import SHARED, read_rgb, record, to_tensor
from official_baseline import load_official_baseline

import camixer_fast
from camixer_fast.evaluation.cost import count_madds

TOL = 1e-4
GAMMAS = (1.0, 0.5, 0.25, 0.0)
BACKENDS = ("official", "reference", "cpu")
SIZES = {"64x64": 9, "128x128": 7, "256x256": 3}
"""Input name -> timed rounds."""


def bench_input(size: str) -> torch.Tensor:
    set5 = SHARED / "data" / "Set5" / "LR_bicubic" / "X4"
    if size == "64x64":
        return to_tensor(read_rgb(set5 / "butterflyx4.png"))[..., :64, :64].contiguous()
    if size == "128x128":
        return to_tensor(read_rgb(set5 / "babyx4.png"))
    if size == "256x256":
        img = to_tensor(read_rgb(SHARED / "data" / "Urban100" / "HR" / "img_001.png"))
        return img[..., 200:456, 300:556].contiguous()
    raise ValueError(size)


@pytest.fixture(scope="module")
def models(weights_path, reference_model) -> dict:
    return {"official": load_official_baseline(reference_model.state_dict()),
            "reference": reference_model,
            "cpu": camixer_fast.load_model(weights_path, backend="cpu")}


_EXPECTED: dict = {}


def expected(reference_model, size: str, gamma: float) -> tuple[torch.Tensor, list[int], int]:
    """The reference output, K per block and measured MAdds for (size, γ), computed once."""
    key = (size, gamma)
    if key not in _EXPECTED:
        x = bench_input(size)
        reference_model.gamma = gamma
        with torch.inference_mode():
            out, routing = reference_model(x, return_routing=True)
        ks = routing.num_hard()[:, 0].tolist()
        _EXPECTED[key] = (out, ks, count_madds(reference_model, x))
    return _EXPECTED[key]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("size", list(SIZES))
def test_backend(benchmark, models: dict, reference_model, size: str, gamma: float,
                 backend: str) -> None:
    x = bench_input(size)
    model = models[backend]
    model.gamma = gamma
    ref, ks, madds = expected(reference_model, size, gamma)
    with torch.inference_mode():
        out = model(x)
    err = float((out - ref).abs().max())
    if not err <= TOL:
        pytest.fail(f"{backend} differs from the reference on {size} at gamma={gamma}: "
                    f"max abs error {err:.3e} > {TOL:.0e}; not timed")

    def run() -> None:
        with torch.inference_mode():
            model(x)

    benchmark.group = f"backends {size} gamma={gamma}"
    record(benchmark, suite="backends", backend=backend, gamma=gamma, size=size,
           max_abs_error=err, madds=madds, num_hard=ks,
           windows=(x.shape[-2] // 16) * (x.shape[-1] // 16))
    benchmark.pedantic(run, rounds=SIZES[size], warmup_rounds=1, iterations=1)
