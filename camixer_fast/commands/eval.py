"""``camixer-fast eval --hr-dir DIR``: PSNR / SSIM of a model on a benchmark folder.

Exit status: 0 when every image was evaluated, 1 when an image or the weights could not be
read, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from camixer_fast.backends import BACKENDS
from camixer_fast.cli import gamma_type
from camixer_fast.evaluation.evaluate import GammaScore, ImageScore, evaluate
from camixer_fast.models.loading import CheckpointError, load_model


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "eval", help="PSNR / SSIM on a folder of HR images",
        description="Evaluate a model on HR images: LR made by MATLAB-compatible bicubic "
                    "downscaling (or read from --lr-dir), SR clamped and rounded to uint8, "
                    "PSNR and SSIM on the Y channel with a border of `scale` pixels. Reports "
                    "the means per γ and a per-image table with the fraction of windows that "
                    "went through attention (K/N, mean over blocks) and the time.",
        epilog="Exit status: 0 done, 1 unreadable image or weights, 2 bad arguments.")
    parser.add_argument("--weights", default="CAMixerSR-S", metavar="NAME_OR_PATH",
                        help="registered weights name or checkpoint path (default CAMixerSR-S)")
    parser.add_argument("--hr-dir", required=True, metavar="DIR", help="folder of HR images")
    parser.add_argument("--lr-dir", default=None, metavar="DIR",
                        help="use these LR files (<name>x<scale>.png or <name>.png) instead of "
                             "making LR from HR")
    parser.add_argument("--scale", type=int, default=None,
                        help="upscale factor; must be the model's (default: the model's)")
    parser.add_argument("--gamma", type=gamma_type, nargs="+", default=[1.0, 0.5, 0.25],
                        metavar="G", help="attention ratios to evaluate (default 1 0.5 0.25)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="backend of the mixers' hot operations (default auto)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(func=run)
    return parser


def _image_line(score: ImageScore) -> str:
    size = f"{score.lr_size[0]}x{score.lr_size[1]}"
    return (f"  {score.name:<16} {size:>9} {score.psnr:9.3f} {score.ssim:8.4f} "
            f"{score.k_fraction:7.3f} {score.seconds:8.3f}")


def print_table(result: GammaScore, scale: int) -> None:
    print(f"γ = {result.gamma:g} (×{scale})")
    print(f"  {'image':<16} {'LR':>9} {'PSNR(Y)':>9} {'SSIM(Y)':>8} {'K/N':>7} {'time(s)':>8}")
    for score in result.images:
        print(_image_line(score))
    mean_seconds = result.seconds / max(len(result.images), 1)
    print(f"  {'mean':<16} {'':>9} {result.mean_psnr:9.3f} {result.mean_ssim:8.4f} "
          f"{result.mean_k_fraction:7.3f} {mean_seconds:8.3f}")
    print(f"  {'total':<16} {'':>9} {'':>9} {'':>8} {'':>7} {result.seconds:8.3f}")


def run(args: argparse.Namespace) -> int:
    """Evaluate; print a table per γ and a summary (or JSON with ``--json``)."""
    try:
        model = load_model(args.weights, gamma=args.gamma[0], backend=args.backend,
                           device=args.device)
    except (CheckpointError, FileNotFoundError, OSError) as err:
        print(f"camixer-fast eval: {err}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:
        print(f"camixer-fast eval: {err}", file=sys.stderr)
        return 2
    if args.scale is not None and args.scale != model.scale:
        print(f"camixer-fast eval: --scale {args.scale} but the model is ×{model.scale}",
              file=sys.stderr)
        return 2
    try:
        results = evaluate(model, args.hr_dir, args.gamma, lr_dir=args.lr_dir)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"camixer-fast eval: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"weights": str(args.weights), "scale": model.scale,
                          "backend": model.backend, "border": model.scale,
                          "lr": "files" if args.lr_dir else "bicubic",
                          "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    for result in results:
        print_table(result, model.scale)
        print()
    print("summary: " + ", ".join(f"γ={r.gamma:g}: {r.mean_psnr:.3f} dB / {r.mean_ssim:.4f}"
                                  for r in results))
    return 0
