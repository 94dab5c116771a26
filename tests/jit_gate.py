"""Compile the fused block's kernels for sm_90 through Triton's own JIT, without a GPU.

A stand-in driver reports an sm_90 device; every launch the block's functional entries make is
then compiled exactly as on that GPU -- with the JIT's real specialization (integer arguments
equal to 1 become constants, 16-divisible ones get alignment attributes) -- and not launched.
Each compiled variant's registers and spills are read from its cubin with the triton wheel's
``cuobjdump``.

Run as ``python tests/jit_gate.py [--json PATH]`` without ``TRITON_INTERPRET``; exit status 1
if a kernel fails to compile or spills. (The project-wide gate of the GPU-correctness issue
will supersede this one for the block's kernels.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)


class StandInDriver:
    """Just enough of a driver for ``JITFunction.run(..., warmup=True)``: device 0, stream 0,
    an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


def _resources(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                                text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{report}")
    reg, stack, shared, local = map(int, found.groups())
    return {"registers": reg, "spill_bytes": stack + local, "shared": shared}


def compile_block_kernels() -> dict[str, dict[str, int]]:
    """Compile every launch of the block's own kernels for the cases below; {variant: usage}."""
    from camixer_fast.kernels.depthwise import depthwise_conv3x3
    from camixer_fast.kernels.ffn import ffn_tail
    from camixer_fast.kernels.mixer_tail import mixer_tail
    from camixer_fast.kernels.predictor import predictor
    from camixer_fast.reference.model import Block

    compiled: dict[str, dict[str, int]] = {}
    original = JITFunction.run

    def compile_only(fn, *args, grid, warmup, **kwargs):
        kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
        key = f"{fn.__name__}[{case}]"
        if key not in compiled:
            compiled[key] = _resources(kernel.asm["cubin"])
        return None

    # (dtype, images, H, W, C): a 4×8 map is one 32-pixel tile (counts of 1 specialise); C = 36
    # (the S model), 60 (B) and 17 (odd: a 32-channel block); each compile takes seconds
    cases = [(torch.float32, 1, 8, 8, 36), (torch.float32, 2, 16, 48, 60),
             (torch.float32, 3, 16, 24, 17), (torch.float16, 1, 4, 8, 36),
             (torch.float16, 3, 16, 24, 17), (torch.bfloat16, 2, 16, 48, 60)]
    JITFunction.run = compile_only
    previous = driver._active              # None on a machine without a GPU driver
    driver.set_active(StandInDriver())
    try:
        for dtype, b, h, w, c in cases:
            case = f"{str(dtype)[6:]},C={c},{h}x{w}x{b}"
            wt = Block(c, 4).to(dtype).weights()
            x = torch.zeros(b, h, w, c, dtype=dtype)
            cond = torch.zeros(b, h, w, 4, dtype=dtype)
            with torch.no_grad():
                maps = predictor(x, cond, wt.v_w, wt.v_b, wt.route_w, wt.route_b,
                                 wt.route_norm_w, wt.route_norm_b, wt.off1_w, wt.off1_b,
                                 wt.off2_w, wt.off2_b, wt.ca_w, wt.ca_b, wt.sa_w, wt.sa_b,
                                 planar=True)
                z = depthwise_conv3x3(maps.v, wt.dw_w, wt.dw_b)
                tail = mixer_tail(z, maps.v, x, maps.ca, wt.dil_w, wt.dil_b, wt.out_w,
                                  wt.out_b, wt.norm1_w, wt.norm1_b, wt.ffn_in_w)
                ffn_tail(tail.u, tail.x1, wt.ffn_dw_w, wt.ffn_out_w, wt.norm2_w, wt.norm2_b)
    finally:
        JITFunction.run = original
        driver._active = previous
    return compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {variant: usage} here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    compiled = compile_block_kernels()
    for name, usage in sorted(compiled.items()):
        print(f"{name}: {usage}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(compiled, f, indent=1)
    return 1 if any(u["spill_bytes"] for u in compiled.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
