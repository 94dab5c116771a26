"""The fused block's kernels compile for sm_90 through Triton's JIT, as a GPU launch would
compile them, without register spills (``tests/jit_gate.py``, in a subprocess: this session
interprets the kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parent / "jit_gate.py"


@pytest.mark.slow
def test_block_kernels_compile_for_sm90_without_spills(tmp_path) -> None:
    out = tmp_path / "usage.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(GATE), "--json", str(out)], capture_output=True,
                          text=True, env=env, timeout=1200, check=False)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    usage = json.loads(out.read_text())
    kernels = {name.split("[")[0] for name in usage}
    assert kernels == {"_predictor_kernel", "_predictor_heads_kernel", "_depthwise3x3_kernel",
                       "_mixer_tail_kernel", "_ffn_tail_kernel"}
    assert all(u["spill_bytes"] == 0 for u in usage.values())
