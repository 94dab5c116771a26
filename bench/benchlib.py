"""Helpers of the benchmark suites and ``bench/report.py``: paths, machine stamp, inputs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from camixer_fast.io.image import read_rgb  # noqa: F401 - the one RGB reader, for the suites
from camixer_fast.evaluation.imresize import make_lr

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = Path(os.environ.get("CAMIXER_FAST_SHARED", REPO.parent / "shared")).resolve()
THREADS = int(os.environ.get("CAMIXER_BENCH_THREADS", "2"))
URBAN_IMAGES = int(os.environ.get("CAMIXER_BENCH_URBAN", "5"))


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_stamp() -> dict:
    """CPU model, core count, torch / triton versions and the thread count of this session."""
    from importlib import metadata

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return {"cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "triton": triton, "threads": torch.get_num_threads()}


def record(benchmark, **info) -> None:
    """Put ``info``, the thread count and the current load average into ``extra_info``."""
    benchmark.extra_info.update(info, threads=torch.get_num_threads(),
                                loadavg_1min=os.getloadavg()[0])


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def dataset_lr(name: str) -> dict[str, np.ndarray]:
    """LR inputs (×4) of a benchmark set by image name: Set5 from its LR files, Set14 made
    from HR with MATLAB bicubic (:func:`make_lr`), Urban100 HR images used as large inputs."""
    if name == "Set5":
        folder = SHARED / "data" / "Set5" / "LR_bicubic" / "X4"
        return {p.stem.removesuffix("x4"): read_rgb(p) for p in sorted(folder.glob("*.png"))}
    if name == "Set14":
        folder = SHARED / "data" / "Set14" / "HR"
        return {p.stem: make_lr(read_rgb(p), 4) for p in sorted(folder.glob("*.png"))}
    if name == "Urban100":
        folder = SHARED / "data" / "Urban100" / "HR"
        return {p.stem: read_rgb(p) for p in sorted(folder.glob("*.png"))[:URBAN_IMAGES]}
    raise ValueError(f"unknown set {name!r}")
