"""What the two attention kernel modules share: window token offsets, channel padding, the dot
precision, and the launch configurations with what is known of them.

Configurations (issue 9, a probe of the hard-window kernel alone on one H200 with Triton 3.6,
S at 720p: C = 36, 240 windows, K = 120; error against the fp32 reference):

| dtype | BM×BN, warps, stages | result | µs per call |
|---|---|---|---|
| fp32 ieee | 16×32, 4, 1 | ok, 1.2e-5 | 280 |
| fp32 ieee | 32×32, 4, 1 | ok, 1.2e-5 | 261 |
| fp32 tf32 | 64×32, 4, 1 / 64×64, 4, 2 | ok, 2.2e-2 | 51 / 53 |
| fp16 | 64×32, 8, 1 | illegal memory access | -- |
| fp16 / bf16 | 64×32, 4, 1 | NaN | 24 |
| fp16 | 32×32, 4, 1 / 64×64, 4, 2 / 128×64, 8, 2 | ok, 1.8e-2 | 49 / 28 / 30 |
| bf16 | 64×64, 4, 2 | ok, 1.6e-1 | 26 |

Why 64×32 breaks in half precision, as far as the compiled code shows (Triton 3.6 and 3.9
compile the same layouts; read here from the TTGIR and PTX, without a GPU): with BM = 64 and 4
or 8 warps, sm_90 runs the dots as wgmma (HGMMA), whose shared-memory operands Triton lays out
in NVMMA swizzled layouts. Every configuration that ran correctly uses only 128-byte swizzling:
BN = 64 gives fp16 operand rows of 64 × 2 B, and fp32 (tf32) 64×32 rows of 32 × 4 B, both
128 B. BN = 32 in fp16 / bf16 is the only case whose k_in and v tiles (rows of 32 × 2 B) get
64-byte swizzled layouts (``swizzlingByteWidth = 64``). BM = 32 never uses wgmma (mma.sync,
HMMA, fed by ldmatrix), and was fine. compute-sanitizer caught threads of the second warpgroup
(160, 224) reading shared memory at 0x4400 in the P·V ``tl.dot``: 0x400 + 16 KiB, the end of
the 16 KiB this configuration allocates (the size it reports, 512 B, may be wrong: it misreads
wgmma access sizes, NVIDIA/compute-sanitizer-samples#19). The descriptors readable in the PTX
(64-byte swizzle, stride 512 B, the second warpgroup's B operand 2 KiB into the 4 KiB v tile)
stay inside the tile, so the bad address is made below the PTX; we did not find where.
Triton's tracker has the same pattern: triton-lang/triton#11366 (an illegal shared read by
wgmma on sm_90 in a kernel with several dots, a block of 32, 4 warps: fails on 3.7.1, clean on
3.5.1), #10573 (3.6.0 and later: illegal memory access in an attention backward with head
dim 32), and pytorch/helion#1905 (two dots in a kernel on H100: dot blocks of 16 and 32 give an
illegal access or silent corruption, 8 and >= 64 are safe).

So on a GPU: half precision uses 64×64 tiles and pads channels to at least 64 (no dot operand
narrower than 128 B); the JIT gate fails any sm_90 kernel with a wgmma operand swizzled at
less than 128 B. A configuration that has not run on a GPU is marked unproven.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from camixer_fast.backends.triton_env import interpreting


@triton.jit
def window_tokens(win, i_blk, COLS, W, WS: tl.constexpr, BT: tl.constexpr):
    """Flat pixel offsets [BT] of tokens i_blk·BT ... of window ``win`` (row-major tokens)."""
    o_t = i_blk * BT + tl.arange(0, BT)
    return ((win // COLS) * WS + o_t // WS) * W + (win % COLS) * WS + o_t % WS


class TileConfig(NamedTuple):
    """A launch configuration of an attention kernel."""

    bm: int              # query tokens per program
    bn: int              # key tokens per inner step
    num_warps: int
    num_stages: int
    proven: bool         # ran correctly on a GPU (issue 9's H200 run); else unproven on a GPU


def whole_windows(window_size: int) -> TileConfig:
    """Under the interpreter: whole windows per program (fewer, larger programs run faster)."""
    tokens = window_size * window_size
    return TileConfig(tokens, tokens, 4, 1, False)


def for_window(config: TileConfig, window_size: int) -> TileConfig:
    """``config`` for windows of ``window_size``: tiles cut to the window's token count, and
    proven only for the 16×16 windows it ran on (the published models')."""
    tokens = window_size * window_size
    return TileConfig(min(config.bm, tokens), min(config.bn, tokens), config.num_warps,
                      config.num_stages, config.proven and window_size == 16)


HALF = (torch.float16, torch.bfloat16)


def channel_block(channels: int, dtype: torch.dtype) -> int:
    """Channels padded (with masks, in the kernel) to a power of two: at least 16 for
    ``tl.dot``, at least 64 in fp16 / bf16 on a GPU, where a narrower tile gets a 64-byte
    swizzled wgmma operand on sm_90 (see the module docstring)."""
    least = 64 if dtype in HALF and not interpreting() else 16
    return max(least, triton.next_power_of_2(channels))


def check_maps(x: Tensor, others: dict[str, Tensor], window_size: int) -> tuple[int, ...]:
    """Validate (B, C, H, W) maps for the attention kernels; returns (B, C, H, W)."""
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W), got {tuple(x.shape)}")
    b, c, height, width = x.shape
    ws = window_size
    if height % ws or width % ws:
        raise ValueError(f"x is {height}x{width}, not a multiple of the window size {ws}")
    if ws & (ws - 1) or ws < 4:
        raise ValueError(f"window_size must be a power of two >= 4 for the kernels, got {ws}")
    if x.dtype not in (torch.float32, *HALF):
        raise ValueError(f"x: dtype {x.dtype} not supported (float32, float16, bfloat16)")
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.is_floating_point() and t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype}, x is {x.dtype}")
    return b, c, height, width


