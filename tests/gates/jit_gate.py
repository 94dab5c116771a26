"""JIT gate: every Triton launch the model makes, compiled for a GPU through Triton's own JIT on a
machine without one.

Triton's interpreter (what the test suite runs on a CPU) never specializes a kernel's
arguments; on a GPU the JIT does: an int argument equal to 1 becomes a Python constant (so
``N.to(tl.int64)`` fails when N = 1), and ints divisible by 16 and pointers get alignment
attributes that change the generated code. This gate installs a stand-in for Triton's active
driver that answers the JIT's questions as a GPU would (target ``cuda`` sm_80 or sm_90, device 0,
stream 0) and turns every launch into ``JITFunction.run(..., warmup=True)``: the kernel is
specialized and compiled exactly as a launch would, and nothing runs. Then it drives the
public API -- ``CAMixerSR(...)``, ``model.backend = "triton"``, ``model(x)`` -- through:

- inference at 16×16, 17×33 and 64×48 at γ = 1, 0.5 and 0;
- a training step with backward at 16×16 and 17×33;
- CAMixerOSR (``backend="triton"``: shifted windows, DCNv2) at 17×33 and 32×64, γ = 1, 0.5;
- the kernel functions themselves on maps down to one pixel (warp, DCNv2) and small windows,
  the attention at shifts 0, 1, 5, 8;

in fp32, fp16 and bf16, for C = 36 and an odd C. Every kernel compiled is then read with
:mod:`cubin`: no register spills, shared memory within bounds, fp16/bf16/tf32 products on
tensor cores (HMMA / HGMMA), no wgmma operand swizzled narrower than 128 bytes. The kernels'
outputs are never computed (tensors keep whatever ``torch.empty`` gave them): this gate proves
compilation; the test suite and the GPU check prove values.

Run as a script (never ``python -m`` from the checkout, which would shadow the installed
package)::

    python tests/gates/jit_gate.py [--target 80 --target 90] [--json out.json]

Exit status 1 when any case fails to compile or any kernel has a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = (80, 90)
SIZES = ((16, 16), (17, 33), (64, 48))
TRAIN_SIZES = ((16, 16), (17, 33))
OSR_SIZES = ((17, 33), (32, 64))
GAMMAS = (1.0, 0.5, 0.0)
CHANNELS = (36, 21)
"""C of the S model, and an odd C (channel blocks padded with masks, odd strides)."""
DTYPES = ("float32", "float16", "bfloat16")


class StandInDriver:
    """Triton's active driver, for a GPU that is not there.

    The JIT asks the driver for the target to compile for, the current device and its stream;
    this answers sm_``capability``, 0 and 0. Loading a binary or launching (anything else)
    raises: under :func:`compile_only` the JIT never gets that far.
    """

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def __getattr__(self, name: str):
        raise RuntimeError(f"the JIT gate's stand-in driver has no {name!r}: it compiles "
                           "kernels, it cannot load or run them")


@dataclass
class Launch:
    case: str
    kernel: str
    variant: str          # the specialization: argument kinds and constexpr values
    compiled: object      # triton's CompiledKernel


@dataclass
class Recorder:
    case: str = ""
    launches: list[Launch] = field(default_factory=list)


def _describe(fn, args: tuple, kwargs: dict) -> str:
    """The specialization a launch gets, as Triton's JIT derives it: pointer dtypes, ints
    equal to 1 (constants), ints divisible by 16 (aligned), constexpr values."""
    parts = []
    for param, value in zip(fn.params, args):
        if param.is_constexpr:
            parts.append(f"{param.name}={value}")
        elif hasattr(value, "data_ptr"):
            parts.append(str(value.dtype).removeprefix("torch."))
        elif isinstance(value, bool):
            parts.append(str(value))
        elif isinstance(value, int):
            parts.append("1" if value == 1 else "i16" if value % 16 == 0 else "i")
        else:
            parts.append(type(value).__name__)
    parts += [f"{k}={v}" for k, v in sorted(kwargs.items())]
    return ",".join(parts)


@contextmanager
def compile_only(capability: int) -> Iterator[Recorder]:
    """Within: every Triton launch compiles for sm_``capability`` through the JIT (its real
    specialization) and runs nothing; the recorder lists what was compiled.

    One target per process: the JIT builds each kernel's binder for the driver's target the
    first time the kernel is launched.
    """
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    recorder = Recorder()
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        constexprs = {k: v for k, v in kwargs.items() if k in self.arg_names}
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        ordered = tuple(named.get(p.name, constexprs.get(p.name)) for p in self.params)
        compiled = original(self, *args, grid=grid, warmup=True, **kwargs)
        recorder.launches.append(Launch(recorder.case, self.fn.__name__,
                                        _describe(self, ordered, options), compiled))
        return compiled

    from camixer_fast.backends.triton_env import COMPILE_ONLY_VAR

    os.environ[COMPILE_ONLY_VAR] = "1"
    driver.set_active(StandInDriver(capability))
    JITFunction.run = run
    try:
        yield recorder
    finally:
        JITFunction.run = original


# --- what the gate drives ------------------------------------------------------------------

def _model(channels: int, dtype, *, train: bool):
    import torch

    import camixer_fast

    torch.manual_seed(channels)
    # two groups of one block: every layer kind of the network, each kernel launch of a block
    model = camixer_fast.CAMixerSR(n_feats=channels, blocks_per_group=(1, 1)).to(dtype)
    model.train(train)
    model.backend = "triton"
    return model


def inference_cases(dtype_name: str, channels: int) -> Iterator[tuple[str, Callable]]:
    import torch

    dtype = getattr(torch, dtype_name)
    holder = {}

    def model():
        if "eval" not in holder:
            holder["eval"] = _model(channels, dtype, train=False)
        return holder["eval"]

    for h, w in SIZES:
        for gamma in GAMMAS:
            def case(h=h, w=w, gamma=gamma):
                m = model()
                m.gamma = gamma
                with torch.no_grad():
                    m(torch.rand(1, 3, h, w, dtype=dtype))
            yield f"model-{dtype_name}-C{channels}-{h}x{w}-gamma={gamma}", case


def training_cases(dtype_name: str, channels: int) -> Iterator[tuple[str, Callable]]:
    import torch

    dtype = getattr(torch, dtype_name)
    for h, w in TRAIN_SIZES:
        def case(h=h, w=w):
            m = _model(channels, dtype, train=True)
            x = torch.rand(2, 3, h, w, dtype=dtype, requires_grad=True)
            sr, ratio_loss = m(x)
            (sr.float().abs().mean() + ratio_loss.float()).backward()
        yield f"train-{dtype_name}-C{channels}-{h}x{w}", case


def osr_cases(dtype_name: str, channels: int) -> Iterator[tuple[str, Callable]]:
    """CAMixerOSR (fp32) at inference: one group of two blocks (shift 0 and 8), window 16,
    x2."""
    import torch

    from camixer_fast.reference.odisr import CAMixerOSR

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(channels)
    model = CAMixerOSR(n_feats=channels, blocks_per_group=(2,), window_size=16, scale=2)
    model = model.to(dtype).eval()
    model.backend = "triton"
    for h, w in OSR_SIZES:
        for gamma in GAMMAS[:2]:
            def case(h=h, w=w, gamma=gamma):
                model.gamma = gamma
                with torch.no_grad():
                    model(torch.rand(1, 3, h, w, dtype=dtype),
                          torch.rand(1, 1, h, w, dtype=dtype))
            yield f"osr-{dtype_name}-C{channels}-{h}x{w}-gamma={gamma}", case


def op_cases(dtype_name: str) -> Iterator[tuple[str, Callable]]:
    """The kernel functions on their own, at sizes the model never makes (maps of one pixel,
    one row or column; windows of 4 and 8)."""
    import torch

    from camixer_fast import kernels

    dtype = getattr(torch, dtype_name)
    for b, c, h, w in ((1, 3, 1, 1), (2, 5, 1, 17), (1, 36, 17, 1), (2, 21, 9, 20)):
        def warp(b=b, c=c, h=h, w=w):
            x = torch.rand(b, c, h, w, dtype=dtype, requires_grad=True)
            off = torch.rand(b, 2, h, w, dtype=dtype, requires_grad=True)
            kernels.deformable_key(x, off).float().sum().backward()
        yield f"op-deformable_key-{dtype_name}-{b}x{c}x{h}x{w}", warp
    for ws, rows, cols, c in ((4, 1, 1, 7), (8, 1, 3, 36), (8, 2, 2, 48), (16, 1, 1, 60)):
        def routed(ws=ws, rows=rows, cols=cols, c=c):
            h, w = rows * ws, cols * ws
            hidden = torch.rand(1, (c + 4) // 4, h, w, dtype=dtype)
            mlp = (torch.rand(ws, ws * ws, dtype=dtype), torch.rand(ws, dtype=dtype),
                   torch.rand(2, ws, dtype=dtype), torch.rand(2, dtype=dtype))
            x, v, offsets, sa = (torch.rand(1, n, h, w, dtype=dtype) for n in (c, c, 2, 1))
            proj = (torch.rand(c, c, dtype=dtype), torch.rand(c, dtype=dtype),
                    torch.rand(c, c, dtype=dtype), torch.rand(c, dtype=dtype))
            for gamma, shift in ((1.0, 0), (0.5, 0), (0.5, 1), (0.5, ws // 2 + 1),
                                 (1.0, ws // 2)):
                routing = kernels.route_windows(hidden, *mlp, gamma, window_size=ws)
                k_in = kernels.deformable_key(x, offsets, routing.num_hard, routing.order,
                                              window_size=ws)
                with torch.no_grad():
                    kernels.window_attention(x, k_in, v, sa, *proj, routing.num_hard,
                                             routing.order, window_size=ws, shift=shift)
        yield f"op-attention-{dtype_name}-ws{ws}-{rows}x{cols}win-C{c}", routed
    for b, c, o, h, w, nhwc in ((1, 3, 5, 1, 1, False), (2, 21, 21, 17, 33, False),
                                (1, 60, 60, 16, 48, True), (1, 70, 36, 9, 10, True)):
        def dcn(b=b, c=c, o=o, h=h, w=w, nhwc=nhwc):
            x = torch.rand(b, c, h, w, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
            offset, mask = torch.rand(b, 18, h, w, dtype=dtype), torch.rand(b, 9, h, w,
                                                                            dtype=dtype)
            with torch.no_grad():
                kernels.deform_conv(x, offset, mask, torch.rand(o, c, 3, 3, dtype=dtype),
                                    torch.rand(o, dtype=dtype))
        yield f"op-dcn-{dtype_name}-{b}x{c}x{h}x{w}-O{o}{'-nhwc' if nhwc else ''}", dcn
    for b, h, w, c in ((1, 4, 8, 36), (3, 8, 12, 17), (2, 16, 48, 60)):
        def block_stages(b=b, h=h, w=w, c=c):
            # the fused block's per-pixel kernels on maps of one tile (tile counts of 1
            # specialise), an odd C, and the B model's C
            from camixer_fast.kernels.depthwise import depthwise_conv3x3
            from camixer_fast.kernels.ffn import ffn_tail
            from camixer_fast.kernels.mixer_tail import mixer_tail
            from camixer_fast.kernels.predictor import predictor
            from camixer_fast.reference.model import Block

            wt = Block(c, 4).to(dtype).weights()
            x, cond = torch.rand(b, h, w, c, dtype=dtype), torch.rand(b, h, w, 4, dtype=dtype)
            with torch.no_grad():
                maps = predictor(x, cond, wt.v_w, wt.v_b, wt.route_w, wt.route_b,
                                 wt.route_norm_w, wt.route_norm_b, wt.off1_w, wt.off1_b,
                                 wt.off2_w, wt.off2_b, wt.ca_w, wt.ca_b, wt.sa_w, wt.sa_b)
                z = depthwise_conv3x3(maps.v, wt.dw_w, wt.dw_b)
                tail = mixer_tail(z, maps.v, x, maps.ca, wt.dil_w, wt.dil_b, wt.out_w, wt.out_b,
                                  wt.norm1_w, wt.norm1_b, wt.ffn_in_w)
                ffn_tail(tail.u, tail.x1, wt.ffn_dw_w, wt.ffn_out_w, wt.norm2_w, wt.norm2_b)
        yield f"op-block-stages-{dtype_name}-{b}x{h}x{w}-C{c}", block_stages


@contextmanager
def fp32_precision(precision: str) -> Iterator[None]:
    """Within: the fp32 kernels launch with dot ``precision`` -- "tf32" through PyTorch's own
    switch (``torch.backends.cuda.matmul.allow_tf32``), "tf32x3" or "ieee" as the parity
    precision (``CAMIXER_FAST_FP32_PARITY``, TF32 off); both restored after."""
    import torch

    from camixer_fast.kernels.helpers import FP32_PARITY_VAR

    saved = torch.backends.cuda.matmul.allow_tf32, os.environ.get(FP32_PARITY_VAR)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if precision != "tf32":
        os.environ[FP32_PARITY_VAR] = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        if saved[1] is None:
            os.environ.pop(FP32_PARITY_VAR, None)
        else:
            os.environ[FP32_PARITY_VAR] = saved[1]


FP32_PRECISIONS = ("tf32", "tf32x3")
"""fp32 dot precisions beside the default IEEE products, each driven through the model."""


def precision_cases(precision: str, channels: int) -> Iterator[tuple[str, Callable]]:
    """fp32 models under dot ``precision``: inference at 16×16 (γ = 1) and 64×48 (γ = 0.5), a
    training step at 17×33, CAMixerOSR at 32×64 (γ = 0.5), the attention alone with 8×8
    windows."""
    for name, case in (*inference_cases("float32", channels), *training_cases("float32",
                                                                               channels)):
        if name.endswith(("-16x16-gamma=1.0", "-64x48-gamma=0.5", "-17x33")) and (
                "train" in name or "model" in name):
            def run(case=case):
                with fp32_precision(precision):
                    case()
            yield name.replace("float32", f"float32-{precision}", 1), run
    for name, case in osr_cases("float32", channels):
        if name.endswith("-32x64-gamma=0.5"):
            def run_osr(case=case):
                with fp32_precision(precision):
                    case()
            yield name.replace("float32", f"float32-{precision}", 1), run_osr
    if channels == CHANNELS[0]:
        for name, case in op_cases("float32"):
            if "ws8" in name:
                def run_op(case=case):
                    with fp32_precision(precision):
                        case()
                yield name.replace("float32", f"float32-{precision}", 1), run_op


def autocast_cases(channels: int) -> Iterator[tuple[str, Callable]]:
    """bf16 autocast around an fp32 model (master weights stay fp32): a training step with
    backward at 16×16 and 17×33, and inference at 64×48. The tensors are on the CPU, so
    the CPU's autocast runs; the kernel entries cast their inputs the same way under CUDA's
    (``camixer_fast.kernels.helpers.autocast_entry``)."""
    import torch

    for h, w in TRAIN_SIZES:
        def train(h=h, w=w):
            m = _model(channels, torch.float32, train=True)
            x = torch.rand(2, 3, h, w, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sr, ratio_loss = m(x)
                loss = sr.float().abs().mean() + ratio_loss.float()
            loss.backward()
        yield f"train-autocast-bfloat16-C{channels}-{h}x{w}", train

    def infer():
        m = _model(channels, torch.float32, train=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            m(torch.rand(1, 3, 64, 48))
    yield f"model-autocast-bfloat16-C{channels}-64x48-gamma=0.5", infer


def cases(dtypes: tuple[str, ...], channels: tuple[int, ...]) -> list[tuple[str, Callable]]:
    out = []
    for dtype in dtypes:
        for c in channels:
            out += list(inference_cases(dtype, c))
            out += list(training_cases(dtype, c))
            if dtype == "float32":       # CAMixerOSR computes in fp32
                out += list(osr_cases(dtype, c))
            if dtype == "float32":
                for precision in FP32_PRECISIONS:
                    out += list(precision_cases(precision, c))
            if dtype == "bfloat16":
                out += list(autocast_cases(c))
        out += list(op_cases(dtype))
    # the warp alone also takes fp64 (its gradcheck runs in it)
    out += [case for case in op_cases("float64") if "deformable_key" in case[0]]
    return out


# --- running and checking ------------------------------------------------------------------

def _error_text(exc: BaseException) -> str:
    """One line: for a Triton compilation error, the kernel's offending line and the cause."""
    while getattr(exc, "__cause__", None) is not None and hasattr(exc.__cause__, "node"):
        exc = exc.__cause__        # an error inside a @triton.jit helper the kernel calls
    src, node = getattr(exc, "src", None), getattr(exc, "node", None)
    if src and hasattr(node, "lineno"):
        line = src.split("\n")[node.lineno - 1].strip()
        cause = (getattr(exc, "error_message", None) or "").strip().splitlines()
        return (f"{type(exc).__name__} at line {node.lineno} of the function, `{line}`: "
                f"{cause[-1] if cause else ''}")
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2000 else text[:2000] + " ..."


