"""camixer_fast.backends.memory: glibc's allocator kept from returning freed memory (the CLI's
start-up setting), checked in fresh processes since it changes the whole process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from camixer_fast.backends import memory as cpu_memory

PROBE = """
import ctypes, resource, sys, torch
from camixer_fast.backends.memory import keep_freed_memory, raise_mmap_threshold
mode, side, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
applied = {"keep": lambda: [keep_freed_memory()],
           "raise": lambda: [raise_mmap_threshold(), raise_mmap_threshold()]}.get(
               mode, lambda: [])()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# is a fresh 20 MiB request served by its own mmap region (below the threshold: from the heap)?
import ctypes.util
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
regions = libc.mallinfo2().hblks
block = libc.malloc(20 * 2**20)
mapped = libc.mallinfo2().hblks > regions
libc.free(block)
x = torch.ones(1, side, side, 36)
for _ in range(3):                 # warm up: the heap reaches its working size
    y = [x * 2 for _ in range(6)]
    del y
before = faults()
for _ in range(rounds):
    y = [x * 2 for _ in range(6)]  # six maps (2.4 MB at 128², 9.4 MB at 256²), then freed
    del y
print(*applied, mapped, faults() - before)
"""


def _probe(mode: str, side: int, rounds: int, **env: str) -> tuple[list[bool], bool, int]:
    """(what the setting calls returned, whether a 20 MiB request then got its own mmap region,
    minor page faults of the measured rounds), in a fresh process with the allocator settings
    of the environment cleared."""
    own = ("GLIBC_TUNABLES", "LD_PRELOAD", cpu_memory.ENV_SWITCH)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in own}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(side), str(rounds)],
                          capture_output=True, text=True, env=environ, timeout=120, check=True)
    *applied, mapped, faults = done.stdout.split()
    return [a == "True" for a in applied], mapped == "True", int(faults)


@pytest.mark.skipif(cpu_memory.unsupported() is not None,
                    reason=str(cpu_memory.unsupported()))
def test_freed_maps_are_reused_without_page_faults() -> None:
    applied, _, kept = _probe("keep", 128, 20)
    assert applied == [True]
    # 120 maps of 2.4 MB (576 pages each) touched: by default glibc may fault them all in again
    # (measured ~68,000 faults); kept, the freed blocks are reused (measured 0, at times one
    # map's pages when the heap grows once more)
    assert kept < 5 * 576, f"{kept} minor page faults with the freed memory kept"


def test_respects_the_users_own_settings(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert "MALLOC_TRIM_THRESHOLD_" in (cpu_memory.unsupported() or "")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "another allocator" in (cpu_memory.unsupported() or "")


def test_the_command_can_be_told_not_to(monkeypatch) -> None:
    monkeypatch.setenv(cpu_memory.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: pytest.fail("called"))
    assert cpu_memory.keep_freed_memory_for_command() is False


RETAINED = """
import torch
from camixer_fast.backends.memory import keep_freed_memory, retained_bytes
assert retained_bytes() == 0                       # nothing kept before the setting
assert keep_freed_memory()
maps = [torch.ones(1, 128, 128, 36) for _ in range(8)]   # 8 x 2.4 MB from the heap
del maps
print(retained_bytes())
"""


@pytest.mark.skipif(cpu_memory.unsupported() is not None,
                    reason=str(cpu_memory.unsupported()))
def test_kept_memory_counts_as_available() -> None:
    """Freed heap the process keeps is reported, and available_memory adds it back (the system
    counts it as used, but this process's next maps come from it)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", RETAINED], capture_output=True, text=True,
                          env=environ, timeout=120, check=True)
    assert int(done.stdout) >= 8 * 128 * 128 * 36 * 4


def test_available_memory_adds_the_kept_heap(monkeypatch) -> None:

    import torch

    from camixer_fast.inference import tiling

    # a command run earlier in this process may have kept heap already: start from none
    monkeypatch.setattr(tiling, "retained_bytes", lambda: 0)
    base = tiling.available_memory(torch.device("cpu"))
    monkeypatch.setattr(tiling, "retained_bytes", lambda: 1 << 30)
    assert abs(tiling.available_memory(torch.device("cpu")) - base - (1 << 30)) < 256 << 20


@pytest.mark.skipif(cpu_memory.unsupported() is not None,
                    reason=str(cpu_memory.unsupported()))
def test_raised_threshold_reuses_freed_maps_once_per_process() -> None:
    (first, second), mapped, raised = _probe("raise", 256, 10)
    assert first and not second
    assert not mapped, "a 20 MiB request still gets its own mmap region"
    # 60 maps of 9.4 MB (2304 pages each): glibc's own thresholds, once at their maximum, keep
    # the 56 MB of each round in the heap (measured 0 faults, at times 2 maps' pages when the
    # heap grows once more); left alone, its threshold stays at the first freed map's size and
    # the heap may be trimmed every round (measured 0 to 137,920 faults from one process to the
    # next, so the comparison is made on the threshold itself below)
    assert raised < 5 * 2304, f"{raised} minor page faults after raising the threshold"
    (off_first, _), untouched_mapped, _ = _probe("raise", 256, 10,
                                                 **{cpu_memory.ENV_SWITCH: "0"})
    assert not off_first
    assert untouched_mapped, "turned off, the threshold should be glibc's initial 128 KiB"
