"""Ahead-of-time compile gate: every kernel variant the wrappers can launch, compiled for NVIDIA
GPUs without a GPU, with its register, spill and shared-memory use read from the cubin.

A variant is one (kernel, dtype, constexpr configuration, launch options) the wrappers choose for
the published models (C = 36, 48, 60; window 16; their channel blocks are 16 for the predictor
and 64 for the features). ``python -m camixer_fast.kernels.aot`` compiles them all and prints
the table that ``bench/kernels.md`` holds.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# the package exports functions with the modules' names: take the modules themselves
routing, warp, attention = (importlib.import_module(f"camixer_fast.kernels.{m}")
                            for m in ("routing", "warp", "window_attention"))

TARGETS = (80, 90)
"""Compute capabilities the gate compiles for: sm_80 (A100) and sm_90 (H100)."""

PUBLISHED_CHANNELS = (36, 48, 60)
WINDOW = 16
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.float64: "*fp64"}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACC = {"fp32": triton.language.float32, "fp64": triton.language.float64}


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    registers: int
    stack: int
    local: int
    shared: int          # static + dynamic bytes per program

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict:
    """Signature of ``kernel``: pointers as given, constexprs marked, other scalars i32/fp32."""
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    sig = {}
    for arg in kernel.arg_names:
        if arg in pointers:
            sig[arg] = pointers[arg]
        elif arg in constexprs:
            sig[arg] = "constexpr"
        else:
            sig[arg] = "fp32" if arg in floats else "i32"
    return sig


def variants() -> list[Variant]:
    """Every (kernel, dtype, configuration) the wrappers launch for the published models."""
    out: list[Variant] = []
    c4_blocks = sorted({triton.next_power_of_2((c + 4) // 4) for c in PUBLISHED_CHANNELS})
    c_blocks = sorted({attention.channel_block(c) for c in PUBLISHED_CHANNELS})
    for dtype in _FLOATS:
        p = _PTR[dtype]
        for bc in c4_blocks:
            k = routing._window_scores_kernel
            out.append(Variant(f"window_scores[{p[1:]}]", k, _signature(k, {
                "h_ptr": p, "w1_ptr": p, "b1_ptr": p, "w2_ptr": p, "b2_ptr": p,
                "pred_ptr": "*fp32"}), dict(WS=WINDOW, BC=bc, BH=WINDOW)))
    k = routing._select_kernel
    for noise in (False, True):
        for all_hard in (False, True):
            out.append(Variant(f"select[noise={noise},all_hard={all_hard}]", k, _signature(k, {
                "pred_ptr": "*fp32", "noise_ptr": "*fp32", "num_hard_ptr": "*i64",
                "order_ptr": "*i64"}, floats=("gamma",)),
                dict(HAS_NOISE=noise, ALL_HARD=all_hard, BI=routing.SELECT_BLOCK,
                     BJ=routing.SELECT_BLOCK)))
    for dtype in (*_FLOATS, torch.float64):
        p = _PTR[dtype]
        acc = "fp64" if dtype == torch.float64 else "fp32"
        k = warp._deform_key_fwd_kernel
        for hard in (True, False):
            out.append(Variant(f"deform_key_fwd[{p[1:]},{'hard' if hard else 'map'}]", k,
                               _signature(k, {"x_ptr": p, "off_ptr": p, "out_ptr": p,
                                              "num_hard_ptr": "*i64", "order_ptr": "*i64"}),
                               dict(HARD_ONLY=hard, WS=WINDOW if hard else 1,
                                    BC=warp.CHANNEL_BLOCK, BP=warp.PIXEL_BLOCK,
                                    ACC=_ACC[acc])))
        k = warp._deform_key_bwd_kernel
        out.append(Variant(f"deform_key_bwd[{p[1:]}]", k, _signature(k, {
            "x_ptr": p, "off_ptr": p, "dout_ptr": p, "dx_ptr": f"*{acc}",
            "doff_ptr": f"*{acc}"}), dict(BC=warp.CHANNEL_BLOCK, BP=warp.PIXEL_BLOCK,
                                           ACC=_ACC[acc])))
    for dtype in _FLOATS:
        p = _PTR[dtype]
        cfg = attention.attention_config(dtype, WINDOW)
        bwd = attention.attention_config(dtype, WINDOW, backward=True)
        prec = "ieee" if dtype == torch.float32 else "tf32"
        opts = dict(num_warps=cfg.num_warps, num_stages=1)
        bwd_opts = dict(num_warps=bwd.num_warps, num_stages=1)
        for bc in c_blocks:
            meta = dict(WS=WINDOW, BC=bc, BM=cfg.bm, BN=cfg.bn, PRECISION=prec)
            bwd_meta = dict(meta, BM=bwd.bm, BN=bwd.bn)
            k = attention._hard_window_attention_kernel
            out.append(Variant(f"hard_window_attention[{p[1:]}]", k, _signature(k, {
                **{n: p for n in ("x_ptr", "k_ptr", "v_ptr", "sa_ptr", "wq_ptr", "bq_ptr",
                                  "wk_ptr", "bk_ptr", "out_ptr")},
                "num_hard_ptr": "*i64", "order_ptr": "*i64"}), meta, opts))
            k = attention._attention_fwd_kernel
            out.append(Variant(f"attention_fwd[{p[1:]}]", k, _signature(k, {
                "q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "lse_ptr": "*fp32"}), meta,
                opts))
            for k, label in ((attention._attention_bwd_dkv_kernel, "attention_bwd_dkv"),
                             (attention._attention_bwd_dq_kernel, "attention_bwd_dq")):
                ptrs = {n: p for n in k.arg_names if n.endswith("_ptr")}
                ptrs.update(lse_ptr="*fp32", delta_ptr="*fp32")
                out.append(Variant(f"{label}[{p[1:]}]", k, _signature(k, ptrs), bwd_meta,
                                   bwd_opts))
    return out


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


def compile_variant(variant: Variant, capability: int) -> Usage:
    """Compile ``variant`` for sm_``capability`` and read its resource use from the cubin."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = ASTSource(fn=variant.kernel, signature=variant.signature,
                           constexprs=variant.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options=dict(variant.options))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        report = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin],
                                capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{report}")
    reg, stack, shared, local = map(int, found.groups())
    return Usage(reg, stack, local, shared + int(compiled.metadata.shared))


