"""Measurements that are not latencies, as rows of the results file:

    python bench/measure.py quality [--out FILE]   # PSNR / SSIM (Y), windows attended, MAdds
    python bench/measure.py memory [--out FILE]    # peak RSS of a 1024² LR input, fresh process

Rows go to a work folder unless ``--out`` names a file (``--out bench/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from common import GAMMAS, SHARED, THREADS, WEIGHTS, append_rows, dataset_lr, machine_stamp, row, to_tensor
from report import WORK_RESULTS

import camixer_fast
from camixer_fast.evaluation.cost import count_madds
from camixer_fast.evaluation.evaluate import evaluate

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, camixer_fast
    torch.set_num_threads(int(sys.argv[2]))
    model = camixer_fast.load_model(sys.argv[1], gamma=1.0, backend="cpu")
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
    assert bool(torch.isfinite(y).all())
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
""")


def quality(stamp: dict) -> list[dict]:
    """Per set and γ: mean PSNR, SSIM, fraction of windows attended and measured MAdds."""
    model = camixer_fast.load_model(WEIGHTS, backend="cpu")
    sets = {"Set5": (SHARED / "data" / "Set5" / "HR", SHARED / "data" / "Set5" / "LR_bicubic" / "X4"),
            "Set14": (SHARED / "data" / "Set14" / "HR", None)}
    rows = []
    for name, (hr_dir, lr_dir) in sets.items():
        lrs = dataset_lr(name)
        for score in evaluate(model, hr_dir, list(GAMMAS), lr_dir=lr_dir):
            model.gamma = score.gamma
            madds = statistics.fmean(count_madds(model, to_tensor(lr)) for lr in lrs.values())
            for metric, value, unit in (("psnr", score.mean_psnr, "dB"),
                                        ("ssim", score.mean_ssim, ""),
                                        ("k_fraction", score.mean_k_fraction, ""),
                                        ("madds", madds, "MAdds")):
                rows.append(row("quality", f"{name} gamma={score.gamma}", metric, value, unit,
                                stamp, set=name, gamma=score.gamma, backend=model.backend))
    return rows


def memory(stamp: dict) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(WEIGHTS), str(THREADS)],
                          capture_output=True, text=True, check=True)
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    return [row("memory", "cpu S gamma=1 LR 1024x1024 (peak RSS)", "peak_rss", peak, "MB",
                stamp, backend="cpu", gamma=1.0, lr_size="1024x1024")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("quality", "memory"))
    parser.add_argument("--out", type=Path, default=WORK_RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    rows = {"quality": quality, "memory": memory}[args.what](machine_stamp())
    append_rows(rows, args.out)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
