"""``camixer-fast upscale INPUT... -o OUT``: super-resolve image files, folders and videos.

Images go through the pipelined runner (:mod:`camixer_fast.inference.pipeline`): decoded ahead of the
model, batched by size, encoded and written behind it. Videos go through
:mod:`camixer_fast.io.video`. Under ``torchrun`` each process takes its share of the sorted inputs
(:mod:`camixer_fast.train.distributed`) and rank 0 prints the summary.

Exit status: 0 when every input was written (or skipped because its output exists), 1 when
some input could not be read, upscaled or written (each reported on stderr by name; the others
are still processed) or no input was found, 2 for bad arguments (unknown options, missing
inputs, γ outside [0, 1], unknown or unreadable weights, an output that would overwrite an
input, an output folder that cannot be written), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from camixer_fast.cli import UsageError, check_writable, gamma_type
from camixer_fast.io.image import EXTENSIONS, LoadedImage, read_image, write_image
from camixer_fast.models.loading import CheckpointError
from camixer_fast.inference.pipeline import Engine, Pipeline
from camixer_fast.inference.api import Prepared, prepare, resolve_device
from camixer_fast.io.video import VIDEO_EXTENSIONS, VideoError, check_codec, is_video, probe
from camixer_fast.train import distributed

PROG = "camixer-fast upscale"


def _say(text: str) -> None:
    """A line on stderr above the progress bars."""
    tqdm.write(text, file=sys.stderr)


def _bar(total: int | None, unit: str, **options) -> tqdm:
    """A progress bar on stderr, drawn only on a terminal."""
    return tqdm(total=total or None, unit=unit, file=sys.stderr, disable=None, leave=False,
                dynamic_ncols=True, **options)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _tile(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}") \
            from None


def _crf(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 0..63, got {text!r}") from None
    if not 0 <= value <= 63:
        raise argparse.ArgumentTypeError(f"must be an integer 0..63, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``upscale`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "upscale", help="super-resolve images and videos (×4 with CAMixerSR-S)",
        description="Super-resolve images and videos. INPUT: image files ("
                    + ", ".join(sorted(EXTENSIONS)) + "), video files ("
                    + ", ".join(sorted(VIDEO_EXTENSIONS)) + ") and/or folders of them "
                    "(scanned non-recursively). Each result is written under OUT with the "
                    "input's name; OUT is a file only for a single input file. 16-bit PNGs "
                    "stay 16-bit, alpha and grey are kept; videos keep their frame rate, audio "
                    "and subtitles. Under torchrun, each process takes its share of the inputs.",
        epilog="Exit status: 0 all done, 1 some input failed or none was found (reported on "
               "stderr), 2 bad arguments, 130 interrupted.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image/video files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (created if missing), or file for one input file")
    parser.add_argument("--gamma", type=gamma_type, default=0.5, metavar="G",
                        help="attention ratio in [0, 1] (default 0.5)")
    parser.add_argument("--weights", default="CAMixerSR-S", metavar="NAME_OR_PATH",
                        help="registered weights name or checkpoint path (default CAMixerSR-S); "
                             "CAMixerSR-ODISR-x2/-x4 (CAMixerOSR) take each input as a whole "
                             "360° equirectangular panorama")
    parser.add_argument("--tile", type=_tile, default=None, metavar="T|auto",
                        help="run in overlapping T×T tiles of the input (spec §5) to bound "
                             "memory; 'auto' tiles only what does not fit in memory")
    parser.add_argument("--no-wrap", action="store_true",
                        help="ODI-SR (CAMixerOSR) weights: do not wrap the panorama around "
                             "horizontally (default: its left and right edges are run as "
                             "neighbours, so the 0°/360° seam matches the interior)")
    parser.add_argument("--device", default=None, metavar="D",
                        help="torch device (default: cuda if available, else cpu; cuda:LOCAL_RANK "
                             "under torchrun)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="network precision (default fp32)")
    parser.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                        help="images (or tiles) of one size per model call (default: sized "
                             "from memory, at most 8)")
    parser.add_argument("--workers", type=_positive, default=None, metavar="W",
                        help="images computed at once, each by its own copy of the network "
                             "(default 1); e.g. --workers 8 --threads 1 for many small images "
                             "on 8 free cores")
    parser.add_argument("--threads", type=_positive, default=None, metavar="T",
                        help="CPU threads per image (default: torch's threads / workers); "
                             "outputs depend on it by up to one 8-bit level on a few pixels, not "
                             "on the batch size or the workers")
    parser.add_argument("--scale-suffix", action="store_true",
                        help="name outputs <stem>_x<scale><ext>")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: skip them)")
    video = parser.add_argument_group("video")
    video.add_argument("--codec", default=None, metavar="NAME",
                       help="video encoder (default: libx264; libvpx-vp9 for .webm, mpeg4 for "
                            ".avi)")
    video.add_argument("--crf", type=_crf, default=None, metavar="Q",
                       help="constant-quality level of x264/x265/VP9/AV1 (default 18 for x264; "
                            "lower is better)")
    video.add_argument("--frames-dir", action="store_true",
                       help="write each video's frames as PNG files (000001.png, ...) into a "
                            "folder (OUT for a single video, else OUT/<stem>) instead of a video")
    parser.set_defaults(func=run)
    return parser


def _collect(inputs: list[str], report: list[str]) -> tuple[list[Path], int]:
    """Image and video files named by ``inputs`` (folders scanned non-recursively, sorted),
    without duplicates; unreadable folders are appended to ``report``. Returns (files,
    explicit files)."""
    known = {**EXTENSIONS, **VIDEO_EXTENSIONS}
    files: list[Path] = []
    seen: set[Path] = set()
    explicit = 0
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            try:
                entries = sorted(p for p in path.iterdir()
                                 if p.suffix.lower() in known and p.is_file())
            except OSError as err:
                report.append(f"{text}: cannot read folder: {err.strerror or err}")
                continue
        elif path.is_file():
            if path.suffix.lower() not in known:
                raise UsageError(f"{text}: unsupported extension (supported: "
                                 f"{', '.join(sorted(known))})")
            entries = [path]
            explicit += 1
        elif path.exists():
            raise UsageError(f"{text}: not a file or folder")
        else:
            raise UsageError(f"{text}: no such file or folder")
        for entry in entries:
            key = entry.resolve()
            if key not in seen:
                seen.add(key)
                files.append(entry)
    return files, explicit


def _plan(files: list[Path], explicit: int, args: argparse.Namespace,
          scale: int) -> tuple[list[tuple[Path, Path]], Path]:
    """(input, output) pairs and the folder they are written to; raises UsageError if OUT is
    unusable, an output would overwrite an input, or two inputs would write the same output.
    With ``--frames-dir`` a video's output is a folder (OUT for one video, else OUT/<stem>)."""
    out = Path(args.output)
    frames = args.frames_dir
    mode = _output_mode(files, explicit, args)
    if mode == "frames":
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: is a file, but --frames-dir needs a folder")
        pairs, folder = [(files[0], out)], out
    elif mode == "file":
        kinds = VIDEO_EXTENSIONS if is_video(files[0]) else EXTENSIONS
        if out.suffix.lower() not in kinds:
            raise UsageError(f"{out}: unsupported output extension for "
                             f"{'a video' if is_video(files[0]) else 'an image'} (supported: "
                             f"{', '.join(sorted(kinds))})")
        pairs, folder = [(files[0], out)], out.parent
    else:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: is a file, but a folder is needed for "
                             f"{'several inputs' if len(args.inputs) > 1 else 'a folder input'}")
        suffix = f"_x{scale}" if args.scale_suffix else ""
        pairs = [(f, out / (f"{f.stem}{suffix}" if frames and is_video(f)
                            else f"{f.stem}{suffix}{f.suffix}")) for f in files]
        folder = out
    by_path = {f.resolve(): f for f in files}
    by_inode = {(st.st_dev, st.st_ino): f for f in files for st in [f.stat()]}
    targets: dict[Path, Path] = {}
    for src, dst in pairs:
        key = dst.resolve()
        clash = by_path.get(key)
        if clash is None and dst.exists():
            st = dst.stat()
            clash = by_inode.get((st.st_dev, st.st_ino))
        if clash is not None:
            raise UsageError(f"{dst}: would overwrite the input {clash}; choose another output "
                             "(or use --scale-suffix)")
        if key in targets:
            raise UsageError(f"{targets[key]} and {src} would both be written to {dst}")
        targets[key] = src
    return pairs, folder


