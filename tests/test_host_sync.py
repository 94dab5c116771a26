"""Host synchronisation in the inference forward: none on the Triton path.

A CUDA graph can capture a forward only if the host never waits for a value computed on the
device: no ``.item()`` / ``.tolist()``, no ``if tensor:``, no output whose size depends on the
data (boolean-mask gathers, ``nonzero``), no copy to the host. Every backend declares whether
its forward is free of them (``Ops.sync_free``); a dispatch mode watches every operation of a
forward and holds the declaration to account, both ways. On the CPU the Triton kernels run in
the interpreter; on a GPU the same test watches the compiled kernels' forward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

from camixer_fast.backends import select_backend
from camixer_fast.reference.model import CAMixerSR

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default: "a scalar read on the host (.item(), int(), if tensor:)",
    aten.is_nonzero.default: "a truth value read on the host",
    aten.equal.default: "torch.equal (a bool on the host)",
    aten.nonzero.default: "nonzero (data-dependent size)",
    aten.masked_select.default: "masked_select (data-dependent size)",
    aten._unique2.default: "unique (data-dependent size)",
    aten.unique_dim.default: "unique (data-dependent size)",
    aten.unique_consecutive.default: "unique_consecutive (data-dependent size)",
}
"""Operators that always make the host wait for the device's data."""


def _is_mask(t: object) -> bool:
    return torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)


class HostSyncDetector(TorchDispatchMode):
    """Records every operation that makes the host wait for the device, as (op, why)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self._tolist = None

    def __enter__(self):
        # Tensor.tolist of a CPU tensor reads memory without dispatching an operator
        self._tolist = torch.Tensor.tolist
        detector, tolist = self, self._tolist

        def watched_tolist(t: torch.Tensor):
            detector.syncs.append(("Tensor.tolist", "values read on the host"))
            return tolist(t)

        torch.Tensor.tolist = watched_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = SYNCING.get(func)
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and \
                any(_is_mask(i) for i in args[1]):
            why = "boolean-mask indexing (data-dependent size)"
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            why = "repeat_interleave without output_size (data-dependent size)"
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
            if torch.is_tensor(src) and src.device.type != "cpu" and dst is not None and \
                    torch.device(dst).type == "cpu":
                why = "a copy from the device to the host"
        if why is not None:
            self.syncs.append((str(func), why))
        return func(*args, **kwargs)


def tiny_model(backend: str) -> CAMixerSR:
    torch.manual_seed(0)
    model = CAMixerSR(n_feats=8, blocks_per_group=(1, 1), window_size=8).to(DEVICE).eval()
    model.backend = backend
    return model


@pytest.mark.parametrize("expression", [
    "t.tolist()", "t[0].item()", "int(t[1])", "bool(t[0] > 0)", "t[t > 1]", "t.nonzero()",
    "t.masked_select(t > 1)", "t.unique()", "t.repeat_interleave(t)", "torch.equal(t, t)",
], ids=lambda e: e.replace(" ", ""))
def test_detector_catches(expression: str) -> None:
    t = torch.tensor([1, 2, 3])
    with HostSyncDetector() as detector:
        eval(expression, {"t": t, "torch": torch})
    assert detector.syncs, f"{expression} was not flagged"


def test_detector_passes_device_side_work() -> None:
    t = torch.tensor([3.0, 1.0, 2.0])
    with HostSyncDetector() as detector:
        order = torch.argsort(t, descending=True)
        k = torch.floor(t.mean() * 2).to(torch.int64).clamp(0, 3)
        torch.arange(3) < k
        t.index_select(0, order)
        t.repeat_interleave(torch.tensor([1, 0, 2]), output_size=3)
    assert detector.syncs == []


def forward_cases() -> list[tuple[str, str, str]]:
    """(backend, tie_break, routing): every combination on the Triton path, which promises no
    sync; one forward of each backend that syncs (the CPU backend runs on the CPU only)."""
    cases = [("triton", t, r) for t in ("official", "index") for r in ("expected", "gumbel")]
    cases.append(("reference", "official", "expected"))
    if DEVICE == "cpu":
        cases.append(("cpu", "official", "expected"))
    return cases


@pytest.mark.parametrize(("backend", "tie_break", "routing"), forward_cases(),
                         ids=["-".join(c) for c in forward_cases()])
def test_forward_syncs_as_declared(one_thread, backend: str, tie_break: str,
                                   routing: str) -> None:
    model = tiny_model(backend)
    model.gamma, model.tie_break, model.routing = 0.5, tie_break, routing
    x = torch.rand(2, 3, 17, 33, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    sync_free = select_backend(backend, x.device).ops.sync_free
    with torch.no_grad():
        model(x)                                       # compile (GPU) and load outside the watch
        with HostSyncDetector() as detector:
            model(x)
    if sync_free:
        assert detector.syncs == [], f"{backend} declares no host sync: {detector.syncs}"
    else:
        # the hard-window lists of the reference and CPU backends are boolean-mask gathers
        assert detector.syncs, f"{backend} declares host syncs, none seen: update Ops.sync_free"
        print(backend, "syncs:", sorted({why for _, why in detector.syncs}))
