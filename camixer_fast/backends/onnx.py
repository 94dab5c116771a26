"""ONNX export with the routing in the graph, and the "onnx" backend that the export traces.
CAMixerOSR: opset >= 19 (its DCNs are DeformConv nodes), an optional "condition" input.

``lr`` (B, 3, H, W) float32 and ``gamma`` (float32 scalar clipped to [0, 1], absent if baked in)
-> ``sr`` (B, 3, sH, sW), B/H/W dynamic. K and the window order (ties by lower index) are in the
graph, whose node count depends on no size, batch or K. The TorchScript-based exporter keeps
sizes and K as graph values (``torch.export`` would specialise on them). fp32 only."""

from __future__ import annotations

import copy
import os
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
from camixer_fast.io.files import atomic_path
from camixer_fast.reference import dense
from camixer_fast.reference.attention_training import masked_window_attention
from camixer_fast.reference.dcn import modulated_deform_conv2d
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.odisr import CAMixerOSR, latitude_condition
from camixer_fast.reference.routing import (
    WindowRouting,
    check_gamma,
    num_hard_windows,
    window_scores,
)
from camixer_fast.reference.windows import to_windows

MIN_OPSET = 17
MAX_OPSET = 20
DEFAULT_OPSET = 17
OSR_MIN_OPSET = 19

_GAMMA_INPUT: ContextVar[Tensor | None] = ContextVar("camixer_fast_onnx_gamma", default=None)


def route_windows(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                  gamma: float | Tensor, *, window_size: int, routing: str = "expected",
                  generator: torch.Generator | None = None,
                  tie_break: str = "official") -> WindowRouting:
    """(B, c4, H, W) -> :class:`WindowRouting`, expected routing only, ties by index whatever
    ``tie_break`` says; while exporting with a γ input, that input replaces ``gamma``."""
    gamma_input = _GAMMA_INPUT.get()
    if gamma_input is not None:
        gamma = gamma_input
    if routing != "expected":
        raise ValueError(f"ONNX export computes the expected routing only, not {routing!r}")
    pred = window_scores(h, w1, b1, w2, b2, window_size)             # [B, N, 2]
    num_windows = pred.shape[1]
    r = torch.softmax(pred.float(), dim=-1)[..., 0].mean(dim=-1)      # [B]
    num_hard = num_hard_windows(r, num_windows, gamma)
    return WindowRouting(pred, num_hard, window_order(pred[..., 0]))


def window_order(score: Tensor) -> Tensor:
    """score (B, N) -> order (B, N) int64, descending, ties by lower index (reference "index").
    One TopK would do by the ONNX spec, but OpenVINO (2026.4, CPU) orders ties its own way: the
    keys (group of equal scores, index) of the second TopK are distinct, < 2**31 for N <= 46,340."""
    n = score.shape[1]
    values, index = torch.topk(score, n, dim=1)
    previous = torch.cat([values[:, :1], values[:, :-1]], dim=1)
    key = (values < previous).to(index.dtype).cumsum(dim=1) * n + index
    return torch.topk(key, n, dim=1, largest=False).values % n


def deformable_key(x: Tensor, offsets: Tensor, num_hard: Tensor | None = None,
                   order: Tensor | None = None, *, window_size: int = 16) -> Tensor:
    """``x + warp(x, offsets)`` with one GridSample, as the reference's (H, W >= 2)."""
    _, _, height, width = x.shape
    rows = torch.arange(height, dtype=offsets.dtype, device=offsets.device).unsqueeze(1)
    cols = torch.arange(width, dtype=offsets.dtype, device=offsets.device)
    gx = 2.0 * (cols + offsets[:, 0]) / (width - 1) - 1.0
    gy = 2.0 * (rows + offsets[:, 1]) / (height - 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1).to(x.dtype)
    return x + F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=True)


def _attend(q: Tensor, k: Tensor, v: Tensor, wq: Tensor, bq: Tensor, wk: Tensor,
            bk: Tensor) -> Tensor:
    scores = torch.softmax(F.linear(q, wq, bq) @ F.linear(k, wk, bk).transpose(-2, -1), dim=-1)
    return scores @ v


