"""``camixer_fast.evaluation.evaluate`` and ``camixer-fast eval``: the official Set5 figures from HR alone
(LR made by our MATLAB bicubic), the --lr-dir path, JSON output and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import camixer_fast
from camixer_fast.cli import main
from camixer_fast.evaluation.evaluate import evaluate, find_lr_file

OFFICIAL_GAMMA1 = {"baby": 33.831, "bird": 34.915, "butterfly": 29.021, "head": 32.981,
                   "woman": 30.901}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def butterfly_hr(shared: Path, tmp_path: Path) -> Path:
    """A folder holding Set5's butterfly HR only (the smallest image: a fast run)."""
    folder = tmp_path / "hr"
    folder.mkdir()
    shutil.copy(shared / "data" / "Set5" / "HR" / "butterfly.png", folder)
    return folder


def test_set5_from_hr_matches_official(model_s: camixer_fast.CAMixerSR, shared: Path) -> None:
    """γ = 1 on Set5 HR, LR made by make_lr: the official 32.330 dB (made from the LR files)."""
    (result,) = evaluate(model_s, shared / "data" / "Set5" / "HR", [1.0])
    for score in result.images:
        print(f"{score.name}: {score.psnr:.3f} dB, SSIM {score.ssim:.4f}, K/N "
              f"{score.k_fraction:.3f}, {score.seconds:.2f} s")
    print(f"mean {result.mean_psnr:.4f} dB, SSIM {result.mean_ssim:.4f}")
    assert abs(result.mean_psnr - 32.330) <= 0.01
    for score in result.images:
        assert abs(score.psnr - OFFICIAL_GAMMA1[score.name]) <= 0.01, score.name
        assert score.k_fraction == 1.0
        assert 0.7 < score.ssim < 1.0


def test_cli_lr_dir_equals_bicubic(shared: Path, butterfly_hr: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Our bicubic reproduces the LR file bit-exactly, so both paths give the same scores."""
    lr_dir = shared / "data" / "Set5" / "LR_bicubic" / "X4"
    runs = {}
    for label, extra in (("bicubic", []), ("files", ["--lr-dir", str(lr_dir)])):
        status = main(["eval", "--weights", "CAMixerSR-S", "--hr-dir", str(butterfly_hr),
                       "--gamma", "0.5", "--backend", "reference", "--json", *extra])
        assert status == 0
        runs[label] = json.loads(capsys.readouterr().out)
    assert runs["files"]["lr"] == "files" and runs["bicubic"]["lr"] == "bicubic"
    a, b = runs["bicubic"]["results"][0], runs["files"]["results"][0]
    print(f"butterfly γ=0.5: {a['mean_psnr']:.3f} dB, K/N {a['mean_k_fraction']:.3f}")
    assert a["gamma"] == 0.5 and a["images"][0]["lr_size"] == [64, 64]
    assert a["mean_psnr"] == b["mean_psnr"] and a["mean_ssim"] == b["mean_ssim"]
    assert 0.0 < a["mean_k_fraction"] < 1.0


def test_cli_table(butterfly_hr: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--hr-dir", str(butterfly_hr), "--gamma", "0", "--scale", "4"]) == 0
    out = capsys.readouterr().out
    assert "butterfly" in out and "γ = 0 (×4)" in out and "summary: γ=0:" in out


def test_find_lr_file(shared: Path, tmp_path: Path) -> None:
    x4 = shared / "data" / "Set5" / "LR_bicubic" / "X4"
    assert find_lr_file(x4, Path("baby.png"), 4).name == "babyx4.png"
    with pytest.raises(FileNotFoundError, match="no LR file"):
        find_lr_file(tmp_path, Path("baby.png"), 4)


@pytest.mark.parametrize("args,status", [
    (["--scale", "2"], 2),
    (["--weights", "no-such-name"], 1),
    (["--lr-dir", "MISSING"], 1),
], ids=["wrong-scale", "unknown-weights", "missing-lr-file"])
def test_cli_errors(butterfly_hr: Path, tmp_path: Path, args: list[str], status: int,
                    capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / "none") if a == "MISSING" else a for a in args]
    assert main(["eval", "--hr-dir", str(butterfly_hr), "--gamma", "0", *args]) == status
    assert "camixer-fast eval:" in capsys.readouterr().err


def test_cli_missing_hr_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--hr-dir", str(tmp_path / "none")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_cli_bad_gamma() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--hr-dir", ".", "--gamma", "1.5"])
    assert exit_info.value.code == 2


def test_table_mean_row_is_the_mean_time(capsys: pytest.CaptureFixture[str]) -> None:
    from camixer_fast.commands.eval import print_table
    from camixer_fast.evaluation.evaluate import GammaScore, ImageScore

    result = GammaScore(0.5, [ImageScore("a", (4, 4), 30.0, 0.9, 0.5, 1.0),
                              ImageScore("b", (4, 4), 32.0, 0.8, 0.5, 3.0)])
    print_table(result, 4)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["mean"][-1] == "2.000" and rows["total"][-1] == "4.000"


def test_standard_json_keys_are_unchanged() -> None:
    """The ODI-SR fields appear only in ODI scores: the standard eval's JSON keeps its keys."""
    from camixer_fast.evaluation.evaluate import GammaScore, ImageScore

    result = GammaScore(0.5, [ImageScore("a", (4, 4), 30.0, 0.9, 0.5, 1.0)]).to_dict()
    assert list(result) == ["gamma", "mean_psnr", "mean_ssim", "mean_k_fraction", "seconds",
                            "images"]
    assert list(result["images"][0]) == ["name", "lr_size", "psnr", "ssim", "k_fraction",
                                         "seconds"]
