"""``camixer-fast convert IN OUT``: official ``.pth`` <-> safetensors.

Exit status: 0 written, 1 unreadable or non-CAMixerSR/OSR input, 2 bad arguments (including an
existing OUT without ``--overwrite`` and an OUT that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from camixer_fast.cli import check_writable
from camixer_fast.models.convert import DTYPES, KEYS, convert_checkpoint
from camixer_fast.models.loading import CheckpointError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "convert", help="convert weights between .pth and .safetensors",
        description="Write a CAMixerSR (or CAMixerOSR, ODI-SR) checkpoint as safetensors (one "
                    "state dict, with the architecture, config, parameter count and source in "
                    "its metadata) or as a .pth in the official layout {'params', "
                    "'params_ema'}. OUT's suffix picks the format. The weights are checked to "
                    "build their network first; OUT is written whole or not at all.",
        epilog="Exit status: 0 written, 1 unreadable or non-CAMixerSR/OSR input, 2 bad "
               "arguments.")
    parser.add_argument("input", metavar="IN",
                        help="registered weights name, .pth or .safetensors file")
    parser.add_argument("output", metavar="OUT", help="output file: .safetensors, .pth or .pt")
    parser.add_argument("--key", choices=KEYS, default=None,
                        help="weights of an official .pth to take (default: params_ema if "
                             "present, else params)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: keep their dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert; print the written file's metadata."""
    dtype = DTYPES[args.dtype] if args.dtype else None
    check_writable(Path(args.output).parent, args.output)
    try:
        metadata = convert_checkpoint(args.input, args.output, key=args.key, dtype=dtype,
                                      overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"camixer-fast convert: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError) as err:
        print(f"camixer-fast convert: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"camixer-fast convert: {err}", file=sys.stderr)
        return 1
    config = json.loads(metadata["camixer_fast.config"])
    print(f"wrote {args.output}: {metadata['camixer_fast.architecture']} "
          f"C={config['n_feats']}, ×{config['scale']}, blocks "
          f"{tuple(config['blocks_per_group'])}, window {config['window_size']}, "
          f"{int(metadata['camixer_fast.parameters']):,} parameters "
          f"({metadata['camixer_fast.dtype']}, from {metadata['camixer_fast.source']} "
          f"{metadata['camixer_fast.source_key']})")
    return 0
