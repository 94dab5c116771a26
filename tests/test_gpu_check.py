"""The CPU-side parts of the one-command GPU check: bench/gpu_check.sh's argument handling and
plan, bench/gpu_summary.py's gathering and rendering (from a canned work folder and JSON),
bench/gpu_compile_graphs.py's refusal without a GPU. bench/gpu_bench.py's own parts:
tests/test_gpu_bench.py. The GPU parts run on a GPU (README, "Running on a GPU")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_records
from conftest import BENCH, bench_module

CHECK = BENCH / "gpu_check.sh"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True,
                          timeout=120, check=False)


# --- gpu_check.sh ------------------------------------------------------------------------------

def test_help_and_bad_usage() -> None:
    done = check("--help")
    assert done.returncode == 0 and "--skip-sanitizer" in done.stdout
    bad = check("--no-such-option")
    assert bad.returncode == 2 and "unknown option --no-such-option" in bad.stderr
    missing = check("--out")
    assert missing.returncode == 2 and "--out needs a value" in missing.stderr


def test_dry_run_plans_every_step_without_a_gpu(tmp_path) -> None:
    done = check("--dry-run", "--out", str(tmp_path / "results"), "--shared", str(tmp_path))
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    for step in ("install", "tests-kernels", "tests-golden", "tests-training", "tests-api",
                 "tests-precision (240 s): pytest tests/test_precision.py tests/test_autocast.py",
                 "tests-compile", "sanitizer-float32", "sanitizer-float16", "sanitizer-bfloat16",
                 "gpu_bench.py --quick", "gpu_compile_graphs.py --quick", "gpu-<date>.json",
                 # the benchmark's own plan, one line per section
                 "    mode quick:", "latency (at most 240 s)", "upscale (at most"):
        assert step in plan, step
    # the benchmark's variants are the compile-graphs step's
    assert "variants (at most" not in plan
    # the benchmark runs before the sanitizer: the speed issue's figures come first
    assert plan.index("bench (") < plan.index("sanitizer-float32")
    assert not (tmp_path / "results").exists(), "a dry run wrote something"
    assert "compile-graphs" not in check("--dry-run", "--skip-compile").stdout
    lean = check("--dry-run", "--skip-tests", "--skip-sanitizer", "--full", "--budget", "300")
    assert "tests-" not in lean.stdout and "sanitizer-" not in lean.stdout
    assert "gpu_bench.py --full" in lean.stdout and "budget:   300 s" in lean.stdout
    assert check("--dry-run", "--budget", "ten").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_refuses_to_run_without_a_cuda_device(tmp_path) -> None:
    done = check("--python", sys.executable, "--out", str(tmp_path))
    assert done.returncode == 3 and "no CUDA device" in done.stderr


# --- gpu_summary.py ----------------------------------------------------------------------------

JUNIT_PASSED = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
 errors="0" failures="0" skipped="1" tests="5" time="12.5"><testcase classname="tests.test_a"
 name="test_x" time="1"/></testsuite></testsuites>"""
JUNIT_FAILED = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
 errors="1" failures="1" skipped="0" tests="4" time="3.0">
