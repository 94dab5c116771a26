"""What a compiled Triton kernel holds, read without a GPU: its resource use and whether its
matrix products run on tensor cores.

Both gates (``aot.py``, ``jit_gate.py``) check every kernel they compile with :func:`inspect`:

- registers, spills (stack frame + local memory) and shared memory, from
  ``cuobjdump --dump-resource-usage`` of the cubin;
- tensor cores: each ``tt.dot`` of the kernel's Triton IR whose operands are fp16 / bf16, or fp32
  with ``inputPrecision = tf32``, must come out as HMMA (mma.sync, sm_80+) or HGMMA (wgmma,
  sm_90) instructions in the SASS (``cuobjdump --dump-sass``). A dot that Triton lowered to FMA
  loops instead runs ten times slower and no parity test notices.
- no wgmma operand in a shared layout swizzled at less than 128 bytes (the TTGIR's
  ``nvmma_shared`` layouts, Triton 3.3+): the only such kernels run on a GPU so far, the
  64×32 fp16 / bf16 attention tiles, read out of bounds or returned NaN on an H200 (issue 9;
  the analysis is in git history, ``git log -p -- kernels/_tiles.py``).

The CUDA binary tools come from the triton wheel (``triton/backends/nvidia/bin``), else PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass

SHARED_LIMIT = 101_376
"""Shared memory per program the kernels may use: 99 KiB, the opt-in limit of sm_86 / sm_89 /
sm_120 GPUs, the smallest of the compute capabilities >= 8.0 the Triton backend accepts
(sm_80 allows 163 KiB, sm_90 227 KiB). Triton checks it only when it loads a kernel on a GPU."""

_DOT = re.compile(r"\btt\.dot\s+(?P<args>[^:]*):\s*tensor<[0-9x]+x(?P<a>\w+)>\s*\*\s*"
                  r"tensor<[0-9x]+x(?P<b>\w+)>")
_NVMMA = re.compile(r"^(#\w+) = #ttg\.nvmma_shared<\{swizzlingByteWidth = (\d+)", re.M)
_MMA = re.compile(r"\b(HGMMA|HMMA)\.[0-9A-Za-z.]+")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class KernelReport:
    """One compiled kernel: resources per program and tensor-core use."""

    registers: int
    stack: int            # bytes of stack frame per thread (spills land here)
    local: int            # bytes of local memory per thread
    shared: int           # bytes of shared memory per program, static + dynamic
    dots: int             # tt.dot operations in the Triton IR
    tensor_core_dots: int  # of those, dots whose operand types call for tensor cores
    mma: tuple[str, ...]  # distinct HMMA / HGMMA shapes in the SASS
    narrow_swizzle: tuple[int, ...] = ()  # swizzle widths < 128 B of wgmma operands

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def problems(self) -> list[str]:
        """What is wrong with the kernel, in words; empty when it passes both gates."""
        found = []
        if self.spills:
            found.append(f"spills registers (stack {self.stack} B, local {self.local} B)")
        if self.registers > 255:
            found.append(f"{self.registers} registers per thread")
        if self.shared > SHARED_LIMIT:
            found.append(f"{self.shared} B of shared memory > {SHARED_LIMIT}")
        if self.narrow_swizzle:
            widths = "/".join(map(str, self.narrow_swizzle))
            found.append(f"wgmma operand in a {widths}-byte swizzled shared layout: such tiles "
                         "read out of bounds or gave NaN on an H200 (issue 9)")
        if self.tensor_core_dots and not self.mma:
            found.append(f"{self.tensor_core_dots} fp16/bf16/tf32 dot(s) but no HMMA/HGMMA "
                         "instruction: the products run on the FMA units")
        return found

    def as_dict(self) -> dict:
        return dict(asdict(self), mma=list(self.mma), narrow_swizzle=list(self.narrow_swizzle))


def tool(name: str) -> str:
    """Path of a CUDA binary tool: the triton wheel's own copy, else the one on PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither in the triton wheel ({bundled}) nor on PATH")
    return found


def tensor_core_dots(ttir: str) -> tuple[int, int]:
    """(dots, dots that must use tensor cores) in a kernel's Triton IR text.

    fp16 / bf16 operands always do; fp32 operands with ``inputPrecision = tf32`` or ``tf32x3``
    do, IEEE fp32 products (``ieee``) run on the FMA units by design.
    """
    dots = tensor_core = 0
    for m in _DOT.finditer(ttir):
        dots += 1
        a, b = m.group("a"), m.group("b")
        if a in ("f16", "bf16") and b in ("f16", "bf16"):
            tensor_core += 1
        elif a == b == "f32":
            # the IR prints no precision for IEEE (the op's default)
            precision = re.search(r"inputPrecision\s*=\s*(\w+)", m.group("args"))
            if precision is not None and precision.group(1).startswith("tf32"):
                tensor_core += 1
    return dots, tensor_core


def narrow_wgmma_swizzles(ttgir: str) -> tuple[int, ...]:
    """Swizzle widths below 128 B of the shared layouts that wgmma (``warp_group_dot``) reads,
    in a kernel's TTGIR text (Triton 3.3+ prints ``nvmma_shared``; older TTGIR yields none)."""
    narrow = {alias: int(width) for alias, width in _NVMMA.findall(ttgir) if int(width) < 128}
    found = set()
    for line in ttgir.splitlines():
        if "warp_group_dot " in line:
            found |= {w for alias, w in narrow.items() if re.search(re.escape(alias) + r"(?!\w)",
                                                                    line)}
    return tuple(sorted(found))


def inspect(kernels: list[tuple[dict, int]]) -> list[KernelReport]:
    """Read compiled kernels: (asm, dynamic shared bytes) each, as in
    ``(c.asm, c.metadata.shared)`` of a triton CompiledKernel (asm: "cubin", "ttir", "ttgir").

    The dynamic shared memory is Triton's; the cubin's static figure does not include it.
    One cuobjdump process reads them all (a process per kernel costs more than the reading).
    """
    if not kernels:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (asm, _) in enumerate(kernels):
            # disassembling takes ~0.3 s a kernel: only where tensor cores are expected
            kind = "sass" if tensor_core_dots(asm["ttir"])[1] else "res"
            paths.append(os.path.join(tmp, f"{i}.{kind}.cubin"))
            with open(paths[-1], "wb") as f:
                f.write(asm["cubin"])
        script = ('for f in "$@"; do echo "@@@ $f"; case "$f" in *.sass.cubin) s=--dump-sass;; '
                  '*) s=;; esac; "$0" --dump-resource-usage $s "$f" || exit 1; done')
        out = subprocess.run(["sh", "-c", script, tool("cuobjdump"), *paths], capture_output=True,
                             text=True, check=True, timeout=600).stdout
    dumps = out.split("@@@ ")[1:]
    if len(dumps) != len(kernels):
        raise RuntimeError(f"cuobjdump read {len(dumps)} of {len(kernels)} cubins:\n{out[-2000:]}")
    reports = []
    for dump, (asm, shared_dynamic) in zip(dumps, kernels):
        found = _RESOURCES.search(dump)
        if not found:
            raise RuntimeError(f"no resource usage in cuobjdump's output:\n{dump[:2000]}")
        reg, stack, shared, local = map(int, found.groups())
        dots, tc = tensor_core_dots(asm["ttir"])
        mma = tuple(sorted({m.group(0) for m in _MMA.finditer(dump)}))
        reports.append(KernelReport(reg, stack, local, shared + int(shared_dynamic), dots, tc, mma,
                                    narrow_wgmma_swizzles(asm.get("ttgir", ""))))
    return reports
