"""The GPU latency table of issue 11 as a pytest-benchmark suite, CUDA-synchronised.

    python -m pytest bench/test_bench_gpu.py --benchmark-json=bench/results/gpu-bench.json

S (``CAMixerSR_S.pth``) at 320×180 -> 1280×720 ×4 on a crop of Urban100 img_001, γ = 1 / 0.5 /
0.25 / 0, the official op chain (``bench/official_baseline.py``) and the Triton backend in the
precision modes of ``bench/gpu_bench.py`` (fp32 parity, TF32, fp16, bf16). Each case is first
checked against the official chain's fp32 output (TF32 off) with ``gpu_bench``'s tolerances; a
case that fails gets no time. Every timed call ends with ``torch.cuda.synchronize()``.
``extra_info`` holds the error, the attended fraction and the card.

This is the same table as ``gpu_bench.py``'s ``latency`` section, which adds B, the reference,
the kernels' roofline shares, the batch, large-image, training and upscale rows, time limits and
the RESULTS.md report: the one command of the GPU check. Without CUDA every case is skipped,
unless ``CAMIXER_BENCH_GPU_SMOKE=1``: then a small seeded model runs the same cases on the CPU
at 32×32 in fp32 (Triton's interpreter), which checks this file, not speed.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from benchlib import SHARED, record
from gpu_bench import (GAMMAS, PRECISIONS, TOLERANCE, Context, _errors, _forward, _passes,
                       environment, precision_mode)

SMOKE = os.environ.get("CAMIXER_BENCH_GPU_SMOKE") == "1"
IMPLEMENTATIONS = ("official", "triton")
TIMED_PRECISIONS = ("fp32",) if SMOKE and not torch.cuda.is_available() else \
    ("fp32", "tf32", "fp16", "bf16")
"""The smoke run on the CPU keeps fp32 (the interpreter's bf16 products are broken)."""

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or SMOKE),
                                reason="needs a CUDA device (or CAMIXER_BENCH_GPU_SMOKE=1)")


@pytest.fixture(scope="module")
def ctx() -> Context:
    if SMOKE:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = SimpleNamespace(smoke=SMOKE and not torch.cuda.is_available(), mode="quick",
                           weights=SHARED / "weights" / "CAMixerSR_S.pth", weights_b=None,
                           image=SHARED / "data" / "Urban100" / "HR" / "img_001.png",
                           part=None, size=(320, 180))
    return Context(args)


@pytest.fixture(scope="module")
def expected(ctx: Context) -> dict:
    """The official chain's fp32 output (TF32 off) per γ."""
    x = ctx.crop(ctx.args.size)
    out = {}
    with precision_mode("fp32"):
        net = ctx.build("S", "official", torch.float32)
        for gamma in GAMMAS:
            net.gamma = gamma
            out[gamma] = _forward(net, x).float()
    return out


@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma{g}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("precision", TIMED_PRECISIONS)
def test_latency(benchmark, ctx: Context, expected: dict, precision: str, impl: str,
                 gamma: float) -> None:
    dtype = getattr(torch, PRECISIONS[precision][0])
    x = ctx.crop(ctx.args.size).to(dtype)
    with precision_mode(precision):
        net = ctx.build("S", impl, dtype, gamma)
        out = _forward(net, x)
        case = {"finite": bool(torch.isfinite(out).all()), **_errors(out, expected[gamma])}
        if impl != "official":
            _, routing = _forward(net, x, routing=True)
            case["k_fraction"] = float(routing.k_fraction().float().mean())
        assert case["finite"], f"{precision} {impl}: non-finite output"
        assert impl == "official" or _passes(case, precision), (
            f"{precision} {impl} gamma={gamma}: max |out - official fp32| "
            f"{case['max_abs_vs_official_fp32']:.2e} > {TOLERANCE[precision]}")

        def call() -> None:
            _forward(net, x)
            ctx.sync()

        record(benchmark, precision=precision, impl=impl, gamma=gamma, **case,
               machine=environment())
        benchmark.pedantic(call, warmup_rounds=2, rounds=ctx.mode["runs"] * 2, iterations=1)
