"""``camixer-fast upscale INPUT... -o OUT``: super-resolve image files.

Exit status: 0 when every image was written (or skipped because its output exists), 1 when
some image could not be read, upscaled or written (each reported on stderr by name; the others
are still processed), 2 for bad arguments (unknown options, missing inputs, γ outside [0, 1],
unknown weights, an output that would overwrite an input).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import torch

from camixer_fast.cli import gamma_type
from camixer_fast.imageio import EXTENSIONS, LoadedImage, read_image, write_image
from camixer_fast.loading import CheckpointError
from camixer_fast.upscale import DTYPES, cached_model, resolve_device, upscale

PROG = "camixer-fast upscale"


class UsageError(Exception):
    """A bad argument found after parsing (exit status 2)."""


def _tile(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``upscale`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "upscale", help="super-resolve image files (×4 with CAMixerSR-S)",
        description="Super-resolve images. INPUT: image files and/or folders (scanned "
                    "non-recursively for " + ", ".join(sorted(EXTENSIONS)) + "). Each result is "
                    "written under OUT with the input's name; OUT is a file only for a single "
                    "input file. 16-bit PNGs stay 16-bit, alpha and grey are kept.",
        epilog="Exit status: 0 all done, 1 some image failed (reported on stderr), "
               "2 bad arguments.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (created if missing), or file for one input file")
    parser.add_argument("--gamma", type=gamma_type, default=0.5, metavar="G",
                        help="attention ratio in [0, 1] (default 0.5)")
    parser.add_argument("--weights", default="CAMixerSR-S", metavar="NAME_OR_PATH",
                        help="registered weights name or checkpoint path (default CAMixerSR-S)")
    parser.add_argument("--tile", type=_tile, default=None, metavar="T|auto",
                        help="run in overlapping T×T tiles of the input (spec §5) to bound "
                             "memory; 'auto' tiles only what does not fit in memory")
    parser.add_argument("--device", default=None, metavar="D",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="network precision (default fp32)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the network as CUDA graphs, one per input or tile size "
                             "(CUDA and the Triton backend only; fastest with --tile or "
                             "images of one size)")
    parser.add_argument("--scale-suffix", action="store_true",
                        help="name outputs <stem>_x<scale><ext>")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: skip them)")
    parser.set_defaults(func=run)
    return parser


class Progress:
    """A one-line progress bar on a terminal (redrawn with \\r); silent on anything else.

    Messages go through :meth:`message`, which clears the bar first when it is shown.
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.label, self.detail = 0, "", ""

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        filled = 24 * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} "
                f"{self.label}{self.detail}")
        self.stream.write("\r" + line[:width - 1] + "\x1b[K")
        self.stream.flush()

    def start(self, label: str) -> None:
        """Begin the next image."""
        self.label, self.detail = label, ""
        self._draw()

    def tiles(self, done: int, total: int) -> None:
        """Tile progress inside the current image (shown when there is more than one)."""
        if total > 1:
            self.detail = f" (tile {done}/{total})"
            self._draw()

    def advance(self) -> None:
        """The current image is finished."""
        self.done += 1
        self.detail = ""
        self._draw()

    def message(self, text: str) -> None:
        """Print a line of text on the stream, above the bar."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream)
        self._draw()

    def close(self) -> None:
        """Remove the bar."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _collect(inputs: list[str], report: list[str]) -> tuple[list[Path], int]:
    """Image files named by ``inputs`` (folders scanned non-recursively, sorted), without
    duplicates; unreadable folders are appended to ``report``. Returns (files, explicit files)."""
    files: list[Path] = []
    seen: set[Path] = set()
    explicit = 0
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            try:
                entries = sorted(p for p in path.iterdir()
                                 if p.suffix.lower() in EXTENSIONS and p.is_file())
            except OSError as err:
                report.append(f"{text}: cannot read folder: {err.strerror or err}")
                continue
        elif path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise UsageError(f"{text}: unsupported extension (supported: "
                                 f"{', '.join(sorted(EXTENSIONS))})")
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
    unusable, an output would overwrite an input, or two inputs would write the same output."""
    out = Path(args.output)
    single_file = (len(args.inputs) == 1 and explicit == 1 and not out.is_dir()
                   and (out.is_file() or (not out.exists() and out.suffix != "")))
    if single_file:
        if out.suffix.lower() not in EXTENSIONS:
            raise UsageError(f"{out}: unsupported output extension (supported: "
                             f"{', '.join(sorted(EXTENSIONS))})")
        pairs, folder = [(files[0], out)], out.parent
    else:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: is a file, but a folder is needed for "
                             f"{'several inputs' if len(args.inputs) > 1 else 'a folder input'}")
        suffix = f"_x{scale}" if args.scale_suffix else ""
        pairs, folder = [(f, out / f"{f.stem}{suffix}{f.suffix}") for f in files], out
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


def _write_atomic(image: LoadedImage, dest: Path, umask: int) -> str | None:
    """Write ``image`` to ``dest`` through a temporary file in the same folder and os.replace,
    so that ``dest`` is never left half-written. Returns :func:`write_image`'s note."""
    fmt = EXTENSIONS[dest.suffix.lower()]
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            note = write_image(image, f, fmt)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return note


