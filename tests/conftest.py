"""Shared fixtures: the read-only ``../shared`` folder (golden outputs, weights, images), and
the device the Triton kernels run on.

Tests that need ``../shared`` fail, never skip, when it is missing: CI must prove golden parity.
Its location can be overridden with ``CAMIXER_FAST_SHARED``.

The same command runs the suite on a CPU machine and on a CUDA one. On a CPU the kernels run in
Triton's interpreter (``DEVICE == "cpu"``, ``INTERPRETED``); on a GPU they are compiled
(``DEVICE == "cuda"``). Parity tests use :func:`no_tf32` (PyTorch lets cuDNN convolutions use
TF32 by default); comparisons across devices pin the device or name their tolerance.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import camixer_fast
from camixer_fast.io.image import read_rgb

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMIXER_FAST_SHARED", REPO.parent / "shared")).resolve()
BENCH = REPO / "bench"


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the kernel tests run: compiled on a GPU, else in Triton's CPU interpreter."""
INTERPRETED = DEVICE == "cpu"
"""The kernels run in Triton's interpreter: a test that needs it (none does today) skips on a
GPU with ``pytest.mark.skipif(not INTERPRETED, reason=...)``, saying why."""


def pytest_configure(config: pytest.Config) -> None:
    # no network in tests: the registered weights resolve to ../shared/weights
    os.environ["CAMIXER_FAST_WEIGHTS"] = str(SHARED / "weights")
    if DEVICE == "cpu":
        # before any test module imports the kernels: run them in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")


@contextmanager
def tf32_off() -> Iterator[None]:
    """IEEE fp32 in CUDA convolutions (cuDNN) and matrix products within; restores the settings.

    PyTorch lets cuDNN use TF32 by default (10-bit mantissas on Ampere and newer): fp32 parity
    with the reference (1e-4 and tighter) needs it off. No effect on a CPU.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def no_tf32() -> Iterator[None]:
    """TF32 off for a whole module (``pytestmark = pytest.mark.usefixtures("no_tf32")``): set
    before the module's fixtures run their forwards, restored after its last test."""
    with tf32_off():
        yield


def bench_module(name: str, folder: Path = BENCH):
    """A script module of ``bench/`` (or of ``folder``, e.g. ``tests/gates``), imported the way
    the scripts import each other (their folder on ``sys.path``)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(name)


@pytest.fixture()
def poisoned_allocations(monkeypatch):
    """Fill every tensor torch.empty / torch.empty_like returns with garbage (NaN, or -7 for
    integers), so that an element a kernel should write and does not fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture()
def one_thread():
    """One torch thread for the test: small convolutions on a busy 2-core machine run many times
    slower with two threads fighting over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "golden" / "camixer_s_x4.pt").is_file():
        pytest.fail(f"the shared folder is missing or incomplete: {SHARED} "
                    "(set CAMIXER_FAST_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def weights_path(shared: Path) -> Path:
    return shared / "weights" / "CAMixerSR_S.pth"


@pytest.fixture(scope="session")
def golden(shared: Path) -> dict:
    return torch.load(shared / "golden" / "camixer_s_x4.pt", weights_only=True)


@pytest.fixture(scope="session")
def model_s(weights_path: Path) -> camixer_fast.CAMixerSR:
    """The official S model on the reference backend; tests set ``gamma`` themselves."""
    return camixer_fast.load_model(weights_path, backend="reference")


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float, *,
                 relative: bool = False) -> None:
    """Fail unless max|out - ref| (divided by max|ref| when ``relative``) <= tol; print it."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref).abs().max().item()
    if relative:
        err /= max(ref.abs().max().item(), 1e-30)
    kind = "relative" if relative else "abs"
    print(f"{name}: max {kind} error {err:.3e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: max {kind} error {err:.3e} > {tol:.0e}"


def load_rgb(path: Path) -> torch.Tensor:
    """A PNG as a (1, 3, H, W) float tensor in [0, 1]."""
    arr = read_rgb(path).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float -> H×W×3 uint8, clamped and rounded as SR benchmarks do."""
    arr = img[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
    return arr.numpy()
