"""ONNX export of CAMixerOSR (ODI-SR): onnxruntime against the reference on a tiny seeded
network (one shifted block, two DCNs), the DeformConv nodes, the condition input, the command."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from camixer_fast.reference.odisr import CAMixerOSR, latitude_condition
from conftest import BENCH, assert_close, bench_module

from camixer_fast.backends.onnx import OSR_MIN_OPSET, export_onnx
from camixer_fast.cli import main
from camixer_fast.models.loading import build_osr_model

pytestmark = pytest.mark.usefixtures("one_thread")
fx = bench_module("odisr_fixture", BENCH / "official")
TOL = 1e-4
"""onnxruntime against the reference, fp32 (other conv/GEMM/DCN kernels; measured ~5e-6)."""
SIZES = {"32x64": (32, 64), "17x33": (17, 33)}


def tiny_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """The fixture's seeded official-layout weights, C = 12, one group of two blocks, ×2."""
    return fx.seeded_state_dict("tiny", 2, seed)


@pytest.fixture(scope="module")
def model() -> CAMixerOSR:
    model = build_osr_model(tiny_state(), backend="reference")
    model.tie_break = "index"        # the graph's TopK: equal scores by lower index
    return model


@pytest.fixture(scope="module")
def exported(model: CAMixerOSR, tmp_path_factory) -> dict:
    """(γ, condition_input) -> the written file, exported once per module."""
    folder = tmp_path_factory.mktemp("osr_onnx")
    cache = {}

    def get(gamma: float, condition_input: bool = False) -> Path:
        key = (gamma, condition_input)
        if key not in cache:
            path = folder / f"osr_{gamma}_{int(condition_input)}.onnx"
            cache[key] = export_onnx(model, path, gamma=gamma,
                                     condition_input=condition_input).path
        return cache[key]
    return get


def _run(path: Path, lr: torch.Tensor, condition: torch.Tensor | None = None,
         gamma: float | None = None) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"lr": lr.numpy()}
    if condition is not None:
        feeds["condition"] = condition.numpy()
    if gamma is not None:
        feeds["gamma"] = np.array(gamma, np.float32)
    return torch.from_numpy(session.run(None, feeds)[0])


def _reference(model: CAMixerOSR, gamma: float, lr: torch.Tensor,
               condition: torch.Tensor | None = None) -> torch.Tensor:
    previous = model.gamma
    model.gamma = gamma
    try:
        with torch.no_grad():
            return model(lr, condition)
    finally:
        model.gamma = previous


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("gamma", [0.5, 1.0], ids=["gamma0.5", "gamma1"])
def test_onnxruntime_matches_reference(model, exported, gamma: float, size) -> None:
    lr = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[0]))
    assert_close(f"γ={gamma} {size}", _reference(model, gamma, lr),
                 _run(exported(gamma), lr), TOL)


def test_gamma_input(model, tmp_path: Path) -> None:
    """gamma=None: γ is the last graph input (after "condition"), any γ in one graph."""
    path = export_onnx(model, tmp_path / "osr.onnx", condition_input=True).path
    assert [i.name for i in onnx.load(path).graph.input] == ["lr", "condition", "gamma"]
    for gamma, size in itertools.product((0.25, 0.5, 1.0), SIZES.values()):
        lr = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        condition = latitude_condition(*size, rows=(5, 2 * size[0]))
        assert_close(f"γ input {gamma} {size}", _reference(model, gamma, lr, condition),
                     _run(path, lr, condition, gamma), TOL)


def test_half_the_windows_are_hard_at_gamma_half(model) -> None:
    lr = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(32))
    model.gamma = 0.5
    with torch.no_grad():
        _, routing = model(lr, return_routing=True)
    assert [b.num_hard.tolist() for b in routing.blocks] == [[4], [4]]     # of 8 windows


def test_deform_conv_nodes(model, exported) -> None:
    proto = onnx.load(exported(0.5))
    assert {o.domain: o.version for o in proto.opset_import}[""] == OSR_MIN_OPSET
    nodes = [n for n in proto.graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == len(model.body) + 1 and all(n.domain == "" for n in nodes)
    for node in nodes:
        attrs = {a.name: list(a.ints) for a in node.attribute}
        assert attrs == {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "dilations": [1, 1]}
        assert len(node.input) == 5                      # x, weight, offset, bias, mask
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    assert "Loop" not in counts and "If" not in counts
    assert [i.name for i in proto.graph.input] == ["lr"]


def test_condition_input_batch_of_crops(model, exported) -> None:
    lr = torch.rand(2, 3, 17, 33, generator=torch.Generator().manual_seed(7))
    condition = torch.cat([latitude_condition(17, 33, rows=(top, 64)) for top in (0, 40)])
    assert_close("condition input", _reference(model, 0.5, lr, condition),
                 _run(exported(0.5, True), lr, condition), TOL)


@pytest.mark.parametrize("bad, message", [
    (dict(opset=17), "opset 17 is not supported"),
    (dict(opset=21), "opset 21 is not supported"),
], ids=["opset-17", "opset-21"])
def test_refusals(model, tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "m.onnx", **bad)
    assert list(tmp_path.iterdir()) == []


def test_export_command(model, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "osr.pth"
    torch.save({"params_ema": tiny_state()}, weights)
    out = tmp_path / "osr.onnx"
    assert main(["export", str(out), "--weights", str(weights), "--gamma", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "CAMixerOSR" in captured.err and "opset 19" in captured.out
    assert "γ = 0.5 baked in" in captured.out
    lr = torch.rand(1, 3, 17, 33, generator=torch.Generator().manual_seed(9))
    assert_close("command", _reference(model, 0.5, lr), _run(out, lr), TOL)
    assert main(["export", str(out), "--weights", str(weights), "--overwrite"]) == 0
    assert "γ input 'gamma'" in capsys.readouterr().out
    assert_close("command, γ input", _reference(model, 0.5, lr), _run(out, lr, gamma=0.5), TOL)
    assert main(["export", str(out), "--weights", str(weights), "--overwrite",
                 "--opset", "17"]) == 2
    assert "opset 17 is not supported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["osr.onnx", "osr.pth"]
