"""The CPU backend's dense operations: oneDNN primitives with their epilogues fused.

The twins of :mod:`camixer_fast.reference.dense` (same signatures, the same numbers up to fp32
rounding), through the oneDNN operators PyTorch ships for its own compiler
(``torch.ops.mkldnn._linear_pointwise`` and ``_convolution_pointwise``):

- :func:`linear`: the 1×1 projections as oneDNN matrix products with the bias and the residual
  added in the product's epilogue. PyTorch's ``F.linear`` runs them through its BLAS (MKL in
  the x86 wheels), which on the CI machine's AMD cores took 2.2× as long: 1.40 against
  0.61–0.67 ms for a 65536×36 by 36×36 product (``bench/cpu_dense.py``).
- :func:`depthwise`: the 3×3 depthwise convolutions with the GELU and the gate's product in
  the convolution's epilogue, one pass over the map instead of three.

They run where :func:`unsupported` is None, in float32; otherwise (a PyTorch without oneDNN,
``torch.backends.mkldnn.enabled = False``, other dtypes) the reference twins run, and
:func:`camixer_fast.backends.describe` says which. With autograd recording (an inference
model called outside ``torch.no_grad()``) the forward is still oneDNN's, so results do not
depend on the grad mode, and the gradient is the reference's, recomputed in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camixer_fast.custom_ops import NAMESPACE, needs_grad, tracing
from camixer_fast.reference import dense


def _build_unsupported() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_linear_pointwise") and hasattr(ops, "_convolution_pointwise")):
        return "this PyTorch has no oneDNN pointwise-fusion operators"
    return None


_BUILD_REASON = _build_unsupported()
"""What the PyTorch build lacks, asked once at import (``torch.compile`` cannot trace the
question)."""


def unsupported() -> str | None:
    """Why the oneDNN forms cannot run in this process (then the reference twins run), or
    None."""
    if _BUILD_REASON is not None:
        return _BUILD_REASON
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is switched off (torch.backends.mkldnn.enabled = False)"
    return None


# torch.compile asks once per graph, outside it, and keeps the answer: what
# torch.compiler.assume_constant_result sets (which would import Dynamo with this module)
unsupported._dynamo_marked_constant = True


def _fused(x: Tensor) -> bool:
    """Whether the oneDNN forms take an operation on x: float32 on the CPU, oneDNN usable (the
    other operands share x's dtype and device, as in the network)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and unsupported() is None


def _linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                    residual: Tensor | None) -> Tensor:
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias,
                                                     "add")


def _depthwise_forward(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int,
                       gelu: bool, multiply: Tensor | None) -> Tensor:
    c = x.shape[-1]
    xc = x.permute(0, 3, 1, 2)
    pad = [dilation, dilation]
    unary = "gelu" if gelu else "none"
    algorithm = "none" if gelu else ""                       # "none": the exact (erf) GELU
    if multiply is None:
        y = torch.ops.mkldnn._convolution_pointwise(xc, weight, bias, pad, [1, 1], pad, c,
                                                    unary, [], algorithm)
    elif not gelu:
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            xc, multiply.permute(0, 3, 1, 2), weight, bias, pad, [1, 1], pad, c, "mul", None,
            None, [], None)
    else:               # GELU before the product: oneDNN's binary step would come first
        y = torch.ops.mkldnn._convolution_pointwise(xc, weight, bias, pad, [1, 1], pad, c,
                                                    unary, [], algorithm)
        return y.permute(0, 2, 3, 1).contiguous().mul_(multiply)
    return y.permute(0, 2, 3, 1).contiguous()


def _linear_like(x: Tensor, weight: Tensor, bias: Tensor | None,
                 residual: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _depthwise_like(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, gelu: bool,
                    multiply: Tensor | None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# one operator each while traced (torch.compile has no fake kernels for oneDNN's own ones)
_linear_op = torch.library.custom_op(f"{NAMESPACE}::cpu_linear", _linear_forward,
                                     mutates_args=())
_linear_op.register_fake(_linear_like)
_depthwise_op = torch.library.custom_op(f"{NAMESPACE}::cpu_depthwise", _depthwise_forward,
                                        mutates_args=())
_depthwise_op.register_fake(_depthwise_like)


class _ReferenceGradient(torch.autograd.Function):
    """oneDNN's forward, the reference twin's gradient (recomputed in backward)."""

    @staticmethod
    def forward(ctx, forward, reference, kwargs, *tensors: Tensor | None) -> Tensor:
        ctx.reference, ctx.kwargs = reference, kwargs
        ctx.save_for_backward(*tensors)
        return forward(*tensors, **kwargs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad)
                  for t in saved]
        with torch.enable_grad():
            out = ctx.reference(*inputs, **ctx.kwargs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, None, None,
                *(next(grads) if t is not None and t.requires_grad else None for t in inputs))


def _reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None,
                      residual: Tensor | None) -> Tensor:
    return dense.linear(x, weight, bias, residual=residual)


def _reference_depthwise(x: Tensor, weight: Tensor, bias: Tensor | None,
                         multiply: Tensor | None, *, dilation: int, gelu: bool) -> Tensor:
    return dense.depthwise(x, weight, bias, dilation=dilation, gelu=gelu, multiply=multiply)


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
        return _ReferenceGradient.apply(_linear_forward, _reference_linear, {}, x, weight, bias,
                                        residual)
    return (_linear_op if tracing() else _linear_forward)(x, weight, bias, residual)


def depthwise(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, dilation: int = 1,
              gelu: bool = False, multiply: Tensor | None = None) -> Tensor:
    """:func:`camixer_fast.reference.dense.depthwise` as one oneDNN convolution (GELU and the
    product in its epilogue). x (B, H, W, C), weight (C, 1, 3, 3), bias (C,), multiply
    (B, H, W, C) -> (B, H, W, C), contiguous."""
    if not _fused(x):
        return dense.depthwise(x, weight, bias, dilation=dilation, gelu=gelu, multiply=multiply)
    x = x.contiguous()
    multiply = None if multiply is None else multiply.contiguous()
    if needs_grad(x, weight, bias, multiply):
        if tracing():
            return dense.depthwise(x, weight, bias, dilation=dilation, gelu=gelu,
                                   multiply=multiply)
        return _ReferenceGradient.apply(
            lambda *t, **k: _depthwise_forward(*t[:3], k["dilation"], k["gelu"], t[3]),
            _reference_depthwise, {"dilation": dilation, "gelu": gelu}, x, weight, bias,
            multiply)
    return (_depthwise_op if tracing() else _depthwise_forward)(x, weight, bias, dilation, gelu,
                                                                multiply)
