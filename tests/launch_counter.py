"""Count what a forward would launch on a GPU, and catch host synchronisation, on the CPU.

:class:`LaunchCounter` is a ``TorchDispatchMode`` plus a hook around Triton's kernel launch:

- every aten operation that runs device work counts as one launch; views, metadata and
  allocations (``empty``) do not (:data:`FREE_OPS`). An operation maps to one kernel on a GPU
  in most cases (a few, such as a sort, launch more: the count is a floor for those);
- every Triton kernel launch counts as one, whether it runs (interpreter) or not (``stub``:
  the launch is recorded and skipped, so a 720p forward is counted in a second);
- operations that make the host wait for the device are recorded as ``syncs``: reading a
  value (``.item()``, ``bool(t)``, ``.tolist()``, ``.numpy()``), data-dependent shapes
  (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``) and the like.

What Triton's interpreter does inside a launch (copies to and from numpy) is not counted.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import ExitStack

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

FREE_OPS = {
    aten.view, aten._unsafe_view, aten._reshape_alias, aten.reshape, aten.permute,
    aten.expand, aten.slice, aten.select, aten.unsqueeze, aten.squeeze, aten.t,
    aten.transpose, aten.as_strided, aten.alias, aten.detach, aten.empty, aten.empty_strided,
    aten.empty_like, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.narrow,
    aten.lift_fresh, aten.diagonal, aten.unfold, aten.view_as, aten.expand_as,
    aten.new_empty, aten.new_empty_strided, aten.set_, aten.resize_, aten.sym_size,
    aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.is_same_size,
    aten._has_compatible_shallow_copy_type, aten.result_type, aten.dim, aten.size,
    aten.stride, aten.is_contiguous, aten.contiguous,
}
"""Operations that launch no kernel: views, metadata, allocation."""

SYNC_OPS = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.nonzero_static,
    aten.masked_select, aten.equal, aten.allclose, aten._unique, aten._unique2,
    aten.unique_dim, aten.unique_consecutive, aten.argwhere,
}
"""Operations whose result the host must wait for (a value or a data-dependent shape)."""


def _packet(func):
    return getattr(func, "overloadpacket", func)


class LaunchCounter(TorchDispatchMode):
    """Counts device launches (aten operations + Triton kernels) and host syncs in a ``with``.

    ``stub=True`` skips the Triton kernels (their outputs stay unwritten): only for counting.
    After the block: ``aten`` (a Counter of operation names), ``triton`` (a Counter of kernel
    names), ``syncs`` (a list of what synchronised), ``launches`` (the total).
    """

    def __init__(self, *, stub: bool = False) -> None:
        super().__init__()
        self.stub = stub
        self.aten: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.syncs: list[str] = []
        self._inside = threading.local()
        self._patches = ExitStack()

    @property
    def launches(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def _in_kernel(self) -> bool:
        return getattr(self._inside, "depth", 0) > 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_kernel():
            packet = _packet(func)
            if packet in SYNC_OPS:
                self.syncs.append(str(func))
            elif packet is aten.index and any(
                    torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.syncs.append(f"{func} with a boolean mask")
            if packet not in FREE_OPS:
                self.aten[str(packet)] += 1
        return func(*args, **kwargs)

    def _wrap_run(self, cls) -> None:
        original = cls.run
        counter = self

        def run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            counter.triton[getattr(fn, "__name__", repr(fn))] += 1
            if counter.stub:
                return None
            counter._inside.depth = getattr(counter._inside, "depth", 0) + 1
            try:
                return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter._inside.depth -= 1

        cls.run = run
        self._patches.callback(setattr, cls, "run", original)

    def _wrap_host_read(self, name: str) -> None:
        original = getattr(torch.Tensor, name)
        counter = self

        def read(t, *args, **kwargs):
            if not counter._in_kernel():
                counter.syncs.append(f"Tensor.{name}")
            return original(t, *args, **kwargs)

        setattr(torch.Tensor, name, read)
        self._patches.callback(setattr, torch.Tensor, name, original)

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._wrap_run(JITFunction)
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            pass
        else:
            self._wrap_run(InterpretedFunction)
        for name in ("tolist", "numpy"):
            self._wrap_host_read(name)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()

    def report(self) -> str:
        """Every counted operation and kernel with its count, most frequent first."""
        rows = [f"{n:5d}  {name}" for name, n in (self.aten + self.triton).most_common()]
        return "\n".join(rows)
