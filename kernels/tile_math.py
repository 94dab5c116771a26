"""Device functions the fused block's kernels share: activations, a LayerNorm over the channels
of a pixel tile, a depthwise 3×3 tap sum, and the launch choices they all make.

No kernels here. A *tile* is [BP pixels, BC channels] in fp32 registers; channels past C are
masked (``m_c``) and come in as zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from camixer_fast.backends.triton_env import interpreting


@triton.jit
def leaky_relu(z):
    """LeakyReLU with slope 0.1 (the predictor's)."""
    return tl.where(z >= 0, z, 0.1 * z)


@triton.jit
def tanh(z):
    """tanh in fp32 from one exp, stable for any |z|."""
    t = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(z >= 0, r, -r)


@triton.jit
def gelu(z):
    """The exact GELU of ``F.gelu`` (erf form)."""
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def layer_norm(b_z, m_c, C, w_ptr, b_ptr, o_c):
    """LayerNorm of each row of the fp32 tile ``b_z`` [BP, BC] over its C valid channels
    (biased variance, eps 1e-6), times the weight plus the bias (both (C,)). Masked channels
    come out 0."""
    b_mean = tl.sum(tl.where(m_c[None, :], b_z, 0.0), axis=1) / C
    b_d = tl.where(m_c[None, :], b_z - b_mean[:, None], 0.0)
    b_var = tl.sum(b_d * b_d, axis=1) / C
    b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_b = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    return b_d * tl.rsqrt(b_var + 1e-6)[:, None] * b_w[None, :] + b_b[None, :]


@triton.jit
def depthwise3x3(src_ptr, w_ptr, p_img, py, px, m_p, o_c, m_c, s_y, s_x, s_c, H, W,
                 DIL: tl.constexpr):
    """Σ over the 9 taps of a depthwise 3×3 convolution with dilation DIL and zero padding DIL
    (the output keeps the H×W grid): fp32 [BP, BC] at the pixels (py, px) [BP] of their images
    and channels o_c [BC], no bias.

    Element (y, x, c) of a pixel's image lies at ``src_ptr + p_img + y·s_y + x·s_x + c·s_c``
    (``p_img``: the offset of that image). ``w_ptr``: the (C, 1, 3, 3) weight, contiguous.
    """
    b_acc = tl.zeros([py.shape[0], o_c.shape[0]], dtype=tl.float32)
    p_c = (o_c * s_c)[None, :]
    m_c2 = m_c[None, :]
    p_w = w_ptr + o_c * 9
    # a loop, not unrolled: one tap's tile live at a time (unrolled, the compiler hoists all
    # nine loads and their 64-bit pointer tiles, and spills)
    for t in range(9):
        qy = py + (t // 3 - 1) * DIL
        qx = px + (t % 3 - 1) * DIL
        m_q = (m_p & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W))[:, None] & m_c2
        b_s = tl.load((src_ptr + p_img + qy * s_y + qx * s_x)[:, None] + p_c, mask=m_q,
                      other=0.0)
        b_w = tl.load(p_w + t, mask=m_c, other=0.0)
        b_acc += b_s.to(tl.float32) * b_w.to(tl.float32)[None, :]
    return b_acc


@triton.jit
def pixel_tile(i_t, i_b, P, W, BP: tl.constexpr):
    """Tile ``i_t`` of image ``i_b`` (P pixels, W per row): the pixels' indices in the batch
    [BP] (int64, image-major), their rows and columns, and the in-image mask. Tiles never span
    two images, so each image's results do not depend on the batch around it."""
    o_l = i_t * BP + tl.arange(0, BP)
    o_p = i_b.to(tl.int64) * P + o_l
    return o_p, (o_l // W).to(tl.int64), (o_l % W).to(tl.int64), o_l < P


@triton.jit
def load_transposed(w_ptr, row0, C_OUT, C_IN, o_in, o_out, DT: tl.constexpr):
    """Rows ``row0 ... row0 + C_OUT`` of a (rows, C_IN) weight matrix, transposed into a
    [BC_in, BC_out] tile in dtype DT (zeros outside), ready for ``tile @ tile``."""
    m = (o_in < C_IN)[:, None] & (o_out < C_OUT)[None, :]
    p = w_ptr + (row0 + o_out[None, :]) * C_IN + o_in[:, None]
    return tl.load(p, mask=m, other=0.0).to(DT)


def pixel_strides(t: Tensor) -> tuple[int, int, int] | None:
    """The (image, pixel, channel) strides of a (B, C, H, W) map whose pixel y·W + x lies at
    that index times one stride -- channels-first or channels-last memory, so the network's
    NHWC maps are read in place -- else None. Strides of dimensions of size 1 read as 0."""
    b, c, height, width = t.shape
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return None
    if height > 1 and width > 1 and t.stride(2) != width * t.stride(3):
        return None
    s_p = 0 if height * width == 1 else t.stride(3) if width > 1 else t.stride(2)
    return (t.stride(0) if b > 1 else 0), s_p, (t.stride(1) if c > 1 else 0)


MAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the block's maps may have (accumulation is fp32 in every case)."""


def channel_block(channels: int) -> int:
    """Channels padded (with masks, in the kernels) to a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(channels))


class TileConfig(NamedTuple):
    """Launch choices of the per-pixel kernels."""

    bp: int          # pixels per program
    bk: int          # channels per step of the depthwise taps and the tile products' K
    num_warps: int


def tile_config(pixels: int, channels: int) -> TileConfig:
    """The tiles of the per-pixel kernels for maps of ``pixels`` per image and ``channels``.

    On a GPU: 32 pixels by 16-channel steps with 4 warps. Every variant compiles without
    register spills for C up to 64 in every dtype on sm_80 and sm_90 (the JIT gate,
    ``bench/gates/jit_gate.py``; 64-pixel tiles spill a little in fp32 with 4 or 8 warps). At
    32 rows the fp16 / bf16 tile products compile to mma.sync (HMMA) even on sm_90, not to the
    wgmma whose narrow (< 128 B) operands broke the attention there (see
    :mod:`camixer_fast.kernels._tiles`). A 720p frame (61,440 LR pixels) gives 1,920 programs
    per image, 15 per SM on an H200. Unproven on a GPU: no GPU was available where this was
    chosen, and nothing here is timed. Under the interpreter: the whole map (up to 16,384
    pixels) and all channels in one step, since there each program and each operation costs
    Python overhead (~50 ms a program) beyond its arithmetic.
    """
    bc = channel_block(channels)
    if interpreting():
        return TileConfig(max(16, min(16384, triton.next_power_of_2(pixels))), bc, 4)
    return TileConfig(32, min(16, bc), 4)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand dtype of the kernels' tile products for maps of ``dtype``: the map's own
    (fp32 in the precision :func:`~camixer_fast.kernels._tiles.dot_precision` gives; fp16 and
    bf16 on tensor cores, fp32 accumulation), except bf16
    under the interpreter, which cannot multiply bf16 (numpy has no bf16): there the operands,
    already rounded to bf16, are multiplied in fp32 -- the same exact products."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return {torch.float32: tl.float32, torch.float16: tl.float16}[dtype]


def map_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of maps of ``dtype``."""
    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]
