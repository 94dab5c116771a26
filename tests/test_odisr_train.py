"""Training CAMixerOSR (ODI-SR): crops carry their rows' latitude, the official objective,
steps, checkpoints that load_model reads, resume, fine-tuning and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BENCH, assert_close, bench_module
from PIL import Image

import camixer_fast
from camixer_fast import cli
from camixer_fast.evaluation.imresize import make_lr
from camixer_fast.evaluation.metrics import erp_row_weights
from camixer_fast.models.loading import build_osr_model
from camixer_fast.reference.odisr import CAMixerOSR, latitude_condition
from camixer_fast.train import (
    ConfigError,
    PairedPatches,
    TrainConfig,
    Trainer,
    ratio_weight,
    read_checkpoint,
    training_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")
fx = bench_module("odisr_fixture", BENCH / "official")


def _panorama(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random 2:1 image (learnable in a few steps), uint8 (height, width, 3)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _coded(height: int, width: int) -> np.ndarray:
    """R = row, G = column: each pixel says where it came from."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, (rows * 7 + cols * 13) % 256], axis=-1).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _official_condition(rows: np.ndarray, height: int) -> np.ndarray:
    """The official ``get_condition(h, w, 'cos_latitude')`` of panorama rows, float64."""
    return np.cos((-1.0 + (2.0 * rows + 1.0) / height) * math.pi / 2)


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    hr_dir = tmp_path / "hr"
    if not hr_dir.exists():
        _save(hr_dir / "pano.png", _panorama(96, 192))
    base = {"hr_dir": str(hr_dir), "out_dir": str(tmp_path / "run"), "arch": "odisr",
            "n_feats": 12, "blocks_per_group": (1, 1), "scale": 2, "iterations": 2,
            "batch_size": 2, "patch_size": 32, "val_every": 0, "save_every": 0,
            "log_every": 1, "probe": 0, "progress": False, "seed": 5}
    base.update(overrides)
    return TrainConfig(**base)


def latitude_rows(height: int, width: int, rows: list[tuple[int, int]]) -> torch.Tensor:
    """(len(rows), 1, height, width): the condition of crops at (top, panorama height)."""
    return torch.cat([latitude_condition(height, width, rows=r) for r in rows])


def _tiny_model(gamma: float = 0.5) -> CAMixerOSR:
    torch.manual_seed(0)
    return CAMixerOSR(n_feats=12, scale=2, blocks_per_group=(2,), gamma=gamma,
                      backend="reference")


@pytest.mark.parametrize("lr_source", ["bicubic", "lr-dir"])
@pytest.mark.parametrize("augment", ["hflip", "none"])
def test_crop_condition_is_its_rows_of_the_whole_panorama(tmp_path: Path, lr_source: str,
                                                          augment: str) -> None:
    """Every crop's condition is the official cos-latitude of its LR rows in the whole LR
    panorama (rows read back from the crop's own pixels), the same in every column."""
    scale, patch, hr = 2, 16, _coded(120, 240)
    _save(tmp_path / "hr" / "pano.png", hr)
    lr_dir = None
    if lr_source == "lr-dir":
        lr_dir = tmp_path / "lr"
        _save(lr_dir / "panox2.png", make_lr(hr, scale))
    data = PairedPatches(tmp_path / "hr", scale=scale, patch_size=patch, lr_dir=lr_dir,
                         augment=augment, condition=True, erp=True, repeat=40, seed=2)
    lr_height = 60
    tops = set()
    for index in range(len(data)):
        item = data[0, index]
        hr_top = int(item["hr"][0, 0, 0].mul(255).round())
        assert hr_top % scale == 0 and hr_top == item["top"]
        top = hr_top // scale
        tops.add(top)
        expected = _official_condition(np.arange(top, top + patch), lr_height)
        got = item["condition"]
        assert got.shape == (1, patch, patch) and got.dtype == torch.float32
        assert_close(f"condition of item {index}", torch.from_numpy(expected)[:, None]
                     .expand(patch, patch)[None], got, 1e-6)
        weights = erp_row_weights(120, np.arange(hr_top, hr_top + patch * scale))
        assert_close(f"WS weights of item {index}", torch.from_numpy(weights)[:, None]
                     .expand(patch * scale, patch * scale)[None], item["weight"], 1e-6)
    assert len(tops) > 10, "the crops should come from many rows"


