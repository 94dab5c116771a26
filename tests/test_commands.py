"""What every ``camixer-fast`` command shares: no abbreviated options, an output that cannot
be written is one line and exit 2, outputs get the umask's permissions; and the summaries."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camixer_fast
from camixer_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args: object) -> int:
    try:
        return main([*map(str, args)])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = camixer_fast.CAMixerSR(n_feats=12, scale=2, blocks_per_group=(1, 2),
                                       window_size=8)
    path = tmp_path_factory.mktemp("weights") / "small.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), np.uint8)).save(path)
    return path


def command(name: str, weights: Path, image: Path, out: Path) -> list:
    return {"export": ["export", out / "m.onnx", "--weights", weights],
            "convert": ["convert", weights, out / "m.safetensors"],
            "upscale": ["upscale", image, "-o", out / "big.png", "--weights", weights],
            "train": ["train", "--hr-dir", image.parent, "--out", out / "run",
                      "--iterations", "1"]}[name]


COMMANDS = ["export", "convert", "upscale", "train"]


@pytest.mark.parametrize("name", COMMANDS)
def test_output_under_a_file_is_one_line_and_exit_2(name, small_weights, image, tmp_path,
                                                   capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run(*command(name, small_weights, image, blocker)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"camixer-fast {name}: error: cannot write {blocker}" in err, err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o500 folder")
@pytest.mark.parametrize("name", COMMANDS)
def test_read_only_folder_is_one_line_and_exit_2(name, small_weights, image, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run(*command(name, small_weights, image, locked)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not writable" in err, err
    assert list(locked.iterdir()) == []


def test_export_failing_while_writing_is_one_line_and_exit_2(small_weights, tmp_path,
                                                            monkeypatch, capsys):
    def denied(model, args, path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch.onnx, "export", denied)
    assert run("export", tmp_path / "m.onnx", "--weights", small_weights) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"camixer-fast export: error: cannot write {tmp_path / 'm.onnx'}: " \
                      "Permission denied", err
    assert not any("Traceback" in line for line in err) and list(tmp_path.iterdir()) == []


def test_exported_onnx_gets_ordinary_permissions(small_weights, tmp_path):
    pytest.importorskip("onnx")
    assert run("export", tmp_path / "m.onnx", "--weights", small_weights, "--gamma", "0.5") == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_no_option_is_taken_by_its_abbreviation(image, tmp_path, capsys):
    assert run("upscale", image, "-o", tmp_path / "out", "--scale", "3") == 2
    assert "unrecognized arguments: --scale 3" in capsys.readouterr().err
    assert run("upscale", image, "-o", tmp_path / "out", "--scale") == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--vers"], ["upscale", "in.png", "-o", "out", "--over"], ["eval", "--hr-dir", "x", "--js"],
    ["info", "--js"], ["train", "--hr-dir", "x", "--out", "y", "--iter", "1"],
    ["convert", "a.pth", "b.pth", "--over"], ["export", "m.onnx", "--over"]],
    ids=lambda args: args[0].lstrip("-"))
def test_every_command_refuses_abbreviations(args, capsys):
    assert run(*args) == 2
    assert "unrecognized arguments: --" in capsys.readouterr().err


def test_single_image_prints_a_summary(small_weights, image, tmp_path, capsys):
    out = tmp_path / "big.png"
    assert run("upscale", image, "-o", out, "--weights", small_weights) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"camixer-fast upscale: 1 image upscaled -> {out} (×2, "), err
    assert err.rstrip().endswith(" s)") and len(err.splitlines()) == 1, err


def test_info_synopsis_says_random_weights(capsys):
    assert run("--help") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "info" in line)
    assert "random" in line
