"""Peak memory stays bounded: a 1024×1024 LR image (4096² out, S, γ = 1) under 4 GB RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LIMIT_MB = 4096

SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, camixer_fast
    model = camixer_fast.load_model(sys.argv[1], gamma=1.0)
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
    print(json.dumps({"shape": list(y.shape), "finite": bool(torch.isfinite(y).all()),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


@pytest.mark.slow
def test_1024_input_under_4gb(weights_path: Path) -> None:
    # a fresh process, so the peak is this run's alone
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(weights_path)], capture_output=True,
                          text=True, timeout=1200, check=False, cwd=weights_path.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak RSS {result['peak_mb']:.0f} MB")
    assert result["shape"] == [1, 3, 4096, 4096] and result["finite"]
    assert result["peak_mb"] < LIMIT_MB
