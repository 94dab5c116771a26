"""GPU check of the compiled and CUDA-graph variants (issue 11): parity with eager, then time.

    python bench/gpu_compile_graphs.py [--weights PTH] [--image PNG] [--json OUT] [--quick]

On one CUDA device, for the S model on a 320×180 crop of an Urban100 photo (1280×720 out):

- ``torch.compile(model, fullgraph=True)`` (inductor) for the triton and reference backends,
  both tie rules: the compiled output against eager (max |diff|, routing K and order equal),
  then eager and compiled latency and the compile time. The first GPU run measured 0.27 here
  with ``tie_break="official"`` (inductor's own sort of the window scores).
- :class:`camixer_fast.inference.graphs.CUDAGraphModel` (triton): each replay against an eager forward of
  the same input, over two input sizes interleaved (the graphs share a memory pool), then the
  replay latency.
- ``torch.compile(mode="reduce-overhead")`` (inductor's own CUDA graphs) of the triton path.

Every variant is timed only after its check passed; a failed check is recorded with its error
and the script exits 1. Latency: median of 10 CUDA-synchronised calls after 3 warm-ups. The
results, with the card, driver and versions, go to one JSON file. Each compile of S takes
about a minute on an H200: ``--quick`` checks only the variants the first GPU run got wrong or
never ran (triton compiled with official ties, the CUDA graphs), with 3 timed calls each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import camixer_fast
from camixer_fast.inference.graphs import CUDAGraphModel

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMIXER_FAST_SHARED", REPO.parent / "shared"))

PARITY_TOL = 1e-4
"""fp32, compiled or replayed against eager (issue 11)."""

RUNS = 10
"""Timed calls per variant (3 with ``--quick``)."""


def crop_input(image: Path, height: int = 180, width: int = 320) -> torch.Tensor:
    """The issue's input: the top-left height×width of the image, (1, 3, H, W) on CUDA."""
    rgb = np.asarray(Image.open(image).convert("RGB"))[:height, :width]
    return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].cuda()


def load(weights: Path, backend: str) -> camixer_fast.CAMixerSR:
    return camixer_fast.load_model(weights, backend=backend, device="cuda", gamma=0.5)


def latency_ms(fn, x: torch.Tensor, warmup: int = 3) -> float:
    runs = RUNS
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare(want, got) -> dict:
    (w, wr), (g, gr) = want, got
    same_k = all(torch.equal(a.num_hard, b.num_hard) for a, b in zip(wr.blocks, gr.blocks))
    same_order = all(torch.equal(a.order, b.order) for a, b in zip(wr.blocks, gr.blocks))
    return {"max_diff": (w.float() - g.float()).abs().max().item(), "same_k": same_k,
            "same_order": same_order}


def check_compiled(model: camixer_fast.CAMixerSR, tie_break: str, x: torch.Tensor) -> dict:
    torch._dynamo.reset()
    model.tie_break = tie_break
    with torch.inference_mode():
        want = model(x, return_routing=True)
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        got = compiled(x, return_routing=True)
        torch.cuda.synchronize()
        row = {"compile_s": time.perf_counter() - start, **compare(want, got)}
        row["ok"] = row["max_diff"] <= PARITY_TOL and row["same_k"] and row["same_order"]
        if row["ok"]:
            row["eager_ms"] = latency_ms(lambda t: model(t, return_routing=True), x)
            row["compiled_ms"] = latency_ms(lambda t: compiled(t, return_routing=True), x)
    return row


def check_graphs(model: camixer_fast.CAMixerSR, x: torch.Tensor) -> dict:
    graphed = CUDAGraphModel(model)
    other = x[..., :96, :160].contiguous()
    row = {"max_diff": 0.0, "same_k": True, "same_order": True}
    with torch.inference_mode():
        for inp in (x, other, x * 0.9, other * 0.9):          # two sizes, interleaved
            want = model(inp, return_routing=True)
            got = graphed(inp, return_routing=True)
            r = compare(want, got)
            row["max_diff"] = max(row["max_diff"], r["max_diff"])
            row["same_k"] &= r["same_k"]
            row["same_order"] &= r["same_order"]
        row["graphs"] = len(graphed.keys())
        row["ok"] = row["max_diff"] <= PARITY_TOL and row["same_k"] and row["same_order"]
        if row["ok"]:
            row["eager_ms"] = latency_ms(model, x)
            row["replay_ms"] = latency_ms(graphed, x)
            graphed_static = CUDAGraphModel(model, copy_outputs=False)
            row["replay_no_copy_ms"] = latency_ms(graphed_static, x)
    return row


def check_reduce_overhead(model: camixer_fast.CAMixerSR, x: torch.Tensor) -> dict:
    torch._dynamo.reset()
    with torch.inference_mode():
        want = model(x, return_routing=True)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):                  # cudagraph trees record on a later call
            got = compiled(x, return_routing=True)
        row = compare(want, (got[0].clone(), got[1]))
        row["ok"] = row["max_diff"] <= PARITY_TOL and row["same_k"] and row["same_order"]
        if row["ok"]:
            row["compiled_ms"] = latency_ms(lambda t: compiled(t, return_routing=True), x)
    return row


def stamp() -> dict:
    from importlib import metadata

    props = torch.cuda.get_device_properties(0)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True,
                                check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        driver = None
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": metadata.version("triton"),
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def main() -> int:
    global RUNS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path,
                        default=SHARED / "weights" / "CAMixerSR_S.pth")
    parser.add_argument("--image", type=Path,
                        default=SHARED / "data" / "Urban100" / "HR" / "img_001.png")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" /
                        "gpu-compile-graphs.json")
    parser.add_argument("--quick", action="store_true",
                        help="the triton compiled (official ties) and CUDA-graph variants only, "
                             "3 timed calls each")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="run the variants whose name contains TEXT")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 3
    if args.quick:
        RUNS = 3
    x = crop_input(args.image)
    results = {"machine": stamp(), "input": list(x.shape), "gamma": 0.5,
               "weights": args.weights.name, "runs": RUNS}
    checks = {f"compiled-{b}-{t}": (lambda b=b, t=t: check_compiled(load(args.weights, b), t, x))
              for b in ("triton", "reference") for t in ("official", "index")}
    checks["cuda-graphs-triton"] = lambda: check_graphs(load(args.weights, "triton"), x)
    checks["reduce-overhead-triton"] = lambda: check_reduce_overhead(
        load(args.weights, "triton"), x)
    quick = ("compiled-triton-official", "cuda-graphs-triton")
    failed = False
    for name, check in checks.items():
        if args.only not in name or (args.quick and name not in quick):
            continue
        try:
            row = check()
        except Exception as err:  # record and go on: one variant must not hide the others
            row = {"ok": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=8)}
        failed |= not row["ok"]
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
