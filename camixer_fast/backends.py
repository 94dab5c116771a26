"""Explicit backend choice for the mixers' hot operations.

- ``"reference"``: the pure-PyTorch operations of :mod:`camixer_fast.reference` (any device).
- ``"cpu"``: :mod:`camixer_fast.cpu_ops`, the fast CPU inference path (channels-last maps,
  work on the hard windows only); same results as the reference up to fp32 rounding. CPU only.
- ``"triton"``: the fused kernels of :mod:`camixer_fast.kernels` (CUDA devices).
- ``"auto"``: ``"triton"`` on a CUDA device :func:`can_use_triton` accepts, ``"cpu"`` on a CPU
  device, else ``"reference"``.

Nothing falls back silently: asking for ``"triton"`` where it cannot run raises and says why.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_use_triton(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device`` (default: CUDA if present, else CPU),
    and why not if it cannot: (ok, reason).

    CUDA devices of compute capability 8.0 or newer run the compiled kernels. A CPU device is
    accepted only under ``TRITON_INTERPRET=1`` (Triton's interpreter: exact but slow, used by
    the test suite).
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; Linux only)"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "this PyTorch build or machine has no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"the kernels need compute capability >= 8.0, this GPU has {major}.{minor}"
        return True, "compiled kernels on CUDA"
    if device.type == "cpu":
        if _interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): exact but slow"
        return False, ("the Triton kernels need a CUDA device; on the CPU they run only in "
                       "Triton's interpreter (set TRITON_INTERPRET=1 before importing them)")
    return False, f"device type {device.type!r} is not supported by the Triton kernels"


def can_use_cpu(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the CPU backend can run on ``device`` (default: the CPU): (ok, reason)."""
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        return False, f"the CPU backend runs on CPU devices only, not {device.type!r}"
    return True, "channels-last PyTorch operations on the CPU"


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Turn a requested backend into the one that will run: "reference", "cpu" or "triton".

    "auto" gives "triton" on a CUDA device :func:`can_use_triton` accepts, "cpu" on a CPU
    device (``device=None`` means the CPU here, where a model is built), else "reference".
    Raises ValueError for an unknown name, RuntimeError when "triton" or "cpu" is asked for
    where it cannot run (:func:`can_use_triton`, :func:`can_use_cpu` say why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # the interpreter is for tests: "auto" takes the kernels only where they are compiled
        on_cuda = device is not None and torch.device(device).type == "cuda"
        if on_cuda:
            return "triton" if can_use_triton(device)[0] else "reference"
        return "cpu" if can_use_cpu(device)[0] else "reference"
    if backend == "triton":
        ok, reason = can_use_triton(device)
        if not ok:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}")
    if backend == "cpu":
        ok, reason = can_use_cpu(device)
        if not ok:
            raise RuntimeError(f"backend 'cpu' cannot run here: {reason}")
    return backend


def backend_ops(backend: str) -> SimpleNamespace:
    """The operation table of a resolved backend ("reference", "cpu" or "triton")."""
    if backend == "reference":
        from camixer_fast.reference.model import REFERENCE_OPS

        return REFERENCE_OPS
    if backend == "cpu":
        from camixer_fast.cpu_ops import CPU_OPS

        return CPU_OPS
    if backend == "triton":
        from camixer_fast.kernels import TRITON_OPS

        return TRITON_OPS
    raise ValueError(f"no operation table for backend {backend!r}; resolve it first")
