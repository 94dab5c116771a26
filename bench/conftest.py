"""Shared set-up of the latency benchmarks (``python -m pytest bench --benchmark-json=...``).

- ``CAMIXER_BENCH_THREADS`` (default 2): torch's intra-op thread count for the whole session.
- ``CAMIXER_FAST_SHARED`` (default ``../shared``): weights and images.
- ``CAMIXER_BENCH_URBAN`` (default 5): how many Urban100 images the large-image suite runs.

Each benchmark's ``extra_info`` records the thread count and the load average when it started
(:func:`benchlib.record`), and the JSON's machine info gets the CPU model, core count, torch /
triton versions and thread count (:func:`benchlib.machine_stamp`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import camixer_fast

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from benchlib import SHARED, THREADS, machine_stamp


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(THREADS)
    os.environ["CAMIXER_FAST_WEIGHTS"] = str(SHARED / "weights")


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["camixer_fast"] = machine_stamp()


@pytest.fixture(scope="session")
def weights_path() -> Path:
    path = SHARED / "weights" / "CAMixerSR_S.pth"
    if not path.is_file():
        pytest.fail(f"missing {path} (set CAMIXER_FAST_SHARED)")
    return path


@pytest.fixture(scope="session")
def reference_model(weights_path: Path) -> camixer_fast.CAMixerSR:
    return camixer_fast.load_model(weights_path, backend="reference")
