"""AOT compile gate (tests/gates/aot.py): every kernel variant the wrappers launch for the
published models compiles for sm_80 and sm_90 without register spills, with its fp16 / bf16
products on tensor cores; the run writes its report to a temporary folder (never a tracked
file).

It runs as a script in a subprocess, from outside the checkout (so the checkout's
``camixer_fast/`` folder cannot shadow the installed package, issue 9's failure 4) and without
TRITON_INTERPRET (the test session interprets the kernels).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "tests" / "gates" / "aot.py"


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    tmp = tmp_path_factory.mktemp("gate")
    out = tmp / "usage.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(GATE), "--json", str(out),
                           "--report", str(tmp / "kernels.md")],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=1200,
                          check=False)
    return done, json.loads(out.read_text()) if out.exists() else {}, tmp / "kernels.md"


def test_every_kernel_compiles_without_spills(gate) -> None:
    done, usage, _ = gate
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert usage, "the gate compiled nothing"
    assert {key.rsplit("@", 1)[1] for key in usage} == {"sm_80", "sm_90"}
    for key, u in usage.items():
        assert u["stack"] == 0 and u["local"] == 0, f"{key} spills"
        assert u["registers"] <= 255
        assert not u["problems"], (key, u["problems"])


def test_half_precision_products_use_tensor_cores(gate) -> None:
    _, usage, _ = gate
    half = {k: u for k, u in usage.items() if "attention" in k and ("[fp16" in k or "[bf16" in k)}
    assert half
    for key, u in half.items():
        assert u["tensor_core_dots"] == u["dots"] > 0 and u["mma"], key
    ieee = {k: u for k, u in usage.items() if "attention" in k and "[fp32,ieee" in k}
    assert ieee and all(u["tensor_core_dots"] == 0 for u in ieee.values()), \
        "fp32 parity by IEEE products must stay on the FMA units"


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_fp32_tensor_core_precisions_use_tensor_cores(gate, precision: str) -> None:
    """fp32 under PyTorch's TF32 switch (tf32) and the tensor-core parity mode (tf32x3): every
    attention kernel compiled in it, all its products as HMMA / HGMMA."""
    _, usage, _ = gate
    variants = {k: u for k, u in usage.items()
                if f"[fp32,{precision}]" in k or f"[fp32,{precision},nhwc]" in k}
    kernels = {k.split("[")[0] for k in variants}
    assert kernels == {"hard_window_attention", "attention_fwd", "attention_bwd_dkv",
                       "attention_bwd_dq"}
    for key, u in variants.items():
        assert u["tensor_core_dots"] == u["dots"] > 0 and u["mma"], key
        assert all(m.endswith("TF32") for m in u["mma"]), (key, u["mma"])


def test_report_written(gate) -> None:
    text = gate[2].read_text()
    assert "hard_window_attention" in text and "floor on H100" in text
    assert "tensor cores" in text


def test_gate_runs_from_the_checkout_root_as_a_script(tmp_path) -> None:
    """The gate's directory, not the working directory, goes on sys.path: run from the
    repository root, ``camixer_fast`` still resolves to the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = ("import runpy, sys; sys.argv = ['aot.py', '--help']; "
             f"runpy.run_path({str(GATE)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--report" in done.stdout


def test_cost_model_is_sane() -> None:
    sys.path.insert(0, str(GATE.parent))
    frame_costs = importlib.import_module("aot").frame_costs

    costs = {c.name: c for c in frame_costs()}
    attention = costs["hard_window_attention"]
    # 120 hard windows × (4·256·60² + 4·256²·60) FLOPs, plus v·sa on the 120 others
    assert attention.flops == 120 * (4 * 256 * 3600 + 4 * 65536 * 60) + 60 * 120 * 256
    assert all(c.bytes > 0 and c.flops > 0 for c in costs.values())
