"""ONNX export with the routing inside the graph.

:func:`export_onnx` traces the network's own code with an operation table of export-friendly
versions of the mixers' hot operations -- the same five functions, with the reference
signatures, that every backend supplies:

- :func:`route_windows`: window scores, then K per image from the expected routing *in the
  graph*, ``K = N`` if γ = 1 else ``min(floor(N·r·2γ), N)`` in float32 in the reference's
  order, and the window order by :func:`window_order`, ties to the lower window index: the
  ``"index"`` tie rule (:func:`camixer_fast.reference.routing.window_order`). The official
  ``argsort`` order of equal scores is no documented rule and cannot be exported.
- :func:`deformable_key`: one ``GridSample`` (bilinear, border, align_corners) over the map.
- :func:`window_attention`: the hard windows of the whole batch are gathered (``Gather``) as
  the K_max = max_b K_b best windows of every image, attended as one batched matmul, and
  written back (``ScatterND``) where the rank is below the image's own K_b; the others keep
  ``v·sa``. Nothing is unrolled per window or per image, so the graph's node count does not
  depend on the input size, the batch or K.

The exported graph takes ``lr`` (B, 3, H, W) float32 in [0, 1] with B, H, W dynamic (H, W >= 1)
and, when γ is not baked in, ``gamma`` (a float32 scalar, clipped to [0, 1]); it returns ``sr``
(B, 3, sH, sW), unclamped, like ``model(lr)``. Inputs are padded to the window grid in the
graph by the model's own rule (reflect, continued periodically for tiny inputs).

The operations are also a backend, "onnx" (:data:`ONNX_BACKEND`; a name
:func:`~camixer_fast.backends.select_backend` accepts inside :func:`onnx_backend` only): there
``model.backend = "onnx"`` runs them eagerly, a batch as one call.

The export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``):
it records the sizes and K as values in the graph, where ``torch.export`` would have to
specialise on them (the network's per-image inference loop and its padding branch depend on
sizes). fp16 export is not provided: export fp32 (the graph computes attention in fp32 anyway).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camixer_fast import backends
from camixer_fast.backends import Backend, Ops
from camixer_fast.reference import dense
from camixer_fast.reference.attention_training import masked_window_attention
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.routing import WindowRouting, check_gamma, window_scores
from camixer_fast.reference.windows import to_windows

MIN_OPSET = 17
"""GridSample entered ONNX in opset 16, LayerNormalization in 17."""
MAX_OPSET = 20
"""The newest opset PyTorch's TorchScript-based exporter writes."""
DEFAULT_OPSET = 17

_GAMMA_INPUT: ContextVar[Tensor | None] = ContextVar("camixer_fast_onnx_gamma", default=None)
"""γ as a graph input: while set (by :class:`ExportGraph`), it replaces the model's γ in
:func:`route_windows`."""


def hard_window_count(r: Tensor, num_windows: Tensor | int, gamma: float | Tensor) -> Tensor:
    """K per image (B,) int64 from the hard fraction r (B,), as
    :func:`camixer_fast.reference.routing.num_hard_windows`, with γ a float or a 0-dim tensor
    (a graph input: clipped to [0, 1])."""
    r = r.float()
    if not torch.is_tensor(gamma):
        gamma = check_gamma(gamma)
        if gamma == 1.0:
            return torch.zeros_like(r, dtype=torch.int64) + num_windows
        k = torch.floor(r * num_windows * 2.0 * gamma).to(torch.int64)
        return torch.minimum(k.clamp(min=0), torch.zeros_like(k) + num_windows)
    g = gamma.float().clamp(0.0, 1.0)
    k = torch.floor(r * num_windows * 2.0 * g).to(torch.int64)
    everything = torch.zeros_like(k) + num_windows
    return torch.where(g >= 1.0, everything, torch.minimum(k.clamp(min=0), everything))


def route_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  gamma: float | Tensor, *, window_size: int, routing: str = "expected",
                  generator: torch.Generator | None = None,
                  tie_break: str = "official") -> WindowRouting:
    """The routing step, (B, c4, H, W) -> :class:`WindowRouting`, for export: expected routing,
    K in the graph, the order by :func:`window_order` (ties: lower window index first, whatever
    ``tie_break`` says). ``gamma`` may be a 0-dim tensor; during an export with γ as a graph
    input, that input replaces it."""
    gamma_input = _GAMMA_INPUT.get()
    if gamma_input is not None:
        gamma = gamma_input
    if routing != "expected":
        raise ValueError(f"ONNX export computes the expected routing only, not {routing!r}")
    pred = window_scores(h, w1, b1, w2, b2, window_size)             # [B, N, 2]
    num_windows = pred.shape[1]
    r = torch.softmax(pred.float(), dim=-1)[..., 0].mean(dim=-1)      # [B]
    num_hard = hard_window_count(r, num_windows, gamma)
    return WindowRouting(pred, num_hard, window_order(pred[..., 0]))


