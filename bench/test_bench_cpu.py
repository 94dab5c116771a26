"""The CPU latency table: each case checked against the reference backend (max |error| <= 1e-4)
before it is timed; a wrong fast path never gets a time.

    python -m pytest bench/test_bench_cpu.py --benchmark-json=/tmp/cpu.json
    python bench/report.py add /tmp/cpu.json            # rows for bench/results.jsonl

- ``backend``: official op chain (bench/official/official_baseline.py) / reference / cpu, per γ,
  on Set5 butterfly (64² crop), baby (128²) and a 256² crop of Urban100 img_001.
- ``upscale``: ``camixer_fast.upscale`` of whole sets (uint8 in and out, default backend).
- ``onnx``: onnxruntime against the CPU backend on baby (128²), γ a graph input.
"""

from __future__ import annotations

import pytest
import torch
from common import GAMMAS, SHARED, dataset_lr, read_rgb, record, to_tensor
from official_baseline import load_official_baseline

import camixer_fast
from camixer_fast.backends import select_backend
from camixer_fast.evaluation.cost import count_madds

TOL = 1e-4
BACKENDS = ("official", "reference", "cpu")
SIZES = {"64x64": 9, "128x128": 7, "256x256": 3}
"""Input -> timed rounds."""
SETS = {"Set5": 5, "Set14": 3, "Urban100": 1}
_CACHE: dict = {}


def bench_input(size: str) -> torch.Tensor:
    set5 = SHARED / "data" / "Set5" / "LR_bicubic" / "X4"
    if size == "64x64":
        return to_tensor(read_rgb(set5 / "butterflyx4.png"))[..., :64, :64].contiguous()
    if size == "128x128":
        return to_tensor(read_rgb(set5 / "babyx4.png"))
    img = to_tensor(read_rgb(SHARED / "data" / "Urban100" / "HR" / "img_001.png"))
    return img[..., 200:456, 300:556].contiguous()


@pytest.fixture(scope="module")
def models(weights_path, reference_model) -> dict:
    return {"official": load_official_baseline(reference_model.state_dict()),
            "reference": reference_model,
            "cpu": camixer_fast.load_model(weights_path, backend="cpu")}


def expected(reference_model, size: str, gamma: float):
    """The reference output, K per block and measured MAdds for (size, γ), computed once."""
    if (size, gamma) not in _CACHE:
        x = bench_input(size)
        reference_model.gamma = gamma
        with torch.inference_mode():
            out, routing = reference_model(x, return_routing=True)
        _CACHE[size, gamma] = out, routing.num_hard()[:, 0].tolist(), count_madds(reference_model, x)
    return _CACHE[size, gamma]


def checked(name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((out - ref).abs().max())
    if not err <= TOL:
        pytest.fail(f"{name}: max abs error {err:.3e} > {TOL:.0e} against the reference; "
                    "not timed")
    return err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("size", list(SIZES))
def test_backend(benchmark, models: dict, reference_model, size: str, gamma: float,
                 backend: str) -> None:
    x, model = bench_input(size), models[backend]
    model.gamma = gamma
    ref, ks, madds = expected(reference_model, size, gamma)
    with torch.inference_mode():
        err = checked(f"{backend} {size} gamma={gamma}", model(x), ref)

    def run() -> None:
        with torch.inference_mode():
            model(x)

    benchmark.group = f"backend {size} gamma={gamma}"
    record(benchmark, suite="backend", backend=backend, gamma=gamma, size=size,
           max_abs_error=err, madds=madds, num_hard=ks)
    benchmark.pedantic(run, rounds=SIZES[size], warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
@pytest.mark.parametrize("dataset", list(SETS))
def test_upscale(benchmark, weights_path, dataset: str, gamma: float) -> None:
    if dataset not in _CACHE:
        _CACHE[dataset] = dataset_lr(dataset)
    lrs = _CACHE[dataset]

    def run() -> None:
        for lr in lrs.values():
            out = camixer_fast.upscale(lr, gamma, weights=weights_path)
            assert out.shape[:2] == (4 * lr.shape[0], 4 * lr.shape[1])

    benchmark.group = f"upscale {dataset}"
    record(benchmark, suite="upscale", dataset=dataset, gamma=gamma, images=len(lrs),
           backend=select_backend("auto", "cpu").name)
    benchmark.pedantic(run, rounds=SETS[dataset], warmup_rounds=1, iterations=1)


@pytest.fixture(scope="module")
def onnx_session(reference_model, tmp_path_factory):
    ort = pytest.importorskip("onnxruntime")
    from camixer_fast.backends.onnx import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "camixer_s.onnx"
    reference = camixer_fast.CAMixerSR(**camixer_fast.infer_config(reference_model.state_dict()),
                                       tie_break="index")
    reference.load_state_dict(reference_model.state_dict())
    export_onnx(reference.eval(), path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    return reference, ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("runtime", ("onnxruntime", "cpu"))
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma={g}")
def test_onnx(benchmark, onnx_session, weights_path, gamma: float, runtime: str) -> None:
    """The graph's "index" tie rule for all: K cuts through equal scores on this image."""
    reference, session = onnx_session
    x = bench_input("128x128")
    feeds = {"lr": x.numpy(), "gamma": torch.tensor(gamma).numpy()}
    cpu = camixer_fast.load_model(weights_path, backend="cpu", gamma=gamma)
    cpu.tie_break = "index"
    reference.gamma = gamma
    with torch.inference_mode():
        ref = reference(x)
        run = (lambda: session.run(None, feeds)) if runtime == "onnxruntime" else (lambda: cpu(x))
        out = run()
        err = checked(f"{runtime} gamma={gamma}",
                      torch.from_numpy(out[0]) if runtime == "onnxruntime" else out, ref)
        benchmark.group = f"onnx gamma={gamma}"
        record(benchmark, suite="onnx", runtime=runtime, gamma=gamma, max_abs_error=err)
        benchmark.pedantic(run, rounds=7, warmup_rounds=1, iterations=1)
