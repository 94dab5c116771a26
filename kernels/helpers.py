"""What the kernel modules share. Half-precision attention keeps wgmma operand rows >= 128 B:
64×32 fp16 tiles failed on an H200 (issue 9)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from camixer_fast.backends.ops import NAMESPACE, tracing
from camixer_fast.backends.triton_env import interpreting

F = TypeVar("F", bound=Callable)


def kernel_op(name: str, launcher: Callable, fake: Callable) -> Callable:
    """Register ``launcher`` as ``camixer::<name>`` (``fake`` for the interpreter); the result
    calls the operator while Dynamo traces, else the launcher."""
    qualname = f"{NAMESPACE}::{name}"
    if interpreting():
        op = torch.library.custom_op(qualname, launcher, mutates_args=())
        op.register_fake(fake)
    else:
        op = torch.library.triton_op(qualname, launcher, mutates_args=())

    def call(*args: object, **kwargs: object) -> object:
        if tracing():
            return op(*args, **kwargs)
        with _plain_launches():
            return launcher(*args, **kwargs)

    call.op = op
    call.__name__ = call.__qualname__ = name
    call.__doc__ = launcher.__doc__
    return call


def _plain_launches():
    switch = getattr(torch._library.triton, "set_wrap_triton_enabled", None)   # torch >= 2.6
    return switch(False) if switch is not None else contextlib.nullcontext()


AUTOCAST_POLICIES = ("lower", "widest")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on ``device_type`` ("cuda", "cpu"), or None where autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:            # torch < 2.4: no device argument
        enabled = (torch.is_autocast_enabled() if device_type == "cuda"
                   else torch.is_autocast_cpu_enabled())
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:       # torch < 2.4
        return (torch.get_autocast_gpu_dtype() if device_type == "cuda"
                else torch.get_autocast_cpu_dtype())


def autocast_entry(policy: str) -> Callable[[F], F]:
    """Under autocast, run the entry with autocast off on its floats cast to the autocast dtype
    (``"lower"``, as ``matmul``) or the widest input's (``"widest"``, as ``grid_sample``)."""
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"policy must be one of {AUTOCAST_POLICIES}, got {policy!r}")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def entry(*args, **kwargs):
            device_type = args[0].device.type
            lower = autocast_dtype(device_type)
            if lower is None:
                return fn(*args, **kwargs)
            floats = [t for t in (*args, *kwargs.values())
                      if torch.is_tensor(t) and t.is_floating_point()]
            if policy == "lower":
                dtype = lower
            else:
                dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats))

            def cast(t):
                return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

            with torch.autocast(device_type, enabled=False):
                return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return entry
    return decorate


HALF = (torch.float16, torch.bfloat16)
MAP_DTYPES = (torch.float32, *HALF)
FP32_PARITY_VAR = "CAMIXER_FAST_FP32_PARITY"
FP32_PARITY_PRECISIONS = ("ieee", "tf32x3")   # without TF32: IEEE (proven) or 3×TF32 (unproven)


def pytorch_allows_tf32() -> bool:
    """Whether PyTorch lets CUDA fp32 matmuls use TF32 (torch 2.9's setting never raises)."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None:
        return setting == "tf32"
    return bool(matmul.allow_tf32)


def fp32_parity_precision() -> str:
    """``"ieee"`` (default) or ``"tf32x3"`` from ``CAMIXER_FAST_FP32_PARITY``; ValueError else."""
    value = os.environ.get(FP32_PARITY_VAR, "").strip().lower() or "ieee"
    if value not in FP32_PARITY_PRECISIONS:
        raise ValueError(f"{FP32_PARITY_VAR} must be one of {FP32_PARITY_PRECISIONS}, "
                         f"got {value!r}")
    return value


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: fp32 ``"tf32"`` if PyTorch allows TF32, else the parity one."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if pytorch_allows_tf32() else fp32_parity_precision()


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of per-pixel products; interpreted bf16 as fp32 (numpy has no bf16)."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return {torch.float32: tl.float32, torch.float16: tl.float16}[dtype]


def check_maps(x: Tensor, others: dict[str, Tensor], window_size: int) -> tuple[int, ...]:
    """(B, C, H, W) of checked attention maps; ValueError for bad rank, grid, ws, dtype, device."""
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W), got {tuple(x.shape)}")
    b, c, height, width = x.shape
    ws = window_size
    if height % ws or width % ws:
        raise ValueError(f"x is {height}x{width}, not a multiple of the window size {ws}")
    if ws & (ws - 1) or ws < 4:
        raise ValueError(f"window_size must be a power of two >= 4 for the kernels, got {ws}")
    if x.dtype not in MAP_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported (float32, float16, bfloat16)")
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.is_floating_point() and t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype}, x is {x.dtype}")
    return b, c, height, width


def check_shapes(like: Tensor, shapes: dict[str, tuple[Tensor, tuple[int, ...]]], *,
                 dtype: bool = False) -> None:
    """ValueError unless each ``name: (tensor, shape)`` has it and ``like``'s device (dtype)."""
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != like.device or (dtype and t.dtype != like.dtype):
            raise ValueError(f"{name} is {t.dtype} on {t.device}; expected "
                             f"{like.dtype if dtype else 'any dtype'} on {like.device}")


