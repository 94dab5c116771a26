"""camixer_fast.inference.graphs.CUDAGraphModel: keys, static buffers, refusals.

Everything but the capture itself is checked on the CPU with a stand-in whose "capture" runs
the forward once and whose "replay" runs it again on the static input, writing into the same
output buffers -- the contract of a CUDA graph. The model runs on the Triton backend (the
interpreter here), the one backend that declares its forward free of host syncs. On a GPU the
last test captures real graphs.
"""

from __future__ import annotations


import pytest
import torch
from conftest import DEVICE, assert_close

from camixer_fast.inference.graphs import CUDAGraphModel, GraphKey
from camixer_fast.reference.model import CAMixerSR
from camixer_fast.reference.routing import Routing


class EagerGraphs(CUDAGraphModel):
    """CUDAGraphModel with eager "graphs": any device, and a count of the captures."""

    captures = 0

    def _check_device(self) -> None:
        pass

    def _capture(self, forward, static_input):
        self.captures += 1
        out, routing = forward()

        def replay() -> None:
            new_out, new_routing = forward()
            out.copy_(new_out)
            for block, new_block in zip(routing.blocks, new_routing.blocks, strict=True):
                for t, new in zip(block, new_block, strict=True):
                    if t is not None:
                        t.copy_(new)

        return replay, (out, routing)


class StaleGraphs(EagerGraphs):
    """A faulty capture whose replay ignores its input: what ``verify`` is there to catch."""

    def _capture(self, forward, static_input):
        replay, outputs = super()._capture(forward, static_input)
        outputs[0].add_(1.0)
        return (lambda: None), outputs


def tiny_model(backend: str = "triton") -> CAMixerSR:
    torch.manual_seed(0)
    model = CAMixerSR(n_feats=8, blocks_per_group=(1,), window_size=8).to(DEVICE).eval()
    model.backend = backend
    return model


def lr(seed: int, height: int = 16, width: int = 24, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g).to(DEVICE)


def eager(model: CAMixerSR, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    with torch.no_grad():
        return model(x, return_routing=True)


@pytest.fixture()
def model(one_thread) -> CAMixerSR:
    return tiny_model()


def test_refuses_a_cpu_model_with_the_reason() -> None:
    with pytest.raises(RuntimeError, match="CUDA device"):
        CUDAGraphModel(tiny_model().cpu())


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if DEVICE == "cpu" else []))
def test_refuses_a_backend_that_syncs(backend: str) -> None:
    with pytest.raises(RuntimeError, match="synchronises with the host.*backend='triton'"):
        EagerGraphs(tiny_model(backend))


def test_refuses_training_mode(model: CAMixerSR) -> None:
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        EagerGraphs(model.train())


