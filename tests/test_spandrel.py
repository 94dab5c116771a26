"""spandrel support: CAMixerSR checkpoints through spandrel's standard loader."""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import types
from pathlib import Path

import pytest
import torch

import camixer_fast
from conftest import assert_close


def _stand_in_torchvision() -> None:
    """spandrel imports ``torchvision.transforms.functional`` (for two other architectures) at
    import time. PyPI's torchvision wheel is a CUDA build that does not import beside the CPU
    torch this project pins ('operator torchvision::nms does not exist'); where that happens,
    a module with those names stands in. Nothing CAMixerSR does touches it."""
    try:
        importlib.import_module("torchvision.transforms.functional")
        return
    except Exception:  # noqa: BLE001 - the broken CUDA build raises RuntimeError
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not usable in this environment")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {"BILINEAR": "bilinear",
                                                                  "NEAREST": "nearest"})
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


@pytest.fixture(scope="module")
def spandrel():
    _stand_in_torchvision()
    import spandrel

    from camixer_fast import spandrel_arch

    spandrel_arch.install()
    return spandrel


def test_model_loader_gives_our_model(spandrel, weights_path: Path, one_thread) -> None:
    descriptor = spandrel.ModelLoader().load_from_file(weights_path)
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert descriptor.architecture.id == "CAMixerSR" and descriptor.purpose == "SR"
    model = descriptor.model
    assert isinstance(model, camixer_fast.CAMixerSR) and not model.training
    assert (descriptor.scale, descriptor.input_channels, descriptor.output_channels) == (4, 3, 3)
    assert descriptor.supports_half and descriptor.supports_bfloat16
    assert descriptor.size_requirements.none
    assert descriptor.tiling == spandrel.ModelTiling.SUPPORTED
    assert descriptor.tags == ["S", "36nf", "blocks 4-4-6-6", "window 16"]
    ours = camixer_fast.load_model(weights_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ours.state_dict().values()))
    x = torch.rand(1, 3, 17, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(x).clamp(0, 1)
    assert_close("spandrel vs load_model", expected, descriptor(x), 0.0)


def test_safetensors_through_spandrel(spandrel, weights_path: Path, tmp_path: Path) -> None:
    from camixer_fast.models.convert import convert_checkpoint

    path = tmp_path / "s.safetensors"
    convert_checkpoint(weights_path, path)
    descriptor = spandrel.ModelLoader().load_from_file(path)
    assert isinstance(descriptor.model, camixer_fast.CAMixerSR)


def test_other_architectures_are_not_claimed(spandrel, weights_path: Path) -> None:
    from camixer_fast.spandrel_arch import detect

    sd = torch.load(weights_path, weights_only=True)["params_ema"]
    assert detect(sd)
    # another SR network's state dict (spandrel's own architectures would claim or refuse it)
    rrdb = {"conv_first.weight": torch.zeros(64, 3, 3, 3), "conv_body.weight": torch.zeros(1),
            "head.weight": torch.zeros(64, 3, 3, 3), "tail.0.weight": torch.zeros(48, 64, 3, 3)}
    assert not detect(rrdb)
    # CAMixerSR's key names with shapes that do not read as a CAMixerSR
    broken = dict(sd)
    broken["tail.0.weight"] = torch.zeros(10, 36, 3, 3)
    assert not detect(broken)
    classsr = {f"net1.{k}": v for k, v in sd.items()}
    classsr["classifier.lastOut.weight"] = torch.zeros(3, 32)
    assert not detect(classsr)
    claimed = [a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures("detection")
               if a.detect(sd)]
    assert claimed == ["CAMixerSR"]
    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_state_dict(broken)


def test_install_is_idempotent(spandrel) -> None:
    from camixer_fast.spandrel_arch import install

    assert install() == []
    registry = spandrel.ArchRegistry()
    assert [a.architecture.id for a in install(registry)] == ["CAMixerSR"]
    with pytest.raises(spandrel.DuplicateArchitectureError):
        install(registry, ignore_duplicates=False)


class _BrokenTorchvision(importlib.abc.MetaPathFinder):
    """torchvision failing as a build for another torch does: RuntimeError on import."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_unusable_torchvision_is_one_clear_import_error(monkeypatch) -> None:
    before = set(sys.modules)
    for name in [n for n in sys.modules if n.split(".")[0] in ("spandrel", "torchvision")
                 or n == "camixer_fast.spandrel_arch"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    try:
        with pytest.raises(ImportError) as info:
            importlib.import_module("camixer_fast.spandrel_arch")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    message = str(info.value)
    print(message)
    assert "\n" not in message and info.value.__cause__ is None
    assert "torchvision::nms" in message and "torch/torchvision pair" in message
