"""Canned records of bench/gpu_bench.py for the tests of its CPU-side parts (the report, the
verdicts, the GPU check's summary): the shapes and magnitudes of an H200 run, numbers chosen
by the test, nothing measured."""

from __future__ import annotations

import copy

MODELS = ("S", "B")
GAMMAS = (1.0, 0.5, 0.25, 0.0)
PRECISIONS = ("fp32", "fp32-tf32x3", "tf32", "fp16", "bf16")


def latency_rows(official_ms: float = 46.0, ours_ms: dict | None = None,
                 gamma_ratio: float = 0.6) -> list[dict]:
    """Every latency case; ours at ``ours_ms[precision]`` for γ = 1, scaled by
    ``gamma_ratio`` at γ = 0.25 (and halfway between for 0.5), the official flat."""
    ours_ms = ours_ms or {"fp32": 7.0, "fp32-tf32x3": 6.0, "tf32": 5.0, "fp16": 3.5,
                          "bf16": 3.5}
    rows = []
    for model in MODELS:
        for precision in PRECISIONS:
            impls = ("triton",) if precision == "fp32-tf32x3" else (
                "official", "reference", "triton")
            for gamma in GAMMAS:
                scale = {1.0: 1.0, 0.5: (1 + gamma_ratio) / 2, 0.25: gamma_ratio,
                         0.0: gamma_ratio}[gamma]
                for impl in impls:
                    ms = {"official": official_ms, "reference": 0.9 * official_ms,
                          "triton": ours_ms[precision] * scale}[impl]
                    rows.append({"model": model, "precision": precision, "impl": impl,
                                 "gamma": gamma, "tolerance": 1e-4, "finite": True,
                                 "max_abs_vs_official_fp32": 0.0 if impl == "official" else 4e-6,
                                 "parity_ok": True, "median_ms": ms, "min_ms": ms,
                                 "max_ms": ms, "runs": 5, "k_fraction": 0.5})
    return rows


CEILINGS = {"copy_bytes": 2 << 30, "copy_ms": 0.5, "copy_gb_s": 4300.0, "matmul_size": 8192,
            "matmul_tflops": {"fp32": 50.0, "tf32": 400.0, "fp16": 750.0, "bf16": 760.0}}


def kernel_times(share: float) -> tuple[dict, dict]:
    """Per-forward kernel times (inference fp32 at 720p, training fp32) at ``share`` of the
    roofline by bench/roofline.py, plus a PyTorch kernel (no cost model, not ours)."""
    import roofline

    peaks = roofline.Ceilings.from_record(CEILINGS)
    inference = roofline.inference_costs(roofline.Shape(1, 36, 192, 320), [120] * 20)
    training = roofline.training_costs(roofline.Shape(16, 36, 64, 64), 20)
    times = ({name: {"us": cost.floor_s(peaks, "ieee") * 1e6 / share, "calls": 20.0}
              for name, cost in inference.items()},
             {name: {"us": cost.floor_s(peaks, "ieee") * 1e6 / share, "calls": 20.0}
              for name, cost in training.items()})
    times[0]["void at::native::conv_depthwise2d_forward_kernel<float>"] = {"us": 1700.0,
                                                                           "calls": 60.0}
    return times


def record(share: float = 0.5, **overrides) -> dict:
    """A whole record: every section ok, our kernels at ``share`` of their roofline.
    ``overrides``: section name -> its data (None: the section timed out)."""
    inference_kernels, training_kernels = kernel_times(share)
    inference = {"dot_precision": "ieee", "itemsize": 4, "max_abs_vs_official_fp32": 4e-6,
                 "parity_ok": True, "padded_hw": [192, 320], "channels": 36,
                 "hard_per_block": [120] * 20, "windows_per_image": 240,
                 "kernels": inference_kernels, "launches": 250.0,
                 "device_ms": 7.9, "runs": 3}
    training = {"batch": 16, "patch": 64, "channels": 36, "blocks": 20,
                "itemsize_attention": 4, "itemsize_warp": 4, "dot_precision": "ieee",
                "kernels": training_kernels,
                "launches": 900.0, "device_ms": 40.0, "runs": 1}
    data = {
        "ceilings": copy.deepcopy(CEILINGS),
        "latency": {"rows": latency_rows(), "input": [1, 3, 180, 320]},
        "kernels": {"inference": {"fp32": inference}, "training": {"fp32": training},
                    "input": [1, 3, 180, 320]},
        "batch": {"batch": 16, "side": 128, "rows": [
            {"impl": "official", "finite": True, "max_abs_vs_solo": 3e-3, "parity_ok": True,
             "median_ms": 77.0, "images_per_s": 207.8},
            {"impl": "triton", "finite": True, "max_abs_vs_solo": 0.0,
             "max_abs_solo_vs_official_solo": 4e-6, "parity_ok": True, "median_ms": 20.0,
             "images_per_s": 800.0}]},
        "large": {"input": [1, 3, 768, 1024], "rows": [
            {"impl": "official", "finite": True, "parity_ok": True, "peak_gib": 2.67,
             "median_ms": 164.0},
            {"impl": "triton", "finite": True, "parity_ok": True, "peak_gib": 1.16,
             "max_abs_vs_official": 5e-6, "median_ms": 40.0}]},
        "training": {"rows": [
            {"impl": "reference", "mode": "fp32", "parity_ok": True, "median_ms": 193.0},
            {"impl": "official", "mode": "fp32", "parity_ok": True, "median_ms": 190.0,
             "loss_rel_vs_reference": 0.0, "grad_rel_l2_vs_reference": 3e-7},
            {"impl": "triton", "mode": "fp32", "parity_ok": True, "median_ms": 80.0,
             "loss_rel_vs_reference": 1e-7, "grad_rel_l2_vs_reference": 2e-7},
            {"impl": "triton", "mode": "bf16-autocast", "parity_ok": True, "median_ms": 50.0,
             "loss_rel_vs_reference": 3e-3, "grad_rel_l2_vs_reference": 0.03}]},
        "upscale": {"size": [480, 320], "first_s": 2.3, "second_s": 0.11,
                    "out_size": [1920, 1280], "max_levels_vs_reference": 1, "parity_ok": True},
        "variants": {"source": "bench/gpu_bench.py", "rows": [
            {"variant": "cuda-graph-triton", "kind": "cuda-graph", "ok": True,
             "max_abs_vs_eager": 0.0, "eager_ms": 7.0, "ms": 5.0},
            {"variant": "compile-triton", "kind": "compile", "ok": True,
             "max_abs_vs_eager": 2e-6, "eager_ms": 7.0, "ms": 6.0, "compile_s": 50.0}]},
    }
    sections = {}
    for name, value in data.items():
        value = overrides.get(name, value)
        if value is None:
            sections[name] = {"status": "timeout", "seconds": 90.0,
                              "error": "killed after 90 s"}
        else:
            sections[name] = {"status": "ok", "seconds": 10.0, "data": value}
    return {"environment": {"date": "2026-12-02T10:00:00+00:00", "gpu": "NVIDIA H200",
                            "capability": "9.0", "multiprocessors": 132, "driver": "580.1",
                            "cuda": "13.0", "cudnn": 91000, "torch": "2.11.0",
                            "triton": "3.6.0", "python": "3.12.3", "commit": "abc1234"},
            "settings": {"mode": "quick", "warmup": 2, "runs": 5, "sections": list(data),
                         "weights": "CAMixerSR_S.pth", "weights_b": "random (seed 0)",
                         "image": "img_001.png", "size": [320, 180], "scale": 4},
            "sections": sections, "seconds": 300.0}
