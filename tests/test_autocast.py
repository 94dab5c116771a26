"""bf16 autocast training with fp32 master weights (issue 11): ``torch.autocast`` around the
forward of a model whose weights stay fp32, on the reference backend and on the Triton kernels
(whose entries cast their inputs to one dtype, ``camixer_fast.kernels.helpers.autocast_entry``), and
``TrainConfig.amp`` / ``camixer-fast train --amp``.

The steps run on ``DEVICE`` under its autocast: on a CPU the CPU's, with the Triton kernels in
the interpreter under fp16 autocast (the interpreter's bf16 ``tl.dot`` is broken); on a GPU
CUDA's, compiled. The Triton bf16 autocast training step is compiled by the JIT gate
(tests/test_jit_gate.py) and checked and timed by bench/test_bench_gpu.py on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import camixer_fast
from camixer_fast import cli
from camixer_fast.kernels.helpers import autocast_dtype, autocast_entry
from camixer_fast.train import AMP_MODES, ConfigError, TrainConfig, Trainer
from camixer_fast.train.trainer import amp_context, check_amp
from conftest import DEVICE, SHARED, assert_close, tf32_off


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model(backend: str, seed: int = 0) -> camixer_fast.CAMixerSR:
    torch.manual_seed(seed)
    model = camixer_fast.CAMixerSR(n_feats=12, blocks_per_group=(1, 1)).to(DEVICE).train()
    model.train_noise = False
    model.backend = backend
    return model


def _step(model: camixer_fast.CAMixerSR, x: torch.Tensor, dtype: torch.dtype | None):
    """Loss and gradients of one training forward, under DEVICE's autocast to ``dtype`` if
    given (TF32 off: fp32 convolutions are IEEE on a GPU too)."""
    context = (torch.autocast(DEVICE, dtype=dtype) if dtype is not None
               else torch.autocast(DEVICE, enabled=False))
    with tf32_off(), context:
        sr, ratio_loss = model(x.to(DEVICE))
        loss = sr.float().abs().mean() + ratio_loss.float()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return sr, loss.detach(), dict(zip([n for n, _ in model.named_parameters()], grads))


def _relative_l2(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> float:
    num = sum(((out[k].double() - g.double()) ** 2).sum() for k, g in ref.items())
    den = sum((g.double() ** 2).sum() for g in ref.values())
    return float((num / den).sqrt())


# --- the kernel entries --------------------------------------------------------------------

def test_entry_casts_only_under_autocast() -> None:
    seen = []

    @autocast_entry("lower")
    def lower(a, b, *, c=None, n=None):
        seen.append((a.dtype, b.dtype, c.dtype, n.dtype, autocast_dtype("cpu")))
        return a

    @autocast_entry("widest")
    def widest(a, b):
        seen.append((a.dtype, b.dtype, autocast_dtype("cpu")))
        return a

    a, b = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    n = torch.arange(2)
    lower(a, b, c=a, n=n)
    assert seen[-1] == (torch.float32, torch.bfloat16, torch.float32, torch.int64, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lower(a, b, c=a, n=n)
        # the entry runs with autocast off, every float argument in the autocast dtype
        assert seen[-1] == (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int64, None)
        widest(a, b)
        assert seen[-1] == (torch.float32, torch.float32, None)
        assert autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="policy"):
        autocast_entry("highest")


def test_entry_casts_are_differentiable() -> None:
    @autocast_entry("lower")
    def scale(a, w):
        assert a.dtype == w.dtype == torch.bfloat16
        return a * w

    w = torch.full((3,), 2.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scale(torch.ones(3), w)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, torch.ones(3))


# --- training steps under autocast ---------------------------------------------------------

def test_reference_bf16_autocast_step_keeps_fp32_masters() -> None:
    """bf16 compute, fp32 weights and gradients; loss and gradients near the fp32 step's."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model("reference")
    _, loss32, grads32 = _step(model, x, None)
    sr, loss, grads = _step(model, x, torch.bfloat16)
    assert sr.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    # bf16 keeps 8 mantissa bits (~4e-3 per rounding): the loss, a mean, stays within 1e-2,
    # the gradient direction within a few percent
    assert_close("loss", loss32, loss, 1e-2, relative=True)
    err = _relative_l2(grads32, grads)
    print(f"bf16 autocast gradients: relative L2 error {err:.3e}")
    assert err < 0.15


