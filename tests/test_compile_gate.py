"""Compile gate: every kernel variant the wrappers launch compiles for sm_80 and sm_90 without
register spills; the run writes the resource table and the cost model to bench/kernels.md.

It runs in a subprocess without TRITON_INTERPRET (the test session interprets the kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gate") / "usage.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "camixer_fast.kernels.aot", "--json", str(out),
                           "--report", str(REPO / "bench" / "kernels.md")],
                          capture_output=True, text=True, env=env, timeout=1200, check=False)
    return done, json.loads(out.read_text()) if out.exists() else {}


def test_every_kernel_compiles_without_spills(gate) -> None:
    done, usage = gate
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert usage, "the gate compiled nothing"
    assert {key.rsplit("@", 1)[1] for key in usage} == {"sm_80", "sm_90"}
    for key, u in usage.items():
        assert u["stack"] == 0 and u["local"] == 0, f"{key} spills"
        assert u["registers"] <= 255


def test_report_written(gate) -> None:
    text = (REPO / "bench" / "kernels.md").read_text()
    assert "hard_window_attention" in text and "floor on H100" in text


def test_cost_model_is_sane() -> None:
    from camixer_fast.kernels.aot import frame_costs

    costs = {c.name: c for c in frame_costs()}
    attention = costs["hard_window_attention"]
    # 120 hard windows × (4·256·60² + 4·256²·60) FLOPs, plus v·sa on the 120 others
    assert attention.flops == 120 * (4 * 256 * 3600 + 4 * 65536 * 60) + 60 * 120 * 256
    assert all(c.bytes > 0 and c.flops > 0 for c in costs.values())