def _output_mode(files: list[Path], explicit: int, args: argparse.Namespace) -> str:
    """"file" when OUT is the one output file, "frames" when it is the one video's frames
    folder, else "folder" (outputs inside OUT)."""
    out = Path(args.output)
    if len(args.inputs) == 1 and explicit == 1:
        if args.frames_dir and is_video(files[0]):
            return "frames"
        if not out.is_dir() and (out.is_file() or (not out.exists() and out.suffix)):
            return "file"
    return "folder"


def _naming(err: OSError, dest: Path) -> OSError:
    """``err`` restated about ``dest`` (not the temporary file it happened on)."""
    text = f"cannot write {dest}: {err.strerror or err}"
    return OSError(err.errno, text) if err.errno is not None else OSError(text)


def _write_atomic(image: LoadedImage, dest: Path, umask: int) -> str | None:
    """Write ``image`` to ``dest`` through a temporary file in the same folder and os.replace,
    so that ``dest`` is never left half-written. Returns :func:`write_image`'s note; an OSError
    names ``dest`` (not the temporary file)."""
    fmt = EXTENSIONS[dest.suffix.lower()]
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as err:
        raise _naming(err, dest) from None
    try:
        with os.fdopen(fd, "wb") as f:
            note = write_image(image, f, fmt)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, dest) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return note


