"""``camixer-fast eval --hr-dir DIR``: PSNR / SSIM of a model on a benchmark folder; with
``--odi`` (or ``--odi-dir ROOT``, a LAU-style dataset) the ODI-SR protocol of 360° panoramas:
PSNR, SSIM, WS-PSNR and WS-SSIM on RGB without a border, as the paper's ODI-SR table.

Exit status: 0 when every image was evaluated, 1 when an image or the weights could not be
read, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from camixer_fast.backends import BACKENDS
from camixer_fast.cli import gamma_type
from camixer_fast.evaluation.evaluate import (GammaScore, ImageScore, ODIDataset, ODIImageScore,
                                               evaluate, evaluate_odi, find_odi_datasets)
from camixer_fast.models.loading import CheckpointError, load_model
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "eval", help="PSNR / SSIM on a folder of HR images",
        description="Evaluate a model on HR images: LR made by MATLAB-compatible bicubic "
                    "downscaling (or read from --lr-dir), SR clamped and rounded to uint8, "
                    "PSNR and SSIM on the Y channel with a border of `scale` pixels. Reports "
                    "the means per γ and a per-image table with the fraction of windows that "
                    "went through attention (K/N, mean over blocks) and the time.",
        epilog="--odi: panoramas (ERP), the official ODI-SR protocol: whole HR panoramas (sizes "
               "divisible by the scale), LR = HR / scale exactly, PSNR, SSIM, WS-PSNR, WS-SSIM "
               "on RGB with no border, γ 0.5 by default. Exit status: 0 done, 1 unreadable "
               "image or weights or unpaired files, 2 bad arguments.")
    parser.add_argument("--weights", default="CAMixerSR-S", metavar="NAME_OR_PATH",
                        help="registered weights name or checkpoint path (default CAMixerSR-S)")
    parser.add_argument("--hr-dir", default=None, metavar="DIR", help="folder of HR images")
    parser.add_argument("--odi", action="store_true",
                        help="ODI-SR protocol for 360° panoramas (RGB, border 0, + WS metrics)")
    parser.add_argument("--odi-dir", default=None, metavar="ROOT",
                        help="a LAU-style ODI-SR folder instead of --hr-dir (implies --odi): a "
                             "split with HR/ and LR_fisheye/X<scale>/ (or LR_erp, LR, "
                             "LR_bicubic), or a dataset root with odisr/testing and sun_test")
    parser.add_argument("--lr-dir", default=None, metavar="DIR",
                        help="use these LR files (<name>x<scale>.png or <name>.png) instead of "
                             "making LR from HR")
    parser.add_argument("--scale", type=int, default=None,
                        help="upscale factor; must be the model's (default: the model's)")
    parser.add_argument("--gamma", type=gamma_type, nargs="+", default=None, metavar="G",
                        help="attention ratios to evaluate (default 1 0.5 0.25; --odi: 0.5)")
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


def _odi_image_line(score: ODIImageScore) -> str:
    size = f"{score.lr_size[0]}x{score.lr_size[1]}"
    return (f"  {score.name:<16} {size:>9} {score.psnr:8.3f} {score.ssim:7.4f} "
            f"{score.ws_psnr:8.3f} {score.ws_ssim:7.4f} {score.k_fraction:6.3f} "
            f"{score.seconds:8.3f}")


def print_odi_table(dataset: str, result: GammaScore, scale: int) -> None:
    print(f"{dataset}: γ = {result.gamma:g} (×{scale}), RGB, border 0")
    print(f"  {'image':<16} {'LR':>9} {'PSNR':>8} {'SSIM':>7} {'WS-PSNR':>8} {'WS-SSIM':>7} "
          f"{'K/N':>6} {'time(s)':>8}")
    for score in result.images:
        print(_odi_image_line(score))
    print(f"  {'mean':<16} {'':>9} {result.mean('psnr'):8.3f} {result.mean('ssim'):7.4f} "
          f"{result.mean('ws_psnr'):8.3f} {result.mean('ws_ssim'):7.4f} "
          f"{result.mean_k_fraction:6.3f} {result.seconds / len(result.images):8.3f}")


def _fail(message: str, status: int) -> int:
    print(f"camixer-fast eval: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Evaluate; print a table per γ and a summary (or JSON with ``--json``)."""
    odi = args.odi or args.odi_dir is not None
    if (args.hr_dir is None) == (args.odi_dir is None):
        return _fail("give one of --hr-dir and --odi-dir", 2)
    if args.odi_dir is not None and args.lr_dir is not None:
        return _fail("--odi-dir finds the LR folder itself; --lr-dir goes with --hr-dir", 2)
    gammas = args.gamma or ([0.5] if odi else [1.0, 0.5, 0.25])
    try:
        model = load_model(args.weights, gamma=gammas[0], backend=args.backend,
                           device=args.device)
    except (CheckpointError, FileNotFoundError, OSError) as err:
        return _fail(str(err), 1)
    except (ValueError, RuntimeError) as err:
        return _fail(str(err), 2)
    if args.scale is not None and args.scale != model.scale:
        return _fail(f"--scale {args.scale} but the model is ×{model.scale}", 2)
    if odi:
        return _run_odi(args, model, gammas)
    if isinstance(model, CAMixerOSR):
        print("camixer-fast eval: note: an ODI-SR model; --odi gives the ODI-SR protocol "
              "(RGB, border 0, WS-PSNR, WS-SSIM)", file=sys.stderr)
    try:
        results = evaluate(model, args.hr_dir, gammas, lr_dir=args.lr_dir)
    except (FileNotFoundError, OSError, ValueError) as err:
        return _fail(str(err), 1)
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


