"""bench/official_baseline.py, the stand-in for the official code in benchmarks, is exact."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO, assert_close


def load_baseline_module():
    spec = importlib.util.spec_from_file_location("official_baseline",
                                                  REPO / "bench" / "official_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baseline(model_s):
    return load_baseline_module().load_official_baseline(model_s.state_dict())


CASES = [("butterfly_x4_lr", "1.0"), ("butterfly_x4_lr", "0.5"), ("butterfly_crop_45x61", "0.25"),
         ("butterfly_crop_45x61", "0.0"), ("baby_x4_lr", "0.5")]


@pytest.mark.parametrize("name, gamma", CASES, ids=[f"{n}@gamma={g}" for n, g in CASES])
def test_baseline_matches_golden(golden: dict, baseline, name: str, gamma: str) -> None:
    baseline.gamma = float(gamma)
    with torch.inference_mode():
        out = baseline(golden["inputs"][name])
    assert_close(f"{name}@{gamma}", golden["outputs"][f"{name}@gamma={gamma}"], out, 1e-4)


def test_baseline_infers_the_configuration(baseline) -> None:
    assert baseline.scale == 4 and baseline.window_size == 16
    assert [len(g.body) for g in baseline.body] == [4, 4, 6, 6]
