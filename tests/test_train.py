"""Training: data, objective, backends, checkpoints and resume, two processes on gloo, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, assert_close, tf32_off
from PIL import Image
from torch import nn

import camixer_fast
from camixer_fast import cli
from camixer_fast.evaluation.imresize import make_lr
from camixer_fast.evaluation.metrics import erp_row_weights
from camixer_fast.train import (
    ConfigError,
    DataError,
    PairedPatches,
    SampleStream,
    TrainConfig,
    Trainer,
    augment_array,
    bicubic_lr_crop,
    load_validation_pairs,
    pixel_loss,
    read_checkpoint,
    save_checkpoint,
    training_backend,
    training_loss,
)

REPO = Path(__file__).resolve().parents[1]
SYMMETRIES = list(product((False, True), repeat=3))
"""(hflip, vflip, transpose): the eight symmetries of a square crop."""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _coded_image(height: int, width: int) -> np.ndarray:
    """R = row, G = column, B = a hash of both: every pixel says where it came from."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, (rows * 7 + cols * 13) % 256], axis=-1).astype(np.uint8)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return t.mul(255).round().byte().permute(1, 2, 0).numpy()


def _small_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A small model from scratch on Set5 crops: fast enough for several steps."""
    base = {"hr_dir": str(SHARED / "data/Set5/HR"), "out_dir": str(tmp_path / "run"),
            "n_feats": 12, "blocks_per_group": (1, 1), "iterations": 4, "batch_size": 2,
            "patch_size": 32, "val_every": 0, "save_every": 0, "log_every": 1, "probe": 0,
            "progress": False, "seed": 3}
    base.update(overrides)
    return TrainConfig(**base)


def _equal_nested(a, b, where: str = "") -> None:
    """Assert two checkpoint structures are identical, tensors bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            _equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_grads_close(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                        tol: float) -> None:
    """Every parameter gradient within ``tol`` relative. The key biases get the gradient scale
    of the whole model instead: softmax(Q·(K + b)ᵀ) does not depend on b, so their exact
    gradient is 0 and what is left is rounding noise (~1e-10)."""
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        if name.endswith("mixer.project_k.bias"):
            err = (out[name] - g).abs().max().item() / scale
            assert err <= tol, f"{name}: {err:.3e} of the largest gradient"
        else:
            assert_close(name, g, out[name], tol, relative=True)


@pytest.mark.parametrize("scale", [2, 3, 4], ids=lambda s: f"x{s}")
def test_bicubic_crop_equals_crop_of_whole_image_lr(scale: int) -> None:
    rng = np.random.default_rng(scale)
    hr = rng.integers(0, 256, (scale * 21 + scale - 1, scale * 17 + 1, 3), dtype=np.uint8)
    full = make_lr(hr, scale)
    size = 6
    for top in range(full.shape[0] - size + 1):
        for left in (0, 1, 4, full.shape[1] - size - 1, full.shape[1] - size):
            crop = bicubic_lr_crop(hr, scale, top, left, size)
            assert np.array_equal(crop, full[top:top + size, left:left + size]), (top, left)


@pytest.mark.parametrize("lr_source, augment", [("bicubic", "flip-rot"), ("bicubic", "hflip"),
                                                ("bicubic", "none"), ("folder", "flip-rot")],
                         ids=lambda v: v)