def _run_odi(args: argparse.Namespace, model: CAMixerSR | CAMixerOSR, gammas: list[float]) -> int:
    try:
        if args.odi_dir is not None:
            datasets = find_odi_datasets(args.odi_dir, model.scale)
        else:
            hr_dir = Path(args.hr_dir)
            name = hr_dir.resolve().parent.name if hr_dir.name == "HR" else hr_dir.name
            datasets = [ODIDataset(name, hr_dir,
                                   None if args.lr_dir is None else Path(args.lr_dir))]
        results = [(d, evaluate_odi(model, d.hr_dir, gammas, lr_dir=d.lr_dir))
                   for d in datasets]
    except (FileNotFoundError, OSError, ValueError) as err:
        return _fail(str(err), 1)
    condition = "whole-panorama cos-latitude" if isinstance(model, CAMixerOSR) else None
    if args.json:
        print(json.dumps({
            "weights": str(args.weights), "model": type(model).__name__, "scale": model.scale,
            "backend": model.backend, "protocol": "odisr", "channels": "RGB", "border": 0,
            "condition": condition,
            "datasets": [{"name": d.name, "hr_dir": str(d.hr_dir),
                          "lr_dir": None if d.lr_dir is None else str(d.lr_dir),
                          "lr": "bicubic" if d.lr_dir is None else "files",
                          "results": [r.to_dict() for r in per_gamma]}
                         for d, per_gamma in results]}, indent=2))
        return 0
    for dataset, per_gamma in results:
        print(f"LR: {dataset.lr_dir or 'MATLAB bicubic of HR'}")
        for result in per_gamma:
            print_odi_table(dataset.name, result, model.scale)
            print()
    print(f"summary ({type(model).__name__} ×{model.scale}, RGB, border 0):")
    print(f"  {'dataset':<16} {'γ':>5} {'PSNR':>8} {'SSIM':>7} {'WS-PSNR':>8} {'WS-SSIM':>7}")
    for dataset, per_gamma in results:
        for r in per_gamma:
            print(f"  {dataset.name:<16} {r.gamma:5g} {r.mean('psnr'):8.3f} "
                  f"{r.mean('ssim'):7.4f} {r.mean('ws_psnr'):8.3f} {r.mean('ws_ssim'):7.4f}")
    return 0
