"""CPU latency of ``camixer_fast`` (``backend="auto"``) against the official CAMixerSR code.

    CAMIXER_OFFICIAL_ARCH=.../CAMixerSR_arch.py python bench/official_speed.py

The official code is the authors' architecture file, run as published (see
``bench/official_code.py`` for how to obtain it and what is stubbed); both models load the same
checkpoint (``CAMixerSR_S.pth``, ``params_ema``). Inputs are crops of real photos that the CPU
work was not tuned on (Urban100 img_004, Set14 barbara; centre crops, 128×128 and 256×256).

Before anything is timed, on every input and γ:

- the official output for one Gumbel draw is compared with ``camixer_fast``'s for the same draw
  (``routing="gumbel"``, same generator stream; :func:`official_code.official_gumbel_run`);
- the timed ``camixer_fast`` model (``backend="auto"``, the default expected routing) is
  compared with the reference backend.

Both must agree to 1e-4 (max abs) or the cell is not timed. Then the two models run
alternately, one warm-up call each and ``--rounds`` timed calls each, under
``torch.no_grad()`` (the official test loop's mode), each in a worker process of its own
(:class:`Worker`) with ``--threads`` torch threads; the result is the median per model and their
ratio, with each forward's minor page faults. Own processes, because a user's process holds one
model: alternating two models in one process lets each one's allocations decide how many fresh
pages the other's forward touches, and alternating the two workers still cancels a drift in
the machine's load. The official K is drawn at random
in every block of every call (its Gumbel rule, the global generator seeded once); ours is the
expected K. Both are recorded as the mean fraction of windows attended.

Rows (speed-up per cell, with both medians) go to a work folder, or with
``--out bench/results.jsonl`` to the results file (bench/report.py renders them).
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

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH), str(BENCH / "official")]

from common import SHARED, append_rows, machine_stamp, read_rgb, row, to_tensor
from official_code import (OFFICIAL_COMMIT, OFFICIAL_REPO, arch_path, load_official,
                           official_gumbel_run, run_official, set_ratio)

import camixer_fast
from camixer_fast.backends.memory import keep_freed_memory
from camixer_fast.backends import memory as cpu_memory

TOL = 1e-4
GAMMAS = (1.0, 0.5, 0.25)
SIZES = (128, 256)
IMAGES = {"Urban100/img_004": SHARED / "data" / "Urban100" / "HR" / "img_004.png",
          "Set14/barbara": SHARED / "data" / "Set14" / "HR" / "barbara.png"}
WEIGHTS = SHARED / "weights" / "CAMixerSR_S.pth"
TARGET = 2.5
def centre_crop(rgb: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> the centre size×size crop as (1, 3, size, size) float32 in [0, 1]."""
    height, width = rgb.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return to_tensor(np.ascontiguousarray(rgb[top:top + size, left:left + size]))


