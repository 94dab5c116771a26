"""Folder throughput: the pipelined ``camixer-fast upscale`` against the sequential command it
replaced, on the 14 Set14 images (LR ×4 made by :func:`camixer_fast.evaluation.imresize.make_lr`).

    python bench/bench_folder.py [--baseline-rev REV] [--rounds 3] [--json PATH]

One run of this script measures everything it reports, on the machine as it is:

- a profile of the sequential loop (read, network, encode, per image; model load), at one and
  at the default number of torch threads, and the same network calls made from a thread other
  than the main one;
- the command of ``--baseline-rev`` (extracted with ``git archive``, run from that tree), the
  current command (its defaults: the baseline's computation, on a network thread, overlapped
  with decoding and encoding), and the current command with one worker per thread at one
  thread each, alternated ``--rounds`` times (median wall time of each, load averages);
- the outputs, byte for byte (and pixel by pixel where they differ): the current command's
  against this commit's ``camixer_fast.upscale`` run one image after another (at the same
  thread count: the runner must change nothing) and against the baseline's (whose network
  code may round differently), the workers' run against the baseline at one thread (the CPU kernels
  round differently with the thread count) and against the current command's, and the
  current command at other batch sizes and worker counts against its default.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from benchlib import SHARED, machine_stamp  # noqa: E402

BASELINE_REV = "0a65789"
"""The last commit whose ``camixer-fast upscale`` ran files one by one (before the runner)."""


def make_inputs(folder: Path) -> list[Path]:
    from camixer_fast.io.image import read_rgb
    from camixer_fast.evaluation.imresize import make_lr

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for hr in sorted((SHARED / "data" / "Set14" / "HR").glob("*.png")):
        Image.fromarray(make_lr(read_rgb(hr), 4)).save(folder / hr.name)
        paths.append(folder / hr.name)
    return paths


def extract(rev: str, dest: Path) -> Path:
    """The tree of ``rev`` at ``dest``, importable as ``camixer_fast`` from PYTHONPATH."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    for sub in ("reference", "kernels"):
        (dest / "camixer_fast" / sub).symlink_to(dest / sub)
    return dest


def run_command(tree: Path | None, inputs: Path, out: Path, *extra: str,
                threads: int | None = None) -> float:
    """Wall seconds of ``python -m camixer_fast upscale inputs -o out`` from ``tree`` (None:
    this checkout), with ``OMP_NUM_THREADS=threads`` when given."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "camixer_fast", "upscale", str(inputs), "-o",
                           str(out), *extra], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


SEQUENTIAL = """
import sys, torch
from pathlib import Path
from camixer_fast.io.image import read_image, write_image
from camixer_fast.inference.api import upscale
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir(parents=True)
for path in sorted(src.glob("*.png")):
    image = read_image(path)
    image.pixels = upscale(image.pixels, 0.5)
    with open(dest / path.name, "wb") as f:
        write_image(image, f, "PNG")
"""
"""This commit's library, one image after another (``camixer_fast.upscale`` per file)."""