<testcase classname="tests.test_kernels" name="test_attention[float16]" time="1">
<failure message="AssertionError: attn_out: max abs error 1.2e-01 &gt; 3e-02">trace</failure>
</testcase>
<testcase classname="tests.test_kernels" name="test_warp" time="1">
<error message="RuntimeError: CUDA error: an illegal memory access">trace</error></testcase>
</testsuite></testsuites>"""
SANITIZER_CLEAN = "========= COMPUTE-SANITIZER\nfloat32: forward finite\n" \
                  "========= ERROR SUMMARY: 0 errors\n"
SANITIZER_ERRORS = """========= COMPUTE-SANITIZER
========= Invalid __shared__ read of size 512 bytes
=========     at _hard_window_attention_kernel+0x2810 in attention_inference.py:72
=========     by thread (224,0,0) in block (4,0,1)
========= ERROR SUMMARY: 2 errors
"""
SANITIZER_REFUSED = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"


def failing_bench() -> dict:
    """A benchmark record whose training section timed out."""
    return gpu_records.record(training=None)


def canned_work(folder: Path) -> Path:
    folder.mkdir()
    (folder / "steps.tsv").write_text(
        "install\tok\t20\texit 0, log install.log\n"
        "tests-kernels\tfailed\t40\texit 1, log tests-kernels.log\n"
        "tests-golden\tok\t60\texit 0, log tests-golden.log\n"
        "tests-training\tfailed\t5\texit 139, log tests-training.log\n"
        "sanitizer-float32\tok\t50\texit 0, log sanitizer-float32.log\n"
        "sanitizer-float16\tfailed\t50\texit 99, log sanitizer-float16.log\n"
        "bench\tfailed\t30\texit 1, log bench.log\n")
    (folder / "env.json").write_text(json.dumps({"date": "2026-12-01T10:00:00+00:00",
                                                 "gpu": "NVIDIA H200", "torch": "2.11.0",
                                                 "triton": "3.6.0", "commit": "abc1234"}))
    (folder / "tests-kernels.xml").write_text(JUNIT_FAILED)
    (folder / "tests-kernels.log").write_text("...")
    (folder / "tests-golden.xml").write_text(JUNIT_PASSED)
    (folder / "tests-training.log").write_text("Fatal Python error: Segmentation fault\n")
    (folder / "sanitizer-float32.log").write_text(SANITIZER_CLEAN)
    (folder / "sanitizer-float16.log").write_text(SANITIZER_ERRORS)
    (folder / "sanitizer-bfloat16.log").write_text(SANITIZER_REFUSED)
    (folder / "bench.json").write_text(json.dumps(failing_bench()))
    return folder


def test_gather_reads_every_part_of_a_work_folder(tmp_path) -> None:
    summary = bench_module("gpu_summary")
    result = summary.gather(canned_work(tmp_path / "work"))
    assert result["ok"] is False and result["date"].startswith("2026-12-01")
    assert [s["name"] for s in result["steps"]][:2] == ["install", "tests-kernels"]
    kernels, golden = result["tests"]["kernels"], result["tests"]["golden"]
    assert (kernels["status"], kernels["passed"], kernels["failed"], kernels["errors"]) == \
        ("failed", 2, 1, 1)
    assert kernels["failures"][0]["message"].startswith("AssertionError: attn_out")
    assert (golden["status"], golden["passed"], golden["skipped"]) == ("passed", 4, 1)
    crashed = result["tests"]["training"]
    assert crashed["status"] == "crashed" and "Segmentation fault" in crashed["log_tail"]
    sanitizer = result["sanitizer"]
    assert sanitizer["float32"] == {"status": "clean", "errors": 0, "first": ""}
    assert sanitizer["float16"]["status"] == "errors" and sanitizer["float16"]["errors"] == 2
    assert "Invalid __shared__ read" in sanitizer["float16"]["first"]
    assert sanitizer["bfloat16"]["status"] == "unavailable"


def test_all_clean_is_a_pass(tmp_path) -> None:
    summary = bench_module("gpu_summary")
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("install\tok\t3\t\nsanitizer\tunavailable\t0\tnot found\n")
    (work / "tests-kernels.xml").write_text(JUNIT_PASSED)
    (work / "bench.json").write_text(json.dumps(gpu_records.record()))
    assert summary.gather(work)["ok"] is True


def test_render_from_a_canned_json_record() -> None:
    summary = bench_module("gpu_summary")
    record = json.loads(json.dumps({
        "date": "2026-12-01T10:00:00+00:00", "ok": False,
        "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0"},
        "steps": [{"name": "install", "status": "ok", "seconds": 20.0, "detail": ""}],
        "tests": {"kernels": {"status": "failed", "passed": 2, "failed": 1, "errors": 0,
                              "skipped": 0, "seconds": 3.0,
                              "failures": [{"test": "tests.test_kernels::test_warp",
                                            "kind": "failure", "message": "boom"}]}},
        "sanitizer": {"float16": {"status": "errors", "errors": 2,
                                  "first": "Invalid __shared__ read"}},
        "bench": failing_bench()}))
    text = summary.render(record)
    assert text.startswith("# GPU check, 2026-12-01")
    assert "NVIDIA H200" in text and "**Overall: FAIL**" in text
    assert "| kernels | failed | 2 | 1 | 0 | 0 | 3 |" in text
    assert "- `tests.test_kernels::test_warp` (kernels, failure): boom" in text
    assert "| float16 | errors | 2 | Invalid __shared__ read |" in text
    # the benchmark's part: the speed targets with their verdicts, then the tables
    assert "## GPU: the speed targets (issue 11)" in text and "gpu-results:begin" not in text
    assert "| training step (S, 16 × 64², fp32): ≥ 2× the official | section training: " \
           "timeout | **NOT RUN** |" in text
    assert "#### S, 320×180 → 1280×720" in text
    assert "| fp32 | 0.5 | 46.00 | 41.40 | 5.60 | 8.21× | 0.50 | 4.0e-06 |" in text
    assert "| training | timeout | 90 | killed after 90 s |" in text


def test_summarize_writes_json_and_markdown(tmp_path) -> None:
    summary = bench_module("gpu_summary")
    work = canned_work(tmp_path / "work")
    done = subprocess.run([sys.executable, str(BENCH / "gpu_summary.py"), "summarize",
                           "--work", str(work), "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr          # the canned check failed
    written = json.loads((tmp_path / "results" / "gpu-2026-12-01.json").read_text())
    assert written == json.loads(json.dumps(summary.gather(work)))
    assert (tmp_path / "results" / "gpu-2026-12-01.md").read_text() == summary.render(written)
    assert "Overall: FAIL" in done.stdout


def test_a_step_the_budget_left_out_fails_the_check(tmp_path) -> None:
    summary = bench_module("gpu_summary")
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("install\tok\t3\t\n"
                                    "bench\tout-of-time\t0\tno time left in the 60 s budget\n")
    assert summary.gather(work)["ok"] is False


def test_steps_file_with_an_unknown_status_is_an_error(tmp_path) -> None:
    summary = bench_module("gpu_summary")
    (tmp_path / "steps.tsv").write_text("install\tmaybe\t1\t\n")
    with pytest.raises(ValueError, match="unknown status"):
        summary.read_steps(tmp_path / "steps.tsv")


COMPILE_GRAPHS = {
    "machine": {"gpu": "NVIDIA H200"}, "input": [1, 3, 180, 320], "gamma": 0.5, "runs": 3,
    "compiled-triton-official": {"compile_s": 55.0, "max_diff": 2e-6, "same_k": True,
                                 "same_order": True, "ok": True, "eager_ms": 28.3,
                                 "compiled_ms": 14.3},
    "cuda-graphs-triton": {"ok": False, "error": "RuntimeError: capturing the forward failed"},
}


def test_compiled_and_graph_variants_are_gathered_and_rendered(tmp_path) -> None:
    summary = bench_module("gpu_summary")
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("install\tok\t3\t\ncompile-graphs\tok\t90\t\n")
    (work / "compile-graphs.json").write_text(json.dumps(COMPILE_GRAPHS))
    result = summary.gather(work)
    assert result["ok"] is False                      # a variant failed its check
    text = summary.render(result)
    assert "| compiled-triton-official | yes | 2.0e-06 | True / True | 28.30 | 14.30 |" in text
    assert "| cuda-graphs-triton | no | RuntimeError: capturing the forward failed |" in text
    passing = dict(COMPILE_GRAPHS)
    del passing["cuda-graphs-triton"]
    (work / "compile-graphs.json").write_text(json.dumps(passing))
    assert summary.gather(work)["ok"] is True


def test_compile_graphs_step_gives_the_benchmark_its_variants(tmp_path) -> None:
    """The check runs bench/gpu_compile_graphs.py as its own step: its rows are the speed
    targets' CUDA-graph and torch.compile verdicts, in the summary and in RESULTS.md."""
    summary = bench_module("gpu_summary")
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("install\tok\t3\t\nbench\tok\t300\t\n"
                                    "compile-graphs\tok\t90\t\n")
    record = gpu_records.record()
    del record["sections"]["variants"]
    record["settings"]["sections"].remove("variants")
    (work / "bench.json").write_text(json.dumps(record))
    (work / "compile-graphs.json").write_text(json.dumps(COMPILE_GRAPHS))
    results = tmp_path / "RESULTS.md"
    _, md_path, result = summary.summarize(work, tmp_path / "out", results)
    text = md_path.read_text()
    assert "| capturable as a CUDA graph: replay matches eager within 1e-4 | " \
           "cuda-graphs-triton: RuntimeError: capturing the forward failed | **FAIL** |" in text
    assert "| torch.compile(model, fullgraph=True) matches eager within 1e-4 | " \
           "compiled-triton-official: 2.0e-06, 14.30 ms vs eager 28.30 ms | **PASS** |" in text
    assert "**FAIL** |" in results.read_text() and "from `gpu-20" in results.read_text()
    assert result["bench"] == record                    # the record itself is left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_compile_graphs_check_says_there_is_no_gpu() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "gpu_compile_graphs.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 3 and "no CUDA device" in done.stderr
