"""Backends: who computes the network's hot operations (:class:`Ops`), chosen in one place
(:func:`select_backend`): "triton", "cpu", "reference" or "auto". Each answers
``unsupported(device, dtype, training)`` with None or a reason, which becomes the error:
nothing falls back silently.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from camixer_fast.backends.triton_env import compile_only, interpreting

if TYPE_CHECKING:
    from camixer_fast.reference.model import BlockWeights, MixerSettings
    from camixer_fast.reference.routing import BlockRouting, WindowRouting


class RouteWindows(Protocol):
    def __call__(self, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma: float,
                 *, window_size: int, routing: str = ..., generator: torch.Generator | None = ...,
                 tie_break: str = ...) -> WindowRouting:
        """Hidden map (B, c4, H, W) -> window scores, K per image and window order."""


class WindowScores(Protocol):
    def __call__(self, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 window_size: int) -> Tensor:
        """Hidden map (B, c4, H, W) -> differentiable window scores (B, N, 2) (training)."""


class DeformableKey(Protocol):
    def __call__(self, x: Tensor, offsets: Tensor, num_hard: Tensor | None = ...,
                 order: Tensor | None = ..., *, window_size: int = ...) -> Tensor:
        """x (B, C, H, W), offsets (B, 2, H, W) -> x + warp(x, offsets) (B, C, H, W)."""


class WindowWarp(Protocol):
    def __call__(self, x: Tensor, offsets: Tensor, num_hard: Tensor, order: Tensor, *,
                 window_size: int, shift: int = ...) -> Tensor:
        """x (B, C, H, W), offsets (B, 2, H, W) -> warp(x, offsets) channels-last on the pixels
        of the hard windows (grid offset by ``shift``, wrapping), 0 elsewhere (never read)."""


class WindowAttention(Protocol):
    def __call__(self, x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                 wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                 window_size: int, shift: int = ...) -> Tensor:
        """Inference token mixing: attention on the hard windows, v·sa on the others; the
        window grid offset by ``shift`` and wrapping (CAMixerOSR's shifted windows)."""


class MaskedWindowAttention(Protocol):
    def __call__(self, x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, mask: Tensor, wq: Tensor,
                 bq: Tensor, wk: Tensor, bk: Tensor, *, window_size: int) -> Tensor:
        """Training token mixing, dense over all windows with a 0/1 mask (B, N, 1)."""


class Linear(Protocol):
    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = ..., *,
                 residual: Tensor | None = ...) -> Tensor:
        """x (..., C_in) -> x·weightᵀ + bias [+ residual] (..., C_out): a 1×1 convolution."""


class DeformConv(Protocol):
    def __call__(self, x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                 bias: Tensor | None = ..., *, padding: int = ..., dilation: int = ...) -> Tensor:
        """DCNv2, stride 1: x (B, C, H, W), offset (B, 2K, h, w) as (Δy, Δx) per tap, mask
        (B, K, h, w), weight (O, C, kh, kw) -> (B, O, h, w) (CAMixerOSR's tails)."""


class BlockInference(Protocol):
    def __call__(self, weights: BlockWeights, x: Tensor, condition: Tensor,
                 settings: MixerSettings) -> tuple[Tensor, BlockRouting]:
        """A block at inference: x (B, H, W, C), condition (B, H, W, 4) -> (out, routing)."""


@dataclass(frozen=True)
class Ops:
    """The operations a backend supplies to the network (signatures of the reference twins).

    window_warp: CAMixerOSR's q = k at inference, or None (the network's whole-map warp).
    block_inference: a whole block at inference, or None (the network's block code).
    whole_batch: a batch as one call; False runs image by image (bit-identical to solo runs).
    sync_free: the inference forward never reads a device value on the host (CUDA-graphable).
    """

    route_windows: RouteWindows
    window_scores: WindowScores
    deformable_key: DeformableKey
    window_attention: WindowAttention
    masked_window_attention: MaskedWindowAttention
    linear: Linear
    deform_conv: DeformConv
    window_warp: WindowWarp | None = None
    block_inference: BlockInference | None = None
    whole_batch: bool = False
    sync_free: bool = False


@dataclass(frozen=True)
class Backend:
    """A named provider of :class:`Ops` (imported on first use); ``trains_as``: the backend run
    in training mode (None: its own)."""

    name: str
    summary: str
    unsupported: Callable[[torch.device, torch.dtype, bool], str | None]
    auto_devices: tuple[str, ...]
    load: Callable[[], Ops]
    trains_as: str | None = None

    @property
    def ops(self) -> Ops:
        # no cache: torch.compile would guard on it
        return self.load()


