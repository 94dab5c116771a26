"""Host-side costs of a CPU forward: page faults with and without freed memory kept, and the
forward on a thread other than the one that first ran torch work with several threads.

    python bench/cpu_host.py [--size 128] [--gamma 0.5] [--runs 5] [--json bench/results/cpu_host.json]
    python bench/cpu_host.py --memory-only ...     # the three allocator states only

Each case runs in a fresh process (the allocator's settings and OpenMP's thread teams are
per-process state), S on a centre crop of Set14 barbara, 2 torch threads, ``torch.no_grad()``,
two warm-up forwards, then the median wall time and minor page faults per forward:

- ``untouched`` / ``default`` / ``kept``: glibc as it is (``CAMIXER_FAST_KEEP_MEMORY=0``); as the
  library leaves it (the CPU backend's first forward raises glibc's adaptive thresholds,
  :func:`camixer_fast.backends.memory.raise_mmap_threshold`); after
  :func:`camixer_fast.backends.memory.keep_freed_memory` (what the command does);
- ``main thread`` / ``worker after main`` / ``worker, main at 1 thread``: the forwards on the main
  thread; on a new thread after the main thread ran forwards with 2 threads; on a new thread
  after the main thread ran its one forward at 1 thread (what the runner does when it loads).

The README's "Host memory and page faults" and the runner's thread settings quote this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

CASE = """
import json, resource, statistics, sys, threading, time
import torch
sys.path.insert(0, {bench!r})
from benchlib import SHARED, read_rgb, to_tensor
import camixer_fast
from camixer_fast.backends.memory import keep_freed_memory
size, gamma, runs, memory, where = {size}, {gamma}, {runs}, {memory!r}, {where!r}
if memory == "kept":
    assert keep_freed_memory()
rgb = read_rgb(SHARED / "data" / "Set14" / "HR" / "barbara.png")
top, left = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
x = to_tensor(rgb[top:top + size, left:left + size].copy())
torch.set_num_threads(1 if where == "worker, main at 1 thread" else 2)
model = camixer_fast.load_model(SHARED / "weights" / "CAMixerSR_S.pth", gamma=gamma)
with torch.no_grad():
    model(x)                      # the main thread's own torch work (at 1 or 2 threads)
out = {{}}

def measure():
    torch.get_num_threads()
    torch.set_num_threads(2)
    times, faults = [], []
    with torch.no_grad():
        model(x)
        model(x)
        for _ in range(runs):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out.update(ms=1e3 * statistics.median(times), faults=statistics.median(faults))

if where == "main thread":
    measure()
else:
    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
print(json.dumps(out))
"""

CASES = [("untouched", "main thread"), ("default", "main thread"), ("kept", "main thread"),
         ("kept", "worker after main"), ("kept", "worker, main at 1 thread")]


def run_case(size: int, gamma: float, runs: int, memory: str, where: str) -> dict:
    code = CASE.format(bench=str(BENCH), size=size, gamma=gamma, runs=runs, memory=memory,
                       where=where)
    own = ("GLIBC_TUNABLES", "CAMIXER_FAST_KEEP_MEMORY")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in own}
    if memory == "untouched":
        env["CAMIXER_FAST_KEEP_MEMORY"] = "0"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=False, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{memory}, {where}: failed\n{done.stderr[-2000:]}")
    return {"memory": memory, "where": where, **json.loads(done.stdout.splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="each case this many times")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory-only", action="store_true",
                        help="the allocator states on the main thread only")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if c[1] == "main thread"] if args.memory_only else CASES
    rows = []
    for round_ in range(args.rounds):
        for memory, where in cases:
            row = run_case(args.size, args.gamma, args.runs, memory, where)
            rows.append({"round": round_, **row})
            print(f"{args.size}x{args.size} gamma={args.gamma:g} {memory:7} {where:26} "
                  f"{row['ms']:7.1f} ms {row['faults']:9.0f} faults", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": args.size, "gamma": args.gamma,
                                         "runs": args.runs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
