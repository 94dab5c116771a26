"""The CPU-side parts of the one-command GPU check, tests/gpu_check.sh: its arguments, its plan
(--dry-run), its refusal without a CUDA device. The GPU parts run on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO

CHECK = REPO / "tests" / "gpu_check.sh"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_help_and_bad_usage() -> None:
    done = check("--help")
    assert done.returncode == 0 and "--skip-sanitizer" in done.stdout
    bad = check("--no-such-option")
    assert bad.returncode == 2 and "unknown option --no-such-option" in bad.stderr
    missing = check("--out")
    assert missing.returncode == 2 and "--out needs a value" in missing.stderr
    assert check("--dry-run", "--budget", "ten").returncode == 2


def test_header_says_how_to_run_it_the_first_time() -> None:
    header = CHECK.read_text().split("set -uo pipefail")[0]
    for words in ("--no-deps", "--target <work>/site", "python -P", "timeout",
                  "compute-sanitizer", "15 minutes"):
        assert words in header, words


def test_dry_run_plans_every_step_without_a_gpu(tmp_path) -> None:
    done = check("--dry-run", "--shared", str(tmp_path))
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    steps = ["install", "tests-kernels", "tests-golden", "tests-training", "tests-api",
             "tests-precision (180 s): pytest tests/test_precision.py tests/test_autocast.py",
             "tests-compile", "sanitizer-float32", "sanitizer-float16", "sanitizer-bfloat16",
             "bench (300 s): pytest bench/test_bench_gpu.py --benchmark-json=<work>/gpu.json",
             "rows: bench/report.py add <work>/gpu.json --out <work>/results.jsonl"]
    for step in steps:
        assert step in plan, step
    assert [plan.index(s) for s in steps] == sorted(plan.index(s) for s in steps)
    lean = check("--dry-run", "--skip-tests", "--skip-sanitizer", "--budget", "300",
                 "--out", "bench/results.jsonl")
    assert "tests-" not in lean.stdout and "sanitizer-" not in lean.stdout
    assert "budget:   300 s" in lean.stdout and "--out bench/results.jsonl" in lean.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_refuses_to_run_without_a_cuda_device(tmp_path) -> None:
    done = check("--python", sys.executable, "--work", str(tmp_path / "work"))
    assert done.returncode == 3 and "no CUDA device" in done.stderr
    assert not (tmp_path / "work").exists()
