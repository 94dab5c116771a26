"""``camixer-fast info``: parameters, the paper's FLOPs and measured multiply-adds of a model
(a CAMixerOSR checkpoint, ODI-SR: no paper FLOPs; its DCNv2 products counted apart).

Exit status: 0 done, 1 unreadable weights, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from camixer_fast.cli import gamma_type
from camixer_fast.evaluation.cost import MODEL_SIZES, measure_madds, paper_flops, parameter_count
from camixer_fast.models.loading import CheckpointError, load_model
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, got {text!r}")
    return int(match[1]), int(match[2])


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``info`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "info", help="parameters, paper FLOPs and measured MAdds of a model (random S "
                     "weights unless --weights)",
        description="Without --weights: a published size (--model, default S) with random "
                    "weights (seed 0). Parameter count; FLOPs per 32×32 LR input in the paper's convention "
                    "(Table 2, the official formula); and multiply-adds measured on an actual "
                    "forward of an --lr-size input (uniform noise, seed 0), counting every "
                    "conv and linear and the attention of the windows the routing chose.",
        epilog="Exit status: 0 done, 1 unreadable weights, 2 bad arguments.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", default=None, metavar="NAME_OR_PATH",
                        help="registered weights name or checkpoint path")
    source.add_argument("--model", choices=sorted(MODEL_SIZES), default=None,
                        help="a published size with random weights (S: C=36, M: 48, B: 60); "
                             "default S when no --weights")
    parser.add_argument("--scale", type=int, default=None,
                        help="upscale factor for --model (default 4); with --weights it must "
                             "match the checkpoint")
    parser.add_argument("--gamma", type=gamma_type, default=1.0, metavar="G",
                        help="attention ratio in [0, 1] (default 1)")
    parser.add_argument("--lr-size", type=_size, default=(32, 32), metavar="HxW",
                        help="LR input size of the measured forward (default 32x32)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(func=run)
    return parser


def _build(args: argparse.Namespace) -> CAMixerSR | CAMixerOSR:
    if args.weights is not None:
        model = load_model(args.weights, gamma=args.gamma, backend="reference")
        if args.scale is not None and args.scale != model.scale:
            raise ValueError(f"--scale {args.scale} but the checkpoint is ×{model.scale}")
        return model
    scale = 4 if args.scale is None else args.scale
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CAMixerSR(n_feats=MODEL_SIZES[args.model or "S"], scale=scale, gamma=args.gamma)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    """Print the model's size and costs (or JSON with ``--json``)."""
    try:
        model = _build(args)
    except (CheckpointError, FileNotFoundError, OSError) as err:
        print(f"camixer-fast info: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"camixer-fast info: {err}", file=sys.stderr)
        return 2
    osr = isinstance(model, CAMixerOSR)
    height, width = args.lr_size
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    madds, routing = measure_madds(model, x)
    ws = model.window_size
    windows = -(-height // ws) * -(-width // ws)
    hard = routing.num_hard()[:, 0].tolist()
    flops = None if osr else paper_flops(model.n_feats, model.scale, args.gamma,
                                         blocks=model.blocks_per_group, window_size=ws)
    info = {
        "model": args.weights if args.weights is not None else (args.model or "S"),
        "weights": "checkpoint" if args.weights is not None else "random (seed 0)",
        **({"architecture": "CAMixerOSR"} if osr else {}),
        "n_feats": model.n_feats, "scale": model.scale,
        "blocks_per_group": list(model.blocks_per_group), "window_size": ws,
        "gamma": args.gamma, "parameters": parameter_count(model),
        "paper_flops_32x32": flops,
        "lr_size": [height, width], "windows": windows, "hard_windows_per_block": hard,
        "madds": madds,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kind = "CAMixerOSR (ODI-SR, 360° panoramas), " if osr else ""
    print(f"model        {info['model']} ({info['weights']}): {kind}C={model.n_feats}, "
          f"×{model.scale}, blocks {tuple(model.blocks_per_group)}, window {ws}")
    print(f"parameters   {info['parameters']:,}")
    if flops is None:
        print("paper FLOPs  none for CAMixerOSR (the official formula is CAMixerSR's)")
    else:
        print(f"paper FLOPs  {flops / 1e6:,.1f}M per 32×32 LR input at γ={args.gamma:g} "
              "(official formula)")
    print(f"MAdds        {madds['total'] / 1e9:,.3f}G measured on {height}×{width}"
          f"{' (a whole panorama)' if osr else ''} at γ={args.gamma:g} "
          f"(output {height * model.scale}×{width * model.scale})")
    print(f"  convs {madds['conv'] / 1e9:.3f}G, linears {madds['linear'] / 1e9:.3f}G, "
          f"window scores {madds['window_scores'] / 1e9:.3f}G, "
          f"Q/K projections {madds['qk_projection'] / 1e9:.3f}G, "
          f"attention {madds['attention'] / 1e9:.3f}G"
          + (f", DCNv2 {madds['dcn'] / 1e9:.3f}G" if osr else ""))
    print(f"  hard windows per block (of {windows}): {hard}")
    return 0
