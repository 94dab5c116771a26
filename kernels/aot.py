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


def compile_all() -> dict[tuple[str, int], Usage]:
    results = {}
    for variant in variants():
        key = variant.name + "".join(f",{k}={v}" for k, v in variant.constexprs.items()
                                     if k in ("BC",))
        for cc in TARGETS:
            results[(key, cc)] = compile_variant(variant, cc)
    return results


if __name__ == "__main__":
    print(usage_table(compile_all()))
