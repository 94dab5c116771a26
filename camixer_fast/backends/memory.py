"""Keep freed host memory in the process: fewer page faults on the CPU path.

A CPU forward allocates and frees maps of a few MB many times (2.4 MB per map for S at
128×128, 9.4 MB at 256×256). glibc's malloc gives freed memory back to the system once the
free space at the top of its heap exceeds a threshold (and serves large requests with fresh
``mmap`` regions), so the next block or forward touches new pages and the kernel faults and
zeroes each of them.

Two remedies, one automatic and one chosen:

- :func:`raise_mmap_threshold` (called once when the CPU backend's operations are first
  loaded, at its first forward, unless ``CAMIXER_FAST_KEEP_MEMORY=0``): glibc adapts its
  thresholds as it sees large blocks freed, but only up to the largest it has seen. At 256×256
  a map is 9.4 MB, the threshold stays near that, and the heap is trimmed between blocks. This
  frees one 32 MiB block, which moves glibc's own adaptive thresholds to their documented
  maximum (requests up to 32 MiB from the heap, up to 64 MiB of free heap kept): the state any
  program that frees a tensor of that size is in. Measured on the 2-core CI machine
  (``bench/cpu_host.py``, ``bench/results/cpu_host_128.json`` and ``_256.json``; S, γ = 0.5,
  2 threads, ``torch.no_grad()``), glibc left alone against raised: at 128×128 49,376–53,152
  minor page faults and 223–231 ms per forward against 0 and 154–159 ms; at 256×256 13,760
  faults and 692–695 ms against 0–1,152 and 648–660 ms.
- :func:`keep_freed_memory` sets the thresholds outright (glibc's ``mallopt``; up to 1 GiB kept,
  so no faults at any γ). It changes the whole process's allocator, so the library never does
  it on its own: the ``camixer-fast`` command, which owns its process, calls it at start
  (``CAMIXER_FAST_KEEP_MEMORY=0`` turns that off), and a Python program may call it once. The
  same effect without code: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
  in the environment, or another allocator (jemalloc, tcmalloc) through ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Requests below 32 MiB come from the heap, where freed blocks are reused (glibc's largest
accepted value on 64-bit Linux); larger ones keep their own ``mmap`` region."""
TRIM_THRESHOLD = 2**30
"""Up to 1 GiB of free heap is kept for reuse instead of being returned to the system."""
ENV_SWITCH = "CAMIXER_FAST_KEEP_MEMORY"
PRIMER_BYTES = 32 * 2**20 - 2**16
"""The block :func:`raise_mmap_threshold` frees: just under glibc's largest adaptive threshold
(``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB on 64-bit), with room for malloc's own header."""
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")
_applied = False
_raised = False


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@functools.cache
def _on_glibc() -> bool:
    # platform.libc_ver reads the interpreter's binary: asked once
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH) == "0"


def unsupported() -> str | None:
    """Why :func:`keep_freed_memory` would do nothing here, or None."""
    if not _on_glibc():
        return "not Linux with glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"another allocator is preloaded ({preload})"
    chosen = [name for name in _USER_SETTINGS if name in os.environ]
    if chosen:
        return f"the environment already sets {', '.join(chosen)}"
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def retained_bytes() -> int:
    """Freed heap this process keeps for its own reuse (glibc's ``mallinfo2().fordblks``) while
    :func:`keep_freed_memory` is in force, else 0.

    The system counts it as used (MemAvailable, a cgroup's usage), yet the next allocations of
    this process are served from it: :func:`camixer_fast.inference.tiling.available_memory` adds it back,
    so that ``tile="auto"`` sizes tiles the same after a large image as before it."""
    if not _applied:
        return 0
    try:
        mallinfo2 = _libc().mallinfo2
    except AttributeError:                   # glibc before 2.33
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def raise_mmap_threshold() -> bool:
    """Move glibc's adaptive mmap and trim thresholds to their maximum, once per process.

    glibc (mallopt(3), M_MMAP_THRESHOLD): "when blocks larger than the current threshold and
    less than or equal to DEFAULT_MMAP_THRESHOLD_MAX are freed, the threshold is adjusted upward
    to the size of the freed block", and the trim threshold to twice that. This allocates and
    frees one :data:`PRIMER_BYTES` block (never touched: no memory is used), which does exactly
    that. The adaptation stays glibc's (no ``mallopt``); where the environment or an earlier
    ``mallopt`` fixed the thresholds, or another allocator is loaded, it changes nothing.
    ``CAMIXER_FAST_KEEP_MEMORY=0`` in the environment turns it off. Returns whether the block
    was freed here (False on later calls, when turned off, and off glibc).
    """
    global _raised
    if _raised or _switched_off() or not _on_glibc():
        return False
    _raised = True
    libc = _libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(PRIMER_BYTES)
    if not block:
        return False
    libc.free(block)
    return True


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (process-wide; see the module docstring).

    Returns True when the settings are in force (now or from an earlier call), False where
    :func:`unsupported` gives a reason or ``mallopt`` refused them. The process then keeps up to
    1 GiB of freed heap (its resident size stays near its peak), which the next forward reuses.
    """
    global _applied
    if _applied:
        return True
    if unsupported() is not None:
        return False
    libc = _libc()
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ok
    return ok


def keep_freed_memory_for_command() -> bool:
    """The ``camixer-fast`` command's call: :func:`keep_freed_memory` unless
    ``CAMIXER_FAST_KEEP_MEMORY=0``."""
    return not _switched_off() and keep_freed_memory()