def _triton_unsupported(device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernels run float32, float16 and bfloat16, not {dtype}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this PyTorch build or machine has no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the kernels need compute capability >= 8.0, this GPU has {major}.{minor}"
        return None
    if device.type == "cpu":
        if interpreting() or compile_only():
            return None
        return ("the Triton kernels need a CUDA device; on the CPU they run only in Triton's "
                "interpreter (set TRITON_INTERPRET=1 before importing them)")
    return f"device type {device.type!r} is not supported by the Triton kernels"


def _cpu_unsupported(device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    if device.type != "cpu":
        return f"the CPU backend runs on CPU devices only, not {device.type!r}"
    return None


def _reference_unsupported(device: torch.device, dtype: torch.dtype,
                           training: bool) -> str | None:
    if not dtype.is_floating_point:
        return f"the network computes in floating point, not {dtype}"
    return None


def _reference_ops() -> Ops:
    from camixer_fast.backends.ops import (
        reference_route_windows,
        reference_window_attention,
    )
    from camixer_fast.reference import dense
    from camixer_fast.reference.attention_training import masked_window_attention
    from camixer_fast.reference.dcn import modulated_deform_conv2d
    from camixer_fast.reference.routing import window_scores
    from camixer_fast.reference.warp import deformable_key

    return Ops(reference_route_windows, window_scores, deformable_key,
               reference_window_attention, masked_window_attention, dense.linear,
               modulated_deform_conv2d)


def _cpu_ops() -> Ops:
    from camixer_fast.backends.cpu import CPU_OPS

    return CPU_OPS


def _triton_ops() -> Ops:
    from camixer_fast import kernels
    from camixer_fast.kernels.block import block_inference
    from camixer_fast.reference import dense
    from camixer_fast.reference.routing import window_scores

    return Ops(kernels.route_windows, window_scores, kernels.deformable_key,
               kernels.window_attention, kernels.masked_window_attention, dense.linear,
               kernels.deform_conv, block_inference=block_inference, whole_batch=True,
               sync_free=True)


REGISTRY: dict[str, Backend] = {
    b.name: b for b in (
        Backend("triton", "fused Triton kernels (CUDA; the interpreter on the CPU)",
                _triton_unsupported, ("cuda",), _triton_ops),
        Backend("cpu", "channels-last CPU inference, keys and attention on hard windows only",
                _cpu_unsupported, ("cpu",), _cpu_ops, trains_as="reference"),
        Backend("reference", "pure-PyTorch reference operations (any device)",
                _reference_unsupported, ("*",), _reference_ops),
    )
}

AUTO_ORDER = ("triton", "cpu", "reference")

BACKENDS = ("auto", *REGISTRY)


def select_backend(name: str, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32, *, training: bool = False) -> Backend:
    """The backend that runs a model on ``device`` (default: the CPU) in ``dtype``: "auto" or
    a :data:`REGISTRY` name (in training mode, the one it ``trains_as``). RuntimeError with
    the reason where it cannot run; ValueError for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device("cpu" if device is None else device)
    return REGISTRY[_chosen(name, device, dtype, training)]


def _chosen(name: str, device: torch.device, dtype: torch.dtype, training: bool) -> str:
    # torch.compile calls this once per graph, outside it (its questions would break the graph)
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            backend = REGISTRY[candidate]
            if device.type not in backend.auto_devices and "*" not in backend.auto_devices:
                continue
            if training and backend.trains_as is not None:
                backend = REGISTRY[backend.trains_as]
            reason = backend.unsupported(device, dtype, training)
            if reason is None:
                return backend.name
            reasons.append(f"{backend.name}: {reason}")
        raise RuntimeError(f"no backend runs {dtype} on {device}: " + "; ".join(reasons))
    backend = REGISTRY[name]
    if training and backend.trains_as is not None:
        backend = REGISTRY[backend.trains_as]
    reason = backend.unsupported(device, dtype, training)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return backend.name


# torch.compiler.assume_constant_result's mark, without importing Dynamo here
_chosen._dynamo_marked_constant = True


def can_use_triton(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(ok, reason): whether the Triton backend runs on ``device`` (default: CUDA if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reason = _triton_unsupported(device, torch.float32, False)
    if reason is not None:
        return False, reason
    if device.type == "cpu":
        return True, "Triton interpreter (TRITON_INTERPRET=1): exact but slow"
    return True, "compiled kernels on CUDA"


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Deprecated: ``select_backend(backend, device).name``."""
    warnings.warn("resolve_backend is deprecated; use select_backend(name, device, dtype, "
                  "training=...).name", DeprecationWarning, stacklevel=2)
    return select_backend(backend, device).name


def can_use_cpu(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Deprecated: ``REGISTRY["cpu"].unsupported``, as (ok, reason)."""
    warnings.warn("can_use_cpu is deprecated; use REGISTRY['cpu'].unsupported(device, dtype, "
                  "training)", DeprecationWarning, stacklevel=2)
    reason = _cpu_unsupported(torch.device("cpu" if device is None else device), torch.float32,
                              False)
    return reason is None, reason or "channels-last PyTorch operations on the CPU"


def backend_ops(backend: str) -> Ops:
    """Deprecated: ``REGISTRY[name].ops``."""
    warnings.warn("backend_ops is deprecated; use select_backend(...).ops",
                  DeprecationWarning, stacklevel=2)
    if backend not in REGISTRY:
        raise ValueError(f"no operation table for backend {backend!r}; resolve it first")
    return REGISTRY[backend].ops