def pixel_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(image, pixel, channel) strides of an NCHW or NHWC (B, C, H, W) map, else None."""
    b, c, height, width = t.shape
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return None
    if height > 1 and width > 1 and t.stride(2) != width * t.stride(3):
        return None
    s_p = 0 if height * width == 1 else t.stride(3) if width > 1 else t.stride(2)
    return (t.stride(0) if b > 1 else 0), s_p, (t.stride(1) if c > 1 else 0)


class TileConfig(NamedTuple):
    bm: int                 # rows per program: query tokens, or pixels (per-pixel kernels)
    bn: int                 # per inner step: key tokens, or channels (per-pixel kernels)
    num_warps: int
    num_stages: int | None  # None: Triton's default (the per-pixel kernels)
    proven: bool            # ran correctly on a GPU (issue 9's H200 run)


def channel_block(channels: int, dtype: torch.dtype | None = None) -> int:
    """Power-of-two channel block: >= 16 (tl.dot), >= 64 for half attention ``dtype`` on a GPU."""
    least = 64 if dtype in HALF and not interpreting() else 16
    return max(least, triton.next_power_of_2(channels))


def whole_windows(window_size: int) -> TileConfig:
    """Whole windows per program: under the interpreter fewer programs run faster."""
    tokens = window_size * window_size
    return TileConfig(tokens, tokens, 4, 1, False)


def for_window(config: TileConfig, window_size: int) -> TileConfig:
    """``config`` cut to the window's token count; proven only for the 16×16 windows it ran on."""
    tokens = window_size * window_size
    return TileConfig(min(config.bm, tokens), min(config.bn, tokens), config.num_warps,
                      config.num_stages, config.proven and window_size == 16)


def pixel_tile_config(pixels: int, channels: int) -> TileConfig:
    """Per-pixel tiles: 32 pixels × 16 channels on a GPU (unproven), the map when interpreted."""
    bc = channel_block(channels)
    if interpreting():
        return TileConfig(max(16, min(16384, triton.next_power_of_2(pixels))), bc, 4, None,
                          False)
    return TileConfig(32, min(16, bc), 4, None, False)


@triton.jit
def window_tokens(win, i_blk, COLS, W, WS: tl.constexpr, BT: tl.constexpr):
    """Pixel offsets [BT] of tokens i_blk·BT ... of window ``win``."""
    o_t = i_blk * BT + tl.arange(0, BT)
    return ((win // COLS) * WS + o_t // WS) * W + (win % COLS) * WS + o_t % WS


@triton.jit
def leaky_relu(z):
    """LeakyReLU with slope 0.1 (the predictor's)."""
    return tl.where(z >= 0, z, 0.1 * z)


@triton.jit
def tanh(z):
    """tanh from one exp, stable for any |z|."""
    t = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(z >= 0, r, -r)


@triton.jit
def gelu(z):
    """The exact GELU of ``F.gelu`` (erf form)."""
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def layer_norm(b_z, m_c, C, w_ptr, b_ptr, o_c):
    """LayerNorm (eps 1e-6) of each row of the fp32 tile [BP, BC] over C channels; masked -> 0."""
    b_mean = tl.sum(tl.where(m_c[None, :], b_z, 0.0), axis=1) / C
    b_d = tl.where(m_c[None, :], b_z - b_mean[:, None], 0.0)
    b_var = tl.sum(b_d * b_d, axis=1) / C
    b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_b = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    return b_d * tl.rsqrt(b_var + 1e-6)[:, None] * b_w[None, :] + b_b[None, :]


@triton.jit
def depthwise3x3(src_ptr, w_ptr, p_img, py, px, m_p, o_c, m_c, s_y, s_x, s_c, H, W,
                 DIL: tl.constexpr):
    """Depthwise 3×3 (dilation, zero padding DIL, no bias): fp32 [BP, BC] at pixels (py, px),
    channels o_c; (y, x, c) at ``src_ptr + p_img + y·s_y + x·s_x + c·s_c``."""
    b_acc = tl.zeros([py.shape[0], o_c.shape[0]], dtype=tl.float32)
    p_c = (o_c * s_c)[None, :]
    m_c2 = m_c[None, :]
    p_w = w_ptr + o_c * 9
    for t in range(9):       # a loop, not unrolled: unrolled, all nine tap tiles spill
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
    """Tile ``i_t`` of image ``i_b``: int64 pixel indices, rows, columns [BP] and the mask."""
    o_l = i_t * BP + tl.arange(0, BP)
    o_p = i_b.to(tl.int64) * P + o_l
    return o_p, (o_l // W).to(tl.int64), (o_l % W).to(tl.int64), o_l < P


@triton.jit
def load_transposed(w_ptr, row0, C_OUT, C_IN, o_in, o_out, DT: tl.constexpr):
    """Rows row0 ... row0 + C_OUT of a (rows, C_IN) matrix as a [BC_in, BC_out] DT tile."""
    m = (o_in < C_IN)[:, None] & (o_out < C_OUT)[None, :]
    p = w_ptr + (row0 + o_out[None, :]) * C_IN + o_in[:, None]
    return tl.load(p, mask=m, other=0.0).to(DT)
