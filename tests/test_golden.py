"""Parity with the official implementation's recorded outputs (../shared/golden).

The reference backend runs on the CPU, the Triton backend on ``DEVICE`` (compiled on a GPU, in
the interpreter on a CPU); fp32 everywhere, TF32 off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camixer_fast
from camixer_fast.reference.windows import to_windows
from conftest import DEVICE, assert_close

pytestmark = pytest.mark.usefixtures("no_tf32")

OUTPUT_TOL = 1e-4
GRAD_RTOL = 1e-4
BLOCK_KEYS = ("condition_global", "pred_score", "offsets", "ca", "sa", "warped_x", "attn_out",
              "mixer_out")


def output_cases() -> list[str]:
    # the golden file's keys, listed here so a test id names each case
    return [f"{name}@gamma={g}" for g in ("1.0", "0.5", "0.25", "0.0")
            for name in ("butterfly_x4_lr", "butterfly_crop_45x61", "baby_x4_lr")
            if not (name == "baby_x4_lr" and g in ("0.25", "0.0"))]


# The Triton backend runs in the CPU interpreter on a machine without a GPU, a minute a case:
# every γ on one input, the padded/cropped input once, and the input whose routing cuts through
# tied scores.
TRITON_CASES = ("butterfly_x4_lr@gamma=1.0", "butterfly_x4_lr@gamma=0.5",
                "butterfly_x4_lr@gamma=0.25", "butterfly_x4_lr@gamma=0.0",
                "butterfly_crop_45x61@gamma=0.5", "baby_x4_lr@gamma=0.5")
BACKEND_CASES = ([("reference", case) for case in output_cases()]
                 + [("triton", case) for case in TRITON_CASES])


@pytest.fixture(scope="module")
def models(model_s: camixer_fast.CAMixerSR, weights_path) -> dict[str, camixer_fast.CAMixerSR]:
    return {"reference": model_s,
            "triton": camixer_fast.load_model(weights_path, backend="triton", device=DEVICE)}


def device_of(model: camixer_fast.CAMixerSR) -> torch.device:
    return next(model.parameters()).device


@pytest.mark.parametrize("backend, case", BACKEND_CASES, ids=[f"{b}-{c}" for b, c in BACKEND_CASES])
def test_outputs(golden: dict, models: dict, backend: str, case: str) -> None:
    model = models[backend]
    name, gamma = case.split("@gamma=")
    model.gamma = float(gamma)
    with torch.no_grad():
        out = model(golden["inputs"][name].to(device_of(model)))
    assert_close(case, golden["outputs"][case], out, OUTPUT_TOL)


def test_every_golden_output_is_tested(golden: dict) -> None:
    assert sorted(golden["outputs"]) == sorted(output_cases())


RECORDED_BLOCKS = ("body.0.body.0", "body.3.body.5")


@pytest.fixture(scope="module")
def captured(golden: dict, models: dict) -> dict[str, dict[str, dict]]:
    """backend -> block -> the intermediates of the recorded blocks' mixers, one forward each."""
    out = {}
    for backend, model in models.items():
        mixers = [model.get_submodule(f"{block}.mixer") for block in RECORDED_BLOCKS]
        model.gamma = 0.5
        for mixer in mixers:
            mixer.capture = {}
        try:
            with torch.no_grad():
                model(golden["inputs"]["butterfly_x4_lr"].to(device_of(model)))
            out[backend] = {block: {k: v.cpu() for k, v in mixer.capture.items()}
                            for block, mixer in zip(RECORDED_BLOCKS, mixers)}
        finally:
            for mixer in mixers:
                mixer.capture = None
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("block", RECORDED_BLOCKS)
def test_block_intermediates(golden: dict, captured: dict, backend: str, block: str) -> None:
    record = golden["blocks@gamma=0.5"][block]
    got = captured[backend][block]
    k = int(got["num_hard"][0])
    assert k == record["K"]
    assert torch.equal(got["order"][:, :k], record["idx1"]), "hard windows differ"
    assert torch.equal(got["order"][:, k:], record["idx2"]), "simple windows differ"
    assert_close(f"{block}.x", record["x"], got["x"], OUTPUT_TOL)
    for key in BLOCK_KEYS:
        ref, out = record[key], got[key]
        if key == "warped_x" and backend == "triton":
            # the kernels compute the deformable keys of the hard windows only
            hard = record["idx1"][0]
            ref, out = to_windows(ref, 16)[:, hard], to_windows(out, 16)[:, hard]
        assert_close(f"{block}.{key}", ref, out, OUTPUT_TOL)


