"""What every benchmark shares: paths, the cases (γ, models, precisions, tolerances), the
machine stamp, inputs, and rows of the one results file (bench/results.jsonl)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from camixer_fast.evaluation.imresize import make_lr
from camixer_fast.io.image import read_rgb

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = Path(os.environ.get("CAMIXER_FAST_SHARED", REPO.parent / "shared")).resolve()
WEIGHTS = SHARED / "weights" / "CAMixerSR_S.pth"
RESULTS = BENCH / "results.jsonl"
THREADS = int(os.environ.get("CAMIXER_BENCH_THREADS", "2"))
URBAN_IMAGES = int(os.environ.get("CAMIXER_BENCH_URBAN", "5"))

GAMMAS = (1.0, 0.5, 0.25, 0.0)
MODELS = {"S": 36, "B": 60}
PRECISIONS = {"fp32": ("float32", False), "tf32": ("float32", True),
              "fp16": ("float16", False), "bf16": ("bfloat16", False)}
"""name -> (weights' dtype, TF32 allowed); fp32 is the parity mode (TF32 off everywhere)."""
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 2e-2, "bf16": 1e-1}
"""Max |output - official fp32 output| for a GPU case to be timed (the suite's bounds)."""
MEAN_TOLERANCE = {"tf32": 1e-3, "fp16": 1e-3, "bf16": 5e-3}
"""Outside fp32 a window at the routing threshold may flip (moving its max by ~0.1-1): such a
case also passes on the mean |error|, the suite's bound for half precision."""


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_stamp() -> dict:
    """Device, versions, thread count and commit of this run."""
    from importlib import metadata

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} (sm_{props.major}{props.minor})"
    else:
        device = f"{cpu_model_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"device": device, "versions": {"torch": torch.__version__, "triton": triton,
                                           "cuda": torch.version.cuda},
            "commit": commit(), "threads": torch.get_num_threads()}


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def record(benchmark, **info) -> None:
    """``info``, the thread count and the load average into the benchmark's ``extra_info``."""
    benchmark.extra_info.update(info, threads=torch.get_num_threads(),
                                loadavg_1min=os.getloadavg()[0])


@contextmanager
def precision_mode(name: str):
    """PyTorch's TF32 switches for precision ``name`` of :data:`PRECISIONS`; restored after."""
    tf32 = PRECISIONS[name][1]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def errors(out: torch.Tensor, expected: torch.Tensor) -> dict:
    err = (out.float() - expected.float()).abs()
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean())}


def passes(err: dict, precision: str) -> bool:
    """A case's check against the official fp32 output (:data:`TOLERANCE`, :data:`MEAN_TOLERANCE`)."""
    return err["max_abs"] <= TOLERANCE[precision] or (
        precision in MEAN_TOLERANCE and err["mean_abs"] <= MEAN_TOLERANCE[precision])


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def centre_crop(path: Path, width: int, height: int) -> torch.Tensor:
    """The centre width×height crop of an image, (1, 3, H, W) float32; smaller images are
    reflected past their edge (up to twice their size)."""
    rgb = read_rgb(path)
    pad_h, pad_w = max(0, height - rgb.shape[0]), max(0, width - rgb.shape[1])
    if pad_h >= rgb.shape[0] or pad_w >= rgb.shape[1]:
        raise ValueError(f"{path} is smaller than half of {width}x{height}")
    rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    top, left = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    return to_tensor(np.ascontiguousarray(rgb[top:top + height, left:left + width]))


def dataset_lr(name: str) -> dict[str, np.ndarray]:
    """LR inputs (×4) by image name: Set5's LR files, Set14 made from HR with MATLAB bicubic,
    the first :data:`URBAN_IMAGES` Urban100 HR images as large inputs."""
    data = SHARED / "data"
    if name == "Set5":
        return {p.stem.removesuffix("x4"): read_rgb(p)
                for p in sorted((data / "Set5" / "LR_bicubic" / "X4").glob("*.png"))}
    if name == "Set14":
        return {p.stem: make_lr(read_rgb(p), 4) for p in sorted((data / "Set14" / "HR").glob("*.png"))}
    if name == "Urban100":
        return {p.stem: read_rgb(p)
                for p in sorted((data / "Urban100" / "HR").glob("*.png"))[:URBAN_IMAGES]}
    raise ValueError(f"unknown set {name!r}")


def row(suite: str, case: str, metric: str, value: float, unit: str, stamp: dict, **params) -> dict:
    """One measurement of the results file."""
    return {"suite": suite, "case": case, "metric": metric, "value": value, "unit": unit,
            "params": params, "device": stamp["device"], "versions": stamp["versions"],
            "commit": stamp["commit"], "date": stamp.get("date") or
            datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def append_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def read_rows(path: Path = RESULTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
