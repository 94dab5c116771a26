"""The CPU-side parts of the one-command GPU check: bench/gpu_check.sh's argument handling and
plan, bench/gpu_summary.py's gathering and rendering (from a canned work folder and JSON),
bench/gpu_bench.py's arguments and input crop. The GPU parts run on a GPU (README, "Running on
a GPU")."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CHECK = BENCH / "gpu_check.sh"


def bench_module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


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
                 "sanitizer-float32", "sanitizer-float16", "sanitizer-bfloat16",
                 "gpu_bench.py --quick", "gpu-<date>.json"):
        assert step in plan, step
    assert not (tmp_path / "results").exists(), "a dry run wrote something"
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


def bench_case(gamma: float, dtype: str, impl: str, ms: float | None, err: float,
               ok: bool = True) -> dict:
    case = {"gamma": gamma, "dtype": dtype, "implementation": impl, "tolerance": 1e-4,
            "finite": True, "max_abs_vs_official_fp32": err, "parity_ok": ok}
    if ms is not None:
        case.update(median_ms=ms, min_ms=ms * 0.9, max_ms=ms * 1.1, runs=10)
    return case


BENCH_RESULT = {"environment": {},
                "settings": {"image": "img_001.png", "size": [320, 180], "scale": 4,
                             "model": "CAMixerSR-S", "warmup": 3, "runs": 10, "tf32": False},
         "cases": [bench_case(0.5, "float32", "official", 46.0, 0.0),
                   bench_case(0.5, "float32", "ours", 23.0, 4.0e-6),
                   bench_case(0.5, "float16", "official", 30.0, 1e-3),
                   bench_case(0.5, "float16", "ours", None, 0.3, ok=False)]}


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
    (folder / "bench.json").write_text(json.dumps(BENCH_RESULT))
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
    passing = dict(BENCH_RESULT, cases=BENCH_RESULT["cases"][:2])
    (work / "bench.json").write_text(json.dumps(passing))
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
        "bench": BENCH_RESULT}))
    text = summary.render(record)
    assert text.startswith("# GPU check, 2026-12-01")
    assert "NVIDIA H200" in text and "**Overall: FAIL**" in text
    assert "| kernels | failed | 2 | 1 | 0 | 0 | 3 |" in text
    assert "- `tests.test_kernels::test_warp` (kernels, failure): boom" in text
    assert "| float16 | errors | 2 | Invalid __shared__ read |" in text
    assert "320×180 → 1280×720" in text
    assert "| 0.5 | float32 | 46.00 | 23.00 | 2.00× | 4.0e-06 |" in text
    # a case that failed its parity check shows no time and says why
    assert "| 0.5 | float16 | 30.00 | — | — | 3.0e-01 **> 1e-04: not timed** |" in text


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


# --- gpu_bench.py ------------------------------------------------------------------------------

def test_bench_arguments(tmp_path) -> None:
    bench = bench_module("gpu_bench")
    args = bench.parse_args(["--weights", "w.pth", "--image", "i.png", "--size", "64x48",
                             "--dtype", "float16", "--gamma", "0.5", "--quick"])
    assert args.size == (64, 48) and args.dtype == ("float16",) and args.gamma == (0.5,)
    defaults = bench.parse_args(["--weights", "w.pth", "--image", "i.png"])
    assert defaults.size == (320, 180) and defaults.dtype == bench.DTYPES
    assert defaults.gamma == bench.GAMMAS
    assert set(bench.TOLERANCE) == set(bench.DTYPES)
    for bad in (["--size", "320"], ["--size", "0x5"], ["--gamma", "1.5"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--weights", "w", "--image", "i", *bad])


def test_bench_crops_the_centre(tmp_path) -> None:
    bench = bench_module("gpu_bench")
    rgb = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    crop = bench.load_crop(tmp_path / "img.png", (4, 2))
    assert crop.shape == (1, 3, 2, 4)
    expected = torch.from_numpy(rgb[4:6, 4:8].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(crop[0], expected)
    with pytest.raises(ValueError, match="smaller than"):
        bench.load_crop(tmp_path / "img.png", (20, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_says_it_needs_a_gpu(capsys) -> None:
    bench = bench_module("gpu_bench")
    assert bench.main(["--weights", "w", "--image", "i"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