def window_order(score: Tensor) -> Tensor:
    """Windows by descending score, equal scores by lower index: (B, N) -> (B, N) int64, as
    :func:`camixer_fast.reference.routing.window_order` with ``"index"``.

    ONNX promises this tie rule for TopK, but OpenVINO's CPU plugin (2026.4) orders ties its own
    way, so the first TopK only groups equal scores and a second one sorts (group, index) keys,
    which are distinct (< 2**31, as OpenVINO computes them in int32, for N <= 46,340).
    """
    n = score.shape[1]
    values, index = torch.topk(score, n, dim=1)
    previous = torch.cat([values[:, :1], values[:, :-1]], dim=1)
    key = (values < previous).to(index.dtype).cumsum(dim=1) * n + index
    return torch.topk(key, n, dim=1, largest=False).values % n


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """``k_in = x + warp(x, offsets)`` over the whole map with one GridSample, as
    :func:`camixer_fast.reference.warp.deformable_key` (H, W >= 2: the model pads to its window
    grid first)."""
    _, _, height, width = x.shape
    rows = torch.arange(height, dtype=offsets.dtype, device=offsets.device).unsqueeze(1)
    cols = torch.arange(width, dtype=offsets.dtype, device=offsets.device)
    gx = 2.0 * (cols + offsets[:, 0]) / (width - 1) - 1.0
    gy = 2.0 * (rows + offsets[:, 1]) / (height - 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1).to(x.dtype)                   # [B, H, W, 2]
    return x + F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=True)


def _attend(q: Tensor, k: Tensor, v: Tensor, wq: Tensor, bq: Tensor, wk: Tensor,
            bk: Tensor) -> Tensor:
    scores = torch.softmax(F.linear(q, wq, bq) @ F.linear(k, wk, bk).transpose(-2, -1), dim=-1)
    return scores @ v


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int) -> Tensor:
    """Inference token mixing with per-image top-K routing, for export (see the module doc).

    Shapes as :func:`camixer_fast.reference.attention_inference.window_attention`; all K_max
    windows of the batch are attended at once.
    """
    dtype = x.dtype
    b, c, height, width = x.shape
    wq, bq, wk, bk = wq.float(), bq.float(), wk.float(), bk.float()
    tokens = window_size * window_size
    # one window layout for the four maps (fewer nodes than four): [B·N, T, 4C]
    maps = torch.cat([x.float(), k_in.float(), v.float(), (v * sa).float()], dim=1)
    windows = to_windows(maps, window_size)                           # [B, N, T, 4C]
    n = windows.shape[1]
    windows = windows.reshape(b * n, tokens, 4 * c)
    k_max = num_hard.max()
    top = order[:, :k_max]                                            # [B, Kmax]
    flat = (top + torch.arange(b, device=x.device).unsqueeze(1) * n).reshape(-1)
    q, k, vv, simple = windows.index_select(0, flat).split(c, dim=-1)  # [B·Kmax, T, C] each
    mixed = _attend(q, k, vv, wq, bq, wk, bk)
    rank = torch.arange(order.shape[1], device=x.device)[:k_max]
    hard = (rank.unsqueeze(0) < num_hard.unsqueeze(1)).reshape(-1, 1, 1)
    everywhere = windows.split(c, dim=-1)[3]                          # v·sa, all windows
    out = everywhere.index_put((flat,), torch.where(hard, mixed, simple))
    rows, cols = height // window_size, width // window_size
    out = out.view(b, rows, cols, window_size, window_size, c).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, c, height, width).to(dtype)


ONNX_OPS = Ops(route_windows, window_scores, deformable_key, window_attention,
               masked_window_attention, dense.linear, whole_batch=True)
"""The operations of the "onnx" backend. They run eagerly too (plain PyTorch); a batch runs
as one call, as in the exported graph. Training runs the reference (``trains_as``)."""


