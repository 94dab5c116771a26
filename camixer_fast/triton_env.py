"""Where Triton's kernels would run, read from the environment alone (imports neither torch nor
triton): the one place that reads ``TRITON_INTERPRET``."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
