"""bench/official/official_code.py: the loader of the official CAMixerSR code (never committed here).

The loader's stubs and errors are tested on a stand-in architecture file. Where the official
file is configured (``CAMIXER_OFFICIAL_ARCH``, with einops installed), it is also loaded and
checked against this project's model on the same Gumbel draw.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from camixer_fast.reference.warp import deform_warp
from conftest import BENCH, assert_close, bench_module


@pytest.fixture(scope="module")
def official_code():
    return bench_module("official_code", BENCH / "official")


STAND_IN = textwrap.dedent("""
    import torch
    from basicsr.archs.arch_util import flow_warp
    from basicsr.utils.registry import ARCH_REGISTRY

    @ARCH_REGISTRY.register()
    class Net(torch.nn.Module):
        def forward(self, x, flow):
            return flow_warp(x, flow, padding_mode="border")
""")


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (32, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_flow_warp_is_the_reference_warp(official_code, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(size[0] * 100 + size[1])
    x = torch.randn(2, 5, *size, generator=gen)
    offsets = torch.randn(2, 2, *size, generator=gen) * 4
    out = official_code.flow_warp(x, offsets.permute(0, 2, 3, 1), padding_mode="border")
    assert_close("flow_warp", deform_warp(x, offsets), out, 1e-6)


def test_stand_in_arch_loads_with_stubs(official_code, tmp_path: Path) -> None:
    file = tmp_path / "arch.py"
    file.write_text(STAND_IN)
    before = {name for name in sys.modules if name.split(".")[0] == "basicsr"}
    module = official_code.load_official_module(file)
    assert {name for name in sys.modules if name.split(".")[0] == "basicsr"} == before
    x = torch.randn(1, 3, 8, 9, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(1, 8, 9, 2)
    assert_close("zero flow", x, module.Net()(x, flow), 1e-6)


def test_missing_official_code_says_how_to_get_it(official_code, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(official_code.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="CAMIXER_OFFICIAL_ARCH.*icandle/CAMixerSR"):
        official_code.arch_path()
    with pytest.raises(FileNotFoundError, match="no official architecture file"):
        official_code.arch_path(tmp_path)
    nested = tmp_path / official_code.ARCH_PATH_IN_REPO
    nested.parent.mkdir(parents=True)
    nested.write_text(STAND_IN)
    assert official_code.arch_path(tmp_path) == nested


def test_einops_missing_is_explained(official_code, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "arch.py"
    file.write_text("import einops_that_is_not_there\n")
    with pytest.raises(ModuleNotFoundError, match="einops_that_is_not_there"):
        official_code.load_official_module(file)
    monkeypatch.setitem(sys.modules, "einops", None)          # import einops -> not found
    file.write_text("from einops import rearrange\n")
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[bench\]'"):
        official_code.load_official_module(file)


@pytest.mark.skipif(not os.environ.get("CAMIXER_OFFICIAL_ARCH")
                    or importlib.util.find_spec("einops") is None,
                    reason="the official code is not configured (CAMIXER_OFFICIAL_ARCH, einops)")
@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.25], ids=lambda g: f"gamma={g}")
def test_official_code_matches_on_the_same_draw(official_code, weights_path, model_s,
                                                gamma: float) -> None:
    official = official_code.load_official(weights_path, gamma)
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    model_s.gamma = gamma
    expected, out, _ = official_code.official_gumbel_run(official, model_s, x, seed=5)
    assert_close(f"official@{gamma}", expected, out, 1e-4)
