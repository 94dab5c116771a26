"""The CPU backend's 1×1 projections: oneDNN matrix products (``mkldnn._linear_pointwise``)
with bias and residual fused, the twin of :func:`camixer_fast.reference.dense.linear`; faster
than ``F.linear``'s BLAS on the CI machine. Where
:func:`unsupported` gives a reason, or off float32, the reference twin runs; under autograd
the forward stays oneDNN's and the gradient is the reference's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camixer_fast.backends.ops import NAMESPACE, needs_grad, tracing
from camixer_fast.reference import dense


def _build_unsupported() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this PyTorch has no oneDNN pointwise-fusion operators"
    return None


_BUILD_REASON = _build_unsupported()  # asked at import: torch.compile cannot trace it


def unsupported() -> str | None:
    """Why the oneDNN form cannot run in this process, or None."""
    if _BUILD_REASON is not None:
        return _BUILD_REASON
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is switched off (torch.backends.mkldnn.enabled = False)"
    return None


# torch.compiler.assume_constant_result's mark, without importing Dynamo here
unsupported._dynamo_marked_constant = True


def _fused(x: Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and unsupported() is None


def _linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                    residual: Tensor | None) -> Tensor:
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias,
                                                     "add")


def _linear_like(x: Tensor, weight: Tensor, bias: Tensor | None,
                 residual: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# one operator while traced (torch.compile has no fake kernel for oneDNN's own)
_linear_op = torch.library.custom_op(f"{NAMESPACE}::cpu_linear", _linear_forward,
                                     mutates_args=())
_linear_op.register_fake(_linear_like)


class _Linear(torch.autograd.Function):
    """oneDNN's forward, the reference twin's gradient (recomputed in backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,
                residual: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias, residual)
        return _linear_forward(x, weight, bias, residual)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad)
                  for t in ctx.saved_tensors]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            out = dense.linear(inputs[0], inputs[1], inputs[2], residual=inputs[3])
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
           residual: Tensor | None = None) -> Tensor:
    """:func:`camixer_fast.reference.dense.linear` as one oneDNN product (bias and residual in
    its epilogue). x (..., C_in), weight (C_out, C_in), bias (C_out,), residual (..., C_out)
    -> (..., C_out)."""
    if not _fused(x):
        return dense.linear(x, weight, bias, residual=residual)
    x = x.contiguous()
    if needs_grad(x, weight, bias, residual):
        if tracing():
            return dense.linear(x, weight, bias, residual=residual)
        return _Linear.apply(x, weight, bias, residual)
    return (_linear_op if tracing() else _linear_forward)(x, weight, bias, residual)
