"""The reference's hot operations against independent formulations, on odd shapes."""

from __future__ import annotations

import pytest
import torch

from camixer_fast.reference import (
    deform_warp,
    flat_hard_windows,
    masked_window_attention,
    select_windows,
    training_mask,
    window_attention,
    window_scores,
)
from camixer_fast.reference.routing import num_hard_windows, window_order
from camixer_fast.reference.windows import from_windows, to_windows
from conftest import assert_close


def bilinear_by_hand(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Border-clamped bilinear sampling at (j + dx, i + dy), written out with gathers."""
    b, c, h, w = x.shape
    rows = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    px = (cols + offsets[:, 0]).clamp(0, w - 1)
    py = (rows + offsets[:, 1]).clamp(0, h - 1)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = x.reshape(b, c, h * w)

    def tap(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = (yy * w + xx).reshape(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, index).reshape(b, c, h, w)

    fx, fy = fx.unsqueeze(1), fy.unsqueeze(1)
    return (tap(y0, x0) * (1 - fx) * (1 - fy) + tap(y0, x1) * fx * (1 - fy)
            + tap(y1, x0) * (1 - fx) * fy + tap(y1, x1) * fx * fy)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 17, 33), (1, 36, 16, 16), (3, 4, 2, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_deform_warp_is_bilinear_with_border_clamp(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    offsets = torch.randn(shape[0], 2, *shape[2:], generator=gen, dtype=torch.float64) * 6
    offsets[..., ::3] = offsets[..., ::3].round()          # exact integers and exact borders
    assert_close("warp", bilinear_by_hand(x, offsets), deform_warp(x, offsets), 1e-12)


def test_deform_warp_zero_offsets_is_identity() -> None:
    x = torch.randn(2, 3, 17, 33)
    assert_close("identity", x, deform_warp(x, torch.zeros(2, 2, 17, 33)), 1e-6)


def _attention_inputs(b: int, c: int, rows: int, cols: int, ws: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = rows * ws, cols * ws
    x, k_in, v = (torch.randn(b, c, h, w, generator=gen) for _ in range(3))
    sa = torch.rand(b, 1, h, w, generator=gen)
    wq, wk = (torch.randn(c, c, generator=gen) / c**0.5 for _ in range(2))
    bq, bk = (torch.randn(c, generator=gen) for _ in range(2))
    return x, k_in, v, sa, wq, bq, wk, bk


@pytest.mark.parametrize("c", [36, 60])
@pytest.mark.parametrize("ks", [[0, 0], [6, 6], [2, 5], [0, 6]], ids=lambda k: f"K={k}")
def test_window_attention_equals_dense_masked_form(c: int, ks: list[int]) -> None:
    """Top-K routing and the dense training form with a 0/1 mask compute the same thing."""
    x, k_in, v, sa, wq, bq, wk, bk = _attention_inputs(2, c, 2, 3)
    order = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i))
                         for i in range(2)])
    num_hard = torch.tensor(ks)
    mask = torch.zeros(2, 6, 1)
    for i in range(2):
        mask[i, order[i, :ks[i]]] = 1.0
    dense = masked_window_attention(x, k_in, v, sa, mask, wq, bq, wk, bk, window_size=16)
    for chunk in (1, 4, 128):
        routed = window_attention(x, k_in, v, sa, wq, bq, wk, bk, num_hard, order,
                                  window_size=16, chunk=chunk)
        assert_close(f"chunk={chunk}", dense, routed, 2e-5)


def test_window_attention_simple_windows_are_v_times_sa() -> None:
    x, k_in, v, sa, wq, bq, wk, bk = _attention_inputs(1, 36, 1, 2)
    out = window_attention(x, k_in, v, sa, wq, bq, wk, bk, torch.tensor([1]),
                           torch.tensor([[1, 0]]), window_size=16)
    assert torch.equal(out[..., :16], (v * sa)[..., :16])
    assert not torch.allclose(out[..., 16:], (v * sa)[..., 16:])


def test_window_attention_one_window_by_hand() -> None:
    x, k_in, v, sa, wq, bq, wk, bk = _attention_inputs(1, 36, 1, 1, seed=3)
    q = x[0].reshape(36, 256).T @ wq.T + bq
    k = k_in[0].reshape(36, 256).T @ wk.T + bk
    expected = (torch.softmax(q @ k.T, dim=-1) @ v[0].reshape(36, 256).T).T.reshape(1, 36, 16, 16)
    out = window_attention(x, k_in, v, sa, wq, bq, wk, bk, torch.tensor([1]),
                           torch.tensor([[0]]), window_size=16)
    assert_close("one window", expected, out, 1e-5)


def test_window_layout_round_trip() -> None:
    x = torch.randn(2, 5, 32, 48)
    t = to_windows(x, 16)
    assert t.shape == (2, 6, 256, 5)
    assert torch.equal(t[1, 4, 17], x[1, :, 16 + 1, 16 + 1])     # window (1, 1), token (1, 1)
    assert torch.equal(from_windows(t, 32, 48), x)
    with pytest.raises(ValueError, match="multiple"):
        to_windows(torch.randn(1, 1, 17, 16), 16)


def test_window_scores_match_out_mask_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 10, 32, 16, generator=gen)
    w1, b1 = torch.randn(16, 256, generator=gen) / 16, torch.randn(16, generator=gen)
    w2, b2 = torch.randn(2, 16, generator=gen), torch.randn(2, generator=gen)
    pred = window_scores(h, w1, b1, w2, b2, 16)
    m = h.mean(1)
    for b in range(2):
        for n, (r, c) in enumerate([(0, 0), (1, 0)]):
            feat = m[b, 16 * r:16 * r + 16, 16 * c:16 * c + 16].reshape(256)
            hid = torch.nn.functional.leaky_relu(w1 @ feat + b1, 0.1)
            assert_close(f"pred[{b},{n}]", torch.softmax(w2 @ hid + b2, 0), pred[b, n], 1e-6)


@pytest.mark.parametrize("gamma, r, n, expected", [
    (1.0, 0.1, 16, 16), (0.0, 0.9, 16, 0), (0.5, 0.6875, 16, 11), (0.25, 0.75, 64, 24),
    (0.5, 0.99, 7, 6), (0.9, 0.9, 10, 10)])
def test_num_hard_windows(gamma: float, r: float, n: int, expected: int) -> None:
    assert int(num_hard_windows(torch.tensor([r]), n, gamma)[0]) == expected


def test_expected_routing_uses_softmax_of_scores() -> None:
    pred = torch.softmax(torch.randn(3, 20, 2, generator=torch.Generator().manual_seed(0)), -1)
    num_hard, order = select_windows(pred, 0.5)
    r = torch.softmax(pred, -1)[..., 0].mean(-1)
    assert num_hard.tolist() == [min(int(20 * float(ri) * 2 * 0.5), 20) for ri in r]
    assert torch.equal(order, torch.argsort(pred[..., 0], dim=1, descending=True))


def test_tie_break_index_orders_ties_by_window() -> None:
    score = torch.tensor([[0.5, 1.0, 1.0, 0.2, 1.0, 0.5]])
    assert window_order(score, "index").tolist() == [[1, 2, 4, 0, 5, 3]]
    official = window_order(score, "official")
    assert torch.equal(score[0, official[0]], score[0, window_order(score, "index")[0]])


def test_flat_hard_windows_is_ragged_in_image_order() -> None:
    order = torch.tensor([[3, 1, 0, 2], [2, 0, 3, 1], [1, 2, 3, 0]])
    image, window = flat_hard_windows(torch.tensor([2, 0, 3]), order)
    assert image.tolist() == [0, 0, 2, 2, 2]
    assert window.tolist() == [3, 1, 1, 2, 3]


def test_gumbel_routing_reproducible_per_generator() -> None:
    pred = torch.softmax(torch.randn(2, 50, 2, generator=torch.Generator().manual_seed(0)), -1)
    a = select_windows(pred, 0.5, routing="gumbel", generator=torch.Generator().manual_seed(1))
    b = select_windows(pred, 0.5, routing="gumbel", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])


def test_training_mask_is_straight_through() -> None:
    pred = torch.softmax(torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(0)), -1)
    pred.requires_grad_(True)
    mask = training_mask(pred, noise=False)
    soft = torch.softmax(pred, -1)[..., 0:1]
    assert torch.equal(mask.detach(), (soft >= 0.5).float())
    (grad_mask,) = torch.autograd.grad(mask.sum(), pred)
    (grad_soft,) = torch.autograd.grad(soft.sum(), pred)
    assert_close("straight-through gradient", grad_soft, grad_mask, 1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_warp_of_half_channels_last_maps_is_computed_in_fp32(dtype: torch.dtype) -> None:
    """CPU grid_sample gives NaN on channels-last fp16/bf16 maps (torch 2.13): the reference
    warp samples in fp32 and returns the map's dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 6, 16, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    offsets = torch.randn(1, 2, 16, 32, generator=gen) * 4
    x, offsets = x.to(dtype), offsets.to(dtype)
    ref = deform_warp(x.float(), offsets.float())            # the same inputs, in fp32
    out = deform_warp(x, offsets)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close("half warp", ref, out.float(), 1e-2)       # the output's rounding to dtype