def gate_target(capability: int, dtypes: tuple[str, ...], channels: tuple[int, ...],
                only: str | None = None) -> dict:
    """Drive every case through the JIT for sm_``capability``; check every kernel compiled.

    Returns {"target", "cases": {case: "ok" | error}, "kernels": {variant: report},
    "problems": [...], "seconds"}.
    """
    import torch

    sys.path.insert(0, str(HERE))
    from cubin import inspect

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    results: dict[str, str] = {}
    with compile_only(capability) as recorder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, case in cases(dtypes, channels):
            if only and only not in name:
                continue
            recorder.case = name
            try:
                case()
                results[name] = "ok"
            except Exception as exc:   # a case that fails to compile: report it, go on
                results[name] = _error_text(exc)
                if os.environ.get("CAMIXER_GATE_TRACEBACK"):
                    traceback.print_exc()
    problems = [f"{name}: {error}" for name, error in results.items() if error != "ok"]
    first: dict[str, Launch] = {}
    for launch in recorder.launches:
        first.setdefault(f"{launch.kernel}[{launch.variant}]", launch)
    reports = inspect([(x.compiled.asm, x.compiled.metadata.shared) for x in first.values()])
    kernels: dict[str, dict] = {}
    for (label, launch), report in zip(first.items(), reports):
        kernels[label] = dict(report.as_dict(), first_case=launch.case)
        problems += [f"{label} (first launched by {launch.case}): {p}" for p in report.problems()]
    return {"target": f"sm_{capability}", "cases": results, "kernels": kernels,
            "problems": problems, "seconds": round(time.perf_counter() - start, 1)}


