"""bench/report.py renders RESULTS.md from benchmark JSON (synthetic numbers here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def report():
    return bench_module("report")


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


def test_official_code_section(report, tmp_path: Path) -> None:
    """The section of bench/official_speed.py, from its JSON: table, verdict, provenance."""
    rows = [{"image": "Urban100/img_004", "size": "128x128", "gamma": g,
             "check": {"official_vs_ours_same_draw": 1e-6, "ours_vs_reference": 2e-6},
             "official_s": 0.8 * g + 0.2, "ours_s": 0.3 * g + 0.05, "speedup": s,
             "official_k_fraction": g, "ours_k_fraction": g, "loadavg_1min_start": 0.2,
             "loadavg_1min_end": 0.4} for g, s in ((1.0, 2.86), (0.5, 2.6))]
    rows.append({"image": "Set14/barbara", "size": "128x128", "gamma": 0.25,
                 "check": {"official_vs_ours_same_draw": 3e-3, "ours_vs_reference": 1e-6},
                 "skipped": "official_vs_ours_same_draw above 0.0001: not timed"})
    data = {"official": {"repo": "https://github.com/icandle/CAMixerSR", "commit": "d690b12bb",
                         "file": "CAMixerSR_arch.py"},
            "ours": {"backend": "cpu", "routing": "expected"}, "threads": 2, "rounds": 5,
            "tolerance": 1e-4, "target": 2.5, "mode": "no_grad", "date": "2026-12-01",
            "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "2.x"}, "rows": rows}
    text = "\n".join(report.official_lines(data))
    assert "| Urban100/img_004 128x128 | 1 | 1000 ms | 350 ms | **2.86×** |" in text
    assert "not timed" in text and "**not met** (lowest 2.60×)" in text
    assert "icandle/CAMixerSR at `d690b12`" in text and "2 threads" in text
    data["rows"] = rows[:2]
    data["profile"] = {"input": "Urban100/img_004 128x128", "threads": 2, "gammas": {"0.5": {
        "official": {"total_ms": 800.0, "ops": [["aten::bmm", 240.0, 0.3]]},
        "ours": {"total_ms": 300.0, "ops": [["aten::addmm", 90.0, 0.3]]},
        "ours_ranges_ms": {"predictor": 50.0, "attention": 100.0, "total": 300.0}}}}
    text = "\n".join(report.official_lines(data))
    assert "**met** (lowest 2.60×)" in text
    assert "| 0.5 | official | 800 ms | bmm 30% |" in text
    assert "| 0.5 | ours by range | 300 ms | predictor 50 ms, attention 100 ms |" in text


def test_onnx_table(report) -> None:
    onnx = {"rows": [{"gamma": 0.5, "cpu_s": 0.2, "onnxruntime_s": 0.3,
                      "errors": {"onnxruntime": 2.5e-5, "cpu": 1e-6}}]}
    assert "| 0.5 | 200 ms | 300 ms | 1.50 | 2.5e-05 |" in report.onnx_lines(onnx)


def test_report_keeps_the_gpu_section(report, tmp_path: Path) -> None:
    """RESULTS.md's GPU section is bench/gpu_report.py's: report.py rewrites the rest."""
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_run(2.5, 0.6)))
    out = tmp_path / "RESULTS.md"
    gpu = "<!-- gpu-results:begin -->\n## GPU\n\nkept\n<!-- gpu-results:end -->\n"
    out.write_text("# old CPU results\n\n" + gpu)
    assert report.main([str(path), "--out", str(out), "--results", str(tmp_path / "r"),
                        "--skip", "breakdown", "quality", "memory", "onnx"]) == 0
    text = out.read_text()
    assert "old CPU results" not in text and text.startswith("# CAMixerSR-S latency on the CPU")
    assert text.endswith("\n" + gpu) and text.count("gpu-results:begin") == 1
