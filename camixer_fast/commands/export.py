"""``camixer-fast export OUT.onnx``: the model as an ONNX graph with the routing inside it.

Exit status: 0 written, 1 unreadable weights, 2 bad arguments (including an existing OUT
without ``--overwrite`` and an OUT that cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camixer_fast.cli import UsageError, check_writable, gamma_type, writing
from camixer_fast.models.loading import CheckpointError, load_model


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers``; its ``func`` is :func:`run`."""
    from camixer_fast.backends.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, OSR_MIN_OPSET

    parser = subparsers.add_parser(
        "export", help="export the model to ONNX (routing inside the graph)",
        description="Write the model as an ONNX graph: input 'lr' (B, 3, H, W) float32 in "
                    "[0, 1], output 'sr' (B, 3, sH, sW), batch, height and width dynamic. "
                    "The window scores, K per image (expected routing) and the window order "
                    "(TopK; equal scores by lower window index) are computed in the graph. "
                    "Without --gamma, γ is the last input 'gamma' (float32 scalar). CAMixerOSR "
                    "(ODI-SR) weights: the DCNs are ai.onnx DeformConv (opset 19), the "
                    "cos-latitude map of the whole panorama 'lr' is built in the graph, or is "
                    "the input 'condition' with --condition-input.",
        epilog="Exit status: 0 written, 1 unreadable weights, 2 bad arguments or an OUT that "
               "cannot be written.")
    parser.add_argument("output", metavar="OUT", help="the .onnx file to write")
    parser.add_argument("--weights", default="CAMixerSR-S", metavar="NAME_OR_PATH",
                        help="registered weights name or checkpoint path (default CAMixerSR-S)")
    parser.add_argument("--gamma", type=gamma_type, default=None, metavar="G",
                        help="bake this attention ratio into the graph (default: a graph "
                             "input 'gamma')")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET}; "
                             f"CAMixerOSR {OSR_MIN_OPSET} to {MAX_OPSET}, default {OSR_MIN_OPSET})")
    parser.add_argument("--condition-input", action="store_true",
                        help="CAMixerOSR: a second input 'condition' (B, 1, H, W), the "
                             "cos-latitudes of a crop, instead of the whole panorama's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Export; print what was written."""
    from camixer_fast.backends.onnx import export_onnx

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists (pass --overwrite to replace it)")
    check_writable(out.parent, out)
    try:
        model = load_model(args.weights, backend="reference")
    except (CheckpointError, OSError) as err:
        print(f"camixer-fast export: {err}", file=sys.stderr)
        return 1
    print(f"camixer-fast export: tracing {args.weights} ({type(model).__name__}, "
          f"C={model.n_feats}, ×{model.scale}) ...",
          file=sys.stderr)
    try:
        with writing(out):
            result = export_onnx(model, out, gamma=args.gamma, opset=args.opset,
                                 condition_input=args.condition_input)
    except ValueError as err:
        raise UsageError(str(err)) from None
    gamma = "γ input 'gamma'" if result.gamma is None else f"γ = {result.gamma:g} baked in"
    print(f"wrote {out}: opset {result.opset}, {result.nodes:,} nodes, {gamma} "
          f"({result.seconds:.1f} s)")
    return 0
