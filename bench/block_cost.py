"""Cost model of the fused GPU block: bytes, FLOPs and the floor time of each kernel on an H200,
and the launches per forward (counted, not assumed).

    python bench/block_cost.py [--write bench/block_kernels.md]

One block of the S (C = 36) and B (C = 60) models on a 1280×720 ×4 frame (LR 320×180, padded
to 320×192: 240 windows of 16×16) at γ = 0.5 with K = N/2 hard windows, in fp32 (parity
mode, IEEE fp32 products on the FMA units) and in fp16 / bf16 (tile products on tensor cores).

Bytes: every element a kernel must read or write, once (halos and taps assumed to hit the
caches: this is a floor). FLOPs: a multiply-add counts 2; "matrix" FLOPs are the tile products
(1×1 convolutions, attention), "vector" FLOPs the rest (depthwise taps, norms, activations),
which run on the FMA units in every dtype. Floor time: max(bytes / bandwidth, matrix FLOPs /
matrix rate + vector FLOPs / FMA rate), with the H200 ceilings below. Launch counts come from
running the model with its Triton kernels stubbed (``tests/launch_counter.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import roofline  # noqa: E402

BANDWIDTH = 4.3e12
"""Bytes/s: device-to-device copy measured on an H200 here (/work/.library/device/KINDS.md,
2026-10-28 and 2026-11-04); the datasheet says 4.8e12."""
FMA_RATE = 67e12
"""FLOP/s of plain fp32 FMA (datasheet; not measured here)."""
MATRIX_RATE = {"fp32": FMA_RATE, "fp16": 788e12}
"""Tile products: fp32 with IEEE products runs on the FMA units; fp16 / bf16 on tensor cores
(788 TFLOP/s: an 8192³ bf16 product measured on an H200 here)."""

MODELS = {"S": 36, "B": 60}
LR = (180, 320)
WINDOW = 16
BLOCKS = 20


@dataclass(frozen=True)
class Cost:
    name: str
    covers: str
    bytes: float
    matrix_flops: float
    vector_flops: float

    def floor_us(self, precision: str) -> float:
        compute = self.matrix_flops / MATRIX_RATE[precision] + self.vector_flops / FMA_RATE
        return 1e6 * max(self.bytes / BANDWIDTH, compute)

    def bound(self, precision: str) -> str:
        compute = self.matrix_flops / MATRIX_RATE[precision] + self.vector_flops / FMA_RATE
        return "memory" if self.bytes / BANDWIDTH >= compute else "compute"


def block_costs(channels: int, itemsize: int, hard_fraction: float = 0.5) -> list[Cost]:
    """Per-launch costs of one block's kernels (and its two PyTorch ops) at 720p, from
    bench/roofline.py's cost model (the GPU benchmark's roofline uses the same functions)."""
    s = roofline.Shape(1, channels, -(-LR[0] // WINDOW) * WINDOW, -(-LR[1] // WINDOW) * WINDOW,
                       WINDOW, itemsize)
    n = s.windows
    k = int(n * hard_fraction)
    px = f"{s.pixels} pixels"
    rows = [("predictor", px, roofline.predictor(s)),
            ("predictor_heads (sa, ca)", px, roofline.predictor_heads(s)),
            ("window_scores", f"{n} windows", roofline.window_scores(s, 1)),
            ("select (+ argsort for official ties)", f"{n} windows", roofline.select(s)),
            ("deform_key (hard windows)", f"{k} windows", roofline.deform_key_hard(s, k)),
            ("hard_window_attention", f"{k} hard + {n - k} simple windows",
             roofline.hard_window_attention(s, k)),
            ("depthwise3x3", px, roofline.depthwise3x3(s)),
            ("mixer_tail", px, roofline.mixer_tail(s)),
            ("ffn_tail", px, roofline.ffn_tail(s))]
    return [Cost(name, covers, c.bytes, c.matrix_flops, c.vector_flops)
            for name, covers, c in rows]


def count_launches(n_feats: int) -> tuple[int, int]:
    """(launches per forward, Triton launches per block) of a CAMixerSR with ``n_feats``
    channels at 720p on the Triton backend, its kernels stubbed (Triton's interpreter)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO / "tests"))
    import torch

    from camixer_fast.reference.model import CAMixerSR
    from launch_counter import LaunchCounter

    model = CAMixerSR(n_feats=n_feats).eval()
    model.backend = "triton"
    x = torch.rand(1, 3, *LR)
    with torch.no_grad(), LaunchCounter(stub=True) as counter:
        model(x)
    return counter.launches, sum(counter.triton.values()) // BLOCKS


def report() -> str:
    lines = [
        "# The fused GPU block: bytes, FLOPs and floors per kernel", "",
        "Made by `python bench/block_cost.py --write bench/block_kernels.md`; do not edit by "
        "hand.", "",
        f"One block at 1280×720 ×4 (LR 320×180 padded to 320×192, 240 windows of 16×16), "
        "γ = 0.5, K = N/2. Bytes: each element read or written once (a floor). FLOPs: a "
        "multiply-add counts 2. Floor: max(bytes / 4.3 TB/s, matrix FLOPs / matrix rate + "
        "vector FLOPs / 67 TFLOP/s); the matrix rate is 67 TFLOP/s in fp32 (IEEE products on "
        "the FMA units) and 788 TFLOP/s in fp16 / bf16 (tensor cores). H200 ceilings: copy "
        "bandwidth and bf16 matrix rate as measured on this project's H200 machines, fp32 FMA "
        "rate from the datasheet. Nothing here is timed: no GPU was available when this was "
        "written.", ""]
    for model, channels in MODELS.items():
        launches, per_block = count_launches(channels)
        lines += [f"## {model} (C = {channels})", "",
                  f"Launches per forward at 720p (counted, kernels stubbed): **{launches}**, of "
                  f"which {per_block} Triton kernels per block.", ""]
        for precision, itemsize in (("fp32", 4), ("fp16", 2)):
            costs = block_costs(channels, itemsize)
            lines += [f"### {precision} maps" + (" (bf16 alike)" if precision == "fp16" else ""),
                      "", "| kernel | one launch covers | MB moved | matrix GFLOP | "
                      "vector GFLOP | floor (µs) | bound by |", "|---|---|---|---|---|---|---|"]
            for cost in costs:
                lines.append(f"| {cost.name} | {cost.covers} | {cost.bytes / 1e6:.2f} | "
                             f"{cost.matrix_flops / 1e9:.3f} | {cost.vector_flops / 1e9:.3f} | "
                             f"{cost.floor_us(precision):.1f} | {cost.bound(precision)} |")
            block = sum(c.floor_us(precision) for c in costs)
            lines += ["", f"One block: {block:.1f} µs at the floor; {BLOCKS} blocks: "
                          f"{BLOCKS * block / 1000:.2f} ms per frame.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="write the markdown report here")
    args = parser.parse_args(argv)
    text = report()
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
