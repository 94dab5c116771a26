"""bench/report.py renders RESULTS.md from benchmark JSON (synthetic numbers here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(speedup: float, ratio: float) -> dict:
    """A pytest-benchmark file with the backend suite at 128x128 and one upscale set."""
    benches = []
    for gamma in (1.0, 0.5, 0.25, 0.0):
        cpu = 0.1 * (1.0 if gamma == 1.0 else ratio if gamma == 0.25 else 0.8)
        times = {"cpu": cpu, "reference": 2 * cpu,
                 "official": speedup * cpu if gamma == 0.5 else 3 * cpu}
        for backend, t in times.items():
            benches.append({"stats": {"median": t, "min": t, "rounds": 3}, "extra_info": {
                "suite": "backends", "backend": backend, "gamma": gamma, "size": "128x128",
                "madds": int(1e9 * (0.4 + 0.6 * gamma)), "num_hard": [int(64 * gamma)] * 20,
                "windows": 64, "threads": 2, "loadavg_1min": 0.3, "max_abs_error": 1e-6}})
        benches.append({"stats": {"median": 0.5 + gamma, "min": 0.5, "rounds": 5}, "extra_info": {
            "suite": "upscale", "dataset": "Set5", "gamma": gamma, "images": 5,
            "lr_pixels": 80000, "threads": 2, "loadavg_1min": 0.4, "backend": "cpu"}})
    return {"machine_info": {"camixer_fast": {"cpu_model": "Test CPU", "cpu_count": 2,
                                              "torch": "2.x", "triton": "none", "threads": 2}},
            "datetime": "2026-01-01T00:00:00", "benchmarks": benches}


@pytest.mark.parametrize("speedup, ratio, verdicts", [(2.5, 0.6, ("yes", "yes")),
                                                      (1.5, 0.9, ("NO", "NO"))],
                         ids=["met", "missed"])
def test_report_states_targets(report, tmp_path: Path, speedup: float, ratio: float,
                               verdicts: tuple[str, str]) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_run(speedup, ratio)))
    out = tmp_path / "RESULTS.md"
    assert report.main([str(path), "--out", str(out), "--results", str(tmp_path / "r"),
                        "--skip", "breakdown", "quality", "memory", "onnx"]) == 0
    text = out.read_text()
    assert "Test CPU, 2 cores" in text and "torch threads: 2" in text
    assert f"**{speedup:.2f}×** | {verdicts[0]} |" in text
    assert f"**{ratio:.3f}** | {verdicts[1]} |" in text
    assert "| 80 ms | 0.80 |" in text                       # cpu latency and its ratio to γ=1
    assert "| Set5 | 5 | 0.08M | 1 |" in text


def test_breakdown_and_quality_tables(report) -> None:
    breakdown = {"runs": 1, "input": "x", "machine": {"threads": 2}, "rows": [
        {"backend": "cpu", "gamma": 0.5, "shares": {"predictor": 0.2, "attention": 0.3,
                                                     "conv": 0.1, "ffn": 0.3, "rest": 0.1}}]}
    assert "| cpu | 0.5 | 20% | 30% | 10% | 30% | 10% |" in report.breakdown_lines(breakdown)
    quality = {"backend": "cpu", "sets": {"Set5": [
        {"gamma": 1.0, "mean_psnr": 32.33, "mean_ssim": 0.8969, "mean_k_fraction": 1.0,
         "mean_madds": 2.5e9}]}}
    assert ("| Set5 | 1 | 32.330 dB | 0.8969 | 1.00 | 2.50G |"
            in report.quality_lines(quality))


def test_onnx_table(report) -> None:
    onnx = {"rows": [{"gamma": 0.5, "cpu_s": 0.2, "onnxruntime_s": 0.3,
                      "errors": {"onnxruntime": 2.5e-5, "cpu": 1e-6}}]}
    assert "| 0.5 | 200 ms | 300 ms | 1.50 | 2.5e-05 |" in report.onnx_lines(onnx)
