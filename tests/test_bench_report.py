"""bench/report.py: rows of the one results file from pytest-benchmark JSON, and
bench/README.md rendered from the rows (synthetic numbers here); nothing tracked written
unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import BENCH, bench_module

STAMP = {"device": "Test CPU (2 cores, 2 threads)", "versions": {"torch": "2.0"},
         "commit": "abc1234", "date": "2026-12-06"}


def benchmark_json() -> dict:
    def case(name: str, median_s: float, **info) -> dict:
        return {"name": name, "stats": {"median": median_s},
                "extra_info": {"threads": 2, "loadavg_1min": 0.5, **info}}

    benches = [case(f"test_backend[64x64-gamma={g}-{b}]", t * (1 + g), suite="backend",
                    backend=b, gamma=g, size="64x64", max_abs_error=1e-6)
               for g in (1.0, 0.5, 0.25, 0.0) for b, t in (("official", 0.3), ("reference", 0.2),
                                                           ("cpu", 0.1))]
    benches.append(case("test_latency[fp32-triton-gamma0.5]", 0.004, suite="gpu-latency",
                        precision="fp32", impl="triton", gamma=0.5, max_abs=2e-6))
    return {"machine_info": {"camixer_fast": {k: v for k, v in STAMP.items() if k != "date"}},
            "commit_info": {"id": "abc1234def"}, "datetime": "2026-12-06T10:00:00",
            "benchmarks": benches}


def test_rows_from_a_benchmark_json() -> None:
    report = bench_module("report")
    rows = report.rows_from_benchmark(benchmark_json())
    assert len(rows) == 13
    first = rows[0]
    assert (first["suite"], first["metric"], first["unit"]) == ("backend", "median", "ms")
    assert first["value"] == pytest.approx(600.0)
    assert first["params"] == {"backend": "official", "gamma": 1.0, "size": "64x64",
                               "max_abs_error": 1e-6}
    assert (first["device"], first["commit"], first["date"]) == (STAMP["device"], "abc1234",
                                                                 "2026-12-06")


def test_render_tables_and_provenance() -> None:
    report = bench_module("report")
    common = bench_module("common")
    rows = report.rows_from_benchmark(benchmark_json())
    rows.append(common.row("memory", "cpu S 1024x1024", "peak_rss", 2394.0, "MB", STAMP))
    text = report.render(rows)
    assert text.startswith("# Benchmarks") and "do not edit by hand" in text
    assert "| 64x64 | 0.5 | 450.0 | 300.0 | 150.0 | 3.00× |" in text
    assert "Test CPU (2 cores, 2 threads), torch 2.0, commit abc1234, 2026-12-06." in text
    assert "| fp32 | triton | 0.5 | 2.00e-06 | 4.00 |" in text
    assert "| cpu S 1024x1024 | 2394 MB |" in text
    # a later date of a suite replaces the earlier rows; other suites keep theirs
    later = [dict(r, date="2026-12-07", value=r["value"] / 2) for r in rows
             if r["suite"] == "backend"]
    assert "| 64x64 | 0.5 | 225.0 | 150.0 | 75.0 | 3.00× |" in report.render(rows + later)


def test_nothing_tracked_is_written_unless_asked(tmp_path: Path, monkeypatch, capsys) -> None:
    report = bench_module("report")
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(benchmark_json()))
    assert report.WORK_RESULTS.parent != BENCH
    out = tmp_path / "results.jsonl"
    assert report.main(["add", str(source), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 13
    readme = tmp_path / "README.md"
    monkeypatch.setattr(report, "README", readme)
    assert report.main(["--results", str(out)]) == 0
    assert "# Benchmarks" in capsys.readouterr().out and not readme.exists()
    assert report.main(["--results", str(out), "--write"]) == 0
    assert readme.read_text().startswith("# Benchmarks")


def test_the_readme_is_generated_from_the_results_file() -> None:
    report = bench_module("report")
    common = bench_module("common")
    assert (BENCH / "README.md").read_text() == report.render(common.read_rows()), \
        "bench/README.md is stale: python bench/report.py --write"
