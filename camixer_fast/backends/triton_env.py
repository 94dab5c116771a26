"""How Triton will run in this process, read from the environment alone: the one place that
reads ``TRITON_INTERPRET``.

Dependency-free on purpose (imports neither torch nor triton): the backend choice, the kernels
and the gates ask the same questions before triton is imported.

- :func:`interpreting`: ``TRITON_INTERPRET`` is set, so ``@triton.jit`` kernels run in Triton's
  CPU interpreter (exact, slow; the test suite on machines without a GPU).
- :func:`compile_only`: a JIT gate (``tests/gates/jit_gate.py``) has installed a stand-in
  driver: every launch compiles for a GPU through Triton's own JIT and runs nothing, so the
  kernels' outputs are never computed. Only a gate sets it.
"""

from __future__ import annotations

import os

INTERPRET_VAR = "TRITON_INTERPRET"
COMPILE_ONLY_VAR = "CAMIXER_FAST_COMPILE_ONLY"

_TRUE = ("1", "true", "on", "yes", "y")


def _flag(name: str) -> bool:
    # Triton 3.9 reads its boolean variables this way (Triton 3.2 took only "1")
    return os.environ.get(name, "").strip().lower() in _TRUE


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel module is imported: set it before that.
    """
    return _flag(INTERPRET_VAR)


def compile_only() -> bool:
    """Whether a JIT gate's stand-in driver compiles the kernels on a CPU without running them
    (``CAMIXER_FAST_COMPILE_ONLY=1``, set by the gate): the Triton backend may then be chosen
    for CPU tensors, whose kernel outputs are left unwritten."""
    return _flag(COMPILE_ONLY_VAR)