def run_sequential(inputs: Path, out: Path, threads: int | None = None) -> None:
    """This commit's sequential path into ``out``, at ``OMP_NUM_THREADS=threads`` if given."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", SEQUENTIAL, str(inputs), str(out)], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"sequential run failed ({proc.returncode}): {proc.stderr[-2000:]}")


def compare(a: Path, b: Path) -> dict:
    """Files of folder ``a`` against ``b``: how many are byte-identical, and the pixels that
    differ (count, largest difference) in the others."""
    same, differing_pixels, largest, total = 0, 0, 0, 0
    for path in sorted(a.iterdir()):
        other = b / path.name
        total += 1
        if path.read_bytes() == other.read_bytes():
            same += 1
            continue
        x = np.asarray(Image.open(path)).astype(np.int64)
        y = np.asarray(Image.open(other)).astype(np.int64)
        diff = np.abs(x - y)
        differing_pixels += int((diff > 0).sum())
        largest = max(largest, int(diff.max()))
    return {"files": total, "identical_files": same, "differing_values": differing_pixels,
            "largest_difference": largest}


def profile(paths: list[Path], threads: int) -> dict:
    """Seconds of each stage of the sequential loop, in this process, at ``threads``."""
    import torch

    from camixer_fast.io.image import read_image, write_image
    from camixer_fast.inference.api import cached_model, upscale

    torch.set_num_threads(threads)
    start = time.perf_counter()
    cached_model("CAMixerSR-S", torch.device("cpu"), torch.float32, "auto")
    stages = {"load_model": time.perf_counter() - start, "read": 0.0, "network": 0.0,
              "encode": 0.0, "network_in_a_worker_thread": 0.0}
    for path in paths:
        t0 = time.perf_counter()
        image = read_image(path)
        t1 = time.perf_counter()
        image.pixels = upscale(image.pixels, 0.5)
        t2 = time.perf_counter()
        write_image(image, io.BytesIO(), "PNG")
        t3 = time.perf_counter()
        stages["read"] += t1 - t0
        stages["network"] += t2 - t1
        stages["encode"] += t3 - t2

    def network_only() -> None:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for path in paths:
            upscale(read_image(path).pixels, 0.5)
        stages["network_in_a_worker_thread"] = time.perf_counter() - start

    worker = threading.Thread(target=network_only)
    worker.start()
    worker.join()
    return {"threads": threads, **{k: round(v, 3) for k, v in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "folder.json")
    args = parser.parse_args()
    os.environ.setdefault("CAMIXER_FAST_WEIGHTS", str(SHARED / "weights"))
    import torch

    work = Path(tempfile.mkdtemp(prefix="camixer-bench-folder-"))
    inputs = work / "set14_lr_x4"
    paths = make_inputs(inputs)
    tree = extract(args.baseline_rev, work / "baseline")
    default_threads = torch.get_num_threads()
    result: dict = {"machine": machine_stamp(), "baseline_rev": args.baseline_rev,
                    "images": len(paths), "default_threads": default_threads}
    result["profile"] = [profile(paths, 1), profile(paths, default_threads)]
    print("profile:", json.dumps(result["profile"]), flush=True)

    workers_name = f"pipelined, {default_threads} workers at 1 thread"
    commands = {"baseline": (tree, []), "pipelined": (None, []),
                workers_name: (None, ["--workers", str(default_threads), "--threads", "1"])}
    folders = {"baseline": "baseline", "pipelined": "pipelined", workers_name: "workers"}
    times: dict[str, list[float]] = {name: [] for name in commands}
    loads = []
    for round_ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, (source, extra) in commands.items():
            out = work / f"{folders[name]}_{round_}"
            times[name].append(run_command(source, inputs, out, *extra))
            print(f"round {round_}: {name} {times[name][-1]:.2f} s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base, new = medians["baseline"], medians["pipelined"]
    result["wall_seconds"] = times
    result["median_seconds"] = medians
    result["speedup"] = base / new
    result["speedup_workers"] = base / medians[workers_name]
    result["loadavg_1min"] = loads

    run_command(tree, inputs, work / "baseline_1thread", threads=1)
    run_sequential(inputs, work / "sequential")
    run_sequential(inputs, work / "sequential_1thread", threads=1)
    outputs = {
        "pipelined vs this commit's upscale() one image after another (default threads)":
            compare(work / "pipelined_0", work / "sequential"),
        f"{workers_name} vs this commit's upscale() one image after another at 1 thread":
            compare(work / "workers_0", work / "sequential_1thread"),
        "pipelined vs baseline (both at torch's default threads)":
            compare(work / "pipelined_0", work / "baseline_0"),
        f"{workers_name} vs baseline at 1 thread (OMP_NUM_THREADS=1)":
            compare(work / "workers_0", work / "baseline_1thread"),
        f"{workers_name} vs pipelined (thread-count rounding)":
            compare(work / "workers_0", work / "pipelined_0"),
    }
    for extra in (["--batch-size", "1"], ["--batch-size", "4"],
                  ["--batch-size", "3", "--workers", "2", "--threads", str(default_threads)]):
        out = work / ("pipelined" + "".join(extra).replace("-", "_"))
        run_command(None, inputs, out, *extra)
        outputs[f"pipelined {' '.join(extra)} vs pipelined"] = compare(out, work / "pipelined_0")
    result["outputs"] = outputs
    for name, value in outputs.items():
        print(f"{name}: {value}")
    print(f"median wall time: baseline {base:.2f} s, pipelined {new:.2f} s: "
          f"{base / new:.2f}x; {workers_name} {medians[workers_name]:.2f} s: "
          f"{result['speedup_workers']:.2f}x "
          f"(load averages {', '.join(f'{x:.2f}' for x in loads)})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