def _error(text: str) -> int:
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run ``camixer-fast upscale`` with parsed ``args``; returns the exit status."""
    failures: list[str] = []
    try:
        files, explicit = _collect(args.inputs, failures)
        try:
            device = resolve_device(args.device)
        except (RuntimeError, ValueError) as err:
            raise UsageError(f"--device {args.device}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available")
        if args.cuda_graph and device.type != "cuda":
            raise UsageError(f"--cuda-graph needs a CUDA device, not {device}")
        dtype = DTYPES[args.dtype]
        try:
            model = cached_model(args.weights, device, dtype, "auto").model
        except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as err:
            raise UsageError(f"--weights {args.weights}: {err}") from None
        pairs, folder = _plan(files, explicit, args, model.scale)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"{folder}: cannot create the output folder: {err}") from None
    except UsageError as err:
        return _error(str(err))
    for text in failures:
        print(f"{PROG}: {text}", file=sys.stderr)
    if not pairs and not failures:
        print(f"{PROG}: no images found in {' '.join(args.inputs)}", file=sys.stderr)

    umask = os.umask(0)
    os.umask(umask)
    progress = Progress(len(pairs))
    written = skipped = 0
    try:
        for src, dst in pairs:
            progress.start(src.name)
            if dst.exists() and not args.overwrite:
                progress.message(f"{PROG}: skipped {src}: {dst} exists (use --overwrite)")
                skipped += 1
                progress.advance()
                continue
            try:
                image = read_image(src)
            except Exception as err:  # Pillow raises many kinds for bad files
                failures.append(f"{src}: cannot read image: {err}")
                progress.message(f"{PROG}: {failures[-1]}")
                progress.advance()
                continue
            try:
                image.pixels = upscale(image.pixels, args.gamma, weights=args.weights,
                                       tile=args.tile, device=device, dtype=dtype,
                                       cuda_graph=args.cuda_graph, progress=progress.tiles)
                note = _write_atomic(image, dst, umask)
            except (OSError, ValueError, TypeError, RuntimeError, MemoryError) as err:
                failures.append(f"{src}: failed: {err}")
                progress.message(f"{PROG}: {failures[-1]}")
                progress.advance()
                continue
            if note:
                progress.message(f"{PROG}: {dst}: {note}")
            written += 1
            progress.advance()
    except KeyboardInterrupt:
        progress.close()
        print(f"{PROG}: interrupted; {written} written", file=sys.stderr)
        return 130
    progress.close()
    if len(pairs) > 1 or skipped or failures:
        print(f"{PROG}: {written} written, {skipped} skipped, {len(failures)} failed",
              file=sys.stderr)
    return 1 if failures else 0