def usage_table(results: dict[tuple[str, int], Usage]) -> str:
    """Markdown table: one row per variant, registers / spills / shared memory per target."""
    names = sorted({name for name, _ in results})
    head = "| kernel variant | " + " | ".join(
        f"sm_{cc} regs | sm_{cc} spill B | sm_{cc} smem B" for cc in TARGETS) + " |"
    rule = "|---|" + "---|---|---|" * len(TARGETS)
    rows = [head, rule]
    for name in names:
        cells = []
        for cc in TARGETS:
            u = results[(name, cc)]
            cells += [str(u.registers), str(u.stack + u.local), str(u.shared)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dataclass(frozen=True)
class KernelCost:
    """What one launch moves and computes: the floor of its time on a given GPU."""

    name: str
    launches: str        # what one call covers
    bytes: float         # minimum DRAM traffic (each byte read or written once)
    flops: float

    def floor_us(self, bandwidth: float = 3.0e12, flops_per_s: float = 60e12) -> float:
        return 1e6 * max(self.bytes / bandwidth, self.flops / flops_per_s)


def frame_costs(n_feats: int = 60, lr_hw: tuple[int, int] = (180, 320), window_size: int = 16,
                hard_fraction: float = 0.5, itemsize: int = 4) -> list[KernelCost]:
    """Per-call bytes and FLOPs of each kernel for one block of the network.

    Defaults: a 1280×720 ×4 frame (LR 320×180, padded to 320×192) of the B model (C = 60) at
    γ = 0.5 with K/N = 0.5 (K = N·r·2γ with r = 0.5; the real r depends on the image), fp32.
    Bytes count each tensor element once (reuse through caches is assumed perfect, which is
    what a floor is); FLOPs count a multiply-add as 2.
    """
    ws = window_size
    height = -(-lr_hw[0] // ws) * ws
    width = -(-lr_hw[1] // ws) * ws
    pixels, tokens = height * width, ws * ws
    n = pixels // tokens
    k = int(n * hard_fraction)
    c, c4, hid = n_feats, (n_feats + 4) // 4, ws
    hard_px = k * tokens
    b = itemsize
    return [
        KernelCost("window_scores", f"{n} windows", c4 * pixels * b + hid * tokens * b + n * 8,
                   c4 * pixels + n * (2 * tokens * hid + 2 * hid * 2 + 8)),
        KernelCost("select", f"{n} windows", n * 8 + n * 8 + 8, 2 * n * n + 4 * n),
        KernelCost("deform_key_fwd (hard windows only)", f"{k} hard windows",
                   2 * c * hard_px * b + 2 * hard_px * b, 8 * c * hard_px + 20 * hard_px),
        KernelCost("hard_window_attention", f"{k} hard + {n - k} simple windows",
                   (3 * c * hard_px + 2 * c * c) * b + (c + 1) * (pixels - hard_px) * b
                   + c * pixels * b,
                   k * (4 * tokens * c * c + 4 * tokens * tokens * c) + c * (pixels - hard_px)),
        KernelCost("attention_fwd (training, all windows)", f"{n} windows",
                   4 * c * pixels * b + pixels * 4, n * 4 * tokens * tokens * c),
        KernelCost("attention_bwd_dkv + dq (training)", f"{n} windows",
                   (4 + 2) * c * pixels * b + 2 * pixels * 4 + 3 * c * pixels * b,
                   n * 2 * (4 + 3) * tokens * tokens * c),
        KernelCost("deform_key_bwd (training, whole map)", f"{pixels} pixels",
                   (3 * c + 2) * pixels * b + c * pixels * 4 + 2 * pixels * b,
                   20 * c * pixels + 30 * pixels),
    ]


def cost_table(costs: list[KernelCost]) -> str:
    rows = ["| kernel | one call covers | MB moved | GFLOP | floor on H100 (µs) | bound by |",
            "|---|---|---|---|---|---|"]
    for cost in costs:
        memory = cost.bytes / 3.0e12 >= cost.flops / 60e12
        rows.append(f"| {cost.name} | {cost.launches} | {cost.bytes / 1e6:.2f} | "
                    f"{cost.flops / 1e9:.3f} | {cost.floor_us():.1f} | "
                    f"{'memory' if memory else 'compute'} |")
    return "\n".join(rows)


def write_report(path: str, results: dict[tuple[str, int], Usage]) -> None:
    """Write ``bench/kernels.md``: the cost model and the compiled resource use."""
    costs = frame_costs()
    inference = [c for c in costs if "training" not in c.name]
    per_block = sum(c.floor_us() for c in inference)
    text = f"""# Kernels: cost per call and compiled resource use

Made by `tests/test_compile_gate.py` (through `camixer_fast.kernels.aot.write_report`); do not
edit by hand.

## Bytes and FLOPs per call

One block of the B model (C = 60) on a 1280×720 ×4 frame (LR 320×180, padded to 320×192:
240 windows of 16×16) at γ = 0.5, taking K = N/2 hard windows (K = N·r·2γ with r = 0.5; r is
the image's), fp32. Bytes: each element read or written once (a floor: perfect cache reuse).
FLOPs: a multiply-add counts 2. Floor time: the larger of bytes / 3.0 TB/s and
FLOPs / 60 TFLOP/s (H100 fp32 without tensor cores).

{cost_table(costs)}

Inference kernels of one block: {per_block:.1f} µs at the floor; the network has 20 blocks,
so {20 * per_block / 1000:.2f} ms per frame for routing, keys and attention together.

## Compiled resource use

Every variant the wrappers launch for the published models (C = 36, 48, 60: channel blocks of
16 in the predictor and the warp, 64 in the attention), compiled ahead of time with
`triton.compile(..., target=GPUTarget("cuda", cc, 32))` and read with the triton wheel's
`cuobjdump --dump-resource-usage`: registers per thread, bytes spilled (stack + local memory;
the gate fails on any), shared memory per program (static + dynamic).

{usage_table(results)}
"""
    with open(path, "w") as f:
        f.write(text)


def compile_all() -> dict[tuple[str, int], Usage]:
    results = {}
    for variant in variants():
        key = variant.name + "".join(f",{k}={v}" for k, v in variant.constexprs.items()
                                     if k in ("BC",))
        for cc in TARGETS:
            results[(key, cc)] = compile_variant(variant, cc)
    return results


def ungated_kernels() -> set[str]:
    """Kernels defined in the kernel modules that :func:`variants` does not compile."""
    defined = {name for module in (routing, warp, attention) for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
    return defined - {variant.kernel.__name__ for variant in variants()}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {variant: {sm_cc: usage}} here")
    parser.add_argument("--report", help="write the markdown report (bench/kernels.md) here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    missing = ungated_kernels()
    if missing:
        parser.error(f"kernels missing from the gate: {sorted(missing)}")
    results = compile_all()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{name}@sm_{cc}": u.__dict__ for (name, cc), u in results.items()}, f,
                      indent=1)
    if args.report:
        write_report(args.report, results)
    print(usage_table(results))
    return 1 if any(u.spills for u in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