def _training_step(model: camixer_fast.CAMixerSR, record: dict) -> tuple[torch.Tensor, ...]:
    param = next(model.parameters())
    x = record["input"].to(param.device, param.dtype).clone().requires_grad_(True)
    out, ratio_loss = model(x)
    loss = (out - record["target"].to(param.device, param.dtype)).abs().mean() + ratio_loss
    loss.backward()
    return out, ratio_loss, loss, x.grad


def _train_model(weights_path, gamma: float, dtype: torch.dtype,
                 backend: str = "reference") -> camixer_fast.CAMixerSR:
    device = DEVICE if backend == "triton" else "cpu"
    model = camixer_fast.load_model(weights_path, gamma=gamma, backend=backend, dtype=dtype,
                                    device=device)
    model.train()
    model.train_noise = False
    return model


TRAINING_CASES = [("reference", "0.5"), ("reference", "0.25"), ("triton", "0.5")]


@pytest.mark.parametrize("backend, gamma", TRAINING_CASES[:2],
                         ids=[f"{b}-gamma={g}" for b, g in TRAINING_CASES[:2]])
def test_training_forward(golden: dict, weights_path, backend: str, gamma: str) -> None:
    record = golden[f"train@gamma={gamma}"]
    out, ratio_loss, loss, _ = _training_step(_train_model(weights_path, float(gamma),
                                                           torch.float32, backend), record)
    assert_close("output", record["output"], out, GRAD_RTOL, relative=True)
    assert_close("ratio_loss", record["ratio_loss"], ratio_loss, GRAD_RTOL, relative=True)
    assert_close("loss", record["loss"], loss, GRAD_RTOL, relative=True)


@pytest.mark.parametrize("backend, gamma", TRAINING_CASES,
                         ids=[f"{b}-gamma={g}" for b, g in TRAINING_CASES])
def test_training_gradients(golden: dict, weights_path, backend: str, gamma: str) -> None:
    """Gradients of the training step, fp32, against the official ones at 1e-4 relative.

    The gradient of a LeakyReLU jumps (1 -> 0.1) where its input crosses 0. On this record one
    pre-activation of ``body.2.body.5.mixer.route.out_offsets`` is about -3e-6 in exact
    arithmetic, the size of the fp32 rounding of any implementation that is not bit-identical
    to the official build: ours lands on the other side, and that one pixel's slope changes every
    gradient upstream of it by up to 1% (the forward values do not move). The official fp32
    gradients agree with exact arithmetic to ~1e-6, so the kinks' sides are taken from an fp64
    forward (the exact side) and the fp32 model is run with those slopes; everything else is
    the plain fp32 computation, held to the full 1e-4 tolerance.
    """
    record = golden[f"train@gamma={gamma}"]
    exact = _train_model(weights_path, float(gamma), torch.float64)
    signs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(
        lambda mod, inp, out, name=name: signs.__setitem__(name, inp[0] > 0))
        for name, module in exact.named_modules() if isinstance(module, nn.LeakyReLU)]
    with torch.no_grad():
        exact(record["input"].double())
    for hook in hooks:
        hook.remove()

    model = _train_model(weights_path, float(gamma), torch.float32, backend)
    flipped = []

    def pin(module: nn.LeakyReLU, inp: tuple, out: torch.Tensor, name: str) -> torch.Tensor:
        side = signs[name].to(inp[0].device)
        flipped.append(int(((inp[0] > 0) != side).sum()))
        return torch.where(side, inp[0], inp[0] * module.negative_slope)

    for name, module in model.named_modules():
        if isinstance(module, nn.LeakyReLU):
            module.register_forward_hook(lambda mod, inp, out, name=name: pin(mod, inp, out, name))
    out, ratio_loss, _, grad_input = _training_step(model, record)
    print(f"pre-activations on the other side of 0 than in exact arithmetic: {sum(flipped)}")
    assert sum(flipped) <= 4, "fp32 forward strays from exact arithmetic more than rounding does"
    assert_close("output", record["output"], out, GRAD_RTOL, relative=True)
    assert_close("grad_input", record["grad_input"], grad_input, GRAD_RTOL, relative=True)
    params = dict(model.named_parameters())
    for name, ref in record["grads"].items():
        assert_close(name, ref, params[name].grad, GRAD_RTOL, relative=True)
