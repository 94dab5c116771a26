"""Video through ``camixer-fast upscale`` (PyAV): a 2-second 96×64 clip with an audio track,
made here, becomes a 384×256 clip with the same frames, frame rate and audio; PNG frames equal
``upscale`` of the decoded frames exactly; bad videos fail cleanly."""

from __future__ import annotations

import importlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import camixer_fast
from camixer_fast.cli import main

av = pytest.importorskip("av")
cmd = importlib.import_module("camixer_fast.commands.upscale")
video = importlib.import_module("camixer_fast.io.video")

pytestmark = pytest.mark.usefixtures("one_thread")

FPS, SECONDS, WIDTH, HEIGHT, RATE = 10, 2, 96, 64, 16000


def make_clip(path: Path, *, with_video: bool = True, with_audio: bool = True,
              seconds: float = SECONDS, faststart: bool = False) -> None:
    """Moving 8×8 blocks (H.264, ``FPS`` frames a second) and a 440 Hz tone (AAC);
    ``faststart``: the index at the front of the file."""
    rng = np.random.default_rng(0)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        if with_video:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            stream.options = {"crf": "10"}
        if with_audio:
            audio = out.add_stream("aac", rate=RATE)
            audio.layout = "mono"
        blocks = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
        for i in range(round(seconds * FPS) if with_video else 0):
            pixels = np.kron(np.roll(blocks, i, axis=1), np.ones((8, 8, 1), np.uint8))
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            out.mux(stream.encode(frame))
        if with_video:
            out.mux(stream.encode(None))
        if with_audio:
            wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * RATE)) / RATE))
            for start in range(0, len(wave), 1024):
                chunk = wave[start:start + 1024].astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = RATE, start, Fraction(1, RATE)
                out.mux(audio.encode(frame))
            out.mux(audio.encode(None))


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def streams(path: Path) -> dict:
    with av.open(str(path)) as container:
        v = container.streams.video[0]
        a = container.streams.audio[0]
        audio_packets = sum(1 for p in container.demux(a) if p.dts is not None)
        return {"frames": len(decoded_frames(path)), "rate": v.average_rate,
                "size": (v.codec_context.width, v.codec_context.height),
                "audio": (a.codec_context.name, a.rate, audio_packets)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    make_clip(path)
    return path


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    """Four frames: for the checks that need a video but not its length."""
    path = tmp_path_factory.mktemp("video") / "short.mp4"
    make_clip(path, seconds=0.4)
    return path


@pytest.fixture(scope="module")
def expected(clip) -> list[np.ndarray]:
    """``upscale`` of every decoded frame, one thread."""
    import torch

    torch.set_num_threads(1)
    return [camixer_fast.upscale(frame) for frame in decoded_frames(clip)]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_clip_keeps_frames_rate_and_audio(clip, expected, tmp_path, capsys):
    out = tmp_path / "clip_x4.mp4"
    assert main(["upscale", str(clip), "-o", str(out), "--crf", "12"]) == 0
    assert names(tmp_path) == ["clip_x4.mp4"], "a temporary file was left behind"
    got, source = streams(out), streams(clip)
    assert got["frames"] == source["frames"] == SECONDS * FPS
    assert got["rate"] == source["rate"] == FPS
    assert got["size"] == (4 * WIDTH, 4 * HEIGHT)
    assert got["audio"] == source["audio"]
    # the encoder takes 4:2:0 YUV: half-resolution colour is the floor of any codec here
    # (~31 dB on these saturated blocks); against that conversion of the expected frames, the
    # difference left is the codec's quantisation
    subsampled = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                  .to_ndarray(format="rgb24") for f in expected]
    frames = decoded_frames(out)
    worst = min(psnr(a, b) for a, b in zip(frames, subsampled, strict=True))
    print(f"lowest frame PSNR against upscale of the decoded input, as 4:2:0: {worst:.2f} dB")
    assert worst > 38.0
    assert min(psnr(a, b) for a, b in zip(frames, expected, strict=True)) > 28.0


def test_frames_dir_pngs_equal_upscale_exactly(clip, expected, tmp_path):
    out = tmp_path / "frames"
    assert main(["upscale", str(clip), "-o", str(out), "--frames-dir", "--batch-size", "3",
                 "--workers", "2", "--threads", "1"]) == 0
    assert names(out) == [f"{n:06d}.png" for n in range(1, SECONDS * FPS + 1)]
    for n, frame in enumerate(expected, start=1):
        assert np.array_equal(np.asarray(Image.open(out / f"{n:06d}.png")), frame), n


def test_progress_counts_frames(short_clip, tmp_path, monkeypatch, capsys):
    class Shown(cmd.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "mininterval": 0})

    monkeypatch.setattr(cmd, "tqdm", Shown)
    assert main(["upscale", str(short_clip), "-o", str(tmp_path / "x.mkv"), "--codec",
                 "mpeg4"]) == 0
    err = capsys.readouterr().err
    assert "4/4" in err and "frames/s" in err and "4 frames in" in err


def test_mixed_folder_handles_each_kind(short_clip, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(short_clip.read_bytes())
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(folder / "still.png")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--frames-dir"]) == 0
    assert names(tmp_path / "out") == ["clip", "still.png"]
    assert names(tmp_path / "out" / "clip") == [f"{n:06d}.png" for n in range(1, 5)]


def _truncated(clip: Path, dest: Path) -> None:
    data = clip.read_bytes()
    dest.write_bytes(data[: len(data) // 2])


def _cut_off(clip: Path, dest: Path) -> None:
    """The first half of a file with its index in front: the index declares 10 frames."""
    whole = dest.with_name("whole.mp4")
    make_clip(whole, seconds=1, faststart=True)
    _truncated(whole, dest)
    whole.unlink()


def _garbage(clip: Path, dest: Path) -> None:
    dest.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)


def _audio_only(clip: Path, dest: Path) -> None:
    make_clip(dest, with_video=False)


BAD_VIDEOS = {"truncated": (_truncated, "cannot read video"),
              "cut-off": (_cut_off, "the video ends after"),
              "garbage": (_garbage, "cannot read video"),
              "audio-only": (_audio_only, "has no video stream")}


@pytest.mark.parametrize("kind", list(BAD_VIDEOS))
def test_bad_video_is_reported_and_leaves_nothing(kind, clip, tmp_path, capsys):
    make, message = BAD_VIDEOS[kind]
    folder = tmp_path / "in"
    folder.mkdir()
    make(clip, folder / "bad.mp4")
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(folder / "still.png")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'bad.mp4'}: {message}" in err
    assert names(tmp_path / "out") == ["still.png"]
    assert "1 written, 0 skipped, 1 failed" in err


def test_interrupted_video_leaves_no_file(clip, tmp_path, monkeypatch):
    real, seen = video.prepare, []

    def interrupt_at_frame_5(rgb):
        seen.append(rgb)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(rgb)

    monkeypatch.setattr(video, "prepare", interrupt_at_frame_5)
    assert main(["upscale", str(clip), "-o", str(tmp_path / "out.mp4")]) == 130
    assert names(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["--codec", "no-such-codec"], "unknown video encoder"),
    (["--codec", "mpeg4", "--crf", "20"], "--crf applies to"),
    (["--crf", "99"], "must be an integer 0..63"),
], ids=["unknown-codec", "crf-for-mpeg4", "crf-out-of-range"])
def test_bad_video_options_exit_2_before_any_work(args, message, short_clip, tmp_path,
                                                  capsys):
    try:
        status = main(["upscale", str(short_clip), "-o", str(tmp_path / "out.mp4"), *args])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert names(tmp_path) == []
