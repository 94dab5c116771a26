"""CUDA graphs: replay a CAMixerSR inference forward as one graph launch, keyed by input size.

The Triton backend's inference forward never makes the host wait for the device
(``tests/test_host_sync.py``), so it can be captured as a CUDA graph: the S model's ~1,600
kernel launches at 720p become one launch, and the forward is no longer bound by the CPU's
launch rate (the first GPU run measured 28 ms eager and 15.5 ms replayed).

>>> graphed = CUDAGraphModel(camixer_fast.load_model("CAMixerSR-S", device="cuda"))
>>> sr = graphed(lr)          # captures on the first call of each input size, then replays

The rules (nothing falls back silently to an uncaptured forward):

- **Refusals** (RuntimeError with the reason): a model that is not on a CUDA device, is in
  training mode, or whose backend synchronises with the host (``Ops.sync_free``: the reference
  and CPU backends gather their hard windows with boolean masks). Checked at construction and
  at every call, since the model's settings may change in between.
- **Keys**: one graph per input shape, dtype and device and per model setting it bakes in
  (``gamma``, ``routing``, ``tie_break``, the backend). A new key is captured on its first call:
  warm-up forwards on a side stream (Triton compiles there, not inside the capture), the
  capture, and -- ``verify``, on by default -- one replay checked against an eager forward of
  the same input (expected routing; Gumbel draws differ from call to call). At most
  ``max_graphs`` are kept, the least recently used dropped first.
- **Buffers**: each graph owns a static input, into which every call copies its input, and
  static outputs (the image and the routing record). Calls return copies, or with
  ``copy_outputs=False`` the graph's own buffers, which the next call with the same key
  overwrites.
- **Parameters** are read where they are: in-place updates (``load_state_dict``, optimizer
  steps) show in the next replay. If a parameter moves (``model.to(...)``, ``.half()``, a new
  tensor assigned), every graph is dropped and the next call captures again. Submodules
  replaced after wrapping need :meth:`CUDAGraphModel.reset`.
- **Memory**: all graphs of one wrapper share a private memory pool. That is safe because each
  graph's static input and outputs stay referenced (no capture may reuse them) and replays never
  overlap (one call at a time, under a lock); what the graphs share is scratch memory that every
  replay writes before it reads. :meth:`CUDAGraphModel.reset` returns the pool.
- **Randomness**: Gumbel routing draws from the default CUDA generator, which CUDA graphs
  advance at every replay; there is no ``generator`` argument.
- Replays run on the caller's current CUDA stream.

Unproven on a GPU so far (this project's sessions had none): ``bench/gpu_compile_graphs.py``
checks replays against eager forwards, two sizes interleaved, and times them.
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
"""Largest difference between a first replay and an eager forward of the same input, per
dtype: the same kernels run, so the two normally agree exactly."""


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
    """A CAMixerSR inference forward captured as CUDA graphs, one per input size (module
    docstring: the rules).

    model: a CAMixerSR in eval mode on a CUDA device, on a backend that never synchronises
    with the host (``"triton"``). max_graphs: graphs kept (least recently used dropped).
    copy_outputs: return copies (default) or the graphs' own output buffers. verify: check
    each new graph's first replay against an eager forward (RuntimeError if they differ by
    more than :data:`VERIFY_TOL`). warmup: eager forwards before each capture.
    """

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
        """The model's upscaling factor."""
        return self.model.scale

    def keys(self) -> list[GraphKey]:
        """The keys of the graphs held, least recently used first."""
        return list(self._graphs)

    def reset(self) -> None:
        """Drop every graph and the memory they share, and find the model's parameters again
        (after submodules were replaced)."""
        with self._lock:
            self._drop_all()
            self._find_slots()

    def __call__(self, x: Tensor, *, return_routing: bool = False):
        """(B, 3, H, W) on the model's device -> (B, 3, sH, sW), as ``model(x)``; with
        ``return_routing`` also the :class:`~camixer_fast.reference.routing.Routing` record."""
        # normal tensors whether or not the caller is in inference mode: the static buffers
        # are written in place by later calls, which inference tensors forbid outside it
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
        # where every parameter and buffer hangs, found once: reading them there each call
        # costs ~0.1 ms for the S model, walking model.parameters() ~2 ms
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
        """Warm up on a side stream, then capture ``forward`` into a new graph in the shared
        pool: (replay, the outputs it writes)."""
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
