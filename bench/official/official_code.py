"""Load and run the official CAMixerSR code, as published, for the CPU benchmarks.

The official implementation is not part of this project and is never committed here. To use
it, check out the authors' repository at the commit the benchmarks were run against and point
``CAMIXER_OFFICIAL_ARCH`` at its architecture file (or pass the path)::

    git clone https://github.com/icandle/CAMixerSR
    git -C CAMixerSR checkout d690b12bb2a0a185dc0049538b377d569f520497
    export CAMIXER_OFFICIAL_ARCH=$PWD/CAMixerSR/codes/basicsr/archs/CAMixerSR_arch.py
    pip install -e '.[bench]'          # einops, which the file imports

The file is executed unchanged. It imports two names from ``basicsr`` (the authors' toolbox,
whose package pulls in torchvision, OpenCV and compiled extensions on import); only those two
are stubbed, in throw-away modules present while the file is imported:

- ``basicsr.utils.registry.ARCH_REGISTRY``: its ``register()`` decorator returns the class;
- ``basicsr.archs.arch_util.flow_warp``: basicsr 1.4.2's function (bilinear ``grid_sample``
  of x at the pixel grid plus the flow, coordinates scaled to [-1, 1] with ``max(size-1, 1)``),
  written here with the same arithmetic.

What the official code does at inference (``CAMixerSR_arch.py``, ``PredictorLG.forward``):
K = N at γ = 1; otherwise K = ``min(int(N·r·2γ), N)`` with r the mean of a hard
``gumbel_softmax`` draw over the batch and the windows: a random K, drawn from torch's global
generator in every block. :func:`official_gumbel_run` reproduces one such draw with
``camixer_fast``'s ``routing="gumbel"`` (same generator stream, batch of one), which is how the
benchmark checks the official outputs against this project's before timing them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OFFICIAL_REPO = "https://github.com/icandle/CAMixerSR"
OFFICIAL_COMMIT = "d690b12bb2a0a185dc0049538b377d569f520497"
ARCH_PATH_IN_REPO = "codes/basicsr/archs/CAMixerSR_arch.py"
ENV_VAR = "CAMIXER_OFFICIAL_ARCH"


def flow_warp(x: Tensor, flow: Tensor, interp_mode: str = "bilinear",
              padding_mode: str = "zeros", align_corners: bool = True) -> Tensor:
    """basicsr's ``flow_warp``: x (N, C, H, W) sampled at (column + flow[..., 0],
    row + flow[..., 1]), flow (N, H, W, 2) in pixels."""
    if x.shape[-2:] != flow.shape[1:3]:
        raise ValueError(f"flow {tuple(flow.shape)} does not match x {tuple(x.shape)}")
    _, _, h, w = x.shape
    grid_y, grid_x = torch.meshgrid(torch.arange(0, h).type_as(x), torch.arange(0, w).type_as(x),
                                    indexing="ij")
    grid = torch.stack((grid_x, grid_y), 2).float()
    vgrid = grid + flow
    vgrid_x = 2.0 * vgrid[:, :, :, 0] / max(w - 1, 1) - 1.0
    vgrid_y = 2.0 * vgrid[:, :, :, 1] / max(h - 1, 1) - 1.0
    vgrid_scaled = torch.stack((vgrid_x, vgrid_y), dim=3)
    return F.grid_sample(x, vgrid_scaled, mode=interp_mode, padding_mode=padding_mode,
                         align_corners=align_corners)


class _Registry:
    """basicsr's ``Registry``, reduced to what an arch file uses: ``@register()``."""

    def __init__(self) -> None:
        self.classes: dict[str, type] = {}

    def register(self, obj: type | None = None):
        def add(cls: type) -> type:
            self.classes[cls.__name__] = cls
            return cls
        return add if obj is None else add(obj)


@contextmanager
def stubbed_modules(attributes: dict[str, dict[str, object]]) -> Iterator[None]:
    """Throw-away modules, one per name of ``attributes`` with those attributes, each also an
    attribute of its parent, in ``sys.modules`` while the block runs (what was there is put
    back)."""
    saved = {name: sys.modules.get(name) for name in attributes}
    stubs = {name: types.ModuleType(name) for name in attributes}
    for name, module in stubs.items():
        for key, value in attributes[name].items():
            setattr(module, key, value)
        parent, _, child = name.rpartition(".")
        if parent in stubs:
            setattr(stubs[parent], child, module)
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _basicsr_stubs():
    """``basicsr.archs.arch_util.flow_warp`` and ``basicsr.utils.registry.ARCH_REGISTRY``."""
    return stubbed_modules({"basicsr": {}, "basicsr.archs": {},
                            "basicsr.archs.arch_util": {"flow_warp": flow_warp},
                            "basicsr.utils": {},
                            "basicsr.utils.registry": {"ARCH_REGISTRY": _Registry()}})


