"""bench/official/official_baseline.py, the stand-in for the official code in benchmarks, is exact."""

from __future__ import annotations


import pytest
import torch

from conftest import BENCH, assert_close, bench_module


def load_baseline_module():
    return bench_module("official_baseline", BENCH / "official")


@pytest.fixture(scope="module")
def baseline(model_s):
    return load_baseline_module().load_official_baseline(model_s.state_dict())


CASES = [("butterfly_x4_lr", "1.0"), ("butterfly_x4_lr", "0.5"), ("butterfly_crop_45x61", "0.25"),
         ("butterfly_crop_45x61", "0.0"), ("baby_x4_lr", "0.5")]


@pytest.mark.parametrize("name, gamma", CASES, ids=[f"{n}@gamma={g}" for n, g in CASES])
def test_baseline_matches_golden(golden: dict, baseline, name: str, gamma: str) -> None:
    baseline.gamma = float(gamma)
    with torch.inference_mode():
        out = baseline(golden["inputs"][name])
    assert_close(f"{name}@{gamma}", golden["outputs"][f"{name}@gamma={gamma}"], out, 1e-4)


def test_baseline_infers_the_configuration(baseline) -> None:
    assert baseline.scale == 4 and baseline.window_size == 16
    assert [len(g.body) for g in baseline.body] == [4, 4, 6, 6]


def test_baseline_training_step_matches_the_reference(model_s, one_thread) -> None:
    """The official training chain (no Gumbel noise): loss, ratio loss and every gradient of
    one step equal the reference backend's, which the golden training record pins."""
    import camixer_fast

    torch.manual_seed(0)
    lr, hr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 128, 128)
    module = load_baseline_module()
    official = module.load_official_baseline(model_s.state_dict()).train()
    official.train_noise = False
    reference = camixer_fast.load_model(model_s.state_dict(), backend="reference").train()
    reference.train_noise = False
    results = []
    for model in (official, reference):
        sr, ratio = model(lr)
        ((sr - hr).abs().mean() + ratio).backward()
        results.append((sr.detach(), ratio.detach(),
                        {n: p.grad for n, p in model.named_parameters()}))
    (sr_o, ratio_o, g_o), (sr_r, ratio_r, g_r) = results
    assert_close("sr", sr_r, sr_o, 1e-5)
    assert_close("ratio loss", ratio_r, ratio_o, 1e-6)
    assert set(g_o) == set(g_r)
    scale = max(g.abs().max().item() for g in g_r.values())
    for name, g in g_r.items():
        # the key biases' exact gradient is 0 (softmax ignores a per-row shift): noise only
        tol = 1e-4 * scale if name.endswith("project_k.bias") else 1e-4
        assert_close(name, g, g_o[name], tol, relative=not name.endswith("project_k.bias"))
