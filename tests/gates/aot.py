"""Ahead-of-time compile gate: every kernel variant the wrappers launch for the published models,
compiled for sm_80 and sm_90 without a GPU, with unspecialized int arguments (the JIT gate,
``jit_gate.py``, covers the specializations), then read with :mod:`cubin`: registers, spills,
shared memory, tensor cores.

A variant is one (kernel, dtype, constexpr configuration, launch options) the wrappers choose for
the published models (C = 36, 48, 60; window 16). Run as a script (never ``python -m`` from the
checkout, which would shadow the installed package)::

    python tests/gates/aot.py [--json usage.json] [--report kernels.md]

It prints the resource table of its ``--report`` and exits 1 on any problem. Needs
Triton >= 3.3 (``ASTSource(..., constexprs=)``); the kernels themselves need only 3.2.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from camixer_fast.kernels import attention_inference, attention_training, routing, warp
from camixer_fast.kernels.helpers import FP32_PARITY_PRECISIONS, channel_block, dot_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cubin import KernelReport, inspect  # noqa: E402

TARGETS = (80, 90)
"""Compute capabilities the gate compiles for: sm_80 (A100) and sm_90 (H100)."""

PUBLISHED_CHANNELS = (36, 48, 60)
WINDOW = 16
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.float64: "*fp64"}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACC = {"fp32": triton.language.float32, "fp64": triton.language.float64}
MODULES = (routing, warp, attention_inference, attention_training)
FP32_PRECISIONS = ("tf32", *FP32_PARITY_PRECISIONS)
"""The dot precisions fp32 attention kernels launch with (``helpers.dot_precision``)."""
_WINDOWED = ("H", "W")
"""Int arguments of the windowed kernels that are multiples of the window size, 16."""


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    aligned: tuple[str, ...] = ()    # int arguments that are multiples of 16 on every launch


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
    for dtype in _FLOATS:
        p = _PTR[dtype]
        for bc in c4_blocks:
            k = routing.window_scores_kernel
            out.append(Variant(f"window_scores[{p[1:]}]", k, _signature(k, {
                "h_ptr": p, "w1_ptr": p, "b1_ptr": p, "w2_ptr": p, "b2_ptr": p,
                "pred_ptr": "*fp32"}), dict(WS=WINDOW, BC=bc, BH=WINDOW), aligned=_WINDOWED))
    k = routing.select_kernel
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
        k = warp.deform_key_fwd_kernel
        for hard in (True, False):
            out.append(Variant(f"deform_key_fwd[{p[1:]},{'hard' if hard else 'map'}]", k,
                               _signature(k, {"x_ptr": p, "off_ptr": p, "out_ptr": p,
                                              "num_hard_ptr": "*i64", "order_ptr": "*i64"}),
                               dict(HARD_ONLY=hard, WS=WINDOW if hard else 1,
                                    BC=warp.CHANNEL_BLOCK, BP=warp.PIXEL_BLOCK,
                                    ACC=_ACC[acc]), aligned=_WINDOWED if hard else ()))
        k = warp.deform_key_bwd_kernel
        out.append(Variant(f"deform_key_bwd[{p[1:]}]", k, _signature(k, {
            "x_ptr": p, "off_ptr": p, "dout_ptr": p, "dx_ptr": f"*{acc}",
            "doff_ptr": f"*{acc}"}), dict(BC=warp.BACKWARD_CHANNEL_BLOCK,
                                           BP=warp.PIXEL_BLOCK, ACC=_ACC[acc])))
    # fp32 in each dot precision: IEEE (parity), tf32 (PyTorch's TF32 switch), tf32x3 (parity
    # on tensor cores); half precision once
    precisions = [(dtype, precision) for dtype in _FLOATS
                  for precision in (FP32_PRECISIONS if dtype == torch.float32 else (None,))]
    for dtype, precision in precisions:
        p = _PTR[dtype]
        tag = p[1:] if precision is None else f"{p[1:]},{precision}"
        precision = precision or dot_precision(dtype)
        configs = {"inference": attention_inference.tile_config(dtype, WINDOW,
                                                                precision=precision),
                   "forward": attention_training.tile_config(dtype, WINDOW,
                                                             precision=precision),
                   "backward": attention_training.tile_config(dtype, WINDOW, backward=True,
                                                              precision=precision)}
        meta, opts = {}, {}
        for role, cfg in configs.items():
            opts[role] = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            meta[role] = dict(WS=WINDOW, BM=cfg.bm, BN=cfg.bn, PRECISION=precision)
        for bc in sorted({channel_block(c, dtype) for c in PUBLISHED_CHANNELS}):
            k = attention_inference.hard_window_attention_kernel
            sig = _signature(k, {
                **{n: p for n in ("x_ptr", "k_ptr", "v_ptr", "sa_ptr", "wq_ptr", "bq_ptr",
                                  "wk_ptr", "bk_ptr", "out_ptr")},
                "num_hard_ptr": "*i64", "order_ptr": "*i64"})
            # channels-first maps (pixel stride 1, the JIT makes it a constant) and the fused
            # block's channels-last ones (channel stride 1), each with its configuration
            nhwc = attention_inference.tile_config(dtype, WINDOW, channels_last=True,
                                                   precision=precision)
            # (image and channel strides C·H·W and H·W, or H·W·C: multiples of 16 too)
            for layout, unit, cfg_meta, cfg_opts, aligned in (
                    ("", "s_p", meta["inference"], opts["inference"], ("s_b", "s_c")),
                    (",nhwc", "s_c", dict(meta["inference"], BM=nhwc.bm, BN=nhwc.bn),
                     dict(num_warps=nhwc.num_warps, num_stages=nhwc.num_stages), ("s_b",))):
                out.append(Variant(f"hard_window_attention[{tag}{layout}]", k,
                                   dict(sig, **{unit: "constexpr"}),
                                   dict(cfg_meta, BC=bc, SHIFTED=False, **{unit: 1}), cfg_opts,
                                   _WINDOWED + aligned))
            k = attention_training.attention_fwd_kernel
            out.append(Variant(f"attention_fwd[{tag}]", k, _signature(k, {
                "q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "lse_ptr": "*fp32"}),
                dict(meta["forward"], BC=bc), opts["forward"], _WINDOWED))
            for k, label in ((attention_training.attention_bwd_dkv_kernel, "attention_bwd_dkv"),
                             (attention_training.attention_bwd_dq_kernel, "attention_bwd_dq")):
                ptrs = {n: p for n in k.arg_names if n.endswith("_ptr")}
                ptrs.update(lse_ptr="*fp32", delta_ptr="*fp32")
                out.append(Variant(f"{label}[{tag}]", k, _signature(k, ptrs),
                                   dict(meta["backward"], BC=bc), opts["backward"], _WINDOWED))
    return out


def compile_variant(variant: Variant, capability: int):
    """Compile ``variant`` for sm_``capability``: triton's CompiledKernel.

    Specialized as every launch of the published models is by the JIT: pointers 16-byte
    aligned (fresh torch allocations), H and W of the windowed kernels multiples of 16 (the
    maps tile into 16×16 windows); the other ints unspecialized (the JIT gate covers the rest).
    """
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(variant.kernel.arg_names)
               if variant.signature[arg].startswith("*") or arg in variant.aligned}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = ASTSource(fn=variant.kernel, signature=variant.signature,
                           constexprs=variant.constexprs, attrs=aligned)
        return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(variant.options))


def usage_table(results: dict[tuple[str, int], KernelReport]) -> str:
    """Markdown table: one row per variant; registers, spills, shared memory per target; the
    tensor-core instructions of its products."""
    names = sorted({name for name, _ in results})
    head = "| kernel variant | " + " | ".join(
        f"sm_{cc} regs | sm_{cc} spill B | sm_{cc} smem B | sm_{cc} tensor cores"
        for cc in TARGETS) + " |"
    rule = "|---|" + "---|---|---|---|" * len(TARGETS)
    rows = [head, rule]
    for name in names:
        cells = []
        for cc in TARGETS:
            u = results[(name, cc)]
            mma = ", ".join(u.mma) if u.mma else ("none (IEEE fp32)" if u.dots else "no dot")
            cells += [str(u.registers), str(u.stack + u.local), str(u.shared), mma]
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


def write_report(path: str, results: dict[tuple[str, int], KernelReport]) -> None:
    """Write the ``--report`` markdown: the cost model and the compiled resource use."""
    costs = frame_costs()
    inference = [c for c in costs if "training" not in c.name]
    per_block = sum(c.floor_us() for c in inference)
    text = f"""# Kernels: cost per call and compiled resource use