class OfficialK:
    """Records the K the official predictor drew in each block (forward hooks on its
    ``PredictorLG`` modules; they read the returned index lists and change nothing)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.fractions: list[float] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if type(m).__name__ == "PredictorLG"]

    def _hook(self, module, args, output) -> None:
        idx1, idx2 = output[0]
        self.fractions.append(idx1.shape[1] / (idx1.shape[1] + idx2.shape[1]))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def check(official, ours, reference, x: torch.Tensor, gamma: float) -> dict:
    """The two correctness checks of the module docstring; max abs errors."""
    set_ratio(official, gamma)
    ours.gamma = reference.gamma = gamma
    expected, got, ks = official_gumbel_run(official, ours, x, seed=int(gamma * 1000) + 1)
    with torch.no_grad():
        ours_out = ours(x)
        ref_out = reference(x)
    return {"official_vs_ours_same_draw": float((expected - got).abs().max()),
            "gumbel_k_fraction": float(ks.float().mean()) / ((x.shape[-2] // 16) *
                                                             (x.shape[-1] // 16)),
            "ours_vs_reference": float((ours_out - ref_out).abs().max())}


class Worker:
    """One model in a process of its own (``official_speed.py --worker official|ours``), timing
    one forward per request: a user's process holds one model, and its allocator's state (how
    many fresh pages a forward touches) is its own, not left by the other model. Requests and
    answers are JSON lines on the worker's stdin and stdout; while the other model runs, the
    worker waits on its pipe and uses no CPU."""

    def __init__(self, who: str, threads: int, arch: str | None, keep_memory: bool) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", who,
                   "--threads", str(threads)] + (["--arch", arch] if arch else []) + \
            (["--keep-freed-memory"] if keep_memory else [])
        self.who = who
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        self.ask({"cmd": "ping"})

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.who} worker exited (status {self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the {self.who} worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def serve(who: str, threads: int, arch: str | None, keep_memory: bool) -> int:
    """The worker's loop: ``{"cmd": "run", "image", "size", "gamma"}`` -> one forward's seconds,
    minor page faults and (official) the fraction of windows its blocks drew."""
    if keep_memory and not keep_freed_memory():
        raise SystemExit(f"--keep-freed-memory: not here ({cpu_memory.unsupported()})")
    answers, sys.stdout = sys.stdout, sys.stderr      # anything else printed goes to stderr
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = (load_official(WEIGHTS, path=arch) if who == "official"
             else camixer_fast.load_model(WEIGHTS, backend="auto"))
    counter = OfficialK(model) if who == "official" else None
    inputs: dict[tuple[str, int], torch.Tensor] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "ping":
                answer = {"backend": getattr(model, "backend", "official")}
            else:
                key = (request["image"], request["size"])
                if key not in inputs:
                    inputs[key] = centre_crop(read_rgb(IMAGES[key[0]]), key[1])
                x = inputs[key]
                if who == "official":
                    set_ratio(model, request["gamma"])
                    counter.fractions.clear()
                else:
                    model.gamma = request["gamma"]
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                if who == "official":
                    run_official(model, x)
                else:
                    with torch.no_grad():
                        model(x)
                answer = {"s": time.perf_counter() - start,
                          "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}
                if counter is not None:
                    answer["k_fraction"] = statistics.fmean(counter.fractions)
        except Exception as err:            # reported to the parent, which stops
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), file=answers, flush=True)
    return 0


def time_pair(workers: dict[str, Worker], ours_k: float, image: str, size: int, gamma: float,
              rounds: int) -> dict:
    """Alternate the official and our worker: one warm-up call each, then ``rounds`` timed
    calls each."""
    request = {"cmd": "run", "image": image, "size": size, "gamma": gamma}
    for worker in workers.values():
        worker.ask(request)
    times: dict[str, list[float]] = {"official": [], "ours": []}
    faults: dict[str, list[int]] = {"official": [], "ours": []}
    fractions = []
    load = os.getloadavg()[0]
    for _ in range(rounds):
        for who, worker in workers.items():
            answer = worker.ask(request)
            times[who].append(answer["s"])
            faults[who].append(answer["faults"])
            if who == "official":
                fractions.append(answer["k_fraction"])
    official_s, ours_s = (statistics.median(times[k]) for k in ("official", "ours"))
    return {"official_s": official_s, "ours_s": ours_s, "speedup": official_s / ours_s,
            "times": times, "page_faults": {k: statistics.median(v) for k, v in faults.items()},
            "official_k_fraction": statistics.fmean(fractions), "ours_k_fraction": ours_k,
            "loadavg_1min_start": load, "loadavg_1min_end": os.getloadavg()[0]}


def measure(threads: int, rounds: int, sizes: tuple[int, ...], arch: str | None,
            keep_memory: bool = False) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    official = load_official(WEIGHTS, path=arch)
    ours = camixer_fast.load_model(WEIGHTS, backend="auto")
    reference = camixer_fast.load_model(WEIGHTS, backend="reference")
    workers = {who: Worker(who, threads, arch, keep_memory) for who in ("official", "ours")}
    rows = []
    try:
        for size in sizes:
            for name, path in IMAGES.items():
                x = centre_crop(read_rgb(path), size)
                for gamma in GAMMAS:
                    row = {"image": name, "size": f"{size}x{size}", "gamma": gamma,
                           "check": check(official, ours, reference, x, gamma)}
                    bad = [k for k in ("official_vs_ours_same_draw", "ours_vs_reference")
                           if not row["check"][k] <= TOL]
                    if bad:
                        row["skipped"] = f"{', '.join(bad)} above {TOL:g}: not timed"
                    else:
                        with torch.no_grad():
                            _, routing = ours(x, return_routing=True)
                        row.update(time_pair(workers, float(routing.k_fraction().mean()), name,
                                             size, gamma, rounds))
                    rows.append(row)
                    print(f"{name} {size}x{size} gamma={gamma:g}: " + (
                        row.get("skipped") or f"official {row['official_s'] * 1e3:.0f} ms, "
                        f"ours {row['ours_s'] * 1e3:.0f} ms, {row['speedup']:.2f}x"),
                        file=sys.stderr)
    finally:
        for worker in workers.values():
            worker.close()
    return {"official": {"repo": OFFICIAL_REPO, "commit": OFFICIAL_COMMIT,
                         "file": arch_path(arch).name},
            "ours": {"backend": ours.backend, "routing": ours.routing},
            "threads": threads, "rounds": rounds, "tolerance": TOL, "target": TARGET,
            "mode": "torch.no_grad(), batch 1, each model in its own process, medians of "
                    "alternating rounds",
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_",
                                               "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                                               "LD_PRELOAD", "CAMIXER_FAST_KEEP_MEMORY")
                    if k in os.environ},
            "allocator": ("freed memory kept in both processes "
                          "(camixer_fast.backends.memory.keep_freed_memory)" if keep_memory
                          else "the system's default (in our process glibc's adaptive "
                          "thresholds raised by the CPU backend's first forward, as the "
                          "library does: camixer_fast.backends.memory.raise_mmap_threshold)"),
            "machine": machine_stamp(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "rows": rows}


def rows_of(result: dict, stamp: dict) -> list[dict]:
    allocator = "kept" if result["allocator"].startswith("freed memory kept") else "default"
    return [row("official-code", f"{allocator} {r['image']} {r['size']} gamma={r['gamma']}",
                "speedup", r["speedup"], "×", stamp, allocator=allocator, image=r["image"],
                size=r["size"], gamma=r["gamma"], official_ms=r["official_s"] * 1e3,
                ours_ms=r["ours_s"] * 1e3, official_commit=OFFICIAL_COMMIT[:7], **r["check"])
            for r in result["rows"] if "speedup" in r]


def main(argv: list[str] | None = None) -> int:
    from report import WORK_RESULTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="the official CAMixerSR_arch.py (or the checkout); "
                        "default $CAMIXER_OFFICIAL_ARCH")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", type=Path, default=WORK_RESULTS,
                        help="append the rows here (bench/results.jsonl: the results file)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="both processes keep freed memory "
                        "(camixer_fast.backends.memory.keep_freed_memory, what the camixer-fast "
                        "command does); default: the system's allocator as it is")
    parser.add_argument("--worker", choices=("official", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return serve(args.worker, args.threads, args.arch, args.keep_freed_memory)
    result = measure(args.threads, args.rounds, tuple(args.sizes), args.arch,
                     args.keep_freed_memory)
    rows = rows_of(result, machine_stamp())
    append_rows(rows, args.out)
    print(f"{len(rows)} rows -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