def test_triton_autocast_step_matches_the_reference_under_the_same_autocast(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernels under (fp16) autocast compute what the reference computes under it:
    their entries hand each kernel one dtype, and the gradients reach the fp32 weights."""
    from camixer_fast.kernels import attention_training, warp

    launched = []
    # what the autograd Functions call: the launchers (the operators while traced)
    for module, name in ((attention_training, "_core_forward"), (warp, "_forward")):
        def spy(*args, _fn=getattr(module, name), _name=name, **kwargs):
            launched.append((_name, {t.dtype for t in args if torch.is_tensor(t)}))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    x = torch.rand(2, 3, 16, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("reference", "triton"):
        model = _model(backend)
        results[backend] = _step(model, x, torch.float16)
    (sr_ref, loss_ref, g_ref), (sr, loss, grads) = results["reference"], results["triton"]
    assert {name for name, _ in launched} == {"_core_forward", "_forward"}
    assert all(len(dtypes) == 1 for _, dtypes in launched), launched
    assert sr.dtype == torch.float16
    # fp16 bounds (10 mantissa bits): the suite's for half-precision outputs
    assert_close("sr", sr_ref.float(), sr.float(), 2e-2)
    assert_close("loss", loss_ref, loss, 1e-3, relative=True)
    err = _relative_l2(g_ref, grads)
    print(f"triton vs reference under fp16 autocast: gradients relative L2 {err:.3e}")
    assert err < 2e-2


def test_triton_inference_under_autocast_matches_the_reference() -> None:
    """Inference under (fp16) autocast of an fp32 model: the fused Triton block runs in the
    autocast dtype (its entry casts maps and weights), as the reference's products do."""
    x = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outputs = {}
    for backend in ("reference", "triton"):
        model = _model(backend).eval()
        with tf32_off(), torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
            outputs[backend] = model(x)
    assert outputs["triton"].dtype == torch.float16
    assert_close("sr", outputs["reference"].float(), outputs["triton"].float(), 2e-2)


# --- TrainConfig.amp -----------------------------------------------------------------------

def test_amp_settings_are_checked(tmp_path: Path) -> None:
    assert AMP_MODES == ("off", "bf16")
    with pytest.raises(ConfigError, match="amp must be one of"):
        TrainConfig(hr_dir="h", out_dir="o", amp="fp8").check()
    with pytest.raises(ConfigError, match="CUDA and CPU"):
        check_amp("bf16", "meta")
    check_amp("bf16", "cpu")
    check_amp("off", "meta")
    with amp_context("bf16", "cpu"):
        assert autocast_dtype("cpu") == torch.bfloat16
    with amp_context("off", "cpu"):
        assert autocast_dtype("cpu") is None


def test_trainer_runs_bf16_autocast_steps(tmp_path: Path) -> None:
    config = TrainConfig(hr_dir=str(SHARED / "data/Set5/HR"), out_dir=str(tmp_path / "run"),
                         n_feats=12, blocks_per_group=(1, 1), iterations=2, batch_size=2,
                         patch_size=32, val_every=0, save_every=0, log_every=1, probe=2,
                         progress=False, seed=3, amp="bf16", backend="reference")
    trainer = Trainer(config)
    summary = trainer.run()
    assert summary["step"] == 2 and summary["loss"] == summary["loss"]        # finite
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    records = [json.loads(line) for line in
               (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[0]["config"]["amp"] == "bf16"
    assert summary["probe_l1_last"] is not None
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=False)
    assert all(t.dtype == torch.float32 for t in saved["params"].values())


def test_command_takes_amp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr("camixer_fast.commands.train.train",
                        lambda config: seen.setdefault("config", config) and {})
    assert cli.main(["train", "--hr-dir", "h", "--out", str(tmp_path), "--amp", "bf16"]) == 0
    assert seen["config"].amp == "bf16"
    with pytest.raises(SystemExit):
        cli.main(["train", "--hr-dir", "h", "--out", str(tmp_path), "--amp", "fp16"])