def _onnx_unsupported(device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    if not dtype.is_floating_point:
        return f"the network computes in floating point, not {dtype}"
    return None


ONNX_BACKEND = Backend("onnx", "export-friendly operations, what export_onnx traces into ONNX",
                       _onnx_unsupported, (), lambda: ONNX_OPS, trains_as="reference")
"""Chosen by name only ("auto" never picks it)."""


@contextmanager
def onnx_backend() -> Iterator[None]:
    """Inside the block, "onnx" is a backend name that
    :func:`camixer_fast.backends.select_backend` accepts (``model.backend = "onnx"``).

    Scoped, not permanent: :mod:`camixer_fast.backends` has no registration function, and its
    set of backends stays the built-in one outside export."""
    name = ONNX_BACKEND.name
    added = name not in backends.REGISTRY
    if added:
        backends.REGISTRY[name] = ONNX_BACKEND
        backends.BACKENDS = (*backends.BACKENDS, name)
    try:
        yield
    finally:
        if added:
            del backends.REGISTRY[name]
            backends.BACKENDS = tuple(b for b in backends.BACKENDS if b != name)


def pad_to_window_grid(x: Tensor, multiple: int) -> Tensor:
    """:func:`camixer_fast.reference.model.pad_to_multiple` written without branches on the
    sizes (so that it traces for every H, W >= 1): reflect padding on the bottom and right,
    continued periodically, a 1-pixel dimension repeated."""
    for dim in (2, 3):
        size = x.shape[dim]
        index = torch.arange(size + (-size) % multiple, device=x.device)
        period = torch.clamp(2 * (size - 1), min=1)
        index = index % period
        index = torch.where(index < size, index, period - index)
        x = x.index_select(dim, index)
    return x


class ExportGraph(nn.Module):
    """What is traced: pad to the window grid, the model's own forward on the "onnx" backend,
    crop to (sH, sW). Holds its own copy of the model (the caller's is left as it is)."""

    def __init__(self, model: CAMixerSR, gamma: float | None) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        with onnx_backend():
            self.model.backend = ONNX_BACKEND.name
        if gamma is not None:
            self.model.gamma = gamma

    def forward(self, lr: Tensor, gamma: Tensor | None = None) -> Tensor:
        height, width = lr.shape[-2:]
        padded = pad_to_window_grid(lr, self.model.window_size)
        token = _GAMMA_INPUT.set(gamma)
        try:
            with onnx_backend():
                sr = self.model(padded)
        finally:
            _GAMMA_INPUT.reset(token)
        return sr[..., : height * self.model.scale, : width * self.model.scale]


def compact_graph(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """Fold the tracer's repetitions out of an exported graph, in place: nodes that compute the
    same op on the same inputs with the same attributes are merged (the exporter emits the same
    shape arithmetic many times), and Constant nodes become initializers (data, not work)."""
    import onnx

    graph = proto.graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    seen: dict[tuple, list[str]] = {}
    kept = []
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        key = (node.op_type, node.domain, tuple(node.input),
               tuple(a.SerializeToString() for a in node.attribute))
        if key in seen and not outputs.intersection(node.output):
            rename.update(zip(node.output, seen[key]))
            continue
        seen[key] = list(node.output)
        kept.append(node)
    nodes = []
    for node in kept:
        attrs = node.attribute
        if node.op_type == "Constant" and len(attrs) == 1 and attrs[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    produced = {name for node in nodes for name in node.output}
    info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return proto


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    opset: int
    gamma: float | None          # None: γ is the graph input "gamma"
    nodes: int                   # nodes of the main graph
    seconds: float


def _check_exportable(model: CAMixerSR, path: Path, gamma: float | None, opset: int) -> None:
    if not isinstance(model, CAMixerSR):
        raise TypeError(f"expected a camixer_fast.CAMixerSR, got {type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode: ONNX export is for inference (call "
                         "model.eval() first)")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset!r} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                         f"(GridSample and LayerNormalization need {MIN_OPSET}; PyTorch's "
                         f"TorchScript exporter writes up to {MAX_OPSET})")
    if model.routing != "expected":
        raise ValueError(f"the model's routing is {model.routing!r}: ONNX export computes the "
                         "expected routing only (set model.routing = 'expected')")
    if gamma is not None:
        check_gamma(gamma)
    if path.suffix.lower() != ".onnx" or not path.parent.is_dir():
        raise ValueError(f"{path}: the output must be a .onnx file in an existing folder")
    dtype = model.head.weight.dtype
    if dtype != torch.float32:
        raise ValueError(f"the model is {dtype}: ONNX export is fp32 only (model.float())")


def export_onnx(model: CAMixerSR, path: str | os.PathLike, *, gamma: float | None = None,
                opset: int = DEFAULT_OPSET) -> OnnxExport:
    """Write ``model`` as an ONNX graph with the routing inside it.

    gamma: bake γ into the graph, or ``None`` for a float32 scalar input "gamma".
    opset: ONNX opset, 17 to 20 (default 17).
    The graph's input is "lr" (B, 3, H, W), output "sr" (B, 3, sH, sW), all dynamic; see the
    module doc for what it computes. The graph is compacted (:func:`compact_graph`), checked
    with ``onnx.checker`` and written whole or not at all. Raises ValueError for a model in
    training mode, an unsupported opset, Gumbel routing or a non-fp32 model. The caller's model
    is not changed (a copy is traced).
    """
    import onnx

    path = Path(path).expanduser()
    _check_exportable(model, path, gamma, opset)
    graph = ExportGraph(model, gamma).eval()
    device = model.head.weight.device
    example = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(0)).to(device)
    args: tuple = (example,)
    names = ["lr"]
    axes = {"lr": {0: "batch", 2: "height", 3: "width"},
            "sr": {0: "batch", 2: "out_height", 3: "out_width"}}
    if gamma is None:
        args += (torch.tensor(0.5, device=device),)
        names.append("gamma")
    start = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the exporter's own deprecation notice, and the tracer's notes on the size checks
            # the network makes in Python (they are constant for every input the graph takes)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(graph, args, tmp, dynamo=False, opset_version=opset,
                              input_names=names, output_names=["sr"], dynamic_axes=axes,
                              do_constant_folding=True)
        proto = compact_graph(onnx.load(tmp))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return OnnxExport(path, opset, gamma, len(proto.graph.node), time.perf_counter() - start)
