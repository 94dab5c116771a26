"""Custom operators: how ``torch.compile`` sees the backends' hot operations.

The inference operations read the routing's values on the host: the hard-window lists are
boolean-mask gathers, the CPU backend loops over ``num_hard.tolist()``, the reference attends
the hard windows in chunks. Traced by Dynamo, each of these breaks the graph. So each such
operation is also registered as a ``torch.library`` operator in the ``camixer`` namespace, with
a fake kernel that gives its output's shape, dtype and strides (static: the data-dependent sizes
stay inside). Dynamo records the operator as one node of a full graph, and inductor runs it as
written.

The routing is such an operator too, although it traces: compiled, its window order would be
inductor's. On CUDA inductor replaces ``argsort`` of up to 512 elements by its own sort kernel,
whose order of equal scores differs from ``torch.argsort``'s -- and equal scores are common
(saturated windows score exactly 1.0), so K cut through such a tie attends other windows: the
up-to-0.27 difference between compiled and eager outputs that the first GPU run measured. As an
operator the routing runs eagerly inside a compiled graph: its scores, K and order are the
eager ones given the same hidden map.

The functional entries call their operator only while Dynamo traces (``torch.compile``,
``torch.export``; :func:`tracing`) and no gradient is needed; otherwise they run the
implementation itself: eagerly there is no dispatcher overhead, and a ``TorchDispatchMode``
sees every operation inside. The operators have no backward: compile inference under
``torch.no_grad()`` or ``torch.inference_mode()`` (with gradients enabled the implementations
are traced, and the graph breaks at their gathers).

Registered here: the reference backend's routing (the CPU backend's too) and window attention,
and the Gumbel noise of the routing draw. The CPU backend registers its operators in
:mod:`camixer_fast.backends.cpu`; the Triton kernels theirs in their kernel files, through
:func:`camixer_fast.kernels.helpers.kernel_op`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camixer_fast.reference import attention_inference
from camixer_fast.reference import routing as reference_routing
from camixer_fast.reference.routing import (
    WindowRouting,
    check_gamma,
    check_routing_mode,
    check_tie_break,
)
from camixer_fast.reference.windows import check_window_grid

NAMESPACE = "camixer"
"""The ``torch.ops`` namespace of every operator of this package: ``torch.ops.camixer.*``."""


def tracing() -> bool:
    """Whether Dynamo is tracing the caller (``torch.compile``, ``torch.export``): the
    functional entries then call their registered operator."""
    return torch.compiler.is_compiling()


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a gradient through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.library.custom_op(f"{NAMESPACE}::gumbel_noise", mutates_args=())
def _gumbel_noise_op(like: Tensor) -> Tensor:
    return reference_routing.gumbel_noise(like)


@_gumbel_noise_op.register_fake
def _(like: Tensor) -> Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """:func:`camixer_fast.reference.routing.gumbel_noise`, drawn eagerly inside compiled graphs.

    Compiled, the draw from the default generator is one operator: the numbers are those of
    the eager run, not of inductor's own generator. A ``generator`` cannot be traced.
    """
    if tracing() and generator is None:
        return _gumbel_noise_op(like)
    return reference_routing.gumbel_noise(like, generator)


@torch.library.custom_op(f"{NAMESPACE}::window_order", mutates_args=())
def _window_order_op(score: Tensor, tie_break: str) -> Tensor:
    return reference_routing.window_order(score, tie_break)


@_window_order_op.register_fake
def _(score: Tensor, tie_break: str) -> Tensor:
    return score.new_empty(score.shape, dtype=torch.int64)


def window_order(score: Tensor, tie_break: str = "official") -> Tensor:
    """:func:`camixer_fast.reference.routing.window_order` (score (B, N) -> order (B, N)); one
    operator while traced, so that equal scores keep eager's order (inductor's sort does not)."""
    check_tie_break(tie_break)
    if tracing():
        return _window_order_op(score, tie_break)
    return reference_routing.window_order(score, tie_break)


@torch.library.custom_op(f"{NAMESPACE}::reference_route_windows", mutates_args=())
def _reference_route_windows_op(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                                gamma: float, window_size: int, routing: str,
                                tie_break: str) -> tuple[Tensor, Tensor, Tensor]:
    pred, num_hard, order = reference_routing.route_windows(h, w1, b1, w2, b2, gamma,
                                                            window_size=window_size,
                                                            routing=routing, tie_break=tie_break)
    return pred, num_hard, order


@_reference_route_windows_op.register_fake
def _(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gamma: float,
      window_size: int, routing: str, tie_break: str) -> tuple[Tensor, Tensor, Tensor]:
    b, _, height, width = h.shape
    n = (height // window_size) * (width // window_size)
    return (h.new_empty(b, n, 2), h.new_empty(b, dtype=torch.int64),
            h.new_empty(b, n, dtype=torch.int64))


def reference_route_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                            gamma: float, *, window_size: int, routing: str = "expected",
                            generator: torch.Generator | None = None,
                            tie_break: str = "official") -> WindowRouting:
    """:func:`camixer_fast.reference.routing.route_windows`; one operator while traced.

    h (B, c4, H, W) -> :class:`WindowRouting` (pred (B, N, 2), num_hard (B,), order (B, N)).
    Gumbel draws inside the operator come from the default generator, as eagerly; a
    ``generator`` for them (which Dynamo cannot trace) or a gradient keeps the plain function.
    """
    if (not tracing() or needs_grad(h, w1, b1, w2, b2)
            or (routing == "gumbel" and generator is not None)):
        return reference_routing.route_windows(h, w1, b1, w2, b2, gamma,
                                               window_size=window_size, routing=routing,
                                               generator=generator, tie_break=tie_break)
    gamma = check_gamma(gamma)
    check_routing_mode(routing)
    check_tie_break(tie_break)
    if h.dim() != 4:
        raise ValueError(f"h: expected (B, c4, H, W), got {tuple(h.shape)}")
    check_window_grid(h.shape[2], h.shape[3], window_size)
    return WindowRouting(*_reference_route_windows_op(h, w1, b1, w2, b2, gamma, window_size,
                                                      routing, tie_break))



@torch.library.custom_op(f"{NAMESPACE}::reference_window_attention", mutates_args=())
def _reference_window_attention_op(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                                   bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor,
                                   order: Tensor, window_size: int, chunk: int,
                                   shift: int = 0) -> Tensor:
    return attention_inference.window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                                                window_size=window_size, chunk=chunk, shift=shift)


@_reference_window_attention_op.register_fake
def _(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor, wk: Tensor,
      bk: Tensor, num_hard: Tensor, order: Tensor, window_size: int, chunk: int,
      shift: int = 0) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def reference_window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor,
                               bq: Tensor, wk: Tensor, bk: Tensor, num_hard: Tensor,
                               order: Tensor, *, window_size: int,
                               chunk: int = attention_inference.DEFAULT_CHUNK,
                               shift: int = 0) -> Tensor:
    """:func:`camixer_fast.reference.attention_inference.window_attention`; one operator while
    traced. x, k_in, v (B, C, H, W), sa (B, 1, H, W) -> attn_out (B, C, H, W), contiguous."""
    if not tracing() or needs_grad(x, k_in, v, sa, wq, bq, wk, bk):
        return attention_inference.window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard,
                                                    order, window_size=window_size,
                                                    chunk=chunk, shift=shift)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    check_window_grid(x.shape[2], x.shape[3], window_size)
    return _reference_window_attention_op(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                                          window_size, chunk, shift)
