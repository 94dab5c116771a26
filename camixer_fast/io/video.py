"""Video through the pipelined runner with PyAV (``pip install 'camixer_fast[video]'``): frames
upscaled in order at their timestamps, audio and subtitles copied, written to a temporary file
moved into place at the end (or as PNG frames, each atomically).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from camixer_fast.inference.pipeline import Engine, Pipeline
from camixer_fast.io.files import atomic_path
from camixer_fast.inference.api import Prepared, prepare

VIDEO_EXTENSIONS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska",
                    ".webm": "webm", ".avi": "avi"}
"""File extensions (lower case) read and written as video, with FFmpeg's muxer name."""

CRF_CODECS = {"libx264": 18, "libx265": 20, "libvpx-vp9": 24, "libaom-av1": 28,
              "libsvtav1": 28}
"""Encoders that take ``--crf``, with the default used when it is not given."""

BITS_PER_PIXEL = 1.0
"""Bit rate of encoders without a CRF mode (e.g. mpeg4): bits per output pixel and frame."""


class VideoError(Exception):
    """A video that cannot be read or written (the message names the file)."""


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("video needs PyAV: pip install 'camixer_fast[video]'") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a video extension (:data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_video_encoder(name: str) -> bool:
    """Whether PyAV's FFmpeg has a video encoder called ``name``."""
    av = _av()
    try:
        return av.Codec(name, "w").type == "video"
    except Exception:  # noqa: BLE001 - unknown, or a decoder only
        return False


def default_codec(suffix: str) -> str:
    """VP9 for .webm, mpeg4 for .avi, else libx264 (mpeg4 without it)."""
    suffix = suffix.lower()
    if suffix == ".webm":
        return "libvpx-vp9"
    if suffix == ".avi":
        return "mpeg4"
    return "libx264" if is_video_encoder("libx264") else "mpeg4"


def check_codec(codec: str | None, crf: int | None, suffix: str) -> str:
    """The encoder for ``suffix``; VideoError for an unknown one or a ``crf`` it does not take."""
    name = codec or default_codec(suffix)
    if not is_video_encoder(name):
        examples = [n for n in ("libx264", "libvpx-vp9", "mpeg4", "ffv1") if is_video_encoder(n)]
        raise VideoError(f"unknown video encoder {name!r} (this FFmpeg has e.g. "
                         f"{', '.join(examples)})")
    if crf is not None and name not in CRF_CODECS:
        raise VideoError(f"--crf applies to {', '.join(sorted(CRF_CODECS))}, not {name}")
    return name


@dataclass
class VideoInfo:
    """What :func:`probe` finds in a video file."""

    frames: int
    """Frames the container announces (0 when it does not say)."""
    rate: Fraction | None
    width: int
    height: int
    others: list[str] = field(default_factory=list)
    """Audio and subtitle streams, as "audio aac" etc."""


def probe(path: str | os.PathLike) -> VideoInfo:
    """Describe the first video stream of ``path``; VideoError if unreadable or none."""
    av = _av()
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise VideoError(f"{path}: has no video stream ({', '.join(kinds)})")
            stream = container.streams.video[0]
            frames = stream.frames or 0
            if not frames and stream.duration and stream.average_rate:
                frames = int(round(float(stream.duration * stream.time_base
                                         * stream.average_rate)))
            others = [f"{s.type} {s.codec_context.name}" for s in container.streams
                      if s.type in ("audio", "subtitle")]
            return VideoInfo(frames, stream.average_rate or stream.guessed_rate,
                             stream.codec_context.width, stream.codec_context.height, others)
    except VideoError:
        raise
    except Exception as err:  # noqa: BLE001 - PyAV raises FFmpegError kinds, OSError, ...
        raise VideoError(f"{path}: cannot read video: {err}") from None


@dataclass
class VideoResult:
    """What :func:`upscale_video` did."""

    frames: int = 0
    pixels: int = 0
    notes: list[str] = field(default_factory=list)


def _frame_prepare(item: object) -> Prepared | None:
    """A decoded frame -> the network's input (its RGB array); anything else passes through."""
    av = _av()
    if not isinstance(item, av.VideoFrame):
        return None
    rgb = item.to_ndarray(format="rgb24")
    job = prepare(rgb)
    pts, time_base = item.pts, item.time_base

    def finish(sr: Tensor) -> tuple[np.ndarray, int | None, Fraction | None]:
        return job.finish(sr), pts, time_base

    return Prepared(job.colour, finish)


def _demux(container, video, others, src: Path) -> object:
    """Decoded frames of ``video`` and the packets of ``others``, in file order; VideoError
    when the file cannot be decoded, or ends before the frames its index declares."""
    decoded = 0
    try:
        for packet in container.demux(video, *others):
            if packet.stream.index == video.index:
                for frame in packet.decode():
                    decoded += 1
                    yield frame
            elif packet.dts is not None:
                yield packet
    except Exception as err:  # noqa: BLE001 - PyAV raises FFmpegError kinds
        raise VideoError(f"{src}: cannot decode frame {decoded + 1}: {err}") from None
    if decoded < (video.frames or 0):
        raise VideoError(f"{src}: the video ends after {decoded} of its {video.frames} frames "
                         "(cut off or damaged)")


def _write_png_atomic(pixels: np.ndarray, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def upscale_video(src: str | os.PathLike, dst: str | os.PathLike, engine: Engine, *,
                  codec: str | None = None, crf: int | None = None, frames_dir: bool = False,
                  on_frame: Callable[[int], None] | None = None) -> VideoResult:
    """Super-resolve the first video stream of ``src`` into ``dst`` (a folder of PNG frames
    when ``frames_dir``) with ``codec`` (default :func:`default_codec`) and ``crf``; streams
    the output cannot hold are dropped with a note. ``on_frame(pixels)`` after each frame.

    Raises VideoError (naming the file) for an unreadable, cut-off or corrupt input, one
    without video, or an encoding failure; nothing is left at ``dst`` then, nor on
    KeyboardInterrupt (PNG frames written before an error stay).
    """
    av = _av()
    src, dst = Path(src), Path(dst)
    result = VideoResult()
    probe(src)
    try:
        container = av.open(os.fspath(src))
    except Exception as err:  # noqa: BLE001
        raise VideoError(f"{src}: cannot read video: {err}") from None
    with container:
        video = container.streams.video[0]
        video.thread_type = "AUTO"
        others = [s for s in container.streams if s.type in ("audio", "subtitle")]
        if frames_dir:
            dst.mkdir(parents=True, exist_ok=True)
            _frames_to_pngs(container, video, engine, dst, result, on_frame, src)
            return result
        name = check_codec(codec, crf, dst.suffix)
        with atomic_path(dst, suffix=f".part{dst.suffix}") as tmp:
            _encode(container, video, others, engine, tmp, name, crf, result, on_frame, src,
                    dst)
    return result


def _frames_to_pngs(container, video, engine: Engine, folder: Path, result: VideoResult,
                    on_frame: Callable[[int], None] | None, src: Path) -> None:
    def sink(item: tuple, finished: tuple) -> None:
        _write_png_atomic(finished[0], folder / f"{item[0]:06d}.png")

    frames = enumerate(_demux(container, video, [], src), start=1)
    for outcome in Pipeline(frames, lambda item: _frame_prepare(item[1]), engine, sink=sink):
        _check(outcome, src)
        result.notes.extend(outcome.notes)
        result.frames += 1
        result.pixels += outcome.pixels
        if on_frame is not None:
            on_frame(outcome.pixels)


def _check(outcome, src: Path) -> None:
    if outcome.error is None:
        return
    if isinstance(outcome.error, KeyboardInterrupt):
        raise outcome.error
    raise VideoError(f"{src}: frame {outcome.index + 1}: {outcome.error}") from outcome.error


def _encode(container, video, others, engine: Engine, tmp: Path, codec: str, crf: int | None,
            result: VideoResult, on_frame: Callable[[int], None] | None, src: Path,
            dst: Path) -> None:
    av = _av()
    rate = video.average_rate or video.guessed_rate or Fraction(25)
    width = video.codec_context.width * engine.scale
    height = video.codec_context.height * engine.scale
    try:
        output = av.open(os.fspath(tmp), "w", format=VIDEO_EXTENSIONS[dst.suffix.lower()])
    except Exception as err:  # noqa: BLE001
        raise VideoError(f"{dst}: cannot write video: {err}") from None
    with output:
        stream = output.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec in CRF_CODECS:
            stream.options = {"crf": str(CRF_CODECS[codec] if crf is None else crf)}
            if codec == "libvpx-vp9":
                stream.options["b"] = "0"
        else:
            stream.bit_rate = int(BITS_PER_PIXEL * width * height * float(rate))
        copies = {}
        for other in others:
            try:
                copies[other.index] = output.add_stream_from_template(other)
            except Exception as err:  # noqa: BLE001 - the container cannot hold it
                result.notes.append(f"{other.type} stream {other.index} "
                                    f"({other.codec_context.name}) dropped: {err}")
        kept = [s for s in others if s.index in copies]
        for outcome in Pipeline(_demux(container, video, kept, src), _frame_prepare, engine):
            _check(outcome, src)
            if outcome.passed:
                packet = outcome.item
                packet.stream = copies[packet.stream.index]
                output.mux(packet)
                continue
            pixels, pts, time_base = outcome.value
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            output.mux(stream.encode(frame))
            result.notes.extend(outcome.notes)
            result.frames += 1
            result.pixels += outcome.pixels
            if on_frame is not None:
                on_frame(outcome.pixels)
        output.mux(stream.encode(None))
    if result.frames == 0:
        raise VideoError(f"{src}: no frame could be decoded")
