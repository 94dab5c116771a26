"""``camixer-fast eval --odi`` and ``evaluate_odi``: the ODI-SR protocol (RGB, border 0, PSNR,
SSIM, WS-PSNR, WS-SSIM) on tiny panoramas with a tiny seeded CAMixerOSR; LAU-style folders,
pairing errors, a CAMixerSR model under --odi, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camixer_fast.cli import main
from camixer_fast.evaluation.evaluate import (ODIImageScore, evaluate_odi, find_odi_datasets,
                                              super_resolve)
from camixer_fast.evaluation.imresize import make_lr
from camixer_fast.evaluation.metrics import psnr, ssim, ws_psnr, ws_ssim
from camixer_fast.models.loading import load_model
from camixer_fast.reference.odisr import CAMixerOSR, latitude_condition

pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = 2
NAMES = ("pano_a", "pano_b")


def panorama(seed: int, height: int = 32, width: int = 64) -> np.ndarray:
    """A smooth random (height, width, 3) uint8 image: noise upsampled, plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3))
    smooth = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width]
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def write(folder: Path, name: str, pixels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"{name}.png")


def write_split(split: Path, lr_folder: str | None = "LR_fisheye") -> None:
    """A LAU-style split: HR/<name>.png and <lr_folder>/X2/<name>.png (bicubic of HR)."""
    for seed, name in enumerate(NAMES):
        hr = panorama(seed)
        write(split / "HR", name, hr)
        if lr_folder is not None:
            write(split / lr_folder / f"X{SCALE}", name, make_lr(hr, SCALE))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CAMixerOSR (C = 12, 2 groups of 1 block, window 8, ×2), seeded, as a .pth file."""
    torch.manual_seed(0)
    model = CAMixerOSR(n_feats=12, scale=SCALE, blocks_per_group=(1, 1), window_size=8)
    path = tmp_path_factory.mktemp("weights") / "tiny_osr_x2.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    return path


@pytest.fixture()
def hr_dir(tmp_path: Path) -> Path:
    write_split(tmp_path / "split", lr_folder=None)
    return tmp_path / "split" / "HR"


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["eval", "--odi", "--json", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_scores_are_the_metrics_of_the_whole_panorama_sr(weights: Path, hr_dir: Path) -> None:
    """Each score equals evaluation.metrics on SR = model(LR, the whole panorama's condition)."""
    model = load_model(weights, backend="reference")
    (result,) = evaluate_odi(model, hr_dir, [0.5])
    assert [s.name for s in result.images] == list(NAMES)
    for seed, score in enumerate(result.images):
        hr = panorama(seed)
        lr = make_lr(hr, SCALE)
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            out = model(x, latitude_condition(*lr.shape[:2]))
        sr = out[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(sr, super_resolve(model, lr)[0])
        expected = (psnr(sr, hr, y_channel=False), ssim(sr, hr, y_channel=False),
                    ws_psnr(sr, hr), ws_ssim(sr, hr))
        print(f"{score.name}: {expected}")
        assert isinstance(score, ODIImageScore) and score.lr_size == (16, 32)
        assert (score.psnr, score.ssim, score.ws_psnr, score.ws_ssim) == expected
        assert score.psnr != psnr(sr, hr) and score.ws_psnr != score.psnr     # RGB, weighted


def without_time(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"}
            | {"images": [{k: v for k, v in i.items() if k != "seconds"} for i in r["images"]]}
            for r in results]


def test_cli_json_bicubic_equals_lr_files(weights: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--hr-dir alone (MATLAB bicubic LR) and --hr-dir + --lr-dir of those LR files agree;
    the JSON means are the means of its rows; γ defaults to 0.5."""
    write_split(tmp_path, lr_folder="LR_erp")
    common = ["--weights", str(weights), "--backend", "reference", "--hr-dir", str(tmp_path / "HR")]
    bicubic = run_json(common, capsys)
    files = run_json([*common, "--lr-dir", str(tmp_path / "LR_erp" / "X2")], capsys)
    assert bicubic["model"] == "CAMixerOSR" and bicubic["condition"] is not None
    assert (bicubic["channels"], bicubic["border"], bicubic["protocol"]) == ("RGB", 0, "odisr")
    (a,), (b,) = bicubic["datasets"], files["datasets"]
    assert (a["lr"], b["lr"]) == ("bicubic", "files")
    assert without_time(a["results"]) == without_time(b["results"])
    (result,) = a["results"]
    assert result["gamma"] == 0.5
    api = evaluate_odi(load_model(weights, backend="reference"), tmp_path / "HR", [0.5])
    api_json = json.loads(json.dumps([r.to_dict() for r in api]))
    assert without_time(a["results"]) == without_time(api_json)
    for metric in ("psnr", "ssim", "ws_psnr", "ws_ssim", "k_fraction"):
        assert result[f"mean_{metric}"] == pytest.approx(
            np.mean([img[metric] for img in result["images"]]), rel=1e-12)


def test_odi_dir_split_and_lau_root(weights: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A split folder is one dataset; a LAU root gives the paper's two, each in the summary."""
    root = tmp_path / "lau_dataset_clean"
    write_split(root / "odisr" / "testing", lr_folder="LR_fisheye")
    write_split(root / "sun_test", lr_folder="LR")
    (split,) = find_odi_datasets(root / "sun_test", SCALE)
    assert (split.name, split.lr_dir) == ("sun_test", root / "sun_test" / "LR" / "X2")
    found = find_odi_datasets(root, SCALE)
    assert [(d.name, d.hr_dir, d.lr_dir.parent.name) for d in found] == [
        ("ODI-SR", root / "odisr" / "testing" / "HR", "LR_fisheye"),
        ("SUN360", root / "sun_test" / "HR", "LR")]
    assert main(["eval", "--weights", str(weights), "--odi-dir", str(root), "--gamma", "1"]) == 0
    out = capsys.readouterr().out
    print(out)
    summary = out[out.index("summary"):].splitlines()
    assert "WS-PSNR" in summary[1] and "WS-SSIM" in summary[1]
    assert [line.split()[:2] for line in summary[2:]] == [["ODI-SR", "1"], ["SUN360", "1"]]
    assert out.count("pano_a") == 2


def bad_layout(case: str, tmp_path: Path) -> list[str]:
    """Writes a broken layout for ``case``; returns the eval arguments that point at it."""
    write_split(tmp_path, lr_folder="LR_fisheye")
    hr, lr = tmp_path / "HR", tmp_path / "LR_fisheye" / "X2"
    if case == "missing-lr":
        (lr / "pano_b.png").unlink()
    elif case == "lr-without-hr":
        write(lr, "pano_c", make_lr(panorama(5), SCALE))
    elif case == "lr-wrong-size":
        write(lr, "pano_b", make_lr(panorama(1, 32, 60), SCALE))
    elif case == "hr-not-divisible":
        write(hr, "pano_b", panorama(1, 33, 64))
        return ["--hr-dir", str(hr)]
    elif case == "not-a-dataset":
        return ["--odi-dir", str(tmp_path / "HR")]      # HR/ has no HR/ inside: not a split
    elif case == "no-lr-for-scale":
        lr.rename(lr.parent / "X4")
    return ["--odi-dir", str(tmp_path)]


PAIRING_ERRORS = {"missing-lr": "no LR file for pano_b.png",
                  "lr-without-hr": "have no HR image",
                  "lr-wrong-size": "not HR 32x64 / 2",
                  "hr-not-divisible": "not divisible by the scale 2",
                  "not-a-dataset": "no HR/ folder",
                  "no-lr-for-scale": "no LR folder for ×2"}


@pytest.mark.parametrize("case,message", PAIRING_ERRORS.items(), ids=list(PAIRING_ERRORS))
def test_pairing_errors(case: str, message: str, weights: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    args = bad_layout(case, tmp_path)
    assert main(["eval", "--odi", "--weights", str(weights), *args]) == 1
    err = capsys.readouterr().err
    print(err)
    assert message in err


@pytest.mark.parametrize("args", [
    [],
    ["--hr-dir", "A", "--odi-dir", "B"],
    ["--odi-dir", "B", "--lr-dir", "C"],
], ids=["no-folder", "hr-and-odi-dir", "odi-dir-and-lr-dir"])
def test_argument_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--odi", *args]) == 2
    assert "camixer-fast eval:" in capsys.readouterr().err


def test_camixersr_model_under_odi(hr_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--odi with a CAMixerSR model: allowed, no condition, the same metrics of its SR."""
    data = run_json(["--weights", "CAMixerSR-S", "--backend", "reference", "--hr-dir",
                     str(hr_dir)], capsys)
    assert (data["model"], data["condition"], data["scale"]) == ("CAMixerSR", None, 4)
    model = load_model("CAMixerSR-S", backend="reference")
    image = data["datasets"][0]["results"][0]["images"][0]
    hr = panorama(0)
    sr = super_resolve(model, make_lr(hr, 4))[0]
    assert image["lr_size"] == [8, 16]
    assert (image["psnr"], image["ssim"], image["ws_psnr"], image["ws_ssim"]) == (
        psnr(sr, hr, y_channel=False), ssim(sr, hr, y_channel=False), ws_psnr(sr, hr),
        ws_ssim(sr, hr))
    assert image["psnr"] > 15          # a trained network (the tiny random one: ~8 dB)


def test_osr_model_without_odi_notes_the_protocol(weights: Path, hr_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--weights", str(weights), "--hr-dir", str(hr_dir), "--gamma", "0"]) == 0
    captured = capsys.readouterr()
    assert "--odi gives the ODI-SR protocol" in captured.err and "PSNR(Y)" in captured.out
