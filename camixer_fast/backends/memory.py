"""Keep freed host memory in the process: fewer page faults on the CPU path.

:func:`raise_mmap_threshold` (automatic, at the CPU backend's first forward) moves glibc's
adaptive thresholds to their maximum; :func:`keep_freed_memory` sets them outright
(process-wide: only the ``camixer-fast`` command calls it). ``CAMIXER_FAST_KEEP_MEMORY=0``: off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit Linux
TRIM_THRESHOLD = 2**30
ENV_SWITCH = "CAMIXER_FAST_KEEP_MEMORY"
PRIMER_BYTES = 32 * 2**20 - 2**16  # just under DEFAULT_MMAP_THRESHOLD_MAX, room for a header
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")
_applied = False
_raised = False


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@functools.cache
def _on_glibc() -> bool:
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
    """Freed heap kept for reuse (``mallinfo2().fordblks``) while :func:`keep_freed_memory` is
    in force, else 0: the system counts it as used, yet this process's next allocations reuse it."""
    if not _applied:
        return 0
    try:
        mallinfo2 = _libc().mallinfo2
    except AttributeError:  # glibc before 2.33
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def raise_mmap_threshold() -> bool:
    """Move glibc's adaptive mmap/trim thresholds to their maximum (mallopt(3)) by freeing one
    untouched :data:`PRIMER_BYTES` block, once per process. Returns whether it was freed here."""
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
    """Make glibc keep up to 1 GiB of freed heap for reuse (process-wide ``mallopt``).
    Returns whether the settings are in force; False where :func:`unsupported` gives a reason."""
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
    """:func:`keep_freed_memory` unless ``CAMIXER_FAST_KEEP_MEMORY=0`` (the command's call)."""
    return not _switched_off() and keep_freed_memory()
