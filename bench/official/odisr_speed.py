"""CPU speed and peak memory of camixer_fast's CAMixerOSR against the official file.

    CAMIXER_OFFICIAL_ODISR_ARCH=.../CAMixerOSR_arch.py python bench/official/odisr_speed.py \
        [--rounds 5] [--threads 2] [--out bench/results.jsonl]

C = 60, 4×6 blocks, x4, seeded official-layout weights, γ = 0.5, official routing made
deterministic (odisr_fixture.official_routing). Speed: 128×256 crop of Urban100 img_004, each
model in its own worker, called alternately; medians of wall and process CPU time. Memory:
512×1024 LR, each model in a fresh process, one inference_mode forward, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import odisr_fixture as fx
from common import append_rows, machine_stamp, row

from camixer_fast.models.loading import build_osr_model

DEFAULT_ARCH = Path("/work/official/codes/odisr/archs/CAMixerOSR_arch.py")
IMAGE = ("Urban100", "img_004", (200, 300))


def crop_input(height: int, width: int) -> torch.Tensor:
    """(1, 3, height, width): a crop of IMAGE at its offset, tiled if the image is smaller."""
    folder, name, (top, left) = IMAGE
    data = Path(os.environ.get("CAMIXER_FAST_SHARED", fx.REPO.parent / "shared")) / "data"
    pixels = np.asarray(Image.open(data / folder / "HR" / f"{name}.png").convert("RGB"))
    reps = (-(-(top + height) // pixels.shape[0]), -(-(left + width) // pixels.shape[1]), 1)
    tile = np.tile(pixels, reps)[top:top + height, left:left + width].astype(np.float32) / 255
    return torch.from_numpy(tile).permute(2, 0, 1).unsqueeze(0).contiguous()


def make_forward(which: str, height: int, width: int):
    """A no-argument forward of ``which`` ('ours' or 'official') on the crop."""
    state = fx.seeded_state_dict("published", 4)
    lr, cond = crop_input(height, width), fx.official_condition(height, width, None)
    if which == "ours":
        model = build_osr_model({"params_ema": state}, gamma=0.5)
        return lambda: model(lr, cond)
    net = fx.load_official().CAMixerOSR(n_block=[6] * 4, n_group=4, n_feats=60, scale=4)
    net.load_state_dict(state, strict=True)
    net.eval()

    def forward():
        with fx.official_routing(0.5):
            return net(lr, cond)
    return forward


def worker(which: str, task: str, height: int, width: int, threads: int) -> None:
    torch.set_num_threads(threads)
    forward = make_forward(which, height, width)
    with torch.inference_mode():
        if task == "memory":
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            forward()
            print(json.dumps({"rss_before_mib": before / 1024, "seconds":
                              time.perf_counter() - start, "peak_rss_mib":
                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
            return
        forward()
        print("ready", flush=True)
        for _ in sys.stdin:
            start, cpu = time.perf_counter(), time.process_time()
            forward()
            print(time.perf_counter() - start, time.process_time() - cpu, flush=True)


def spawn(which: str, task: str, args: argparse.Namespace, size: tuple[int, int]):
    cmd = [sys.executable, __file__, "--worker", which, "--task", task, "--threads",
           str(args.threads), "--size", f"{size[0]}x{size[1]}"]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, fx.ENV_VAR: str(args.arch)})


def speed(args: argparse.Namespace, height: int, width: int) -> dict:
    """Alternating timed forwards of both workers; the medians and ratios."""
    procs = {w: spawn(w, "speed", args, (height, width)) for w in ("ours", "official")}
    times, cpu = {w: [] for w in procs}, {w: [] for w in procs}
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "ready"
    for _ in range(args.rounds):
        for w, proc in procs.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            wall, seconds = map(float, proc.stdout.readline().split())
            times[w].append(wall)
            cpu[w].append(seconds)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    median = {w: statistics.median(t) for w, t in times.items()}
    cpu_median = {w: statistics.median(t) for w, t in cpu.items()}
    result = {"measure": "speed", "size": [height, width], "threads": args.threads,
              "seconds": times, "median_s": median, "cpu_seconds": cpu,
              "cpu_median_s": cpu_median, "speedup": median["official"] / median["ours"],
              "cpu_speedup": cpu_median["official"] / cpu_median["ours"],
              "load_avg": os.getloadavg()[0]}
    print(f"speed {height}x{width} x4, {args.threads} threads: ours {median['ours']:.3f} s, "
          f"official {median['official']:.3f} s, ratio {result['speedup']:.2f}x; process CPU "
          f"time ratio {result['cpu_speedup']:.2f}x (load {os.getloadavg()[0]:.1f})")
    return result


def rows_of(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """The results file's rows: the wall and CPU-time speed-ups, each model's peak RSS."""
    torch.set_num_threads(args.threads)
    stamp, rows = machine_stamp(), []
    for r in results:
        size = "x".join(map(str, r["size"]))
        if r["measure"] == "speed":
            params = {"threads": r["threads"], "rounds": args.rounds, "loadavg_1min": r["load_avg"],
                      **{f"{w}_ms": r["median_s"][w] * 1e3 for w in ("ours", "official")},
                      **{f"{w}_cpu_ms": r["cpu_median_s"][w] * 1e3 for w in ("ours", "official")}}
            rows += [row("odisr-official", f"{size} x4 gamma=0.5", "speedup", r["speedup"], "x",
                         stamp, **params),
                     row("odisr-official", f"{size} x4 gamma=0.5", "cpu_time_speedup",
                         r["cpu_speedup"], "x", stamp, **params)]
        else:
            rows.append(row("odisr-official", f"{size} x4 gamma=0.5 {r['model']}", "peak_rss",
                            r["peak_rss_mib"], "MiB", stamp, model=r["model"],
                            rss_before_mib=r["rss_before_mib"], seconds=r["seconds"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append the rows (bench/common.row) here")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--worker", choices=("ours", "official"))
    parser.add_argument("--task", choices=("speed", "memory"))
    parser.add_argument("--size", default="128x256")
    parser.add_argument("--arch", type=Path,
                        default=Path(os.environ.get(fx.ENV_VAR, DEFAULT_ARCH)))
    args = parser.parse_args()
    height, width = map(int, args.size.split("x"))
    if args.worker:
        return worker(args.worker, args.task, height, width, args.threads)
    if not args.arch.is_file():
        sys.exit(f"set {fx.ENV_VAR} to codes/odisr/archs/CAMixerOSR_arch.py")
    results = [] if args.skip_speed else [speed(args, height, width)]
    if not args.skip_memory:
        procs = {w: spawn(w, "memory", args, (512, 1024)) for w in ("official", "ours")}
        for w, proc in procs.items():
            out, _ = proc.communicate()
            row = json.loads(out.strip().splitlines()[-1])
            results.append({"measure": "memory", "model": w, "size": [512, 1024], **row})
            print(f"memory 512x1024 x4 {w}: peak {row['peak_rss_mib']:.0f} MiB (before "
                  f"{row['rss_before_mib']:.0f} MiB, {row['seconds']:.1f} s)")
    if args.out:
        append_rows(rows_of(results, args), args.out)

if __name__ == "__main__":
    main()