FP32_PARITY_VAR = "CAMIXER_FAST_FP32_PARITY"
FP32_PARITY_PRECISIONS = ("ieee", "tf32x3")
"""How fp32 kernels keep parity with the reference (<= 1e-4) when PyTorch forbids TF32: IEEE
products on the FMA units (the default, proven on the H200), or ``"tf32x3"``, three TF32
tensor-core products per product (Triton 3.0 and later, so every Triton this project takes;
unproven on a GPU), chosen with the environment variable ``CAMIXER_FAST_FP32_PARITY``."""


def pytorch_allows_tf32() -> bool:
    """Whether PyTorch lets float32 matrix products use TF32 on CUDA: the switch a user sets
    with ``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high" or "medium")`` or (torch 2.9+)
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``. Off by PyTorch's default.

    torch 2.9+ reads the new setting, which follows the legacy ones and never raises (the
    legacy getters raise once the two APIs are mixed)."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None:
        return setting == "tf32"
    return bool(matmul.allow_tf32)


def fp32_parity_precision() -> str:
    """``"ieee"`` or ``"tf32x3"``: :data:`FP32_PARITY_PRECISIONS`, from
    ``CAMIXER_FAST_FP32_PARITY`` (read at every launch; ValueError for another value)."""
    value = os.environ.get(FP32_PARITY_VAR, "").strip().lower() or "ieee"
    if value not in FP32_PARITY_PRECISIONS:
        raise ValueError(f"{FP32_PARITY_VAR} must be one of {FP32_PARITY_PRECISIONS}, "
                         f"got {value!r}")
    return value


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision of the attention kernels for inputs of ``dtype``, asked
    at every launch. fp32: ``"tf32"`` where PyTorch allows TF32 (:func:`pytorch_allows_tf32`:
    TF32 tensor-core products, ~1e-3 relative, as cuBLAS under the same switch), else the
    parity precision (:func:`fp32_parity_precision`). fp16 / bf16 run on tensor cores whatever
    this says (Triton ignores it for them)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if pytorch_allows_tf32() else fp32_parity_precision()
