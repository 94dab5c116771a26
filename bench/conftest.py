"""Shared set-up of the benchmarks (``python -m pytest bench --benchmark-json=...``):
``CAMIXER_BENCH_THREADS`` (default 2) torch threads, ``CAMIXER_FAST_SHARED`` (default ../shared)
weights and images; the JSON's machine info gets :func:`common.machine_stamp`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
for folder in (BENCH, BENCH / "official"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402
from common import SHARED, THREADS, WEIGHTS, machine_stamp  # noqa: E402

import camixer_fast  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(THREADS)
    os.environ["CAMIXER_FAST_WEIGHTS"] = str(SHARED / "weights")


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["camixer_fast"] = machine_stamp()


@pytest.fixture(scope="session")
def weights_path() -> Path:
    if not WEIGHTS.is_file():
        pytest.fail(f"missing {WEIGHTS} (set CAMIXER_FAST_SHARED)")
    return WEIGHTS


@pytest.fixture(scope="session")
def reference_model(weights_path: Path) -> camixer_fast.CAMixerSR:
    return camixer_fast.load_model(weights_path, backend="reference")
