"""The backend chooser (camixer_fast.backends) and what a forward returns about its routing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import camixer_fast
from camixer_fast.backends import (
    AUTO_ORDER,
    BACKENDS,
    REGISTRY,
    Backend,
    Ops,
    select_backend,
)
from camixer_fast.reference import BlockRouting, BlockWeights, Routing
from conftest import assert_close

CPU = torch.device("cpu")


@pytest.mark.parametrize("training, expected", [(False, "cpu"), (True, "reference")],
                         ids=["inference", "training"])
def test_auto_on_the_cpu(training: bool, expected: str) -> None:
    assert select_backend("auto", "cpu", torch.float32, training=training).name == expected


def test_cpu_backend_trains_as_the_reference() -> None:
    assert select_backend("cpu", "cpu", training=True).name == "reference"
    assert REGISTRY["cpu"].trains_as == "reference"


def test_auto_never_picks_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert REGISTRY["triton"].unsupported(CPU, torch.float32, False) is None
    assert select_backend("triton", "cpu").name == "triton"           # by name only
    assert select_backend("auto", "cpu").name == "cpu"


def test_triton_refused_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: .*TRITON_INTERPRET"):
        select_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="float64"):
        select_backend("triton", "cpu", torch.float64)


def test_no_cuda_device_is_a_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    reason = REGISTRY["triton"].unsupported(torch.device("cuda"), torch.float32, False)
    assert "no CUDA device" in reason
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here: .*CPU devices only"):
        select_backend("cpu", "cuda")


def test_unknown_names_and_the_order() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("cuda")
    assert set(AUTO_ORDER) == set(REGISTRY) and BACKENDS[0] == "auto"
    assert all(isinstance(b, Backend) and b.name == name for name, b in REGISTRY.items())
    for name in ("reference", "cpu"):
        assert isinstance(REGISTRY[name].ops, Ops)


def test_choosing_a_backend_imports_no_triton() -> None:
    code = ("import sys, torch, camixer_fast\n"
            "m = camixer_fast.CAMixerSR(n_feats=8, blocks_per_group=(1,))\n"
            "m.backend = 'auto'\n"
            "with torch.inference_mode(): m(torch.rand(1, 3, 8, 8))\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_model_reports_the_backend_of_its_mode(weights_path) -> None:
    model = camixer_fast.load_model(weights_path)
    assert model.backend == "cpu"
    model.train()
    assert model.backend == "reference"
    model.eval()
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here"), \
            pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        model.backend = "triton"
    assert model.backend == "cpu"                       # a refused request changes nothing


# --- the routing record --------------------------------------------------------------------------

def test_inference_routing_record(model_s: camixer_fast.CAMixerSR) -> None:
    x = torch.rand(2, 3, 20, 40, generator=torch.Generator().manual_seed(0))
    model_s.gamma = 0.5
    with torch.inference_mode():
        sr, routing = model_s(x, return_routing=True)
        plain = model_s(x)
    assert torch.equal(sr, plain)
    assert isinstance(routing, Routing) and len(routing.blocks) == 20
    assert routing.num_windows == 6                     # 32x48 padded: 2x3 windows
    ks = routing.num_hard()
    assert ks.shape == (20, 2) and ks.dtype == torch.int64
    for block in routing.blocks:
        assert block.mask is None and block.scores.shape == (2, 6, 2)
        assert torch.equal(block.order.sort(dim=1).values, torch.arange(6).expand(2, 6))
    assert_close("k_fraction", ks.float() / 6, routing.k_fraction(), 0.0)
    with pytest.raises(ValueError, match="no training masks"):
        routing.mask_means()


def test_training_routing_record(model_s: camixer_fast.CAMixerSR) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model_s.train()
    try:
        sr, ratio, routing = model_s(x, generator=torch.Generator().manual_seed(2),
                                     return_routing=True)
    finally:
        model_s.eval()
    means = routing.mask_means()
    assert means.shape == (20,) and means.requires_grad
    m = torch.cat([b.mask.flatten() for b in routing.blocks]).mean()
    assert_close("ratio loss", 2 * model_s.gamma * (m - 0.5) ** 2, ratio, 0.0)
    assert routing.k_fraction().shape == (20, 2)
    with pytest.raises(ValueError, match="training-mode forward"):
        routing.num_hard()


def test_routing_of_a_batch_is_that_of_its_images(model_s: camixer_fast.CAMixerSR) -> None:
    x = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    model_s.gamma = 0.25
    with torch.inference_mode():
        _, together = model_s(x, return_routing=True)
        parts = [model_s(x[i:i + 1], return_routing=True)[1] for i in range(3)]
    joined = Routing.cat(parts)
    for a, b in zip(together.blocks, joined.blocks, strict=True):
        assert torch.equal(a.num_hard, b.num_hard) and torch.equal(a.order, b.order)


def test_deprecated_last_num_hard(model_s: camixer_fast.CAMixerSR) -> None:
    x = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        _, routing = model_s(x, return_routing=True)
    with pytest.deprecated_call():
        ks = [m.last_num_hard for m in model_s.mixers()]
    assert torch.equal(torch.stack(ks), routing.num_hard())


# --- the block-level seam ------------------------------------------------------------------------

def test_block_weights_cover_every_parameter(model_s: camixer_fast.CAMixerSR) -> None:
    block = model_s.body[1].body[2]
    weights = block.weights()
    assert isinstance(weights, BlockWeights)
    given = {t.data_ptr() for t in weights}
    params = {p.data_ptr() for p in block.parameters()}
    assert given == params and len(weights) == len(list(block.parameters()))


def test_a_declared_block_path_replaces_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def block_path(weights: BlockWeights, x, condition, settings):
        calls.append((type(weights), tuple(x.shape), tuple(condition.shape)))
        n = (x.shape[1] // 16) * (x.shape[2] // 16)
        empty = torch.zeros(x.shape[0], n, 2)
        return x, BlockRouting(empty, torch.zeros(x.shape[0], dtype=torch.int64),
                               torch.arange(n).expand(x.shape[0], n), None)

    ops = dataclasses.replace(REGISTRY["reference"].ops, block_inference=block_path)
    probe = Backend("probe", "test", lambda d, t, training: None, (), lambda: ops)
    monkeypatch.setitem(REGISTRY, "probe", probe)
    monkeypatch.setattr("camixer_fast.backends.BACKENDS", (*BACKENDS, "probe"))
    model = camixer_fast.CAMixerSR(n_feats=8, blocks_per_group=(2,)).eval()
    model.backend = "probe"
    with torch.inference_mode():
        _, routing = model(torch.rand(1, 3, 16, 32), return_routing=True)
    assert calls == [(BlockWeights, (1, 16, 32, 8), (1, 16, 32, 4))] * 2
    assert routing.num_hard().tolist() == [[0], [0]]


def test_a_compile_only_gate_may_choose_triton_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("CAMIXER_FAST_COMPILE_ONLY", "1")
    assert select_backend("triton", "cpu").name == "triton"
    assert select_backend("auto", "cpu").name == "cpu"
