"""torch.compile(model, fullgraph=True): one graph per backend, the same outputs as eager.

The operators of :mod:`camixer_fast.backends.ops` (and the CPU backend's) are checked with
``torch.library.opcheck`` (schema, fake kernel against the real output's shape, dtype and
strides, AOT dispatch); the network is compiled with ``fullgraph=True`` on a small random
model, through AOT autograd for every backend and once through inductor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DEVICE, assert_close
from torch._dynamo.backends.registry import lookup_backend

from camixer_fast import backends
from camixer_fast.backends import cpu as cpu_ops
from camixer_fast.backends import dense as cpu_dense
from camixer_fast.backends import ops as custom_ops
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.routing import route_windows

COMPILED_TOL = 1e-4
"""fp32: compiled against eager (issue 11)."""

SMALL = {"n_feats": 8, "blocks_per_group": (1, 1), "window_size": 8}
BACKENDS = ("reference", "cpu", "triton")
"""The backends compiled here (the Triton kernels in the interpreter on the CPU)."""

HOT_OPERATORS = {
    "reference": ("camixer.reference_route_windows.default",
                  "camixer.reference_window_attention.default"),
    "cpu": ("camixer.reference_route_windows.default", "camixer.cpu_deformable_key.default",
            "camixer.cpu_window_attention.default"),
    "triton": ("camixer.triton_predictor.default", "camixer.triton_score_windows.default",
               "camixer.triton_select_windows.default", "camixer.triton_deformable_key.default",
               "camixer.triton_window_attention.default",
               "camixer.triton_depthwise_conv3x3.default", "camixer.triton_mixer_tail.default",
               "camixer.triton_ffn_tail.default"),
}
"""The operators each backend's inference forward calls once per block and image (once per
block for a backend that runs the batch as one call: the Triton backend's fused block)."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: Dynamo's per-function recompile limit counts the
    models of earlier tests otherwise."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _triton_add_one():
    """A one-kernel operator registered through :func:`camixer_fast.kernels.helpers.kernel_op`."""
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from camixer_fast.kernels.helpers import kernel_op

    @triton.jit
    def _add_one_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m_i = o_i < N
        tl.store(out_ptr + o_i, tl.load(x_ptr + o_i, mask=m_i) + 1.0, mask=m_i)

    def launch(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        wrap_triton(_add_one_kernel)[(triton.cdiv(x.numel(), 16),)](x, out, x.numel(), BLOCK=16)
        return out

    return kernel_op("_test_add_one", launch, lambda x: torch.empty_like(x))


try:
    add_one = _triton_add_one()
except ImportError:                     # triton is not installed: the kernels cannot run
    add_one = None
triton_kernel_test = pytest.mark.skipif(add_one is None, reason="triton is not installed")


def small_model(backend: str, *, saturated: bool = False) -> CAMixerSR:
    """A random two-block model; ``saturated``: every window scores exactly 1.0, so that K cuts
    through a tie of all windows and their order is the sort's order of equal scores."""
    torch.manual_seed(0)
    model = CAMixerSR(**SMALL).to(device_of(backend)).eval()
    if saturated:
        with torch.no_grad():
            for mixer in model.mixers():
                head = mixer.route.out_mask[2]
                head.weight.zero_()
                head.bias.copy_(torch.tensor([30.0, -30.0]))
    model.backend = backend
    return model


def device_of(backend: str) -> str:
    """Where a backend's model runs here: the Triton kernels on the kernel tests' device."""
    return DEVICE if backend == "triton" else "cpu"


def lr_input(batch: int = 2, height: int = 17, width: int = 33,
             device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, height, width, generator=g).to(device)


def operator_cases() -> list[tuple[str, object, tuple]]:
    """(id, operator, sample arguments): odd channels, channels-last maps as the network passes
    them, routings with K = 0, some and all windows."""
    g = torch.Generator().manual_seed(0)
    b, c, height, width, ws = 2, 5, 16, 24, 8

    def fmap(channels: int) -> torch.Tensor:
        return torch.randn(b, height, width, channels, generator=g).permute(0, 3, 1, 2)

    x, k_in, v, h = fmap(c), fmap(c), fmap(c), fmap(3)
    sa = torch.rand(b, 1, height, width, generator=g)
    offsets = 3 * torch.randn(b, 2, height, width, generator=g)
    wq, wk = torch.randn(c, c, generator=g), torch.randn(c, c, generator=g)
    bq, bk = torch.randn(c, generator=g), torch.randn(c, generator=g)
    mlp = (torch.randn(ws, ws * ws, generator=g), torch.randn(ws, generator=g),
           torch.randn(2, ws, generator=g), torch.randn(2, generator=g))
    assert cpu_ops.CPU_OPS is not None              # importing cpu_ops registers its operators
    ops = torch.ops.camixer
    cases = []
    for gamma in (0.0, 0.5, 1.0):
        r = route_windows(h, *mlp, gamma, window_size=ws)
        cases += [
            (f"reference_route_windows-gamma={gamma}", ops.reference_route_windows.default,
             (h, *mlp, gamma, ws, "expected", "official")),
            (f"reference_window_attention-gamma={gamma}", ops.reference_window_attention.default,
             (x, k_in, v, sa, wq, bq, wk, bk, r.num_hard, r.order, ws, 2)),
            (f"cpu_window_attention-gamma={gamma}", ops.cpu_window_attention.default,
             (x, k_in, v, sa, wq, bq, wk, bk, r.num_hard, r.order, ws, 2)),
            (f"cpu_deformable_key-gamma={gamma}", ops.cpu_deformable_key.default,
             (x, offsets, r.num_hard, r.order, ws)),
        ]
    cases.append(("window_order-index", ops.window_order.default, (h[:, 0, 0], "index")))
    if cpu_dense.unsupported() is None:             # the CPU backend's oneDNN product
        xh, bias = x.permute(0, 2, 3, 1).contiguous(), torch.randn(c, generator=g)
        w1 = torch.randn(c, c, generator=g)
        cases += [
            ("cpu_linear", ops.cpu_linear.default, (xh, w1, bias, None)),
            ("cpu_linear-residual", ops.cpu_linear.default, (xh, w1, None, xh.clone())),
        ]
    return cases


def triton_operator_cases() -> list[tuple[str, object, tuple, dict]]:
    """(id, operator, arguments, keyword arguments) of the Triton kernels' operators, on the
    kernels' device, with the channels-last maps the network passes."""
    from camixer_fast import kernels  # noqa: F401  (registers the operators)

    g = torch.Generator().manual_seed(0)
    b, c, height, width, ws = 2, 5, 16, 24, 8
    n = (height // ws) * (width // ws)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE)

    def fmap(channels: int) -> torch.Tensor:
        return rand(b, height, width, channels).permute(0, 3, 1, 2)

    x, k_in, v, h = fmap(c), fmap(c), fmap(c), fmap(3)
    sa, offsets = rand(b, 1, height, width).sigmoid(), 3 * rand(b, 2, height, width)
    wq, wk, bq, bk = rand(c, c), rand(c, c), rand(c), rand(c)
    mlp = (rand(ws, ws * ws), rand(ws), rand(2, ws), rand(2))
    pred = torch.softmax(rand(b, n, 2), dim=-1)
    num_hard = torch.tensor([0, 3], device=DEVICE)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).to(DEVICE)
    q, k, vv = (t.contiguous() for t in (x, k_in, v))
    out, lse = fmap(c).contiguous(), rand(b, n, ws * ws)      # metadata is what is checked
    ops = torch.ops.camixer
    return [
        ("triton_score_windows", ops.triton_score_windows.default,
         (h.contiguous(), *mlp, ws), {}),
        ("triton_select_windows", ops.triton_select_windows.default, (pred, None, 0.5), {}),
        ("triton_select_windows-gumbel", ops.triton_select_windows.default,
         (pred, rand(b, n, 2), 0.5), {}),
        ("triton_deformable_key-hard", ops.triton_deformable_key.default,
         (x, offsets, num_hard, order), {"window_size": ws}),
        ("triton_deformable_key-whole", ops.triton_deformable_key.default, (x, offsets), {}),
        ("triton_deformable_key_backward", ops.triton_deformable_key_backward.default,
         (x, offsets, fmap(c)), {}),
        ("triton_window_attention", ops.triton_window_attention.default,
         (x, k_in, v, sa, wq, bq, wk, bk, num_hard, order, ws), {}),
        ("triton_window_attention_core", ops.triton_window_attention_core.default,
         (q, k, vv), {"window_size": ws}),
        ("triton_window_attention_core_backward",
         ops.triton_window_attention_core_backward.default,
         (q, k, vv, out, lse, fmap(c)), {"window_size": ws}),
    ]


CASES = operator_cases()


@pytest.mark.parametrize(("op", "args"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_operator(op, args) -> None:
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_static"))


TRITON_CASES = triton_operator_cases() if add_one is not None else []


@pytest.mark.parametrize(("op", "args", "kwargs"), [c[1:] for c in TRITON_CASES],
                         ids=[c[0] for c in TRITON_CASES])
def test_triton_operator(op, args, kwargs) -> None:
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    if op is torch.ops.camixer.triton_deformable_key.default and "window_size" in kwargs:
        # only the hard windows' pixels are written (the rest is never read): two runs agree
        # there only, and the AOT check compares whole outputs
        checks = checks[:2]
    torch.library.opcheck(op, args, kwargs, test_utils=checks)


def test_gumbel_noise_operator_fake_kernel() -> None:
    # a random draw: its values differ run to run, so only schema and metadata are compared
    like = torch.zeros(2, 7, 2)
    torch.library.opcheck(torch.ops.camixer.gumbel_noise.default, (like,),
                          test_utils=("test_schema", "test_faketensor"))


def compile_recording(model: CAMixerSR, graphs: list[torch.fx.GraphModule]):
    """``torch.compile(model, fullgraph=True)`` through AOT autograd (eager kernels), keeping
    every graph Dynamo produces."""
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return torch.compile(model, backend=backend, fullgraph=True)


def called(graph: torch.fx.GraphModule) -> list[str]:
    """The names of the functions and methods a Dynamo graph calls."""
    names = []
    for node in graph.graph.nodes:
        if node.op == "call_function":
            names.append(str(node.target))
        elif node.op == "call_method":
            names.append(node.target)
    return names


def same_routing(eager, compiled) -> None:
    for i, (a, b) in enumerate(zip(eager.blocks, compiled.blocks, strict=True)):
        assert torch.equal(a.num_hard, b.num_hard), f"block {i}: K {a.num_hard} != {b.num_hard}"
        assert torch.equal(a.order, b.order), f"block {i}: window order differs"


FULLGRAPH_CASES = [(b, "expected") for b in BACKENDS] + [
    (b, "gumbel") for b in BACKENDS if b != "cpu"]
"""Gumbel routing once per routing operator (the CPU backend routes with the reference's)."""


@pytest.mark.parametrize(("backend", "routing"), FULLGRAPH_CASES,
                         ids=["-".join(c) for c in FULLGRAPH_CASES])
def test_fullgraph(one_thread, backend: str, routing: str) -> None:
    model = small_model(backend, saturated=True)
    model.routing, model.gamma = routing, 0.25
    x = lr_input(device=device_of(backend))
    graphs: list[torch.fx.GraphModule] = []
    compiled = compile_recording(model, graphs)
    with torch.no_grad():
        torch.manual_seed(7)
        want, want_routing = model(x, return_routing=True)
        torch.manual_seed(7)
        got, got_routing = compiled(x, return_routing=True)
    assert len(graphs) == 1
    names = called(graphs[0])
    whole_batch = backends.select_backend(backend, x.device).ops.whole_batch
    calls = sum(SMALL["blocks_per_group"]) * (1 if whole_batch else x.shape[0])
    for op in HOT_OPERATORS[backend]:
        assert names.count(op) == calls, f"{op}: {names.count(op)} calls, expected {calls}"
    if backend == "triton":
        # the official order of tied scores and the Gumbel draw stay eager operators
        assert names.count("camixer.window_order.default") == calls
        assert names.count("camixer.gumbel_noise.default") == (calls if routing == "gumbel"
                                                               else 0)
    leaked = [n for n in names if n in ("item", "tolist")
              or any(s in n for s in ("sort", "nonzero", "_local_scalar_dense"))]
    assert not leaked, f"data-dependent calls traced into the graph: {leaked}"
    # the Gumbel draws come from the default generator inside the routing operator, as eagerly
    same_routing(want_routing, got_routing)
    assert_close(f"{backend} {routing} compiled (aot_eager)", want, got, COMPILED_TOL)


def test_fullgraph_needs_no_grad(one_thread) -> None:
    # with gradients the hard-window gathers are traced and break the graph; compile inference
    # under no_grad / inference_mode (README)
    compiled = compile_recording(small_model("cpu"), [])
    with pytest.raises(Exception, match="nonzero|data-dependent|Dynamic shape"):
        compiled(lr_input(1, 16, 16))


def test_backend_is_resolved_outside_the_graph(one_thread) -> None:
    model = small_model("reference")
    graphs: list[torch.fx.GraphModule] = []
    compiled = compile_recording(model, graphs)
    with torch.no_grad():
        compiled(lr_input(1, 16, 16))
        model.backend = "cpu"
        compiled(lr_input(1, 16, 16))
    # a change of backend is a guard failure and a new graph, with the new backend's operators
    assert len(graphs) == 2
    assert "camixer.cpu_window_attention.default" in called(graphs[1])
    assert "camixer.cpu_window_attention.default" not in called(graphs[0])


def test_backend_choice_is_not_traced(one_thread, monkeypatch) -> None:
    # the choice asks questions Dynamo cannot trace on every device (importlib's find_spec,
    # torch.cuda.get_device_capability on a GPU): it runs once, outside the graph
    reference = backends.REGISTRY["reference"]
    asked = []

    def untraceable(device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
        torch._dynamo.graph_break()
        asked.append(device)
        return reference.unsupported(device, dtype, training)

    monkeypatch.setitem(backends.REGISTRY, "reference",
                        dataclasses.replace(reference, unsupported=untraceable))
    model = small_model("reference")
    compiled = compile_recording(model, [])
    with torch.no_grad():
        want = model(lr_input(1, 16, 16))
        asked.clear()
        got = compiled(lr_input(1, 16, 16))
        compiled(lr_input(1, 16, 16))
    assert asked == [torch.device("cpu")], "the choice ran more than once, or in the graph"
    assert_close("compiled", want, got, COMPILED_TOL)


def test_window_order_entry_is_one_operator_when_traced() -> None:
    scores = torch.ones(2, 12)
    traced = torch.compile(lambda s: custom_ops.window_order(s, "official"), fullgraph=True,
                           backend="eager")
    assert torch.equal(traced(scores), torch.argsort(scores, dim=1, descending=True))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fullgraph_training_step(one_thread, backend: str) -> None:
    model = small_model(backend).train()
    model.train_noise = False
    x = lr_input(2, 16, 24, device=device_of(backend))
    grads = []
    for run in (model, compile_recording(model, [])):
        model.zero_grad()
        sr, ratio_loss = run(x)
        (sr.square().mean() + ratio_loss).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, want in grads[0].items():
        assert_close(f"{backend} grad {name}", want, grads[1][name], COMPILED_TOL)


@triton_kernel_test
def test_kernel_op_launches_plainly_and_traces_as_one_operator() -> None:
    x = torch.arange(37.0, device=DEVICE)
    assert torch.equal(add_one(x), x + 1)               # eager: the launcher itself
    graphs: list[torch.fx.GraphModule] = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    traced = torch.compile(lambda t: add_one(t * 2.0), backend=backend, fullgraph=True)
    assert torch.equal(traced(x), x * 2 + 1)
    assert "camixer._test_add_one.default" in called(graphs[0])
    torch.library.opcheck(add_one.op, (x,), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton" if DEVICE == "cuda" else "cpu"])
def test_inductor_matches_eager(one_thread, backend: str) -> None:
    # on a GPU: the Triton operators through inductor, ties in a CUDA sort; here: the CPU
    # backend (one inductor compile of the small model costs ~15-50 s on this machine)
    model = small_model(backend, saturated=True)
    model.gamma = 0.25
    x = lr_input(1, device=device_of(backend))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want, want_routing = model(x, return_routing=True)
        got, got_routing = compiled(x, return_routing=True)
    same_routing(want_routing, got_routing)
    assert_close(f"{backend} compiled (inductor)", want, got, COMPILED_TOL)