def test_checks_the_settings_at_every_call(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    graphed(lr(0))
    model.backend = "reference"
    with pytest.raises(RuntimeError, match="synchronises"):
        graphed(lr(0))
    model.backend = "triton"
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        graphed(lr(0))


@pytest.mark.parametrize("bad", [dict(max_graphs=0), dict(warmup=0)], ids=str)
def test_bad_options(model: CAMixerSR, bad: dict) -> None:
    with pytest.raises(ValueError):
        EagerGraphs(model, **bad)


def test_bad_inputs(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        graphed(lr(0)[0])
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="on cpu"):
            graphed(lr(0).cpu())


def test_replays_read_the_new_input(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    for seed in (0, 1, 2):
        x = lr(seed, 17, 33, batch=2)
        got, got_routing = graphed(x, return_routing=True)
        want, want_routing = eager(model, x)
        assert_close(f"replay of input {seed}", want, got, 0.0)
        assert torch.equal(got_routing.num_hard(), want_routing.num_hard())
    assert graphed.captures == 1


def test_one_graph_per_key(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    graphed(lr(0))
    graphed(lr(1, 16, 32))                      # another size
    graphed(lr(2))                              # the first size again: a replay
    assert graphed.captures == 2
    model.gamma = 0.25                          # baked into the graph: a new key
    graphed(lr(0))
    model.tie_break = "index"
    graphed(lr(0))
    assert graphed.captures == 4
    assert [k.shape for k in graphed.keys()] == [(1, 3, 16, 32), (1, 3, 16, 24),
                                                 (1, 3, 16, 24), (1, 3, 16, 24)]
    assert graphed.keys()[-1] == GraphKey((1, 3, 16, 24), torch.float32, lr(0).device, 0.25,
                                          "expected", "index", "triton")


def test_least_recently_used_graph_is_dropped(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, max_graphs=2, warmup=1)
    a, b, c = lr(0, 16, 16), lr(0, 16, 24), lr(0, 16, 32)
    graphed(a)
    graphed(b)
    graphed(a)                                  # a is now the most recent
    graphed(c)                                  # drops b
    assert [k.shape for k in graphed.keys()] == [tuple(a.shape), tuple(c.shape)]
    graphed(b)
    assert graphed.captures == 4


def test_outputs_are_copies_by_default(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    first = graphed(lr(0))
    kept = first.clone()
    second = graphed(lr(1))
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, kept), "a returned output changed under a later call"


def test_static_outputs_without_copies(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, copy_outputs=False, warmup=1)
    first, routing = graphed(lr(0), return_routing=True)
    second, routing2 = graphed(lr(1), return_routing=True)
    assert first.data_ptr() == second.data_ptr()          # the graph's own buffer
    assert routing.blocks[0].order.data_ptr() == routing2.blocks[0].order.data_ptr()
    assert_close("static buffer holds the latest call", eager(model, lr(1))[0], first, 0.0)


def test_moved_parameters_drop_every_graph(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    graphed(lr(0))
    graphed(lr(0, 16, 32))
    with torch.no_grad():
        model.head.weight.data = model.head.weight.data * 2.0    # a new tensor, elsewhere
    got = graphed(lr(0))
    assert graphed.captures == 3
    assert len(graphed.keys()) == 1
    assert_close("after the move", eager(model, lr(0))[0], got, 0.0)


def test_in_place_parameter_updates_show_without_a_capture(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    graphed(lr(0))
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    got = graphed(lr(0))
    assert graphed.captures == 1
    assert_close("after the in-place update", eager(model, lr(0))[0], got, 0.0)


def test_verify_refuses_an_unfaithful_graph(model: CAMixerSR) -> None:
    with pytest.raises(RuntimeError, match="differs from the eager forward"):
        StaleGraphs(model, warmup=1)(lr(0))


def test_verify_off_skips_the_check(model: CAMixerSR) -> None:
    StaleGraphs(model, warmup=1, verify=False)(lr(0))


def test_reset_drops_the_graphs(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    graphed(lr(0))
    graphed.reset()
    assert graphed.keys() == []
    graphed(lr(0))
    assert graphed.captures == 2


def test_reset_finds_replaced_submodules(model: CAMixerSR) -> None:
    graphed = EagerGraphs(model, warmup=1)
    graphed(lr(0))
    model.head = torch.nn.Conv2d(3, 8, 3, padding=1).to(DEVICE)
    graphed.reset()
    got = graphed(lr(0))
    assert graphed.captures == 2
    assert_close("after reset", eager(model, lr(0))[0], got, 0.0)


def test_upscale_refuses_cuda_graphs_off_cuda() -> None:
    from camixer_fast.inference import api as upscale
    image = torch.rand(3, 8, 8)
    with pytest.raises(RuntimeError, match="CUDA device"):
        upscale.upscale(image, device="cpu", cuda_graph=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="captures real CUDA graphs")
def test_cuda_graphs_match_eager(model: CAMixerSR) -> None:
    graphed = CUDAGraphModel(model)
    sizes = [(16, 24), (17, 33), (16, 24), (17, 33)]          # interleaved: the shared pool
    for seed, (height, width) in enumerate(sizes):
        x = lr(seed, height, width, batch=2)
        assert_close(f"graph {height}x{width}", eager(model, x)[0], graphed(x), 1e-5)
    assert len(graphed.keys()) == 2