def test_rotations_and_triton_are_refused_for_odisr(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rotations"):
        _config(tmp_path, augment="flip-rot").check()
    with pytest.raises(ConfigError, match="Triton"):
        _config(tmp_path, backend="triton").check()
    with pytest.raises(ConfigError, match="arch"):
        _config(tmp_path, arch="osr").check()


def test_objective_is_l1_plus_the_official_ratio_loss() -> None:
    """total = WS-L1 + (m − 0.5)², m the mean of every block's mask (no 2γ: γ = 0.25 here),
    equal to the network's own ratio loss, and its gradient that of the official sum."""
    model = _tiny_model(gamma=0.25).train()
    model.train_noise = False
    assert ratio_weight(model) == 1.0
    gen = torch.Generator().manual_seed(1)
    lr = torch.rand(2, 3, 32, 32, generator=gen)
    hr = torch.rand(2, 3, 64, 64, generator=gen)
    condition = latitude_rows(32, 32, [(10, 96), (50, 96)])
    weight = torch.rand(2, 1, 64, 64, generator=gen)
    terms = training_loss(model, lr, hr, weight, condition=condition)
    sr, official_ratio, routing = model(lr, condition, return_routing=True)
    masks = torch.cat([b.mask.flatten() for b in routing.blocks])
    m = masks.sum() / masks.numel()
    l1 = (weight * (sr - hr).abs()).sum() / sr.numel()
    assert_close("l1", l1, terms.l1, 1e-6)
    assert_close("ratio", (m - 0.5) ** 2, terms.ratio, 1e-7)
    assert_close("ratio vs the network's", official_ratio, terms.ratio, 1e-7)
    assert_close("total", l1 + (m - 0.5) ** 2, terms.total, 1e-6)
    grads = torch.autograd.grad(terms.total, list(model.parameters()), allow_unused=True)
    official = torch.autograd.grad(l1 + official_ratio, list(model.parameters()),
                                   allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads, official):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(f"grad {name}", b, a, 1e-6)


def test_the_condition_reaches_the_network() -> None:
    model = _tiny_model().train()
    model.train_noise = False
    lr, hr = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 64, 64)
    polar = training_loss(model, lr, hr, condition=latitude_rows(32, 32, [(0, 512)]))
    equator = training_loss(model, lr, hr, condition=latitude_rows(32, 32, [(240, 512)]))
    assert polar.l1.item() != equator.l1.item()
    with pytest.raises(ValueError, match="CAMixerSR takes none"):
        sr_model = camixer_fast.CAMixerSR(n_feats=12, blocks_per_group=(1,)).train()
        training_loss(sr_model, lr, torch.rand(1, 3, 128, 128),
                      condition=latitude_rows(32, 32, [(0, 64)]))


@pytest.mark.parametrize("loss", ["l1", "ws-l1"])
def test_steps_train_and_the_checkpoint_loads_as_camixerosr(tmp_path: Path, loss: str) -> None:
    config = _config(tmp_path, loss=loss, val_dir=str(tmp_path / "hr"))
    trainer = Trainer(config)
    assert isinstance(trainer.model, CAMixerOSR) and trainer.augment == "hflip"
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    assert 0.0 <= summary["ratio_loss"] <= 0.25
    assert math.isfinite(summary["val_psnr_last"])
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "head.weight" in changed and "dcn.weight" in changed and "offset_conv.0.weight" in changed
    path = Path(config.out_dir) / "last.pth"
    saved = read_checkpoint(path)
    assert saved["model_config"]["arch"] == "odisr"
    model = camixer_fast.load_model(path)
    assert isinstance(model, CAMixerOSR) and model.scale == 2 and model.n_feats == 12
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["params_ema"][key]), key
    records = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]
    assert records[0]["arch"] == "odisr"


def test_resumed_odisr_run_continues_exactly(tmp_path: Path) -> None:
    """3 steps straight, or 1 step and 2 more resumed (arch from the checkpoint): the same."""
    straight = _config(tmp_path / "a", iterations=3)
    Trainer(straight).run()
    first = _config(tmp_path / "b", iterations=1)
    Trainer(first).run()
    second = _config(tmp_path / "b", iterations=3, resume="auto", arch="auto",
                     n_feats=None, blocks_per_group=None)
    trainer = Trainer(second)
    assert isinstance(trainer.model, CAMixerOSR) and trainer.step == 1
    trainer.run()
    a = read_checkpoint(Path(straight.out_dir) / "last.pth")
    b = read_checkpoint(Path(second.out_dir) / "last.pth")
    for group in ("params", "params_ema"):
        for key, value in a[group].items():
            assert torch.equal(value, b[group][key]), f"{group} {key}"
    assert a["step"] == b["step"] == 3


def test_command_fine_tunes_a_seeded_official_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--init of official-layout CAMixerOSR weights: detected, starts from them, trains, and
    writes a checkpoint load_model reads as CAMixerOSR; --arch sr with them is refused."""
    seeded = fx.seeded_state_dict("small", 2, 7)
    init = tmp_path / "osr_x2.pth"
    torch.save({"params_ema": seeded}, init)
    hr_dir = tmp_path / "hr"
    _save(hr_dir / "pano.png", _panorama(96, 192))
    config = _config(tmp_path, arch="auto", init=str(init), n_feats=None,
                     blocks_per_group=None, scale=None, out_dir=str(tmp_path / "probe"))
    trainer = Trainer(config)
    for key, value in build_osr_model(seeded).state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    out = tmp_path / "out"
    status = cli.main(["train", "--init", str(init), "--hr-dir", str(hr_dir), "--out", str(out),
                       "--iterations", "1", "--batch-size", "1", "--patch-size", "32",
                       "--lr", "1e-5", "--val-every", "0", "--save-every", "0", "--probe", "1",
                       "--no-progress", "--loss", "ws-l1"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["step"] == 1 and math.isfinite(summary["probe_l1_last"])
    model = camixer_fast.load_model(out / "last.pth")
    assert isinstance(model, CAMixerOSR) and model.blocks_per_group == (2, 2)
    assert not torch.equal(model.state_dict()["head.weight"], seeded["head.weight"])
    status = cli.main(["train", "--init", str(init), "--arch", "sr", "--hr-dir", str(hr_dir),
                       "--out", str(tmp_path / "refused"), "--iterations", "1"])
    assert status == 2 and "CAMixerOSR" in capsys.readouterr().err
