"""The kernels under ``torch.autocast``: one dtype per launch, chosen as PyTorch's own autocast
policy would choose it for the operation.

Autocast converts the inputs of the operations it knows (convolutions, linear maps, matrix
products to the autocast dtype; norms and softmax to fp32), so inside an autocast region the
tensors that reach a fused kernel arrive in mixed dtypes (an fp32 LayerNorm output beside a
bf16 projection, fp32 master weights). :func:`autocast_entry` wraps a kernel's functional
entry: when autocast is on for the inputs' device, it casts their floating tensors to one dtype
and runs the entry with autocast off on that device (so the projections inside run in that
dtype too); the casts are ordinary autograd operations, so gradients reach fp32 master weights
in fp32. Outside autocast the entry is called untouched.

- ``"lower"``: the autocast dtype (bf16 or fp16), as for ``matmul`` and ``conv2d``: the
  attention.
- ``"widest"``: the widest floating dtype among the inputs, as for ``grid_sample``: the
  deformable key (its sampling coordinates need fp32 offsets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

POLICIES = ("lower", "widest")


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
    """Decorate a kernel entry whose first argument is a tensor: under autocast on that
    tensor's device, its floating tensor arguments are cast by ``policy`` (see the module
    docstring) and it runs with autocast off there."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")

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
