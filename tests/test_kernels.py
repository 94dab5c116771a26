"""Parity of the Triton kernels with their reference twins.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small; on a GPU they are compiled, TF32 off for the PyTorch
parts (the training attention's projections are convolutions). Every tensor the wrappers
allocate is poisoned (NaN for floats, -7 for integers) so an element a kernel fails to write
shows up.
"""

from __future__ import annotations

import pytest
import torch

from camixer_fast import reference
from camixer_fast.kernels import attention_inference as kattn
from camixer_fast.kernels import attention_training as ktrain
from camixer_fast.kernels import routing as kroute
from camixer_fast.kernels import warp as kwarp
from camixer_fast.reference.windows import to_windows
from conftest import DEVICE, INTERPRETED, assert_close

pytestmark = pytest.mark.usefixtures("no_tf32", "poisoned_allocations")
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
              INTERPRETED, reason="bf16 tl.dot is broken in the interpreter; proven by the "
                                  "compile gate and on a GPU"))]
ATTN_TOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(DEVICE, dtype)


def mask_mlp(window_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    hid = window_size
    return (rand(hid, window_size ** 2, seed=seed, scale=1 / window_size),
            rand(hid, seed=seed + 1), rand(2, hid, seed=seed + 2), rand(2, seed=seed + 3))


ROUTING_SHAPES = [(2, 10, 48, 80, 16), (1, 15, 16, 16, 16), (3, 9, 32, 24, 8),
                  (1, 4, 192, 208, 16)]


@pytest.mark.parametrize("shape", ROUTING_SHAPES, ids=lambda s: "B{}-c{}-{}x{}-ws{}".format(*s))
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0], ids=lambda g: f"gamma={g}")
def test_routing_matches_reference(shape: tuple[int, ...], gamma: float) -> None:
    b, c4, h, w, ws = shape
    hidden = rand(b, c4, h, w, seed=1)
    mlp = mask_mlp(ws, 2)
    got = kroute.route_windows(hidden, *mlp, gamma, window_size=ws, tie_break="index")
    ref = reference.route_windows(hidden, *mlp, gamma, window_size=ws, tie_break="index")
    assert_close("pred", ref.pred, got.pred, 1e-6)
    assert torch.equal(got.num_hard, ref.num_hard), (got.num_hard, ref.num_hard)
    assert torch.equal(got.order, ref.order)


def test_routing_ties_go_to_the_lower_window_index() -> None:
    hidden = rand(1, 10, 16, 16, seed=3).repeat(2, 1, 3, 4)      # 12 identical windows, twice
    mlp = mask_mlp(16, 4)
    got = kroute.route_windows(hidden, *mlp, 0.5, window_size=16, tie_break="index")
    assert got.order.tolist() == [list(range(12))] * 2
    official = kroute.route_windows(hidden, *mlp, 0.5, window_size=16, tie_break="official")
    assert torch.equal(official.order, torch.argsort(got.pred[..., 0], 1, descending=True))


def test_gumbel_routing_draws_like_the_reference() -> None:
    hidden = rand(3, 9, 32, 48, seed=5)
    mlp = mask_mlp(16, 6)
    got = kroute.route_windows(hidden, *mlp, 0.5, window_size=16, routing="gumbel",
                               generator=torch.Generator(DEVICE).manual_seed(9))
    ref = reference.route_windows(hidden, *mlp, 0.5, window_size=16, routing="gumbel",
                                  generator=torch.Generator(DEVICE).manual_seed(9))
    assert torch.equal(got.num_hard, ref.num_hard)


WARP_SHAPES = [(2, 5, 17, 33), (1, 3, 1, 1), (1, 36, 16, 16), (2, 60, 9, 20)]


def offsets_for(shape: tuple[int, ...], seed: int, integers: bool, dtype=torch.float32):
    off = rand(shape[0], 2, *shape[2:], seed=seed, scale=6.0, dtype=torch.float64)
    if integers:
        off[..., ::3] = off[..., ::3].round()      # samples exactly on pixels and on borders
    return off.to(dtype)


