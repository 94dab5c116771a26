"""The GPU latency table: the official op chain against the Triton backend, each case checked
against the official chain's fp32 output (TF32 off) before it is timed, every call synchronised.

    python -m pytest bench/test_bench_gpu.py --benchmark-json=/tmp/gpu.json
    python bench/report.py add /tmp/gpu.json            # rows for bench/results.jsonl

- ``latency``: S at 320×180 -> 1280×720, γ of :data:`common.GAMMAS`, in fp32 / TF32 / fp16 / bf16.
- ``training``: one step (forward, L1 + ratio loss, backward, AdamW) on 16 crops of 64², fp32
  and bf16 autocast (fp32 master weights), loss and gradients against the reference fp32 step.
- ``large``: a 1024×768 input, time and peak memory; ``variants``: CUDA graphs and
  ``torch.compile(fullgraph=True)`` against eager.
- ``osr``: CAMixerOSR x4 on 256×512, reference / Triton / Triton with torchvision's DCNv2.

Without CUDA every case is skipped, unless ``CAMIXER_BENCH_GPU_SMOKE=1``: a small seeded model
runs the latency and training cases on the CPU at 32×32 (Triton's interpreter), which checks
this file, not speed.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import pytest
import torch
from common import (GAMMAS, PRECISIONS, SHARED, TOLERANCE, centre_crop, errors, passes,
                    precision_mode, record, sync)
from official_baseline import load_official_baseline

import camixer_fast

CUDA = torch.cuda.is_available()
SMOKE = os.environ.get("CAMIXER_BENCH_GPU_SMOKE") == "1" and not CUDA
DEVICE = torch.device("cuda" if CUDA else "cpu")
IMAGE = SHARED / "data" / "Urban100" / "HR" / "img_001.png"
SIZE = (32, 32) if SMOKE else (320, 180)
TIMED = ("fp32",) if SMOKE else tuple(PRECISIONS)
"""The smoke run keeps fp32 (the interpreter's bf16 products are broken)."""
TRAIN = (2, 32) if SMOKE else (16, 64)
TRAIN_TOL = {"fp32": (1e-5, 1e-4), "bf16-autocast": (2e-2, 0.15)}
"""Against the reference fp32 step: (relative loss, relative L2 of all gradients); bf16 keeps
8 mantissa bits."""
SMOKE_THREADS = 2
"""The bf16 sums of LayerNorm's weight gradients depend on the CPU split (0.062 at 1 thread,
0.039 at 2, 0.007 at 8 on the smoke model): the smoke run pins it."""
ROUNDS = 2 if SMOKE else 10

pytestmark = pytest.mark.skipif(not (CUDA or SMOKE),
                                reason="needs a CUDA device (or CAMIXER_BENCH_GPU_SMOKE=1)")


@pytest.fixture(scope="module")
def state(weights_path) -> dict:
    if SMOKE:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(SMOKE_THREADS)
        torch.manual_seed(1)
        net = camixer_fast.CAMixerSR(n_feats=12, blocks_per_group=(1, 1))
    else:
        net = camixer_fast.load_model(weights_path, backend="reference")
    return {k: v.clone() for k, v in net.state_dict().items()}


def build(state: dict, impl: str, dtype=torch.float32, gamma: float = 0.5, *, train: bool = False):
    """``impl`` ("official", "reference", "triton") on the device in ``dtype``."""
    if impl == "official":
        net = load_official_baseline(state, gamma=gamma).to(DEVICE, dtype)
    else:
        net = camixer_fast.CAMixerSR(**camixer_fast.infer_config(state), gamma=gamma)
        net.load_state_dict(state)
        net = net.to(DEVICE, dtype)
        net.backend = impl
    return net.train(train)


def forward(net, x):
    with torch.inference_mode():
        return net(x)


@pytest.fixture(scope="module")
def expected(state) -> dict:
    """The official chain's fp32 output (TF32 off) per γ."""
    x = centre_crop(IMAGE, *SIZE).to(DEVICE)
    net = build(state, "official")
    out = {}
    with precision_mode("fp32"):
        for gamma in GAMMAS:
            net.gamma = gamma
            out[gamma] = forward(net, x).float()
    return out


@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma{g}")
@pytest.mark.parametrize("impl", ("official", "triton"))
@pytest.mark.parametrize("precision", TIMED)
def test_latency(benchmark, state, expected, precision: str, impl: str, gamma: float) -> None:
    dtype = getattr(torch, PRECISIONS[precision][0])
    x = centre_crop(IMAGE, *SIZE).to(DEVICE, dtype)
    with precision_mode(precision):
        net = build(state, impl, dtype, gamma)
        out = forward(net, x)
        err = errors(out, expected[gamma])
        assert bool(torch.isfinite(out).all()), f"{precision} {impl}: non-finite output"
        assert impl == "official" or passes(err, precision), (
            f"{precision} {impl} gamma={gamma}: |out - official fp32| max {err['max_abs']:.2e}"
            f" mean {err['mean_abs']:.2e} > {TOLERANCE[precision]}; not timed")
        if impl != "official":
            with torch.inference_mode():
                _, routing = net(x, return_routing=True)
            err["k_fraction"] = float(routing.k_fraction().float().mean())

        def call() -> None:
            forward(net, x)
            sync()

        benchmark.group = f"latency {precision} gamma={gamma}"
        record(benchmark, suite="gpu-latency", precision=precision, impl=impl, gamma=gamma,
               **err)
        benchmark.pedantic(call, warmup_rounds=2, rounds=ROUNDS, iterations=1)


def train_batch(batch: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` LR crops of ``patch``² at seeded positions of the image, and their bicubic
    ×4 targets."""
    whole = centre_crop(IMAGE, 256, 256)
    g = torch.Generator().manual_seed(0)
    tops = torch.randint(0, 256 - patch + 1, (2, batch), generator=g).tolist()
    lr = torch.cat([whole[..., t:t + patch, l:l + patch] for t, l in zip(*tops)]).to(DEVICE)
    return lr, torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)


def loss_and_grads(net, lr, hr, mode: str) -> tuple[torch.Tensor, dict]:
    net.zero_grad(set_to_none=True)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if mode != "fp32" else nullcontext()
    with autocast:
        sr, ratio = net(lr)
        loss = (sr.float() - hr).abs().mean() + ratio.float()
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() if p.grad is not None else
                           torch.zeros_like(p, dtype=torch.float32)
                           for n, p in net.named_parameters()}


def relative_l2(ref: dict, got: dict) -> float:
    num = sum(float(((got[k] - ref[k]) ** 2).sum()) for k in ref)
    return math.sqrt(num / sum(float((g ** 2).sum()) for g in ref.values()))


@pytest.fixture(scope="module")
def training_reference(state) -> tuple:
    lr, hr = train_batch(*TRAIN)
    with precision_mode("fp32"):
        net = build(state, "reference", train=True)
        net.train_noise = False
        loss, grads = loss_and_grads(net, lr, hr, "fp32")
    return lr, hr, float(loss), grads


@pytest.mark.parametrize("mode", ("fp32", "bf16-autocast"))
@pytest.mark.parametrize("impl", ("official", "reference", "triton"))
def test_training(benchmark, state, training_reference, impl: str, mode: str) -> None:
    if SMOKE and impl == "triton" and mode != "fp32":
        pytest.skip("the interpreter's bf16 products are broken")
    lr, hr, ref_loss, ref_grads = training_reference
    with precision_mode("fp32"):
        net = build(state, impl, train=True)
        net.train_noise = False
        loss, grads = loss_and_grads(net, lr, hr, mode)
        check = {"loss_rel": abs(float(loss) - ref_loss) / abs(ref_loss),
                 "grad_rel_l2": relative_l2(ref_grads, grads)}
        loss_tol, grad_tol = TRAIN_TOL[mode]
        assert math.isfinite(float(loss)) and check["loss_rel"] <= loss_tol and \
            check["grad_rel_l2"] <= grad_tol, (
                f"{impl} {mode}: loss {check['loss_rel']:.3g} (tolerance {loss_tol}), gradients"
                f" {check['grad_rel_l2']:.3g} (tolerance {grad_tol}) against the reference fp32"
                " step; not timed")
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6)

        def step() -> None:
            loss_and_grads(net, lr, hr, mode)
            optimizer.step()
            sync()

        benchmark.group = "training"
        record(benchmark, suite="gpu-training", impl=impl, mode=mode, batch=TRAIN[0],
               patch=TRAIN[1], **check)
        benchmark.pedantic(step, warmup_rounds=1, rounds=max(1, ROUNDS // 2), iterations=1)


@pytest.mark.skipif(not CUDA, reason="peak memory needs CUDA")
@pytest.mark.parametrize("impl", ("official", "triton"))
def test_large(benchmark, state, impl: str) -> None:
    x = centre_crop(SHARED / "data" / "Urban100" / "HR" / "img_002.png", 1024, 768).to(DEVICE)
    with precision_mode("fp32"):
        net = build(state, impl)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = forward(net, x)
        peak = torch.cuda.max_memory_allocated() / 2**30
        assert bool(torch.isfinite(out).all())
        del out
        benchmark.group = "large 1024x768"
        record(benchmark, suite="gpu-large", impl=impl, peak_gib=peak)
        benchmark.pedantic(lambda: (forward(net, x), sync()), warmup_rounds=1, rounds=3,
                           iterations=1)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and inductor need CUDA")
@pytest.mark.parametrize("variant", ("cuda-graphs", "compiled"))
def test_variants(benchmark, state, variant: str) -> None:
    """A CUDA-graph replay and torch.compile(fullgraph=True) of the Triton model, within 1e-4
    of eager (fp32) with the same routing, then timed."""
    from camixer_fast.inference.graphs import CUDAGraphModel

    x = centre_crop(IMAGE, *SIZE).to(DEVICE)
    with precision_mode("fp32"), torch.inference_mode():
        net = build(state, "triton")
        torch._dynamo.reset()
        fast = CUDAGraphModel(net) if variant == "cuda-graphs" else torch.compile(net, fullgraph=True)
        want, want_routing = net(x, return_routing=True)
        got, got_routing = fast(x, return_routing=True)
        err = float((want - got).abs().max())
        same = all(torch.equal(a.num_hard, b.num_hard) and torch.equal(a.order, b.order)
                   for a, b in zip(want_routing.blocks, got_routing.blocks))
        assert err <= TOLERANCE["fp32"] and same, f"{variant}: {err:.2e}, same routing {same}"
        benchmark.group = "variants"
        record(benchmark, suite="gpu-variants", variant=variant, max_abs_vs_eager=err)
        benchmark.pedantic(lambda: (fast(x), sync()), warmup_rounds=2, rounds=ROUNDS,
                           iterations=1)


@pytest.mark.skipif(not CUDA, reason="CAMixerOSR at ODI size needs CUDA")
@pytest.mark.parametrize("impl", ("reference", "triton", "triton-torchvision-dcn"))
def test_osr_latency(benchmark, impl: str) -> None:
    """CAMixerOSR (published size, seeded weights, x4) on a 256×512 ERP input, fp32, γ 0.5:
    the reference ops, the Triton ops, and the Triton ops with torchvision's CUDA DCNv2 in
    place of ours (the measurement that picks the DCN); each within 1e-4 of the reference."""
    import dataclasses

    from odisr_fixture import seeded_state_dict

    from camixer_fast.models.loading import build_osr_model

    x = torch.rand(1, 3, 256, 512, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with precision_mode("fp32"):
        net = build_osr_model(seeded_state_dict("published", 4), backend="reference").to(DEVICE)
        want = forward(net, x)
        net.backend = impl.split("-")[0]
        if impl == "triton-torchvision-dcn":
            try:
                import torchvision.ops as tv
            except (ImportError, RuntimeError) as error:   # a build for another torch
                pytest.skip(f"torchvision's DCNv2 does not load: {error}")

            def tv_dcn(x, offset, mask, weight, bias=None, *, padding=1, dilation=1):
                return tv.deform_conv2d(x, offset, weight, bias, padding=padding,
                                        dilation=dilation, mask=mask)
            ops = dataclasses.replace(net.ops(DEVICE), deform_conv=tv_dcn)
            net.ops = lambda device: ops
        got = forward(net, x)
        err = errors(got, want)
        assert err["max_abs"] <= TOLERANCE["fp32"], f"{impl}: {err['max_abs']:.2e} vs reference"
        benchmark.group = "osr 256x512 x4"
        record(benchmark, suite="gpu-osr", impl=impl, **err)
        benchmark.pedantic(lambda: (forward(net, x), sync()), warmup_rounds=2, rounds=ROUNDS,
                           iterations=1)
