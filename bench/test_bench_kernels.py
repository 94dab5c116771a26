"""Per-op kernel benchmarks: reference | triton | compiled (torch.compile of the reference op) on
one block's maps of S at 720p (C = 36, 192×320 padded, γ = 0.5), each checked against the
reference before it is timed. CUDA only (``CAMIXER_BENCH_GPU_SMOKE=1``: 32×32 on the CPU in
Triton's interpreter, which checks this file, not speed).

    python -m pytest bench/test_bench_kernels.py --benchmark-json=/tmp/kernels.json
"""

from __future__ import annotations

import os

import pytest
import torch
from common import TOLERANCE, record, sync

from camixer_fast.backends import select_backend

CUDA = torch.cuda.is_available()
SMOKE = os.environ.get("CAMIXER_BENCH_GPU_SMOKE") == "1" and not CUDA
DEVICE = torch.device("cuda" if CUDA else "cpu")
C, WS = 36, 16
H, W = (32, 32) if SMOKE else (192, 320)
PROVIDERS = ("reference", "triton") if SMOKE else ("reference", "triton", "compiled")

pytestmark = pytest.mark.skipif(not (CUDA or SMOKE),
                                reason="needs a CUDA device (or CAMIXER_BENCH_GPU_SMOKE=1)")


@pytest.fixture(scope="module")
def maps() -> dict:
    """Seeded inputs of one block: x, v, the predictor's hidden map, offsets and sa, the window
    MLP's and the Q/K projections' weights."""
    if SMOKE:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    c4 = (C + 4) // 4

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    return {"x": rand(1, C, H, W), "v": rand(1, C, H, W),
            "hidden": rand(1, c4, H, W).contiguous(memory_format=torch.channels_last),
            "offsets": rand(1, 2, H, W, scale=2.0), "sa": torch.sigmoid(rand(1, 1, H, W)),
            "mlp": (rand(WS, WS * WS, scale=WS ** -1), rand(WS, scale=0.1),
                    rand(2, WS, scale=WS ** -0.5), rand(2, scale=0.1)),
            "qk": (rand(C, C, scale=C ** -0.5), rand(C, scale=0.1), rand(C, C, scale=C ** -0.5),
                   rand(C, scale=0.1))}


def ops_of(provider: str):
    ops = select_backend("reference" if provider == "compiled" else provider, DEVICE).ops
    return ops, (torch.compile if provider == "compiled" else (lambda f: f))


def route(ops, wrap, m: dict):
    fn = wrap(ops.route_windows)
    return lambda: fn(m["hidden"], *m["mlp"], 0.5, window_size=WS)


def attention(ops, wrap, m: dict):
    """The deformable keys of the hard windows, then the window attention."""
    routing = select_backend("reference", DEVICE).ops.route_windows(m["hidden"], *m["mlp"], 0.5,
                                                                    window_size=WS)
    key, attend = wrap(ops.deformable_key), wrap(ops.window_attention)

    def run():
        k_in = key(m["x"], m["offsets"], routing.num_hard, routing.order, window_size=WS)
        return attend(m["x"], k_in, m["v"], m["sa"], *m["qk"], routing.num_hard, routing.order,
                      window_size=WS)

    return run


OPS = {"route": route, "attention": attention}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(OPS))
def test_kernel(benchmark, maps: dict, op: str, provider: str) -> None:
    run = OPS[op](*ops_of(provider), maps)
    expected = OPS[op](*ops_of("reference"), maps)
    with torch.inference_mode():
        got, want = run(), expected()
        if op == "route":
            assert torch.equal(got.num_hard, want.num_hard) and torch.equal(got.order, want.order)
            err = float((got.pred.float() - want.pred.float()).abs().max())
        else:
            err = float((got.float() - want.float()).abs().max())
        assert err <= TOLERANCE["fp32"], f"{op} {provider}: max abs {err:.2e} > 1e-4; not timed"
        benchmark.group = f"kernel {op}"
        record(benchmark, suite="kernel", op=op, provider=provider, max_abs=err)
        benchmark.pedantic(lambda: (run(), sync()), warmup_rounds=2, rounds=2 if SMOKE else 20,
                           iterations=1)