def _error(text: str, status: int = 2) -> int:
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return status


def _prepare_file(pair: tuple[Path, Path]) -> Prepared:
    image = read_image(pair[0])
    job = prepare(image.pixels)
    return Prepared(job.colour, lambda sr: dataclasses.replace(image, pixels=job.finish(sr)))


@dataclasses.dataclass
class Tally:
    """What one process did (gathered on rank 0 under torchrun)."""

    written: int = 0
    skipped: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    items: int = 0
    landed: int = 0
    """Files moved into place (counted as they land, also while an interrupt stops the run)."""
    pixels: int = 0
    seconds: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


def _exists(dst: Path, frames: bool) -> bool:
    if frames and dst.is_dir():
        return any(dst.iterdir())
    return dst.exists()


def _run_images(pairs: list[tuple[Path, Path]], engine: Engine, tally: Tally,
                bar: tqdm, prefix: str, umask: int) -> None:
    def sink(pair: tuple[Path, Path], image: LoadedImage) -> str | None:
        note = _write_atomic(image, pair[1], umask)
        with lock:
            tally.landed += 1
        return note

    lock = threading.Lock()

    def tiles(done: int, total: int) -> None:
        if total > 1:
            bar.set_postfix_str(f"tile {done}/{total}")

    for outcome in Pipeline(pairs, _prepare_file, engine, sink=sink, ordered=False,
                            progress=tiles):
        src, dst = outcome.item
        for note in outcome.notes:
            _say(f"{PROG}: {prefix}{src}: {note}")
        if isinstance(outcome.error, KeyboardInterrupt):
            raise outcome.error
        if outcome.error is not None:
            what = "cannot read image" if outcome.stage == "prepare" else "failed"
            tally.failures.append(f"{prefix}{src}: {what}: {outcome.error}")
            _say(f"{PROG}: {tally.failures[-1]}")
        else:
            if outcome.value:
                _say(f"{PROG}: {prefix}{dst}: {outcome.value}")
            tally.written += 1
            tally.pixels += outcome.pixels
        tally.items += 1
        seconds = max(time.perf_counter() - tally.start, 1e-9)
        bar.set_postfix_str(f"{tally.pixels / 1e6 / seconds:.2f} MP/s {src.name}",
                            refresh=False)
        bar.update()


def _run_video(src: Path, dst: Path, engine: Engine, args: argparse.Namespace, tally: Tally,
               prefix: str) -> None:
    from camixer_fast.io.video import upscale_video

    frames = _bar(probe(src).frames, "frame", desc=src.name)
    start, done = time.perf_counter(), [0, 0]

    def on_frame(pixels: int) -> None:
        done[0] += 1
        done[1] += pixels
        frames.update()

    try:
        result = upscale_video(src, dst, engine, codec=args.codec, crf=args.crf,
                               frames_dir=args.frames_dir, on_frame=on_frame)
    finally:
        frames.close()
    for note in result.notes:
        _say(f"{PROG}: {prefix}{src}: {note}")
    tally.written += 1
    tally.landed += 1
    tally.pixels += result.pixels
    seconds = max(time.perf_counter() - start, 1e-9)
    _say(f"{PROG}: {prefix}{dst}: {done[0]} frame{'s' if done[0] != 1 else ''} in "
         f"{seconds:.1f} s ({done[0] / seconds:.2f} frames/s, {done[1] / 1e6 / seconds:.2f} MP/s)")


