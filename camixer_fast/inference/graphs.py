"""CUDA graphs: replay a CAMixerSR inference forward as one graph launch per input size, so it
is no longer bound by the CPU's launch rate. Not yet run on a GPU.

>>> graphed = CUDAGraphModel(camixer_fast.load_model("CAMixerSR-S", device="cuda"))
>>> sr = graphed(lr)          # captures on the first call of each input size, then replays

A model off CUDA, in training mode or on a backend that synchronises is refused (RuntimeError).
One graph per input shape, dtype, device and baked-in setting (LRU past ``max_graphs``); a moved
parameter drops every graph. All graphs share one memory pool; calls run one at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from camixer_fast.backends import REGISTRY
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.routing import BlockRouting, Routing

VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class GraphKey(NamedTuple):
    """What a captured graph is valid for."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    gamma: float
    routing: str
    tie_break: str
    backend: str


class Captured(NamedTuple):
    """A captured forward: ``replay()`` reads ``static_input`` and writes the outputs."""

    replay: Callable[[], None]
    static_input: Tensor
    static_output: Tensor
    static_routing: Routing


Forward = Callable[[], tuple[Tensor, Routing]]


def clone_routing(routing: Routing) -> Routing:
    """A copy of a routing record whose tensors the caller owns."""
    return Routing(tuple(BlockRouting(*(None if t is None else t.clone() for t in block))
                         for block in routing.blocks))


class CUDAGraphModel:
    """A CAMixerSR inference forward as CUDA graphs. copy_outputs=False: the graphs' own buffers;
    verify: first replay vs eager (RuntimeError past :data:`VERIFY_TOL`)."""

    def __init__(self, model: CAMixerSR, *, max_graphs: int = 8, copy_outputs: bool = True,
                 verify: bool = True, warmup: int = 2) -> None:
        if not isinstance(model, CAMixerSR):
            raise TypeError(f"expected a CAMixerSR model, got {type(model).__name__}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (Triton compiles in the warm-up, never "
                             f"inside a capture), got {warmup}")
        self.model = model
        self.max_graphs = max_graphs
        self.copy_outputs = copy_outputs
        self.verify = verify
        self.warmup = warmup
        self._graphs: OrderedDict[GraphKey, Captured] = OrderedDict()
        self._placement: list[int] = []
        self._find_slots()
        self._lock = threading.Lock()
        self._pool = None
        self._stream = None
        self._check_model()

    @property
    def scale(self) -> int:
        return self.model.scale

    def keys(self) -> list[GraphKey]:
        return list(self._graphs)

    def reset(self) -> None:
        """Drop every graph and their memory pool; find the parameters again."""
        with self._lock:
            self._drop_all()
            self._find_slots()

    def __call__(self, x: Tensor, *, return_routing: bool = False):
        """(B, 3, H, W) on the model's device -> (B, 3, sH, sW), as ``model(x)``; with
        ``return_routing`` also the :class:`~camixer_fast.reference.routing.Routing` record."""
        # static buffers are written in place later: no inference tensors
        with self._lock, torch.inference_mode(False), torch.no_grad():
            self._check_model()
            device = self._device()
            if not torch.is_tensor(x) or x.dim() != 4:
                shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"expected a (B, 3, H, W) tensor, got {shape}")
            if x.device != device:
                raise ValueError(f"the input is on {x.device}, the model on {device}")
            placement = self._parameter_placement()
            if placement != self._placement:
                self._drop_all()
                self._placement = placement
            key = self._key(x)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._capture_key(x)
                self._graphs[key] = graph
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            graph.static_input.copy_(x)
            graph.replay()
            out, routing = graph.static_output, graph.static_routing
            if self.copy_outputs:
                out, routing = out.clone(), clone_routing(routing)
            return (out, routing) if return_routing else out

    def _key(self, x: Tensor) -> GraphKey:
        m = self.model
        return GraphKey(tuple(x.shape), x.dtype, x.device, m.gamma, m.routing, m.tie_break,
                        m.backend)

    def _find_slots(self) -> None:
        # where every parameter hangs, found once: cheaper each call than model.parameters()
        self._slots = [(table, name) for module in self.model.modules()
                       for table in (module._parameters, module._buffers)
                       for name, t in table.items() if t is not None]

    def _parameter_placement(self) -> list[int]:
        return [table[name].data_ptr() for table, name in self._slots]

    def _drop_all(self) -> None:
        self._graphs.clear()
        self._pool = None

    def _capture_key(self, x: Tensor) -> Captured:
        static_input = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)

        def forward() -> tuple[Tensor, Routing]:
            return self.model(static_input, return_routing=True)

        replay, (out, routing) = self._capture(forward, static_input)
        graph = Captured(replay, static_input, out, routing)
        if self.verify and self.model.routing == "expected":
            self._verify(graph, forward)
        return graph

    def _verify(self, graph: Captured, forward: Forward) -> None:
        graph.replay()
        want, _ = forward()
        err = (graph.static_output.float() - want.float()).abs().max().item()
        tol = VERIFY_TOL.get(want.dtype, 1e-4)
        if not err <= tol:
            raise RuntimeError(
                f"the captured graph's output differs from the eager forward by {err:.3e} "
                f"(> {tol:.0e}) for input {tuple(graph.static_input.shape)}: something in the "
                "forward is not captured faithfully; run the model without CUDA graphs and "
                "report this")

    def _device(self) -> torch.device:
        return self.model.head.weight.device

    def _check_model(self) -> None:
        """Raise RuntimeError unless the model can be captured now."""
        self._check_device()
        self._check_settings()

    def _check_device(self) -> None:
        device = self._device()
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need the model on a CUDA device; it is on "
                               f"{device}. Run it directly (model(x)) there")

    def _check_settings(self) -> None:
        if self.model.training:
            raise RuntimeError("CUDA graphs capture inference: call model.eval() first")
        name = self.model.backend
        if not REGISTRY[name].ops.sync_free:
            raise RuntimeError(
                f"the {name!r} backend synchronises with the host in its forward (its hard-"
                "window lists are boolean-mask gathers), which a CUDA graph cannot capture; "
                "use backend='triton'")

    def _capture(self, forward: Forward, static_input: Tensor) -> tuple[Callable[[], None],
                                                                         tuple[Tensor, Routing]]:
        """Warm up on a side stream, capture ``forward`` in the shared pool: (replay, outputs)."""
        device = static_input.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        caller = torch.cuda.current_stream(device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            for _ in range(self.warmup):
                forward()
        caller.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                outputs = forward()
        except Exception as err:
            raise RuntimeError(f"capturing the forward of a {tuple(static_input.shape)} input "
                               f"as a CUDA graph failed: {err}") from err
        return graph.replay, outputs