def arch_path(path: str | os.PathLike | None = None) -> Path:
    """The official architecture file: ``path``, else ``$CAMIXER_OFFICIAL_ARCH``; either may
    name the file itself or a checkout of the repository."""
    value = path if path is not None else os.environ.get(ENV_VAR)
    if not value:
        raise FileNotFoundError(
            f"the official code is not configured: set {ENV_VAR} to {ARCH_PATH_IN_REPO} of a "
            f"checkout of {OFFICIAL_REPO} at {OFFICIAL_COMMIT[:7]} (see bench/official_code.py)")
    found = Path(value).expanduser()
    if found.is_dir():
        found = found / ARCH_PATH_IN_REPO
    if not found.is_file():
        raise FileNotFoundError(f"no official architecture file at {found}")
    return found


def load_official_module(path: str | os.PathLike | None = None) -> types.ModuleType:
    """Import the official architecture file (see :func:`arch_path`) with the basicsr stubs.

    Needs ``einops`` (the ``bench`` extra). The module is not registered in ``sys.modules``.
    """
    file = arch_path(path)
    spec = importlib.util.spec_from_file_location("camixersr_official_arch", file)
    module = importlib.util.module_from_spec(spec)
    try:
        with _basicsr_stubs():
            spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        if error.name == "einops":
            raise ModuleNotFoundError("the official code imports einops: "
                                      "pip install -e '.[bench]'", name="einops") from error
        raise
    return module


def set_ratio(model: nn.Module, gamma: float) -> None:
    """Set the official model's γ: the ``ratio`` of every module that holds one."""
    for module in model.modules():
        if hasattr(module, "ratio"):
            module.ratio = gamma


def load_official(weights: str | os.PathLike, gamma: float = 0.5, *,
                  path: str | os.PathLike | None = None) -> nn.Module:
    """The official ``CAMixerSR`` built for a checkpoint's ``params_ema`` (strict load), in
    eval mode on the CPU, its ``ratio`` set to ``gamma``.

    The configuration (C, blocks per group, scale) is read from the state dict.
    """
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("params_ema", state)
    n_feats = state["head.weight"].shape[0]
    scale = round(math.sqrt(state["tail.0.weight"].shape[0] / 3))
    groups: dict[int, int] = {}
    for key in state:
        parts = key.split(".")
        if parts[0] == "body" and len(parts) > 3 and parts[2] == "body":
            groups[int(parts[1])] = max(groups.get(int(parts[1]), 0), int(parts[3]) + 1)
    blocks = [groups[g] for g in sorted(groups)]
    module = load_official_module(path)
    model = module.CAMixerSR(n_block=blocks, n_group=len(blocks), n_colors=3, n_feats=n_feats,
                             scale=scale, ratio=gamma)
    model.load_state_dict(state, strict=True)
    set_ratio(model, gamma)
    return model.eval()


def run_official(model: nn.Module, x: Tensor) -> Tensor:
    """One official forward as basicsr's test loop runs it: eval mode, ``torch.no_grad()``.

    The official code's ``torch.meshgrid`` call (no ``indexing``) warns on every call in
    recent PyTorch; that warning is silenced here.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*indexing argument.*")
        return model(x)


def official_gumbel_run(official: nn.Module, model: nn.Module, x: Tensor,
                        seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The official output for one Gumbel draw and ``model``'s output for the same draw.

    x: (1, 3, H, W). The official forward runs with torch's global generator seeded with
    ``seed``; ``model`` (a :class:`camixer_fast.CAMixerSR`) runs with ``routing="gumbel"`` and a
    generator seeded the same, so every block draws the same Gumbel noise and so the same K
    (one image: the official batch mean is that image's). Returns (official output, model
    output, K per block (blocks,) of the model's run). The model's routing mode is restored.
    """
    if x.shape[0] != 1:
        raise ValueError("the official K is a batch mean: compare one image at a time")
    torch.manual_seed(seed)
    expected = run_official(official, x)
    routing = model.routing
    model.routing = "gumbel"
    try:
        with torch.no_grad():
            out, record = model(x, generator=torch.Generator().manual_seed(seed),
                                return_routing=True)
    finally:
        model.routing = routing
    return expected, out, record.num_hard()[:, 0]