@pytest.mark.parametrize("shape", WARP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[1])
def test_deformable_key_forward(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = rand(*shape, seed=1, dtype=dtype)
    off = offsets_for(shape, 2, integers=True, dtype=dtype)
    ref = reference.deformable_key(x.double(), off.double())
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-2}[dtype]
    assert_close("k_in", ref, kwarp.deformable_key(x, off), tol)


@pytest.mark.parametrize("ks", [[0, 0], [2, 6], [6, 6]], ids=lambda k: f"K={k}")
def test_deformable_key_computes_only_hard_windows(ks: list[int]) -> None:
    x = rand(2, 36, 32, 48, seed=3)
    off = offsets_for((2, 36, 32, 48), 4, integers=False)
    order = torch.stack([torch.randperm(6, generator=gen(i)) for i in range(2)]).to(DEVICE)
    got = to_windows(kwarp.deformable_key(x, off, torch.tensor(ks, device=DEVICE), order,
                                          window_size=16), 16)
    ref = to_windows(reference.deformable_key(x, off), 16)
    for i, k in enumerate(ks):
        hard, simple = order[i, :k], order[i, k:]
        assert_close(f"image {i} hard windows", ref[i, hard], got[i, hard], 2e-5)
        assert torch.isnan(got[i, simple]).all(), "simple windows should not be computed"