def run(args: argparse.Namespace) -> int:
    """Run ``camixer-fast upscale`` with parsed ``args``; returns the exit status."""
    rank = distributed.rank_from_env()
    prefix = rank.prefix
    found_failures: list[str] = []
    try:
        files, explicit = _collect(args.inputs, found_failures)
        if not files:
            for text in found_failures:
                print(f"{PROG}: {text}", file=sys.stderr)
            return _error(f"no images found in {' '.join(args.inputs)} (nothing was written)",
                          status=1)
        videos = [f for f in files if is_video(f)]
        if videos:
            try:
                check_codec(args.codec, args.crf, Path(args.output).suffix
                            if is_video(args.output) else ".mp4")
            except VideoError as err:
                raise UsageError(str(err)) from None
        elif args.frames_dir or args.codec or args.crf is not None:
            raise UsageError("--codec, --crf and --frames-dir apply to video inputs only")
        mode = _output_mode(files, explicit, args)
        out = Path(args.output)
        first = files[0]
        check_writable(out.parent if mode == "file" else out,
                        out if mode != "folder" else out / first.name)
        device = distributed.device_for(rank, args.device)
        try:
            resolved = resolve_device(device)
        except (RuntimeError, ValueError) as err:
            raise UsageError(f"--device {args.device}: {err}") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available")
        try:
            engine = Engine(args.gamma, weights=args.weights, tile=args.tile, device=device,
                            dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                            threads=args.threads, wrap=False if args.no_wrap else None)
        except (CheckpointError, FileNotFoundError) as err:
            raise UsageError(f"--weights {args.weights}: {err}") from None
        except (RuntimeError, ValueError) as err:
            raise UsageError(f"--device {args.device}: {err}" if args.device
                             else str(err)) from None
        pairs, folder = _plan(files, explicit, args, engine.scale)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"{folder}: cannot create the output folder: "
                             f"{err.strerror or err}") from None
    except UsageError as err:
        return _error(str(err))
    if rank.is_main:
        for text in found_failures:
            print(f"{PROG}: {text}", file=sys.stderr)

    distributed.init(rank)
    umask = os.umask(0)
    os.umask(umask)
    tally = Tally(failures=list(found_failures) if rank.is_main else [])
    mine = distributed.shard(pairs, rank)
    bar = _bar(len(mine), "image")
    todo: list[tuple[Path, Path]] = []
    for src, dst in mine:
        if _exists(dst, args.frames_dir and is_video(src)) and not args.overwrite:
            _say(f"{PROG}: {prefix}skipped {src}: {dst} exists (use --overwrite)")
            tally.skipped += 1
            tally.items += 1
            bar.update()
        else:
            todo.append((src, dst))
    try:
        images = [pair for pair in todo if not is_video(pair[0])]
        if images:
            _run_images(images, engine, tally, bar, prefix, umask)
        for src, dst in todo:
            if not is_video(src):
                continue
            try:
                _run_video(src, dst, engine, args, tally, prefix)
            except VideoError as err:
                tally.failures.append(f"{prefix}{err}")
                _say(f"{PROG}: {tally.failures[-1]}")
            tally.items += 1
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        print(f"{PROG}: {prefix}interrupted; {tally.landed} written", file=sys.stderr)
        return 130
    bar.close()
    tally.seconds = time.perf_counter() - tally.start
    tallies = distributed.all_gather(tally, rank)
    distributed.close()
    written = sum(t.written for t in tallies)
    skipped = sum(t.skipped for t in tallies)
    failures = [text for t in tallies for text in t.failures]
    if rank.is_main:
        if rank.world > 1:
            for text in failures:
                if not text.startswith(prefix):
                    print(f"{PROG}: failed on {text}", file=sys.stderr)
        if len(pairs) > 1 or skipped or failures:
            seconds = max(t.seconds for t in tallies)
            pixels = sum(t.pixels for t in tallies)
            rates = [f"{pixels / 1e6 / max(seconds, 1e-9):.2f} MP/s"]
            if not any(is_video(src) for src, _ in pairs):
                rates.insert(0, f"{written / max(seconds, 1e-9):.2f} images/s")
            if rank.world > 1:
                rates.append(f"{rank.world} processes")
            rate = f" in {seconds:.1f} s ({', '.join(rates)})"
            print(f"{PROG}: {written} written, {skipped} skipped, {len(failures)} failed"
                  + (rate if written else ""), file=sys.stderr)
        elif written and not is_video(pairs[0][0]):
            print(f"{PROG}: 1 image upscaled -> {pairs[0][1]} (×{engine.scale}, "
                  f"{max(t.seconds for t in tallies):.1f} s)", file=sys.stderr)
    return 1 if failures else 0
