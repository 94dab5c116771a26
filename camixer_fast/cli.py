"""The ``camixer-fast`` command (also ``python -m camixer_fast``).

Each subcommand lives in ``camixer_fast/commands/<name>.py`` and provides
``register(subparsers) -> argparse.ArgumentParser`` (which sets ``func`` on its parser through
``set_defaults``); ``func(args) -> int`` returns the exit status. Exit status 2 means bad
arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: tuple[str, ...] = ("upscale", "eval", "info", "train", "convert", "export")
"""Subcommand modules under camixer_fast.commands, in the order ``--help`` lists them."""


def gamma_type(text: str) -> float:
    """argparse ``type`` for γ: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from camixer_fast import __version__

    parser = argparse.ArgumentParser(prog="camixer-fast",
                                     description="CAMixerSR super-resolution, fast and exact.")
    parser.add_argument("--version", action="version", version=f"camixer-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