@pytest.mark.parametrize("shape", WARP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_deformable_key_gradients(shape: tuple[int, ...]) -> None:
    # non-integer coordinates: the bilinear weights' derivative jumps at whole pixels
    x = rand(*shape, seed=5)
    off = offsets_for(shape, 6, integers=False)
    grad = rand(*shape, seed=7)
    grads = []
    for fn in (kwarp.deformable_key, reference.deformable_key):
        xi, oi = x.clone().requires_grad_(), off.clone().requires_grad_()
        (fn(xi, oi) * grad).sum().backward()
        grads.append((xi.grad, oi.grad))
    scale = max(1.0, shape[1] ** 0.5)
    assert_close("dx", grads[1][0], grads[0][0], 3e-5)
    assert_close("doffsets", grads[1][1], grads[0][1], 3e-5 * scale * 6)


def test_deformable_key_gradcheck_float64() -> None:
    x = rand(2, 3, 5, 7, seed=8, dtype=torch.float64).requires_grad_()
    off = offsets_for((2, 3, 5, 7), 9, integers=False, dtype=torch.float64)
    off = (off * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(kwarp.DeformableKey.apply, (x, off), eps=1e-6, atol=1e-6)


def attention_inputs(b: int, c: int, rows: int, cols: int, ws: int, dtype=torch.float32):
    h, w = rows * ws, cols * ws
    maps = [rand(b, c, h, w, seed=s, dtype=dtype) for s in (1, 2, 3)]
    sa = torch.rand(b, 1, h, w, generator=gen(4)).to(DEVICE, dtype)
    proj = [rand(c, c, seed=5, scale=c ** -0.5, dtype=dtype), rand(c, seed=6, dtype=dtype),
            rand(c, c, seed=7, scale=c ** -0.5, dtype=dtype), rand(c, seed=8, dtype=dtype)]
    return maps, sa, proj


ATTN_CASES = [(2, 36, 2, 3, 16, [2, 5]), (2, 60, 1, 2, 16, [0, 0]), (1, 36, 1, 3, 16, [3]),
              (2, 48, 2, 2, 8, [1, 4]), (3, 20, 1, 1, 16, [1, 0, 1])]


@pytest.mark.parametrize("case", ATTN_CASES,
                         ids=lambda c: "B{}-C{}-{}x{}win-ws{}-K={}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_window_attention_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    b, c, rows, cols, ws, ks = case
    (x, k_in, v), sa, proj = attention_inputs(b, c, rows, cols, ws, dtype)
    order = torch.stack([torch.randperm(rows * cols, generator=gen(i)) for i in range(b)])
    num_hard = torch.tensor(ks)
    order, num_hard = order.to(DEVICE), num_hard.to(DEVICE)
    got = kattn.window_attention(x, k_in, v, sa, *proj, num_hard, order, window_size=ws)
    ref = reference.window_attention(x.float(), k_in.float(), v.float(), sa.float(),
                                     *(p.float() for p in proj), num_hard, order,
                                     window_size=ws)
    assert got.dtype == dtype
    assert_close("attn_out", ref, got.float(), ATTN_TOL[dtype])


def test_window_attention_rejects_bad_inputs() -> None:
    (x, k_in, v), sa, proj = attention_inputs(1, 36, 1, 2, 16)
    order, num_hard = torch.tensor([[0, 1]], device=DEVICE), torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="sa"):
        kattn.window_attention(x, k_in, v, sa[..., :16], *proj, num_hard, order, window_size=16)
    with pytest.raises(ValueError, match="order"):
        kattn.window_attention(x, k_in, v, sa, *proj, num_hard, order[:, :1], window_size=16)
    with pytest.raises(ValueError, match="multiple"):
        kattn.window_attention(x, k_in, v, sa, *proj, num_hard, order, window_size=12)
    with pytest.raises(ValueError, match="float16"):
        kattn.window_attention(x, k_in.half(), v, sa, *proj, num_hard, order, window_size=16)


@pytest.mark.parametrize("case", [(2, 36, 2, 3), (1, 60, 1, 2)],
                         ids=lambda c: "B{}-C{}-{}x{}win".format(*c))
def test_masked_window_attention_forward_and_backward(case: tuple) -> None:
    b, c, rows, cols = case
    (x, k_in, v), sa, proj = attention_inputs(b, c, rows, cols, 16)
    logits = rand(b, rows * cols, 2, seed=9)
    grad = rand(b, c, rows * 16, cols * 16, seed=10)
    results = []
    for fn in (ktrain.masked_window_attention, reference.masked_window_attention):
        leaves = [t.clone().requires_grad_() for t in (x, k_in, v, sa, logits, *proj)]
        soft = torch.softmax(leaves[4], -1)[..., 0:1]
        mask = (soft >= 0.5).float() - soft.detach() + soft
        out = fn(*leaves[:4], mask, *leaves[5:], window_size=16)
        (out * grad).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    names = ["out", "dx", "dk_in", "dv", "dsa", "dlogits", "dwq", "dbq", "dwk", "dbk"]
    for name, got, ref in zip(names, *results):
        if name == "dbk":
            # softmax ignores a per-row shift: d/dbk is 0, both sides hold rounding noise only
            assert_close(name, ref, got, 1e-4 * results[1][8].abs().max().item())
        else:
            assert_close(name, ref, got, 2e-5, relative=True)


def test_half_precision_model_on_triton(golden: dict, weights_path) -> None:
    """fp16 end to end (fp32 accumulation in the kernels) stays close to the fp32 golden."""
    import camixer_fast

    model = camixer_fast.load_model(weights_path, backend="triton", dtype=torch.float16,
                                    device=DEVICE, gamma=0.5)
    with torch.no_grad():
        out = model(golden["inputs"]["butterfly_crop_45x61"].to(DEVICE, torch.float16))
    err = (out.float().cpu() - golden["outputs"]["butterfly_crop_45x61@gamma=0.5"]).abs()
    print(f"fp16 vs fp32 golden: max {err.max():.2e}, mean {err.mean():.2e}")
    assert err.mean() < 1e-3 and err.max() < 2e-2


def test_window_attention_refuses_to_drop_gradients() -> None:
    (x, k_in, v), sa, proj = attention_inputs(1, 36, 1, 2, 16)
    order, num_hard = torch.tensor([[0, 1]], device=DEVICE), torch.tensor([1], device=DEVICE)
    with pytest.raises(RuntimeError, match="does not differentiate"):
        kattn.window_attention(x.requires_grad_(), k_in, v, sa, *proj, num_hard, order,
                               window_size=16)
    with torch.no_grad():
        kattn.window_attention(x, k_in, v, sa, *proj, num_hard, order, window_size=16)