def _summary(result: dict) -> str:
    cases_ok = sum(v == "ok" for v in result["cases"].values())
    tc = sum(1 for k in result["kernels"].values() if k["tensor_core_dots"])
    lines = [f"{result['target']}: {cases_ok}/{len(result['cases'])} cases compiled, "
             f"{len(result['kernels'])} kernel variants ({tc} on tensor cores), "
             f"{len(result['problems'])} problem(s), {result['seconds']} s"]
    lines += [f"  FAIL {p.splitlines()[0][:300]}" for p in result["problems"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, action="append", choices=TARGETS,
                        help="compute capability to compile for (repeat; default: 80 and 90, "
                             "one process each, in parallel)")
    parser.add_argument("--dtype", action="append", choices=DTYPES,
                        help="dtype to drive (repeat; default: all three)")
    parser.add_argument("--channels", type=int, action="append",
                        help=f"model width C (repeat; default: {' '.join(map(str, CHANNELS))})")
    parser.add_argument("-k", dest="only", help="run only the cases whose name contains this")
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args(argv)
    from camixer_fast.backends.triton_env import interpreting

    if interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile for a GPU")
    targets = tuple(args.target or TARGETS)
    dtypes = tuple(args.dtype or DTYPES)
    channels = tuple(args.channels or CHANNELS)
    if len(targets) == 1:
        results = [gate_target(targets[0], dtypes, channels, args.only)]
    else:
        results = _in_parallel(targets, dtypes, channels, args.only)
    for result in results:
        print(_summary(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["problems"] for r in results) else 0


def _in_parallel(targets: tuple[int, ...], dtypes: tuple[str, ...], channels: tuple[int, ...],
                 only: str | None) -> list[dict]:
    """One process per target (the JIT binds a kernel to one target per process)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for cc in targets:
            out = Path(tmp) / f"sm_{cc}.json"
            cmd = [sys.executable, __file__, "--target", str(cc), "--json", str(out)]
            cmd += [f"--dtype={d}" for d in dtypes] + [f"--channels={c}" for c in channels]
            cmd += ["-k", only] if only else []
            procs.append((cc, out, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True)))
        results = []
        for cc, out, proc in procs:
            log, _ = proc.communicate()
            if not out.exists():
                raise RuntimeError(f"the sm_{cc} gate process died (exit {proc.returncode}):\n"
                                   f"{log[-4000:]}")
            results += json.loads(out.read_text())
    return results


if __name__ == "__main__":
    raise SystemExit(main())
