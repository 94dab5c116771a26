"""The kernel cost model (camixer_fast.evaluation.cost) and the GPU latency table
(bench/test_bench_gpu.py) in its CPU smoke mode: a small seeded model in Triton's interpreter,
every case checked before it is timed (the code paths, not the numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from camixer_fast.evaluation import cost
from conftest import BENCH, REPO, bench_module


def test_cost_model_arithmetic() -> None:
    s = cost.Shape(1, 36, 192, 320)                          # S at 720p, padded
    assert (s.pixels, s.tokens, s.windows) == (61440, 256, 240)
    attention = cost.hard_window_attention(s, 120)
    # 120 hard windows: Q projection and the W_k fold (2·t·C² each), QKᵀ and PV (2·t²·C each)
    assert attention.matrix_flops == 120 * (4 * 256 * 36 * 36 + 4 * 256 * 256 * 36)
    assert attention.vector_flops == 120 * 6 * 256 * 256 + 36 * 120 * 256
    assert attention.bytes == (3 * 36 * 120 * 256 + 2 * 36 * 36 + 37 * 120 * 256
                               + 36 * 61440) * 4
    assert cost.deform_key_hard(s, 120).bytes == (2 * 36 + 2) * 120 * 256 * 4
    half = cost.Shape(1, 36, 192, 320, itemsize=2)           # half the bytes, the same FLOPs
    assert cost.hard_window_attention(half, 240).bytes * 2 == \
        cost.hard_window_attention(s, 240).bytes
    costs = cost.inference_costs(s, [0, 240])
    assert costs["hard_window_attention"] == (cost.hard_window_attention(s, 0)
                                              + cost.hard_window_attention(s, 240))
    assert costs["select"].bytes == 2 * cost.select(s).bytes
    training = cost.training_costs(cost.Shape(16, 36, 64, 64), 20)
    assert training["attention_bwd_dkv"].matrix_flops == 20 * 256 * 8 * 256 * 256 * 36


def test_block_kernel_costs() -> None:
    px = 192 * 320
    s = cost.Shape(1, 36, 192, 320)                          # S, fp32: c4 = 10, c8 = 5
    assert cost.predictor(s).bytes == px * (40 * 4 + (36 + 10 + 2) * 4 + 4)
    assert cost.ffn_tail(s).matrix_flops == px * 2 * 36 * 36
    half = cost.Shape(1, 60, 192, 320, itemsize=2)           # B, fp16
    assert cost.depthwise3x3(half).bytes == 2 * px * 60 * 2
    assert cost.mixer_tail(half).bytes == px * 6 * 60 * 2
    fused = cost.inference_costs(s, [120] * 20)
    assert fused["mixer_tail"].matrix_flops == 20 * 61440 * 2 * 3 * 36 * 36
    assert fused["window_scores"].bytes == 20 * (61440 * 4 + 240 * 8)
    plain = cost.inference_costs(s, [120] * 20, fused_block=False)
    assert "predictor" not in plain
    assert plain["window_scores"].bytes == 20 * (10 * 61440 * 4 + 240 * 8)


def test_cost_model_agrees_with_the_aot_gates_frame() -> None:
    aot = bench_module("aot", REPO / "tests" / "gates")
    frame = {c.name: c for c in aot.frame_costs()}["hard_window_attention"]
    ours = cost.hard_window_attention(cost.Shape(1, 60, 192, 320), 120)
    assert ours.bytes == frame.bytes
    assert ours.matrix_flops + 60 * 120 * 256 == frame.flops


def test_floor_and_bound() -> None:
    peaks = cost.Ceilings(bandwidth=1e12, fp32=1e12, tf32=6e12, fp16=8e12, bf16=8e12)
    assert peaks.matrix_rate("tf32x3") == 2e12 and peaks.matrix_rate("ieee") == 1e12
    with pytest.raises(ValueError, match="precision"):
        peaks.matrix_rate("fp8")
    c = cost.Cost(bytes=2e6, matrix_flops=4e6, vector_flops=1e6)
    assert c.floor_s(peaks, "ieee") == pytest.approx(5e-6)       # 4 + 1 µs of compute
    assert c.bound(peaks, "ieee") == "compute"
    assert c.floor_s(peaks, "fp16") == pytest.approx(2e-6)       # 2 µs of bytes
    assert c.bound(peaks, "fp16") == "memory"


def test_gpu_table_smoke(tmp_path: Path) -> None:
    """bench/test_bench_gpu.py on the CPU: the latency cases (fp32, official and Triton, every
    γ) and the training rows (fp32 and bf16 autocast against the reference fp32 step), each
    checked, then timed; a failed check names the case, its errors and tolerances."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CAMIXER_BENCH_GPU_SMOKE="1")
    done = subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "test_bench_gpu.py"),
                           "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = {c["name"]: c["extra_info"] for c in json.loads(out.read_text())["benchmarks"]}
    latency = [i for i in cases.values() if i["suite"] == "gpu-latency"]
    assert len(latency) == 8 and all(i["precision"] == "fp32" for i in latency)
    assert all(i["max_abs"] <= 1e-4 for i in latency if i["impl"] == "triton")
    training = {(i["impl"], i["mode"]): i for i in cases.values() if i["suite"] == "gpu-training"}
    assert set(training) == {("official", "fp32"), ("reference", "fp32"), ("triton", "fp32"),
                             ("official", "bf16-autocast"), ("reference", "bf16-autocast")}
    assert training["triton", "fp32"]["grad_rel_l2"] < 1e-5
    assert training["reference", "bf16-autocast"]["grad_rel_l2"] <= 0.15