Made by `tests/gates/aot.py --report`; do not edit by
hand.

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
16 in the predictor, 16 in the warp (8 in its backward), 64 in the attention),
compiled ahead of time with `triton.compile(..., target=GPUTarget("cuda", cc, 32))` as their
launches are specialized (pointers 16-byte aligned; H and W of the windowed kernels multiples
of 16; other ints unspecialized), and read with the triton wheel's `cuobjdump`: registers per
thread, bytes spilled (stack + local memory; the gate fails on any), shared memory per program
(static + dynamic), and the tensor-core instructions of the matrix products (the gate fails an
fp16 / bf16 / tf32 product without them). fp32 attention variants are compiled in each dot
precision the launchers choose (`kernels/helpers.py`, `dot_precision`): `ieee` (parity on the
FMA units, the default), `tf32` (under PyTorch's TF32 switch) and `tf32x3` (parity on tensor
cores, `CAMIXER_FAST_FP32_PARITY=tf32x3`). `tests/gates/jit_gate.py` checks the same for every
specialization the model's launches get.

{usage_table(results)}
"""
    with open(path, "w") as f:
        f.write(text)


def compile_all() -> dict[tuple[str, int], KernelReport]:
    """Compile every variant for every target; their reports by (variant label, capability)."""
    keys, compiled = [], []
    for variant in variants():
        key = variant.name + "".join(f",{k}={v}" for k, v in variant.constexprs.items()
                                     if k in ("BC",))
        for cc in TARGETS:
            c = compile_variant(variant, cc)
            keys.append((key, cc))
            compiled.append((c.asm, c.metadata.shared))
    return dict(zip(keys, inspect(compiled)))


def ungated_kernels() -> set[str]:
    """Kernels defined in the kernel modules that :func:`variants` does not compile."""
    defined = {name for module in MODULES for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
    return defined - {variant.kernel.__name__ for variant in variants()}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from camixer_fast.backends.triton_env import interpreting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {variant@sm_cc: report} here")
    parser.add_argument("--report", help="write the markdown report here")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    missing = ungated_kernels()
    if missing:
        parser.error(f"kernels missing from the gate: {sorted(missing)}")
    results = compile_all()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{name}@sm_{cc}": dict(r.as_dict(), problems=r.problems())
                       for (name, cc), r in results.items()}, f, indent=1)
    if args.report:
        write_report(args.report, results)
    print(usage_table(results))
    problems = [f"{name}@sm_{cc}: {p}" for (name, cc), r in results.items()
                for p in r.problems()]
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
