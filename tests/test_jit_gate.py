"""The JIT gate (tests/gates/jit_gate.py): every launch the model makes compiles for sm_80 and
sm_90 through Triton's own JIT and its real argument specialization, without a GPU; every kernel
compiled is free of spills and runs its fp16/bf16/tf32 products on tensor cores.

The gate runs as a script in a subprocess, outside the checkout and without TRITON_INTERPRET
(the test session interprets the kernels). Its pieces are tested here too.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, bench_module

GATES = REPO / "tests" / "gates"


def gate_module(name: str):
    return bench_module(name, GATES)


def kernel_names() -> set[str]:
    """Every @triton.jit kernel (``*_kernel``) of the camixer_fast.kernels modules."""
    import triton

    import camixer_fast.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        # JITFunction, or InterpretedFunction under TRITON_INTERPRET
        names |= {name for name, obj in vars(module).items()
                  if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface)}
    return names


def run_gate(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(GATES / script), *args], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=1800, check=False)


@pytest.fixture(scope="module")
def jit_gate(tmp_path_factory) -> tuple[subprocess.CompletedProcess, list[dict]]:
    tmp = tmp_path_factory.mktemp("jit_gate")
    done = run_gate("jit_gate.py", "--json", str(tmp / "gate.json"), tmp=tmp)
    results = json.loads((tmp / "gate.json").read_text()) if (tmp / "gate.json").exists() else []
    return done, results


def test_every_launch_compiles_for_sm80_and_sm90(jit_gate) -> None:
    done, results = jit_gate
    print(done.stdout)
    assert results, done.stderr[-3000:] + done.stdout[-3000:]
    assert [r["target"] for r in results] == ["sm_80", "sm_90"]
    for result in results:
        failed = {case: error for case, error in result["cases"].items() if error != "ok"}
        assert not failed, f"{result['target']}: " + "\n".join(
            f"{case}: {error[:600]}" for case, error in failed.items())


def test_every_kernel_passes_the_cubin_checks(jit_gate) -> None:
    done, results = jit_gate
    assert results
    for result in results:
        assert not result["problems"], "\n".join(result["problems"])
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_gate_drives_every_kernel_and_dtype(jit_gate) -> None:
    _, results = jit_gate
    for result in results:
        compiled = {label.split("[")[0] for label in result["kernels"]}
        assert compiled == kernel_names(), f"not driven: {kernel_names() - compiled}"
        cases = result["cases"]
        for dtype in ("float32", "float16", "bfloat16"):
            assert any(c.startswith(f"train-{dtype}") for c in cases)
            assert any(c.startswith(f"model-{dtype}") and c.endswith("16x16-gamma=1.0")
                       for c in cases)
        # fp32 in the other dot precisions, and bf16 autocast around an fp32 model
        # CAMixerOSR's shifted windows (and DCNv2), and the attention at a shift alone
        assert any(c.startswith("osr-float32-") for c in cases)
        shifts = {label.split(",")[16] for label in result["kernels"]   # SHIFT_H: H + shift
                  if label.startswith("hard_window_attention_kernel[")}
        assert shifts == {"i", "i16"}, shifts
        for prefix in ("model-float32-tf32-", "train-float32-tf32-", "model-float32-tf32x3-",
                       "train-float32-tf32x3-", "op-attention-float32-tf32x3-ws8",
                       "osr-float32-tf32-", "osr-float32-tf32x3-", "op-dcn-bfloat16-",
                       "train-autocast-bfloat16-", "model-autocast-bfloat16-"):
            assert any(c.startswith(prefix) for c in cases), prefix


def test_fp32_precisions_compile_on_tensor_cores(jit_gate) -> None:
    """Every kernel with matrix products launched in tf32 or tf32x3 -- the attention (forward,
    backward, small windows) and the fused block's predictor, mixer tail and FFN tail -- runs
    its products on tensor cores."""
    _, results = jit_gate
    for result in results:
        for precision in ("tf32", "tf32x3"):
            variants = {label: k for label, k in result["kernels"].items()
                        if f"PRECISION={precision}," in label and "[float32," in label}
            assert {label.split("[")[0] for label in variants} >= {
                "hard_window_attention_kernel", "attention_fwd_kernel",
                "attention_bwd_dkv_kernel", "attention_bwd_dq_kernel", "predictor_kernel",
                "mixer_tail_kernel", "ffn_tail_kernel"}, precision
            for label, k in variants.items():
                assert k["tensor_core_dots"] == k["dots"] > 0 and k["mma"], label


def test_half_precision_attention_runs_on_tensor_cores(jit_gate) -> None:
    _, results = jit_gate
    for result in results:
        half = {label: k for label, k in result["kernels"].items()
                if "attention" in label and ("float16," in label or "bfloat16," in label)}
        assert half
        for label, k in half.items():
            assert k["tensor_core_dots"] == k["dots"] > 0, label
            assert k["mma"], label
        if result["target"] == "sm_90":
            assert any(m.startswith("HGMMA") for k in half.values() for m in k["mma"])


# --- the gate's pieces ------------------------------------------------------------------------

TTIR = "\n".join([
    "%a = tt.dot %q, %k, %c, inputPrecision = tf32 : tensor<64x64xf16> * tensor<64x32xf16> -> "
    "tensor<64x32xf32> loc(#loc1)",
    "%b = tt.dot %q, %k, %c : tensor<16x64xf32> * tensor<64x16xf32> -> tensor<16x16xf32>",
    "%c = tt.dot %q, %k, %c, inputPrecision = tf32 : tensor<16x64xf32> * tensor<64x16xf32> -> "
    "tensor<16x16xf32>",
    "%d = tt.dot %q, %k, %c, inputPrecision = tf32x3 : tensor<16x64xf32> * tensor<64x16xf32> -> "
    "tensor<16x16xf32>",
    "%e = tt.dot %q, %k, %c : tensor<16x64xbf16> * tensor<64x16xbf16> -> tensor<16x16xf32>",
])


def test_tensor_core_dots_are_read_from_the_ir() -> None:
    cubin = gate_module("cubin")
    # f16 (any precision), tf32, tf32x3, bf16: tensor cores; f32 with IEEE (printed as nothing)
    assert cubin.tensor_core_dots(TTIR) == (5, 4)
    assert cubin.tensor_core_dots("tt.load %p : tensor<16x!tt.ptr<f32>>") == (0, 0)


def test_narrow_wgmma_swizzles_are_read_from_the_ttgir() -> None:
    cubin = gate_module("cubin")
    layouts = ("#shared = #ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = true, "
               "elementBitWidth = 16}>\n"
               "#shared2 = #ttg.nvmma_shared<{swizzlingByteWidth = 64, transposed = true, "
               "elementBitWidth = 16}>\n")
    wide = ("%d = ttng.warp_group_dot %p, %v, %acc : tensor<64x64xf16> * "
            "!ttg.memdesc<64x64xf16, #shared, #smem> -> tensor<64x64xf32, #mma>\n")
    narrow = ("%e = ttng.warp_group_dot %p, %v, %acc : tensor<64x32xf16> * "
              "!ttg.memdesc<32x64xf16, #shared2, #smem> -> tensor<64x64xf32, #mma>\n")
    waited = "%w = ttng.warp_group_dot_wait %e, %v : !ttg.memdesc<32x64xf16, #shared2, #smem>\n"
    assert cubin.narrow_wgmma_swizzles(layouts + wide) == ()
    assert cubin.narrow_wgmma_swizzles(layouts + wide + waited) == ()
    assert cubin.narrow_wgmma_swizzles(layouts + wide + narrow) == (64,)
    assert cubin.narrow_wgmma_swizzles("") == ()


def test_kernel_report_names_each_problem() -> None:
    cubin = gate_module("cubin")
    ok = cubin.KernelReport(96, 0, 0, 1024, 2, 2, ("HMMA.16816.F32",))
    assert ok.problems() == []
    bad = cubin.KernelReport(300, 16, 8, 200_000, 2, 2, (), (64,))
    problems = " ".join(bad.problems())
    for words in ("spills", "300 registers", "shared memory", "no HMMA/HGMMA",
                  "64-byte swizzled"):
        assert words in problems
    # IEEE fp32 products run on the FMA units by design
    assert cubin.KernelReport(96, 0, 0, 0, 2, 0, ()).problems() == []


def test_stand_in_driver_answers_like_a_gpu_and_runs_nothing() -> None:
    jit_gate_module = gate_module("jit_gate")
    driver = jit_gate_module.StandInDriver(90)
    assert (driver.get_current_target().backend, driver.get_current_target().arch) == ("cuda", 90)
    assert driver.get_current_device() == 0 and driver.get_current_stream(0) == 0
    with pytest.raises(RuntimeError, match="cannot load or run"):
        driver.launcher_cls  # noqa: B018


def test_gate_refuses_the_interpreter(tmp_path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(GATES / "jit_gate.py"), "--target", "90"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr
