"""Explicit backend choice for the mixers' hot operations.

- ``"reference"``: the pure-PyTorch operations of :mod:`camixer_fast.reference` (any device).
- ``"triton"``: the fused kernels of :mod:`camixer_fast.kernels` (CUDA devices).
- ``"auto"``: ``"triton"`` when :func:`can_use_triton` accepts the device, else ``"reference"``.

Nothing falls back silently: asking for ``"triton"`` where it cannot run raises and says why.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

BACKENDS = ("auto", "reference", "triton")


def can_use_triton(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device``, and if not, why (a readable reason)."""
    return False, "the fused Triton kernels are not available in this version of camixer_fast"


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Turn a requested backend into the one that will run: "reference" or "triton".

    Raises ValueError for an unknown name, RuntimeError when "triton" is asked for and
    :func:`can_use_triton` declines.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ok, reason = can_use_triton(device)
    if backend == "auto":
        return "triton" if ok else "reference"
    if backend == "triton" and not ok:
        raise RuntimeError(f"backend 'triton' cannot run here: {reason}")
    return backend


def backend_ops(backend: str) -> SimpleNamespace:
    """The operation table of a resolved backend ("reference" or "triton")."""
    if backend == "reference":
        from camixer_fast.reference.model import REFERENCE_OPS

        return REFERENCE_OPS
    raise ValueError(f"no operation table for backend {backend!r}; resolve it first")