def test_crops_pair_lr_hr_and_erp_weights_under_augmentation(tmp_path: Path, lr_source: str,
                                                             augment: str) -> None:
    """The HR of each item is the crop its LR comes from, both augmented alike, and the WS
    weight of every HR pixel is that of the row the pixel came from."""
    scale, patch = 4, 8
    hr = _coded_image(160, 192)
    _save(tmp_path / "hr" / "coded.png", hr)
    if lr_source == "folder":
        lr_full = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        _save(tmp_path / "lr" / "codedx4.png", lr_full)
    else:
        lr_full = make_lr(hr, scale)
    data = PairedPatches(tmp_path / "hr", scale=scale, patch_size=patch, augment=augment,
                         erp=True, repeat=64, seed=1,
                         lr_dir=tmp_path / "lr" if lr_source == "folder" else None)
    seen = set()
    for index in range(64):
        item = data[(2, index)]
        assert item["lr"].shape == (3, patch, patch)
        assert item["hr"].shape == (3, patch * scale, patch * scale)
        assert item["weight"].shape == (1, patch * scale, patch * scale)
        got_hr = _to_uint8(item["hr"])
        top, left = item["top"], int(got_hr[..., 1].min())
        assert top % scale == 0 and left % scale == 0 and item["height"] == 160
        crop = hr[top:top + patch * scale, left:left + patch * scale]
        ops = [op for op in SYMMETRIES if np.array_equal(augment_array(crop, *op), got_hr)]
        assert len(ops) == 1, f"item {index} is not an augmented crop"
        seen.add(ops[0])
        lr_crop = lr_full[top // scale: top // scale + patch, left // scale: left // scale + patch]
        assert np.array_equal(_to_uint8(item["lr"]), augment_array(lr_crop, *ops[0]))
        expected = erp_row_weights(160, got_hr[..., 0]).astype(np.float32)
        assert np.array_equal(item["weight"][0].numpy(), expected)
    allowed = {"flip-rot": set(SYMMETRIES), "hflip": {(False, False, False), (True, False, False)},
               "none": {(False, False, False)}}[augment]
    assert seen == allowed


def test_items_are_keyed_on_epoch_and_index(tmp_path: Path) -> None:
    _save(tmp_path / "hr" / "a.png", _coded_image(96, 96))
    data = PairedPatches(tmp_path / "hr", scale=2, patch_size=8, repeat=4, seed=5)
    assert torch.equal(data[(1, 3)]["hr"], data.sample(1, 3)["hr"])
    assert torch.equal(data[3]["hr"], data[(0, 3)]["hr"])
    draws = {(e, i): data[(e, i)]["hr"] for e in range(3) for i in range(4)}
    distinct = {tuple(t.flatten()[:64].tolist()) for t in draws.values()}
    assert len(distinct) == len(draws)
    other = data.with_stream(1)
    assert not torch.equal(other[(1, 3)]["hr"], draws[(1, 3)])
    with pytest.raises(IndexError):
        data[(0, 4)]


def test_erp_weights_formula() -> None:
    height = 8
    rows = np.arange(height)
    expected = np.cos((rows + 0.5 - height / 2) * np.pi / height)
    assert np.allclose(erp_row_weights(height, rows), expected, atol=1e-7)
    assert np.allclose(erp_row_weights(height, rows), erp_row_weights(height, rows)[::-1])
    sr, hr = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    weight = torch.rand(2, 1, 4, 5)
    assert torch.allclose(pixel_loss(sr, hr, weight),
                          ((sr - hr).abs() * weight).sum() / sr.numel())
    assert torch.allclose(pixel_loss(sr, hr), (sr - hr).abs().mean())


def test_train_erp_row_weights_is_a_deprecated_alias() -> None:
    rows = np.array([[0, 5], [17, 32]])
    with pytest.warns(DeprecationWarning, match="metrics.erp_row_weights"):
        got = camixer_fast.train.erp_row_weights(rows, 33)
    assert got.dtype == np.float32 and got.shape == (2, 2)
    assert np.array_equal(got, erp_row_weights(33, rows).astype(np.float32))


class _Sized(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"world={w}")
def test_rank_batches_make_up_the_global_batch(world: int) -> None:
    """Step k's local batches of all ranks hold the samples of step k's batch in one process,
    across epochs, and a stream started at step k continues the stream from step 0."""
    data, batch = _Sized(26), 4
    take = 4 * 6 * batch

    def keys(ranks: int, rank: int, start: int = 0) -> list[tuple[int, int]]:
        stream = SampleStream(data, world_size=ranks, rank=rank, local_batch=batch // ranks,
                              seed=7, start_batch=start)
        it = iter(stream)
        return [next(it) for _ in range(take // ranks)]

    single = keys(1, 0)
    shards = [keys(world, r) for r in range(world)]
    local = batch // world
    for step in range(take // batch):
        together = {k for shard in shards for k in shard[step * local:(step + 1) * local]}
        assert together == set(single[step * batch:(step + 1) * batch]), step
    assert {e for e, _ in single} == set(range(4)), "the stream runs over several epochs"
    assert keys(1, 0, start=5)[: take - 5 * batch] == single[5 * batch:]


def test_loader_workers_load_the_same_batches(tmp_path: Path) -> None:
    batches = []
    for workers in (0, 2):
        trainer = Trainer(_small_config(tmp_path / str(workers), workers=workers, loss="ws-l1"))
        it = iter(trainer.loader())
        batches.append([next(it) for _ in range(3)])
        del it
    for one, other in zip(*batches, strict=True):
        assert set(one) == {"lr", "hr", "weight", "top", "height"}
        for key in one:
            assert torch.equal(one[key], other[key]), key


BAD_DATA = ["missing-folder", "empty-folder", "not-an-image", "truncated-png", "too-small",
            "two-bad-files", "no-lr-file", "lr-too-small", "hr-smaller-than-lr"]


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_training_data_is_refused_by_name(tmp_path: Path, case: str) -> None:
    hr_dir, lr_dir = tmp_path / "hr", None
    good = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    expect = ""
    if case != "missing-folder":
        hr_dir.mkdir()
    if case == "missing-folder":
        expect = "not a folder"
    elif case == "empty-folder":
        (hr_dir / "notes.txt").write_text("no images here")
        expect = "no images"
    elif case in ("not-an-image", "two-bad-files"):
        _save(hr_dir / "good.png", good)
        (hr_dir / "broken.png").write_text("not a png")
        expect = "broken.png"
        if case == "two-bad-files":
            _save(hr_dir / "tiny.png", good[:20, :20])
            expect = "tiny.png"
    elif case == "truncated-png":
        path = _save(hr_dir / "cut.png", good)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expect = "cut.png"
    elif case == "too-small":
        _save(hr_dir / "small.png", good[:60])
        expect = "small.png: 60x64 is smaller than the HR crop 64x64"
    else:
        lr_dir = tmp_path / "lr"
        _save(hr_dir / "pic.png", good)
        if case == "lr-too-small":
            _save(lr_dir / "picx4.png", good[:15, :16])
            expect = "smaller than the LR patch"
        elif case == "hr-smaller-than-lr":
            _save(lr_dir / "picx4.png", good[:17, :16])
            expect = "smaller than 4 × its LR"
        else:
            lr_dir.mkdir()
            expect = "no LR file for pic.png"
    with pytest.raises(DataError) as info:
        PairedPatches(hr_dir, scale=4, patch_size=16, lr_dir=lr_dir)
    print(info.value)
    assert expect in str(info.value)
    if case == "two-bad-files":
        assert "broken.png" in str(info.value) and "2 of the 3 images" in str(info.value)


def test_bad_data_fails_the_command_before_training(tmp_path: Path, weights_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    _save(tmp_path / "hr" / "small.png", np.zeros((40, 40, 3), np.uint8))
    out = tmp_path / "out"
    status = cli.main(["train", "--hr-dir", str(tmp_path / "hr"), "--out", str(out),
                       "--init", str(weights_path), "--patch-size", "16"])
    assert status == 1
    err = capsys.readouterr().err
    assert "small.png: 40x40 is smaller than the HR crop 64x64" in err
    assert not out.exists()
    (tmp_path / "val").mkdir()
    _save(tmp_path / "hr" / "big.png", np.zeros((80, 80, 3), np.uint8))
    (tmp_path / "hr" / "small.png").unlink()
    status = cli.main(["train", "--hr-dir", str(tmp_path / "hr"), "--out", str(out),
                       "--patch-size", "16", "--val-dir", str(tmp_path / "val")])
    assert status == 1
    assert "validation data: no images" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(DataError, match="not a folder"):
        load_validation_pairs(tmp_path / "nowhere", 4)


def _tiny_model(seed: int = 0) -> camixer_fast.CAMixerSR:
    torch.manual_seed(seed)
    return camixer_fast.CAMixerSR(n_feats=12, blocks_per_group=(2, 1)).train()


@pytest.mark.parametrize("noise", [False, True], ids=["no-noise", "gumbel-noise"])
def test_objective_is_l1_plus_the_models_ratio_loss(noise: bool) -> None:
    """In one process the loss and gradients are those of L1 + the model's own ratio loss."""
    torch.manual_seed(1)
    lr, hr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 128, 128)
    grads, values = [], []
    for ours in (False, True):
        model = _tiny_model()
        model.train_noise = noise
        gen = torch.Generator().manual_seed(11)
        if ours:
            terms = training_loss(model, lr, hr, generator=gen)
            loss = terms.total
            assert torch.equal(terms.loss, terms.total.detach())
            assert torch.equal(terms.mask_means, masks)        # the same draws, same masks
        else:
            sr, ratio, routing = model(lr, generator=gen, return_routing=True)
            masks = routing.mask_means().detach()
            loss = (sr - hr).abs().mean() + ratio
        loss.backward()
        values.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"
    assert_close("loss", values[0], values[1], 1e-6, relative=True)
    _assert_grads_close(grads[0], grads[1], 1e-5)


def test_per_shard_ratio_losses_would_not_average(weights_path: Path) -> None:
    """Why the ratio loss is all-reduced: the mean of two half-batch ratio losses' gradients
    is far from the whole batch's (m is squared after the mean), by ~50% in the predictor."""
    model = camixer_fast.load_model(weights_path, backend="reference").train()
    model.train_noise = False
    data = PairedPatches(SHARED / "data/Set5/HR", scale=4, patch_size=32, repeat=4)
    items = [data.sample(0, i) for i in range(4)]
    lr = torch.stack([it["lr"] for it in items])

    def ratio_grad(x: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        model(x)[1].backward()
        return model.body[1].body[0].mixer.route.out_mask[0].weight.grad.clone()

    whole = ratio_grad(lr)
    halves = (ratio_grad(lr[:2]) + ratio_grad(lr[2:])) / 2
    assert (halves - whole).abs().max() > 0.1 * whole.abs().max()


def _pin_kinks(model: nn.Module, signs: dict[str, torch.Tensor], *, record: bool) -> list[int]:
    """Hook every LeakyReLU: record its inputs' signs into ``signs`` (``record``), or take its
    slopes from the recorded signs. Returns the list the pinned ones append their flip counts to."""
    flipped: list[int] = []

    def hook(module: nn.LeakyReLU, inp: tuple, name: str) -> torch.Tensor | None:
        if record:
            signs[name] = inp[0] > 0
            return None
        side = signs[name].to(inp[0].device)
        flipped.append(int(((inp[0] > 0) != side).sum()))
        return torch.where(side, inp[0], inp[0] * module.negative_slope)

    for name, module in model.named_modules():
        if isinstance(module, nn.LeakyReLU):
            module.register_forward_hook(lambda mod, inp, out, name=name: hook(mod, inp, name))
    return flipped


def test_triton_training_step_matches_reference(weights_path: Path) -> None:
    """One step of the official S model, 32×32 crops, batch 2: loss and every gradient within
    1e-4 relative. LeakyReLU pre-activations within rounding of 0 take their side from the
    reference run (a kink's slope jumps 1 -> 0.1, moving upstream gradients by ~1%)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lr, hr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 128, 128)
    signs: dict[str, torch.Tensor] = {}
    results = {}
    with tf32_off():       # IEEE fp32 convolutions on CUDA, as in the reference
        for backend in ("reference", "triton"):
            dev = "cpu" if backend == "reference" else device
            model = camixer_fast.load_model(weights_path, backend=backend, device=dev).train()
            model.train_noise = False
            flipped = _pin_kinks(model, signs, record=backend == "reference")
            assert training_backend(backend, dev) == backend
            terms = training_loss(model, lr.to(dev), hr.to(dev))
            terms.total.backward()
            print(f"{backend}: loss {terms.loss.item():.6f}, kinks pinned: {sum(flipped)}")
            assert sum(flipped) <= 4
            results[backend] = (terms, {n: p.grad.cpu() for n, p in model.named_parameters()})
    ref, out = results["reference"], results["triton"]
    assert_close("loss", ref[0].loss, out[0].loss, 1e-4, relative=True)
    assert_close("mask means", ref[0].mask_means, out[0].mask_means, 0)
    _assert_grads_close(ref[1], out[1], 1e-4)


def test_triton_backend_is_refused_on_a_cpu_without_the_interpreter(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        training_backend("triton", "cpu")
    assert training_backend("auto", "cpu") == "reference"
    status = cli.main(["train", "--hr-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--backend", "triton"])
    assert status == 2
    assert "backend 'triton' cannot run here" in capsys.readouterr().err


@pytest.mark.parametrize("change", [{"milestones": (5, 3)}, {"ema_decay": 1.0},
                                    {"betas": (0.9, 1.0)}, {"gamma": 1.5}, {"loss": "l2"},
                                    {"batch_size": 0}],
                         ids=["milestones", "ema", "betas", "gamma", "loss", "batch"])
def test_bad_settings_are_refused(tmp_path: Path, change: dict) -> None:
    with pytest.raises(ConfigError):
        _small_config(tmp_path, **change).check()


def test_checkpoint_round_trips_and_loads_as_official_weights(tmp_path: Path) -> None:
    trainer = Trainer(_small_config(tmp_path, iterations=2))
    trainer.run()
    path = Path(trainer.config.out_dir) / "last.pth"
    payload = trainer.checkpoint_payload()
    saved = read_checkpoint(path)
    _equal_nested({k: payload[k] for k in ("params", "params_ema", "optimizer", "scheduler")},
                  {k: saved[k] for k in ("params", "params_ema", "optimizer", "scheduler")})
    assert saved["step"] == 2 and saved["format"] == "camixer_fast.train/1"
    official = torch.load(path, map_location="cpu", weights_only=True)["params_ema"]
    model = camixer_fast.load_model(path, backend="reference")
    _equal_nested(dict(model.state_dict()), official)
    assert not torch.equal(saved["params"]["head.weight"], saved["params_ema"]["head.weight"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth", "log.jsonl"]
    resumed = Trainer(_small_config(tmp_path, iterations=2, resume=str(path)))
    assert resumed.step == 2
    _equal_nested(resumed.checkpoint_payload()["optimizer"], saved["optimizer"])
    _equal_nested(dict(resumed.model.state_dict()), saved["params"])
    _equal_nested(resumed.ema.state_dict(), saved["params_ema"])


def test_an_existing_run_is_not_overwritten(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    config = _small_config(tmp_path, iterations=1)
    Trainer(config).run()
    before = (Path(config.out_dir) / "last.pth").read_bytes()
    with pytest.raises(ConfigError, match="already holds a training checkpoint"):
        Trainer(config)
    status = cli.main(["train", "--hr-dir", config.hr_dir, "--out", config.out_dir,
                       "--iterations", "1"])
    assert status == 2 and "resume it" in capsys.readouterr().err
    assert (Path(config.out_dir) / "last.pth").read_bytes() == before


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"params": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def broken_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"params": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_resumed_run_continues_exactly(tmp_path: Path) -> None:
    """4 steps straight, or 2 steps, a checkpoint, and 2 more from it in a new Trainer: the
    same weights, EMA, optimiser state and losses, bit for bit (Gumbel noise and flips on)."""
    straight = _small_config(tmp_path / "a", iterations=4)
    Trainer(straight).run()
    first = _small_config(tmp_path / "b", iterations=2)
    Trainer(first).run()
    second = _small_config(tmp_path / "b", iterations=4, resume="auto")
    trainer = Trainer(second)
    assert trainer.step == 2
    trainer.run()
    a = read_checkpoint(Path(straight.out_dir) / "last.pth")
    b = read_checkpoint(Path(second.out_dir) / "last.pth")
    for key in ("params", "params_ema", "optimizer", "scheduler", "step"):
        _equal_nested(a[key], b[key], key)

    def losses(config: TrainConfig) -> list[dict]:
        lines = (Path(config.out_dir) / "log.jsonl").read_text().splitlines()
        return [{k: r[k] for k in ("step", "loss", "l1", "ratio_loss", "k_fraction")}
                for r in map(json.loads, lines) if r["event"] == "train"]

    assert losses(straight) == losses(second)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_gradients(weights_path: Path, data: PairedPatches, world: int, local_batch: int,
                     seed: int) -> dict[str, torch.Tensor]:
    """Step 1's gradient as the design prescribes it, in one process: every rank's shard run
    on its own (the very arithmetic of that rank), the ratio term's gradient 4γ(m − 0.5)·∇m_rank
    with m the mean over all shards, and the ranks' gradients averaged (DDP's all-reduce)."""
    model = camixer_fast.load_model(weights_path, backend="reference").train()
    model.train_noise = False
    pixel, means = [], []
    for rank in range(world):
        stream = iter(SampleStream(data, world_size=world, rank=rank, local_batch=local_batch,
                                   seed=seed))
        items = [data[next(stream)] for _ in range(local_batch)]
        lr, hr = (torch.stack([it[key] for it in items]) for key in ("lr", "hr"))
        sr, _, routing = model(lr, return_routing=True)
        pixel.append(pixel_loss(sr, hr))
        means.append(routing.mask_means().mean())
    m = torch.stack(means).detach().mean()
    slope = 4.0 * model.gamma * (m - 0.5)
    sum((p + slope * mean) / world for p, mean in zip(pixel, means, strict=True)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_two_gloo_processes_match_one_process(tmp_path: Path, weights_path: Path) -> None:
    """torchrun, 2 CPU processes on gloo, global batch 4 (2 per rank), 3 steps fine-tuning S
    without Gumbel noise.

    - the ranks' weights, EMA and gradients stay identical;
    - the gradient the optimiser sees at step 1 is the design's (:func:`_shard_gradients`,
      the same arithmetic per shard) to 1e-5;
    - against one process running the global batch of 4 at once, step 1's L1, ratio loss and
      K fractions agree to 1e-5 and its gradient to 1e-2 (relative L2 norm): the batch size
      changes the fp32 rounding of SR by ~4e-7, and the L1 gradient sign(SR − HR) jumps where
      SR lands on an 8-bit HR value exactly (a few pixels in 200k; here one flips, moving the
      gradient by ~1e-3), which no split of the batch can avoid. Adam's first update is
      ±lr for every element whatever its gradient's size, so elements whose gradient is
      rounding noise move apart by up to 2·lr, and the losses of steps 2 and 3 agree to 1e-3.
      The naive per-rank ratio loss would be off by ~50% in the predictor's gradient
      (:func:`test_per_shard_ratio_losses_would_not_average`).
    - rank 0 alone writes the log and the checkpoint.
    """
    settings = {"hr_dir": str(weights_path.parents[1] / "data/Set5/HR"),
                "init": str(weights_path), "iterations": 3, "batch_size": 4, "patch_size": 32,
                "train_noise": False, "log_every": 1, "val_every": 0, "save_every": 0,
                "probe": 0, "progress": False, "seed": 4}
    worker = REPO / "tests" / "ddp_train_worker.py"
    # the installed package, never the checkout's folders (they shadow a non-editable install)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    runs = {}
    for world in (2, 1):
        out = tmp_path / f"world{world}"
        out.mkdir()
        config = json.dumps(dict(settings, out_dir=str(out)))
        command = [sys.executable, str(worker), config, str(out)]
        if world > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                       str(world), "--master_addr", "127.0.0.1", "--master_port",
                       str(_free_port())] + command[1:]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                              check=False, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[world] = out
    ranks = [torch.load(runs[2] / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = torch.load(runs[1] / "rank0.pt", weights_only=True)
    assert ranks[0]["world_size"] == 2 and single["world_size"] == 1
    for key in ("params", "ema", "grads"):
        _equal_nested(ranks[0][key], ranks[1][key], key)

    def records(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    multi, one = records(runs[2]), records(runs[1])
    data = PairedPatches(settings["hr_dir"], scale=4, patch_size=32, seed=4,
                         repeat=multi[0]["repeat"])
    designed = _shard_gradients(weights_path, data, world=2, local_batch=2, seed=4)
    _assert_grads_close(designed, ranks[0]["grads"], 1e-5)
    flat = [torch.cat([g[name].flatten() for name in designed])
            for g in (single["grads"], ranks[0]["grads"])]
    err = ((flat[1] - flat[0]).norm() / flat[0].norm()).item()
    print(f"step-1 gradient, 2 ranks vs 1 process: relative L2 difference {err:.2e}")
    assert err <= 1e-2
    assert [r["event"] for r in multi] == ["start", "train", "train", "train", "end"]
    for step, (r_multi, r_one) in enumerate(zip(multi[1:4], one[1:4], strict=True), start=1):
        print(f"step {step}: L1 {r_multi['l1']:.9f} (2 ranks) {r_one['l1']:.9f} (1 process)")
        for key in ("l1", "ratio_loss"):
            tol = 1e-5 if step == 1 else 1e-3
            assert r_multi[key] == pytest.approx(r_one[key], rel=tol, abs=1e-9), (step, key)
        assert r_multi["k_fraction"] == pytest.approx(r_one["k_fraction"], abs=1e-6)
    assert sorted(p.name for p in runs[2].iterdir()) == ["last.pth", "log.jsonl", "rank0.pt",
                                                         "rank1.pt"]


def test_command_fine_tunes_and_writes_readable_checkpoints(
        tmp_path: Path, weights_path: Path, capsys: pytest.CaptureFixture) -> None:
    set5 = weights_path.parents[1] / "data/Set5/HR"
    for name in ("baby", "bird"):
        img = np.asarray(Image.open(set5 / f"{name}.png").convert("RGB"))
        _save(tmp_path / "val" / f"{name}.png", img[:96, :96])
    out = tmp_path / "out"
    status = cli.main(["train", "--init", str(weights_path), "--hr-dir", str(set5),
                       "--out", str(out), "--val-dir", str(tmp_path / "val"),
                       "--iterations", "2", "--batch-size", "2", "--patch-size", "16",
                       "--lr", "1e-5", "--val-every", "0", "--save-every", "1",
                       "--log-every", "1", "--probe", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["step"] == 2 and summary["val_psnr_first"] > 25
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert len(train_records[0]["k_fraction"]) == 20
    assert all(0 <= k <= 1 for k in train_records[0]["k_fraction"])
    assert [r["step"] for r in records if r["event"] == "val"] == [0, 2]
    last = read_checkpoint(out / "last.pth")
    assert last["step"] == 2 and last["best_psnr"] == summary["best_psnr"]
    if summary["val_psnr_last"] > summary["val_psnr_first"]:
        assert read_checkpoint(out / "best.pth")["best_psnr"] == summary["val_psnr_last"]
    model = camixer_fast.load_model(out / "last.pth", backend="reference")
    _equal_nested(dict(model.state_dict()), last["params_ema"])
    assert cli.main(["eval", "--weights", str(out / "last.pth"), "--hr-dir",
                     str(tmp_path / "val"), "--gamma", "0.5", "--backend", "reference",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["mean_psnr"] == pytest.approx(summary["val_psnr_last"], abs=1e-6)
