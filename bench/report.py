"""Turn benchmark JSON into ``bench/RESULTS.md``: latency tables, breakdown, quality, memory.

    python -m pytest bench --benchmark-json=bench/results/bench.json
    python bench/report.py bench/results/bench.json

Reads the pytest-benchmark JSON files given (``bench/test_bench_backends.py``,
``bench/test_bench_upscale.py``), computes what the benchmarks do not time -- the runtime
breakdown per backend (:func:`camixer_fast.evaluation.profiling.runtime_breakdown`), PSNR/SSIM and
measured MAdds per γ on Set5 and Set14 (:func:`camixer_fast.evaluation.evaluate.evaluate`), the peak RSS of
one 1024×1024 input in a fresh process, onnxruntime against the CPU backend on the ONNX export
-- stores those as JSON beside the benchmark files (``breakdown.json``, ``quality.json``,
``memory.json``, ``onnx.json``; ``--reuse`` reads them instead of recomputing), draws PSNR
against MAdds when matplotlib is installed, and writes the report.
``official_code.json`` (``bench/official_speed.py``, which needs the official code) is read
when present, never measured here.
Every figure in the report comes from these files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from benchlib import SHARED, dataset_lr, machine_stamp, read_rgb, to_tensor
from gpu_report import extract_section
from official_baseline import load_official_baseline

import camixer_fast
from camixer_fast.evaluation.cost import count_madds
from camixer_fast.evaluation.evaluate import evaluate
from camixer_fast.evaluation.profiling import PARTS, runtime_breakdown

GAMMAS = (1.0, 0.5, 0.25, 0.0)
BACKENDS = ("official", "reference", "cpu")
TARGET_SPEEDUP = 2.0
TARGET_RATIO = 0.75
TARGET_RSS_MB = 4096
TARGET_SIZE = "128x128"
WEIGHTS = SHARED / "weights" / "CAMixerSR_S.pth"


# --- measurements the benchmarks do not make -------------------------------------------------

def measure_breakdown(runs: int = 3) -> dict:
    """Runtime shares per backend and γ on Set5's baby LR (128×128)."""
    x = to_tensor(read_rgb(SHARED / "data" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"))
    reference = camixer_fast.load_model(WEIGHTS, backend="reference")
    models = {"official": load_official_baseline(reference.state_dict()),
              "reference": reference, "cpu": camixer_fast.load_model(WEIGHTS, backend="cpu")}
    rows = []
    for gamma in (1.0, 0.5, 0.25):
        for name, model in models.items():
            model.gamma = gamma
            load = os.getloadavg()[0]
            shares = runtime_breakdown(model, x, runs=runs)
            rows.append({"backend": name, "gamma": gamma, "shares": shares,
                         "loadavg_1min": load})
    return {"input": "Set5 baby LR 128x128", "runs": runs, "machine": machine_stamp(),
            "rows": rows}


def measure_quality() -> dict:
    """PSNR / SSIM (Y) and mean measured MAdds per image, per γ, on Set5 and Set14 (×4)."""
    model = camixer_fast.load_model(WEIGHTS, backend="cpu")
    out = {"backend": model.backend, "machine": machine_stamp(), "sets": {}}
    sets = {"Set5": (SHARED / "data" / "Set5" / "HR",
                     SHARED / "data" / "Set5" / "LR_bicubic" / "X4"),
            "Set14": (SHARED / "data" / "Set14" / "HR", None)}
    for name, (hr_dir, lr_dir) in sets.items():
        scores = evaluate(model, hr_dir, list(GAMMAS), lr_dir=lr_dir)
        lrs = dataset_lr(name)
        rows = []
        for score in scores:
            model.gamma = score.gamma
            madds = [count_madds(model, to_tensor(lr)) for lr in lrs.values()]
            row = score.to_dict()
            row.pop("images")
            row["mean_madds"] = statistics.fmean(madds)
            rows.append(row)
        out["sets"][name] = rows
    return out


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch, camixer_fast
    torch.set_num_threads(int(sys.argv[2]))
    model = camixer_fast.load_model(sys.argv[1], gamma=1.0, backend="cpu")
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode():
        y = model(x)
    print(json.dumps({"shape": list(y.shape), "finite": bool(torch.isfinite(y).all()),
                      "seconds": time.perf_counter() - start,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def measure_memory(threads: int) -> dict:
    """Peak RSS of one 1024×1024 LR input (S, ×4, γ = 1, CPU backend), in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(WEIGHTS), str(threads)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(threads=threads, backend="cpu", gamma=1.0, lr_size="1024x1024")
    return result


def _alternating_medians(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each callable over ``rounds`` rounds after a warm-up, the callables
    taking turns within every round (so that a change of machine load hits them alike)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_onnx(threads: int, rounds: int = 7) -> dict:
    """onnxruntime (CPU) against the CPU backend on Set5's baby LR (128×128), per γ: S exported
    once with γ as a graph input; each runtime's output is first checked against the reference
    backend to 1e-4 (all with the graph's "index" tie rule), then timed, taking turns."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from camixer_fast.backends.onnx import export_onnx

    x = to_tensor(read_rgb(SHARED / "data" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"))
    reference = camixer_fast.load_model(WEIGHTS, backend="reference")
    cpu = camixer_fast.load_model(WEIGHTS, backend="cpu")
    # the graph's tie rule for all three: K cuts through equal scores on this image
    reference.tie_break = cpu.tie_break = "index"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "camixer_s.onnx"
        exported = export_onnx(reference, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        start = time.perf_counter()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session_seconds = time.perf_counter() - start
        size_mb = path.stat().st_size / 2**20
    rows = []
    for gamma in GAMMAS:
        feeds = {"lr": x.numpy(), "gamma": torch.tensor(gamma).numpy()}
        reference.gamma = cpu.gamma = gamma
        with torch.inference_mode():
            ref = reference(x)
            errors = {"onnxruntime": float((torch.from_numpy(session.run(None, feeds)[0])
                                            - ref).abs().max()),
                      "cpu": float((cpu(x) - ref).abs().max())}
        bad = {k: v for k, v in errors.items() if not v <= 1e-4}
        if bad:
            raise RuntimeError(f"γ={gamma}: differs from the reference by {bad}; not timed")

        def run_cpu() -> None:
            with torch.inference_mode():
                cpu(x)

        load = os.getloadavg()[0]
        medians = _alternating_medians(
            {"onnxruntime": lambda: session.run(None, feeds), "cpu": run_cpu}, rounds)
        rows.append({"gamma": gamma, "errors": errors, "loadavg_1min": load,
                     "onnxruntime_s": medians["onnxruntime"], "cpu_s": medians["cpu"]})
    return {"input": "Set5 baby LR 128x128", "rounds": rounds, "threads": threads,
            "machine": machine_stamp(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "opset": exported.opset, "nodes": exported.nodes,
            "export_s": exported.seconds, "session_s": session_seconds, "size_mb": size_mb,
            "rows": rows}


# --- reading the benchmark JSON --------------------------------------------------------------

def load_benchmarks(paths: list[Path]) -> tuple[list[dict], dict]:
    """All benchmarks of the given pytest-benchmark files, and the first file's machine info."""
    benches, machine = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            bench["_file"] = path.name
            bench["_datetime"] = data.get("datetime", "")
            benches.append(bench)
    return benches, machine


def backend_table(benches: list[dict]) -> dict:
    """{size: {gamma: {backend: {"median", "madds", "k_fraction", ...}}}} of the backend suite."""
    table: dict = {}
    for bench in benches:
        info = bench["extra_info"]
        if info.get("suite") != "backends":
            continue
        cell = table.setdefault(info["size"], {}).setdefault(info["gamma"], {})
        cell[info["backend"]] = {
            "median": bench["stats"]["median"], "min": bench["stats"]["min"],
            "rounds": bench["stats"]["rounds"], "madds": info["madds"],
            "k_fraction": statistics.fmean(info["num_hard"]) / info["windows"],
            "threads": info["threads"], "loadavg": info["loadavg_1min"],
            "error": info["max_abs_error"]}
    return table


def upscale_table(benches: list[dict]) -> dict:
    """{dataset: {gamma: {"median", "images", "lr_pixels", ...}}} of the upscale suite."""
    table: dict = {}
    for bench in benches:
        info = bench["extra_info"]
        if info.get("suite") != "upscale":
            continue
        table.setdefault(info["dataset"], {})[info["gamma"]] = {
            "median": bench["stats"]["median"], "rounds": bench["stats"]["rounds"],
            "images": info["images"], "lr_pixels": info["lr_pixels"],
            "threads": info["threads"], "loadavg": info["loadavg_1min"],
            "backend": info["backend"]}
    return table


# --- rendering -------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def speed_targets(table: dict, memory: dict | None) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    cells = table.get(TARGET_SIZE, {})
    if 0.5 in cells and {"official", "cpu"} <= set(cells[0.5]):
        speedup = cells[0.5]["official"]["median"] / cells[0.5]["cpu"]["median"]
        lines.append(f"| γ = 0.5, {TARGET_SIZE}: CPU backend ≥ {TARGET_SPEEDUP:.0f}× faster than "
                     f"the official chain | {ms(cells[0.5]['official']['median'])} → "
                     f"{ms(cells[0.5]['cpu']['median'])}: **{speedup:.2f}×** | "
                     f"{'yes' if speedup >= TARGET_SPEEDUP else 'NO'} |")
    if 0.25 in cells and 1.0 in cells and "cpu" in cells[0.25] and "cpu" in cells[1.0]:
        ratio = cells[0.25]["cpu"]["median"] / cells[1.0]["cpu"]["median"]
        lines.append(f"| time(γ=0.25) ≤ {TARGET_RATIO} × time(γ=1), {TARGET_SIZE}, CPU backend | "
                     f"{ms(cells[0.25]['cpu']['median'])} / {ms(cells[1.0]['cpu']['median'])} "
                     f"= **{ratio:.3f}** | {'yes' if ratio <= TARGET_RATIO else 'NO'} |")
    if memory is not None:
        ok = memory["peak_mb"] < TARGET_RSS_MB and memory["finite"]
        lines.append(f"| 1024×1024 LR (S, ×4, γ = 1) in one call, peak RSS < 4 GB | "
                     f"**{memory['peak_mb']:.0f} MB** ({memory['seconds']:.1f} s, "
                     f"{memory['threads']} threads) | {'yes' if ok else 'NO'} |")
    return lines


def table1(table: dict) -> list[str]:
    """Paper Table 1 analogue: latency per γ, its ratio to γ = 1, and the MAdds ratio."""
    lines = []
    for size, cells in table.items():
        present = [b for b in BACKENDS if any(b in cells[g] for g in cells)]
        head = "| γ | " + " | ".join(f"{b} | {b} / γ=1" for b in present)
        head += " | MAdds | MAdds / γ=1 | K/N |"
        lines += [f"**{size}**", "", head, "|---" * (2 * len(present) + 4) + "|"]
        for gamma in sorted(cells, reverse=True):
            row = [f"{gamma:g}"]
            for backend in present:
                cell, base = cells[gamma].get(backend), cells.get(1.0, {}).get(backend)
                row += ([ms(cell["median"]), f"{cell['median'] / base['median']:.2f}"]
                        if cell and base else ["–", "–"])
            any_cell = next(iter(cells[gamma].values()))
            base_madds = next(iter(cells[1.0].values()))["madds"] if 1.0 in cells else None
            row += [f"{any_cell['madds'] / 1e9:.2f}G",
                    f"{any_cell['madds'] / base_madds:.2f}" if base_madds else "–",
                    f"{any_cell['k_fraction']:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def speedups(table: dict) -> list[str]:
    lines = ["| input | γ | CPU vs official | CPU vs reference | reference vs official |",
             "|---|---|---|---|---|"]
    for size, cells in table.items():
        for gamma in sorted(cells, reverse=True):
            c = cells[gamma]
            if not {"official", "reference", "cpu"} <= set(c):
                continue
            lines.append(f"| {size} | {gamma:g} | "
                         f"{c['official']['median'] / c['cpu']['median']:.2f}× | "
                         f"{c['reference']['median'] / c['cpu']['median']:.2f}× | "
                         f"{c['official']['median'] / c['reference']['median']:.2f}× |")
    return lines


def upscale_lines(table: dict) -> list[str]:
    lines = ["| set | images | LR pixels | γ | time per set | per image | / γ=1 | rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset, cells in table.items():
        base = cells.get(1.0)
        for gamma in sorted(cells, reverse=True):
            c = cells[gamma]
            ratio = f"{c['median'] / base['median']:.2f}" if base else "–"
            lines.append(f"| {dataset} | {c['images']} | {c['lr_pixels'] / 1e6:.2f}M | "
                         f"{gamma:g} | {ms(c['median'])} | {ms(c['median'] / c['images'])} | "
                         f"{ratio} | {c['rounds']} |")
    return lines


def official_lines(data: dict, heading: str = "## Against the official code",
                   source: str = "bench/results/official_code.json") -> list[str]:
    """The section of ``bench/official_speed.py``: ``backend="auto"`` against the official code."""
    stamp, rows = data["machine"], data["rows"]
    timed = [r for r in rows if "speedup" in r]
    loads = [r[k] for r in timed for k in ("loadavg_1min_start", "loadavg_1min_end")]
    worst = min((r["speedup"] for r in timed), default=float("nan"))
    met = bool(timed) and len(timed) == len(rows) and worst >= data["target"]
    official = data["official"]
    lines = [
        heading,
        "",
        (f"Written from `{source}` (`bench/official_speed.py`, "
         f"{data['date']}). The official architecture file of {official['repo']} at "
         f"`{official['commit'][:7]}`, run as published (`bench/official_code.py`: only "
         "basicsr's registry and `flow_warp` are stubbed), against `camixer_fast` with "
         f"`backend=\"auto\"` (here `{data['ours']['backend']}`, {data['ours']['routing']} "
         "routing); the same `CAMixerSR_S.pth` (`params_ema`). "
         f"{stamp['cpu_model']}, {stamp['cpu_count']} cores, torch {stamp['torch']}, "
         f"{data['threads']} threads"
         + "".join(f", {k}={v}" for k, v in data.get("env", {}).items())
         + f", {data['mode']}, {data['rounds']} rounds, allocator: "
         + data.get("allocator", "the system's default") + "; 1-minute load "
         + (f"average {min(loads):.2f}–{max(loads):.2f}." if loads else "average not recorded.")),
        "",
        ("Checked before timing, per input and γ: the official output for one Gumbel draw "
         "against ours for the same draw, and the timed model against the reference backend "
         f"(max abs, both ≤ {data['tolerance']:g}). The official code draws K at random "
         "(`gumbel_softmax` averaged over the batch and the windows, in every block of every "
         "call); ours takes its expectation. K/N: the mean fraction of windows attended in "
         "the timed calls."),
        "",
        f"Target: ≥ {data['target']:g}× at every γ on every input: "
        + (f"**met** (lowest {worst:.2f}×)." if met else f"**not met** (lowest {worst:.2f}×).")
        + ("" if "kept" in data.get("allocator", "") else
           " The official process's page faults, and with them its time, change from run to "
           "run on the same input (glibc's adaptive threshold follows whatever block it saw "
           "freed last; the column below), so this ratio does too: the section with both "
           "processes keeping freed memory compares the two without faults."),
        "",
        "| input | γ | official | ours | speed-up | K/N official | K/N ours | "
        "page faults official / ours | max err same draw | max err vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        check = r["check"]
        if "speedup" not in r:
            lines.append(f"| {r['image']} {r['size']} | {r['gamma']:g} | – | – | "
                         f"{r['skipped']} | – | – | – | "
                         f"{check['official_vs_ours_same_draw']:.1e} | "
                         f"{check['ours_vs_reference']:.1e} |")
            continue
        lines.append(f"| {r['image']} {r['size']} | {r['gamma']:g} | {ms(r['official_s'])} | "
                     f"{ms(r['ours_s'])} | **{r['speedup']:.2f}×** | "
                     f"{r['official_k_fraction']:.2f} | {r['ours_k_fraction']:.2f} | "
                     f"{_faults(r)} | {check['official_vs_ours_same_draw']:.1e} | "
                     f"{check['ours_vs_reference']:.1e} |")
    prof = data.get("profile")
    if prof:
        lines += ["", (f"Where a forward's time goes ({prof['input']}, torch threads: "
                       f"{prof['threads']}, "
                       "`torch.profiler` self CPU time per operation, mean of 3 forwards; the "
                       "profiler's per-operation cost is included). Ours per network range: "
                       "predictor = project_v, predictor and routing; attention = deformable "
                       "keys and window attention; conv = the mixer's depthwise convolutions, "
                       "GELU gate and output projection; ffn = the FFN and its LayerNorm; rest "
                       "= head, tail, group tails, the first LayerNorm of each block."), "",
                  "| γ | model | profiled total | largest operations (share) |",
                  "|---|---|---|---|"]
        for gamma, cell in prof["gammas"].items():
            for model in ("official", "ours"):
                ops = ", ".join(f"{name.removeprefix('aten::')} {100 * share:.0f}%"
                                for name, _, share in cell[model]["ops"][:6])
                lines.append(f"| {float(gamma):g} | {model} | {cell[model]['total_ms']:.0f} ms "
                             f"| {ops} |")
            ranges = cell["ours_ranges_ms"]
            parts = ", ".join(f"{k} {ranges[k]:.0f} ms" for k in ranges if k != "total")
            lines.append(f"| {float(gamma):g} | ours by range | {ranges['total']:.0f} ms | "
                         f"{parts} |")
    return lines


def _faults(row: dict) -> str:
    """Median minor page faults per forward, official / ours (not recorded before the
    worker processes)."""
    faults = row.get("page_faults")
    if not faults:
        return "–"
    return f"{faults['official']:,.0f} / {faults['ours']:,.0f}"


def breakdown_lines(breakdown: dict) -> list[str]:
    lines = ["| backend | γ | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
    for row in breakdown["rows"]:
        shares = " | ".join(f"{100 * row['shares'][p]:.0f}%" for p in PARTS)
        lines.append(f"| {row['backend']} | {row['gamma']:g} | {shares} |")
    return lines


def quality_lines(quality: dict) -> list[str]:
    lines = ["| set | γ | PSNR (Y) | SSIM (Y) | K/N | mean MAdds / image |",
             "|---|---|---|---|---|---|"]
    for name, rows in quality["sets"].items():
        for row in rows:
            lines.append(f"| {name} | {row['gamma']:g} | {row['mean_psnr']:.3f} dB | "
                         f"{row['mean_ssim']:.4f} | {row['mean_k_fraction']:.2f} | "
                         f"{row['mean_madds'] / 1e9:.2f}G |")
    return lines


def plot(quality: dict, path: Path) -> str:
    """PSNR against MAdds per γ; returns the Markdown for the report (image or a note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("(No plot: matplotlib is not installed; `pip install -e '.[plot]'` and rerun "
                "`bench/report.py --reuse` to draw PSNR against MAdds.)")
    fig, axes = plt.subplots(1, len(quality["sets"]), figsize=(5 * len(quality["sets"]), 3.6))
    for ax, (name, rows) in zip(axes, quality["sets"].items(), strict=True):
        xs = [r["mean_madds"] / 1e9 for r in rows]
        ys = [r["mean_psnr"] for r in rows]
        ax.plot(xs, ys, "o-")
        for r, xv, yv in zip(rows, xs, ys, strict=True):
            ax.annotate(f"γ={r['gamma']:g}", (xv, yv), textcoords="offset points", xytext=(4, -10))
        ax.set(title=f"{name} ×4 (CAMixerSR-S)", xlabel="mean MAdds per image (G)",
               ylabel="PSNR Y (dB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"![PSNR against MAdds per γ]({path.relative_to(BENCH).as_posix()})"


def onnx_lines(onnx: dict) -> list[str]:
    out = ["| γ | CPU backend | onnxruntime | onnxruntime / CPU backend | max error vs reference |",
           "|---|---|---|---|---|"]
    for row in onnx["rows"]:
        out.append(f"| {row['gamma']:g} | {ms(row['cpu_s'])} | {ms(row['onnxruntime_s'])} | "
                   f"{row['onnxruntime_s'] / row['cpu_s']:.2f} | "
                   f"{row['errors']['onnxruntime']:.1e} |")
    return out


def render(benches: list[dict], machine: dict, breakdown: dict | None, quality: dict | None,
           memory: dict | None, plot_md: str, sources: list[str],
           official: dict | None = None, onnx: dict | None = None,
           official_kept: dict | None = None) -> str:
    stamp = machine.get("camixer_fast") or machine_stamp()
    backends, upscales = backend_table(benches), upscale_table(benches)
    loads = [b["extra_info"]["loadavg_1min"] for b in benches if "loadavg_1min" in b["extra_info"]]
    threads = sorted({b["extra_info"]["threads"] for b in benches if "threads" in b["extra_info"]})
    dates = sorted({b["_datetime"][:19] for b in benches if b["_datetime"]})
    out = [
        "# CAMixerSR-S latency on the CPU",
        "",
        "Written by `bench/report.py` from " + ", ".join(f"`{s}`" for s in sources) + "; do not "
        "edit by hand. Medians of pytest-benchmark rounds (one warm-up round each).",
        "",
        (f"- machine: {stamp['cpu_model']}, {stamp['cpu_count']} cores; torch {stamp['torch']}, "
        f"triton {stamp['triton']}"),
        f"- torch threads: {', '.join(map(str, threads)) or stamp['threads']}; 1-minute load "
        f"average when the benchmarks started: {min(loads):.2f}–{max(loads):.2f}"
        if loads else f"- torch threads: {stamp['threads']}",
        f"- run: {', '.join(dates)}" if dates else "",
        ("- **official** is `bench/official_baseline.py`: this project's re-implementation of the "
        "official code's op chain (spec §3: per-call rearrange copies, argsort, batch "
        "index_select gathers, full-size grid_sample, nn.Linear Q/K projections, index fill, "
        "batched matmul + softmax over all hard windows; K from the expected routing). It "
        "stands in for the official implementation; each timed forward of every backend was "
        "first checked against the reference model on the same input (≤ 1e-4)."),
        ("- **reference**: `camixer_fast.reference` (pure PyTorch, NCHW); **cpu**: "
        "`camixer_fast.backends.cpu`, the CPU backend (`backend=\"auto\"` on the CPU)."),
        "",
        *(official_lines(official) + [""] if official else []),
        *(official_lines(official_kept, "### Both processes keeping freed memory",
                         "bench/results/official_code_kept.json") + [""]
          if official_kept else []),
        "## Speed targets",
        "",
        *speed_targets(backends, memory),
        "",
        "## Latency per γ (paper Table 1 analogue)",
        "",
        ("One forward of the S model (×4), batch 1, per backend; ratio to the same backend at "
        "γ = 1; MAdds measured on that input with the routing it took "
        "(`camixer_fast.evaluation.cost.count_madds`); K/N the mean fraction of windows attended."),
        "",
        *table1(backends),
        "### Speed-ups",
        "",
        *speedups(backends),
        "",
    ]
    if upscales:
        out += ["## `camixer_fast.upscale` per γ", "",
                ("uint8 arrays in and out, default backend "
                f"(`{next(iter(next(iter(upscales.values())).values()))['backend']}`), whole "
                "images (no tiling). Set5 LR files; Set14 LR made with "
                "`camixer_fast.evaluation.imresize.make_lr`; Urban100 HR images used as large LR inputs."),
                "", *upscale_lines(upscales), ""]
    if breakdown:
        out += ["## Runtime breakdown (paper Fig. 6 analogue)", "",
                (f"Share of a forward's time per part, from `torch.profiler` with the model's "
                f"ranges (`camixer_fast.evaluation.profiling.runtime_breakdown`, {breakdown['runs']} "
                f"profiled runs, {breakdown['machine']['threads']} threads) on "
                f"{breakdown['input']}. predictor = predictor and routing; attention = "
                "deformable keys and window attention; conv = the mixer's depthwise "
                "convolutions, GELU gate and output projection; ffn = the gated FFN; rest = "
                "head, norms, group tails, upsampler. The profiler's per-operation cost "
                "inflates parts made of many small operations."), "",
                *breakdown_lines(breakdown), ""]
    if onnx:
        loads = [r["loadavg_1min"] for r in onnx["rows"]]
        out += ["## ONNX export on onnxruntime (CPU)", "",
                (f"CAMixerSR-S exported by `camixer_fast.export_onnx` (γ a graph input, opset "
                 f"{onnx['opset']}, {onnx['nodes']:,} nodes, {onnx['size_mb']:.1f} MB; export "
                 f"{onnx['export_s']:.1f} s, session creation {onnx['session_s']:.1f} s) run "
                 f"by onnxruntime {onnx['onnxruntime']} on the CPU against the CPU backend, "
                 f"{onnx['input']}, {onnx['threads']} threads each, medians of "
                 f"{onnx['rounds']} rounds after a warm-up, the two taking turns in each round; "
                 f"1-minute load average "
                 f"{min(loads):.2f}–{max(loads):.2f}. Both outputs were first checked against "
                 "the reference backend to 1e-4, all three with the graph's tie rule "
                 "(\"index\": on this image K cuts through equal window scores)."), "",
                *onnx_lines(onnx), ""]
    if quality:
        out += ["## Quality per γ", "",
                (f"PSNR / SSIM on Y, border 4, SR clamped and rounded to uint8 "
                f"(`camixer_fast.evaluation.evaluate.evaluate`, `{quality['backend']}` backend); Set5 "
                "from its LR files, Set14 LR by MATLAB-bicubic `make_lr`. MAdds: mean over the "
                "set's images of the measured multiply-adds."), "",
                *quality_lines(quality), "", plot_md, ""]
    return "\n".join(line for line in out if line is not None) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--results", type=Path, default=BENCH / "results",
                        help="folder of breakdown.json, quality.json, memory.json, onnx.json, "
                             "the plot")
    parser.add_argument("--reuse", action="store_true",
                        help="read breakdown, quality and memory JSON instead of measuring")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["breakdown", "quality", "memory", "onnx"],
                        help="leave these out")
    args = parser.parse_args(argv)
    benches, machine = load_benchmarks(args.bench_json)
    threads = (machine.get("camixer_fast") or {}).get("threads", torch.get_num_threads())
    torch.set_num_threads(threads)
    args.results.mkdir(parents=True, exist_ok=True)
    measured = {}
    makers = {"breakdown": measure_breakdown, "quality": measure_quality,
              "memory": lambda: measure_memory(threads), "onnx": lambda: measure_onnx(threads)}
    for name, make in makers.items():
        path = args.results / f"{name}.json"
        if name in args.skip:
            measured[name] = None
        elif args.reuse and path.is_file():
            measured[name] = json.loads(path.read_text())
        else:
            start = time.perf_counter()
            measured[name] = make()
            path.write_text(json.dumps(measured[name], indent=1) + "\n")
            print(f"{name}: {time.perf_counter() - start:.0f} s -> {path}", file=sys.stderr)
    plot_md = plot(measured["quality"], args.results / "psnr_vs_madds.png") \
        if measured["quality"] else ""
    sources = [p.resolve().relative_to(BENCH.parent).as_posix()
               if p.resolve().is_relative_to(BENCH.parent) else str(p) for p in args.bench_json]
    sources += [f"bench/results/{n}.json" for n, v in measured.items() if v is not None]
    official_path = args.results / "official_code.json"
    official = json.loads(official_path.read_text()) if official_path.is_file() else None
    if official:
        sources.append("bench/results/official_code.json")
    kept_path = args.results / "official_code_kept.json"
    official_kept = json.loads(kept_path.read_text()) if kept_path.is_file() else None
    if official_kept:
        sources.append("bench/results/official_code_kept.json")
    text = render(benches, machine, measured["breakdown"], measured["quality"],
                  measured["memory"], plot_md, sources, official=official, onnx=measured["onnx"],
                  official_kept=official_kept)
    # the GPU section is bench/gpu_report.py's: kept as it is
    gpu = extract_section(args.out.read_text()) if args.out.is_file() else None
    args.out.write_text(text + ("\n" + gpu if gpu else ""))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