def window_attention(x: Tensor, k_in: Tensor, v: Tensor, sa: Tensor, wq: Tensor, bq: Tensor,
                     wk: Tensor, bk: Tensor, num_hard: Tensor, order: Tensor, *,
                     window_size: int, shift: int = 0) -> Tensor:
    """Top-K window attention as the reference's, the K_max windows of the batch at once;
    ``shift``: the window grid offset by it, wrapping (the maps rolled by −shift and back)."""
    if shift:
        x, k_in, v, sa = (torch.roll(t, (-shift, -shift), dims=(2, 3)) for t in (x, k_in, v, sa))
        out = window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                               window_size=window_size)
        return torch.roll(out, (shift, shift), dims=(2, 3))
    dtype = x.dtype
    b, c, height, width = x.shape
    wq, bq, wk, bk = wq.float(), bq.float(), wk.float(), bk.float()
    tokens = window_size * window_size
    maps = torch.cat([x.float(), k_in.float(), v.float(), (v * sa).float()], dim=1)
    windows = to_windows(maps, window_size)                           # [B, N, T, 4C]
    n = windows.shape[1]
    windows = windows.reshape(b * n, tokens, 4 * c)
    k_max = num_hard.max()
    top = order[:, :k_max]
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


@torch.library.custom_op("camixer_fast_onnx::deform_conv", mutates_args=())
def _deform_conv_op(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor,
                    padding: int, dilation: int) -> Tensor:
    return modulated_deform_conv2d(x, offset, mask, weight, bias, padding=padding,
                                   dilation=dilation).contiguous()


@_deform_conv_op.register_fake
def _(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, padding: int,
      dilation: int) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], *offset.shape[2:])


def _deform_conv_symbolic(g, x, offset, mask, weight, bias, padding, dilation):
    from torch.onnx import symbolic_helper

    pad = symbolic_helper._get_const(padding, "i", "padding")
    dil = symbolic_helper._get_const(dilation, "i", "dilation")
    kernel = symbolic_helper._get_tensor_sizes(weight)[2:]
    return g.op("DeformConv", x, weight, offset, bias, mask, kernel_shape_i=kernel,
                pads_i=[pad] * 4, dilations_i=[dil] * 2)


torch.onnx.register_custom_op_symbolic("camixer_fast_onnx::deform_conv", _deform_conv_symbolic,
                                       OSR_MIN_OPSET)


def deform_conv(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor,
                bias: Tensor | None = None, *, padding: int = 1, dilation: int = 1) -> Tensor:
    """:func:`modulated_deform_conv2d` (same shapes), exported as one ``DeformConv`` node."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return _deform_conv_op(x, offset, mask, weight, bias, padding, dilation)


ONNX_OPS = Ops(route_windows, window_scores, deformable_key, window_attention,
               masked_window_attention, dense.linear, deform_conv, whole_batch=True)


def _onnx_unsupported(device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    if not dtype.is_floating_point:
        return f"the network computes in floating point, not {dtype}"
    return None


ONNX_BACKEND = Backend("onnx", "export-friendly operations, what export_onnx traces into ONNX",
                       _onnx_unsupported, (), lambda: ONNX_OPS, trains_as="reference")


@contextmanager
def onnx_backend() -> Iterator[None]:
    """Inside the block, ``model.backend = "onnx"`` is accepted; outside, the built-in set."""
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
    """The reference's ``pad_to_multiple`` with no branch on sizes: traces for H, W >= 1."""
    for dim in (2, 3):
        size = x.shape[dim]
        index = torch.arange(size + (-size) % multiple, device=x.device)
        period = torch.clamp(2 * (size - 1), min=1)
        index = index % period
        index = torch.where(index < size, index, period - index)
        x = x.index_select(dim, index)
    return x


class ExportGraph(nn.Module):
    """Pad, a copy of the model on the "onnx" backend, crop to (sH, sW): what is traced."""

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


def _onnx_ops(device: torch.device) -> Ops:
    return ONNX_OPS


