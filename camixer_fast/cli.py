"""The ``camixer-fast`` command (also ``python -m camixer_fast``).

Each subcommand lives in ``camixer_fast/commands/<name>.py`` and provides
``register(subparsers) -> argparse.ArgumentParser`` (setting ``func(args) -> int``, the exit
status). Exit status 2 means bad arguments, an unwritable output included.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

COMMANDS: tuple[str, ...] = ("upscale", "eval", "info", "train", "convert", "export")


class UsageError(Exception):
    """A bad argument found after parsing, e.g. an output that cannot be written (exit 2)."""


def gamma_type(text: str) -> float:
    """argparse ``type`` for γ: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def check_writable(folder: str | os.PathLike, example: str | os.PathLike) -> None:
    """Raise UsageError, before any work, when ``example`` cannot be written in ``folder``
    (which may not exist yet): its nearest existing ancestor is not a writable folder."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write {example}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder" if probe == folder else f"folder {folder} cannot be created: its parent"
        raise UsageError(f"cannot write {example}: the {what} {probe} is not writable")


@contextlib.contextmanager
def writing(dest: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised inside into a UsageError naming ``dest`` (not a temporary file)."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"cannot write {dest}: {err.strerror or err}") from None


@contextlib.contextmanager
def interrupts(prog: str) -> Iterator[None]:
    """The first Ctrl-C raises KeyboardInterrupt (the work stops cleanly, between tiles); a
    second one exits at once with status 130. Only in the main thread, over Python's default."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def again(signum: int, frame: object) -> None:
        os.write(2, f"\n{prog}: interrupted again, exiting now\n".encode())
        os._exit(130)

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, again)
        os.write(2, f"\n{prog}: interrupted, stopping (Ctrl-C again to exit now)\n".encode())
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def build_parser() -> argparse.ArgumentParser:
    from camixer_fast import __version__

    # no abbreviations: `--scale 3` must not be read as `--scale-suffix`
    parser = argparse.ArgumentParser(prog="camixer-fast", allow_abbrev=False,
                                     description="CAMixerSR super-resolution, fast and exact.")
    parser.add_argument("--version", action="version", version=f"camixer-fast {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    for name in COMMANDS:
        importlib.import_module(f"camixer_fast.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from camixer_fast.backends.memory import keep_freed_memory_for_command

    keep_freed_memory_for_command()     # this process is ours: fewer page faults per forward
    prog = f"camixer-fast {args.command}"
    try:
        with interrupts(prog):
            return int(args.func(args))
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
