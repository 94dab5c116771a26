"""The CPU backend's choices for its dense steps, each against the alternative it rejected.

    python bench/cpu_dense.py [--threads 2] [--rounds 30] [--json bench/results/cpu_dense.json]

On S's shapes (C = 36 channels; maps of 128×128 and 256×256 pixels, batch 1, NHWC), each pair
is first checked to agree (max abs difference printed, ≤ 1e-4), then timed alternately: one
warm-up call each, then ``--rounds`` calls each, medians. ``first`` is the plain form, ``second``
the alternative; ``used`` says which the CPU backend runs:

- ``linear``: a 1×1 projection with bias, ``F.linear`` (PyTorch's BLAS) against
  :func:`camixer_fast.backends.dense.linear` (oneDNN); and the same with the residual added.
- ``depthwise + gelu``: ``F.conv2d`` then an in-place GELU (the reference's
  :func:`camixer_fast.reference.dense.depthwise`, which every backend runs) against oneDNN's
  convolution with the GELU in its epilogue; and the gate's product.
- ``keys``: the deformable keys of a quarter of the pixels (the hard windows at γ = 0.25),
  ``grid_sample`` at those pixels of the channels-last map (the CPU backend's former way)
  against :func:`camixer_fast.backends.cpu._keys_at` (neighbours gathered as NHWC rows).

glibc's adaptive thresholds are raised first (:func:`camixer_fast.backends.memory.raise_mmap_threshold`,
as the CPU backend does), so fresh pages do not weigh on either side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from benchlib import machine_stamp

from camixer_fast.backends.memory import raise_mmap_threshold
from camixer_fast.backends.cpu import _keys_at, hard_window_pixels
from camixer_fast.reference import dense
from camixer_fast.backends import dense as cpu_dense

CHANNELS = 36
TOL = 1e-4


def _keys_by_grid_sample(x: torch.Tensor, offsets: torch.Tensor, pixels: torch.Tensor
                         ) -> torch.Tensor:
    """The former CPU keys: the reference warp's grid at the pixels, one ``grid_sample`` of the
    channels-last map, plus x. x (1, C, H, W) channels-last, offsets (1, 2, H, W)."""
    _, c, height, width = x.shape
    rows = torch.div(pixels, width, rounding_mode="floor")
    cols = pixels - rows * width
    off = offsets.reshape(2, -1)[:, pixels]
    gx = 2.0 * (cols + off[0]) / max(width - 1, 1) - 1.0
    gy = 2.0 * (rows + off[1]) / max(height - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1).view(1, -1, 1, 2)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    x_flat = x.permute(0, 2, 3, 1).reshape(-1, c)
    return x_flat.index_select(0, pixels) + warped.view(c, -1).t()


def _onednn_depthwise(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None,
                      unary: str, multiply: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's depthwise 3×3 with an epilogue: "gelu" (exact), or the product with multiply."""
    xc, conv = x.permute(0, 3, 1, 2), torch.ops.mkldnn._convolution_pointwise
    c = x.shape[-1]
    if multiply is None:
        y = conv(xc, kernel, bias, [1, 1], [1, 1], [1, 1], c, unary, [], "none")
    else:
        y = conv.binary(xc, multiply.permute(0, 3, 1, 2), kernel, bias, [1, 1], [1, 1], [1, 1],
                        c, "mul", None, None, [], None)
    return y.permute(0, 2, 3, 1).contiguous()


def pairs(size: int) -> list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor],
                                   str]]:
    """(name, first form, second form, the one the CPU backend runs) on one map size."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(1, size, size, CHANNELS, generator=g)
    other = torch.randn(1, size, size, CHANNELS, generator=g)
    weight = torch.randn(CHANNELS, CHANNELS, generator=g) / CHANNELS**0.5
    bias = torch.randn(CHANNELS, generator=g)
    kernel = torch.randn(CHANNELS, 1, 3, 3, generator=g) / 3
    offsets = torch.randn(1, 2, size, size, generator=g) * 4
    windows = (size // 16) ** 2
    order = torch.randperm(windows, generator=g)[None]
    pixels = hard_window_pixels(torch.tensor([windows // 4]), order, size, size, 16)
    x_map = x.permute(0, 3, 1, 2)
    return [
        ("linear", lambda: F.linear(x, weight, bias), lambda: cpu_dense.linear(x, weight, bias),
         "second"),
        ("linear + residual", lambda: F.linear(x, weight, bias) + other,
         lambda: cpu_dense.linear(x, weight, bias, residual=other), "second"),
        ("depthwise + gelu", lambda: dense.depthwise(x, kernel, bias, gelu=True),
         lambda: _onednn_depthwise(x, kernel, bias, "gelu"), "first"),
        ("depthwise × gate", lambda: dense.depthwise(x, kernel, multiply=other),
         lambda: _onednn_depthwise(x, kernel, None, "none", other), "first"),
        ("keys at ¼ of the pixels", lambda: _keys_by_grid_sample(x_map, offsets, pixels),
         lambda: _keys_at(x.view(-1, CHANNELS), offsets.reshape(2, -1), pixels, size, size),
         "second"),
    ]


def time_pair(first: Callable, second: Callable, rounds: int) -> tuple[float, float]:
    """Medians (s) of the two taking turns, after one warm-up call each."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if cpu_dense.unsupported() is not None:
        raise SystemExit(f"oneDNN does not run here: {cpu_dense.unsupported()}")
    torch.set_num_threads(args.threads)
    raise_mmap_threshold()
    rows = []
    with torch.no_grad():
        for size in args.sizes:
            for name, first, second, used in pairs(size):
                err = (first() - second()).abs().max().item()
                if not err <= TOL:
                    raise SystemExit(f"{name} at {size}²: the two differ by {err:.3e}")
                first_s, second_s = time_pair(first, second, args.rounds)
                rows.append({"op": name, "size": size, "first_ms": first_s * 1e3,
                             "second_ms": second_s * 1e3, "used": used,
                             "first_over_second": first_s / second_s, "max_abs_diff": err})
                print(f"{size}x{size} {name:24} first {first_s * 1e3:7.3f} ms  second "
                      f"{second_s * 1e3:7.3f} ms  {first_s / second_s:5.2f}x  used: {used}  "
                      f"(diff {err:.1e})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                                         "machine": machine_stamp(), "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