class OsrExportGraph(nn.Module):
    """CAMixerOSR: the cos-latitude map of the whole panorama ``lr`` (or the ``condition``
    input, a crop's), both padded as the reference pads them, the model on ONNX_OPS, crop;
    γ baked in, or the last input."""

    def __init__(self, model: CAMixerOSR, gamma: float | None, condition_input: bool) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.model.ops = _onnx_ops          # the instance's Ops: the "onnx" set, any device
        self.model.tie_break = "official"   # argsort exports as TopK (a stable sort does not)
        self.gamma_input, self.condition_input = gamma is None, condition_input
        if gamma is not None:
            self.model.gamma = gamma

    def forward(self, lr: Tensor, *inputs: Tensor) -> Tensor:
        height, width = lr.shape[-2:]
        condition = inputs[0] if self.condition_input else \
            latitude_condition(height, width, device=lr.device)
        ws = self.model.window_size
        padded = pad_to_window_grid(lr, ws)
        cond = pad_to_window_grid(condition.expand(lr.shape[0], 1, height, width), ws)
        sr = self.model(padded, cond, gamma=inputs[-1] if self.gamma_input else None)
        return sr[..., : height * self.model.scale, : width * self.model.scale]


def compact_graph(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """In place: merge nodes with equal op, inputs and attributes, Constants to initializers."""
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
    gamma: float | None
    nodes: int
    seconds: float


def _check_exportable(model: CAMixerSR | CAMixerOSR, path: Path, gamma: float | None,
                      opset: int) -> None:
    if not isinstance(model, (CAMixerSR, CAMixerOSR)):
        raise TypeError(f"expected a camixer_fast.CAMixerSR or CAMixerOSR, got "
                        f"{type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode: ONNX export is for inference (call "
                         "model.eval() first)")
    low = OSR_MIN_OPSET if isinstance(model, CAMixerOSR) else MIN_OPSET
    if not isinstance(opset, int) or not low <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset!r} is not supported: use {low}..{MAX_OPSET} "
                         f"(GridSample and LayerNormalization need {MIN_OPSET}, CAMixerOSR's "
                         f"DeformConv {OSR_MIN_OPSET}; PyTorch's TorchScript exporter writes up "
                         f"to {MAX_OPSET})")
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


def export_onnx(model: CAMixerSR | CAMixerOSR, path: str | os.PathLike, *,
                gamma: float | None = None, opset: int | None = None,
                condition_input: bool = False) -> OnnxExport:
    """Write ``model`` (left unchanged) as a checked ONNX graph, whole or not at all.
    gamma: baked in, or ``None`` for the graph input "gamma" (the last input); opset: 17 to 20
    (CAMixerOSR 19 to 20), None: the lowest; condition_input: CAMixerOSR only, an input
    "condition" (B, 1, H, W) after "lr" instead of the whole panorama's latitudes.
    Raises ValueError for training mode, another opset, Gumbel routing or a non-fp32 model."""
    import onnx

    path = Path(path).expanduser()
    osr = isinstance(model, CAMixerOSR)
    if opset is None:
        opset = OSR_MIN_OPSET if osr else DEFAULT_OPSET
    _check_exportable(model, path, gamma, opset)
    if condition_input and not osr:
        raise ValueError("condition_input is for CAMixerOSR (ODI-SR) only")
    device = model.head.weight.device
    example = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(0)).to(device)
    args: tuple = (example,)
    names = ["lr"]
    axes = {"lr": {0: "batch", 2: "height", 3: "width"},
            "sr": {0: "batch", 2: "out_height", 3: "out_width"}}
    if osr:
        graph: nn.Module = OsrExportGraph(model, gamma, condition_input).eval()
        if condition_input:
            args += (latitude_condition(20, 28, rows=(3, 40), device=device),)
            names.append("condition")
            axes["condition"] = {0: "batch", 2: "height", 3: "width"}
    else:
        graph = ExportGraph(model, gamma).eval()
    if gamma is None:
        args += (torch.tensor(0.5, device=device),)
        names.append("gamma")
    start = time.perf_counter()
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(graph, args, tmp, dynamo=False, opset_version=opset,
                              input_names=names, output_names=["sr"], dynamic_axes=axes,
                              do_constant_folding=True)
        proto = compact_graph(onnx.load(tmp))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
    return OnnxExport(path, opset, gamma, len(proto.graph.node), time.perf_counter() - start)
