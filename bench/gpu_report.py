"""The GPU section of bench/RESULTS.md, from a record of bench/gpu_bench.py: every target of the
speed issue (issue 11) with its measured value and PASS / FAIL / NOT RUN.

    python bench/gpu_report.py RECORD.json [--results-md bench/RESULTS.md]
    python bench/gpu_report.py --no-run --results-md bench/RESULTS.md

``RECORD.json`` is what ``gpu_bench.py --json`` writes, or the ``gpu-<date>.json`` of
``bench/gpu_check.sh`` (its ``bench`` entry). ``--no-run`` writes the section of a project that
has not been benchmarked on a GPU yet (every target NOT RUN). Pure Python: no torch, no GPU.

Verdicts: FAIL when a measured value misses its target (or its check failed), NOT RUN when a
value the target needs was not measured (section not run, timed out, failed, or the case did
not pass its check and so got no time), PASS when every value the target covers meets it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import roofline

BEGIN = "<!-- gpu-results:begin -->"
END = "<!-- gpu-results:end -->"
"""The markers around the GPU section of bench/RESULTS.md (bench/report.py keeps it)."""

MODELS = ("S", "B")
GAMMAS = (1.0, 0.5, 0.25, 0.0)
PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT RUN"

SPEEDUP_FP32 = 6.0
SPEEDUP_HALF = 12.0
GAMMA_RATIO = 0.65
ROOFLINE_SHARE = 0.40
LAUNCHES = 300
BATCH_SPEEDUP = 3.0
SOLO_TOL = 1e-5
LARGE_SPEEDUP = 3.0
LARGE_MEMORY = 0.5
TRAIN_SPEEDUP = 2.0

BASELINE = (
    "**official** is `bench/official_baseline.py` on CUDA: this project's re-implementation of "
    "the published code's operation chain (spec §3), run eagerly in the row's precision. It "
    "differs from the published code in three ways: K comes from the expected routing "
    "(mean of softmax(pred)) instead of a Gumbel draw, so runs are deterministic and comparable "
    "(the published code draws K at random at inference); the window condition and the padding "
    "follow the published code but it is not the published file (basicsr is not a "
    "dependency); and its training path draws the mask without Gumbel noise when checked "
    "(`train_noise=False`), as ours does. Every timed case was first checked: outputs "
    "against the official chain in fp32 with TF32 off.")


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    status: str


# --- reading the record -------------------------------------------------------------------

def bench_record(record: dict) -> dict | None:
    """The benchmark record inside ``record``: itself, or a GPU check's ``bench`` entry (with
    the check's compile-graphs step as its ``variants``)."""
    if record is None:
        return None
    if "sections" in record:
        return record
    inner = record.get("bench")
    if not isinstance(inner, dict) or "sections" not in inner:
        return None
    return with_compile_graphs(inner, record.get("compile_graphs"))


def section(record: dict | None, name: str) -> dict | None:
    """A section's data, or None where it measured nothing. A section that crashed or ran out
    of time keeps what it measured before (``partial``): each of those cases was checked."""
    if record is None:
        return None
    entry = record.get("sections", {}).get(name)
    return entry.get("data") if entry else None


def _why_missing(record: dict | None, name: str) -> str:
    if record is None:
        return "no GPU run yet"
    entry = record.get("sections", {}).get(name)
    if entry is None:
        return f"section {name} not run"
    if entry.get("data") is not None:
        return f"not measured (section {name}: {entry.get('status')})"
    return f"section {name}: {entry.get('status')}"


def latency_rows(record: dict | None) -> list[dict]:
    data = section(record, "latency")
    return data["rows"] if data else []


def _find(rows: list[dict], **keys) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def _ms(row: dict | None) -> float | None:
    return None if row is None else row.get("median_ms")


def official_ms(rows: list[dict], model: str, gamma: float, precisions: tuple[str, ...]) -> \
        float | None:
    """The official chain's fastest time at (model, γ) over ``precisions``."""
    times = [_ms(_find(rows, model=model, gamma=gamma, impl="official", precision=p))
             for p in precisions]
    times = [t for t in times if t]
    return min(times) if times else None


def speedups(rows: list[dict], precision: str, baseline: tuple[str, ...]) -> dict:
    """{(model, γ): speed-up of ours in ``precision`` over the official's fastest time among
    ``baseline`` precisions, or None where either was not timed}."""
    out = {}
    for model in MODELS:
        for gamma in GAMMAS:
            ours = _ms(_find(rows, model=model, gamma=gamma, impl="triton",
                             precision=precision))
            base = official_ms(rows, model, gamma, baseline)
            out[(model, gamma)] = base / ours if ours and base else None
    return out


def bench_ok(record: dict) -> bool:
    """Every section that was asked for ran to the end and every case passed its check."""
    record = bench_record(record)
    if record is None:
        return False
    ok = True
    for name in record.get("settings", {}).get("sections", record.get("sections", {})):
        entry = record["sections"].get(name, {})
        if entry.get("status") != "ok":
            ok = False
            continue
        data = entry.get("data") or {}
        rows = list(data.get("rows", []))
        rows += list(data.get("inference", {}).values())
        if name == "upscale":
            rows.append(data)
        for row in rows:
            if not row.get("parity_ok", row.get("ok", True)):
                ok = False
    return ok


def compile_graphs_rows(result: dict) -> list[dict]:
    """The ``variants`` rows of bench/gpu_compile_graphs.py's JSON (issue 11 part B): one per
    variant (its entries with an ``ok``)."""
    rows = []
    for name, value in result.items():
        if not isinstance(value, dict) or "ok" not in value:
            continue
        rows.append({"variant": name, "kind": "cuda-graph" if "graph" in name else "compile",
                     "ok": bool(value["ok"]), "max_abs_vs_eager": value.get("max_diff"),
                     "eager_ms": value.get("eager_ms"),
                     "ms": value.get("replay_ms", value.get("compiled_ms")),
                     "compile_s": value.get("compile_s"), "error": value.get("error")})
    return rows


def with_compile_graphs(bench: dict, compiled: dict | None, status: str = "ok") -> dict:
    """``bench`` with its ``variants`` section taken from a compile-graphs JSON (the GPU check
    runs bench/gpu_compile_graphs.py as its own step); ``bench`` itself is not changed."""
    if compiled is None:
        return bench
    out = dict(bench, sections=dict(bench.get("sections", {})))
    out["sections"]["variants"] = {"status": status, "seconds": 0.0, "data": {
        "source": "bench/gpu_compile_graphs.py", "rows": compile_graphs_rows(compiled)}}
    return out


# --- targets ------------------------------------------------------------------------------

def _verdict(values: dict, passes, missing_reason: str) -> str:
    measured = {k: v for k, v in values.items() if v is not None}
    if any(not passes(v) for v in measured.values()):
        return FAIL
    if not measured or len(measured) < len(values):
        return NOT_RUN
    return PASS


def _span(values: dict, fmt: str = "{:.2f}×") -> str:
    """"S 1.52–1.76×; B 1.26–1.73×" over (model, γ) values; missing ones counted."""
    parts = []
    for model in MODELS:
        vals = [v for (m, _), v in values.items() if m == model and v is not None]
        if vals:
            lo, hi = min(vals), max(vals)
            text = fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"
            parts.append(f"{model} {text}")
    missing = sum(v is None for v in values.values())
    if missing:
        parts.append(f"{missing} of {len(values)} not measured")
    return "; ".join(parts) if parts else "—"


def target_speedup(record: dict | None) -> list[Verdict]:
    rows = latency_rows(record)
    why = _why_missing(record, "latency")
    out = []
    fp32 = speedups(rows, "fp32", ("fp32", "tf32"))
    text = _span(fp32) if rows else why
    alt = speedups(rows, "fp32-tf32x3", ("fp32", "tf32"))
    if any(v is not None for v in alt.values()):
        text += f" (tf32x3 parity products: {_span(alt)})"
    out.append(Verdict(f"fp32 parity mode (≤ 1e-4): ≥ {SPEEDUP_FP32:g}× the official eager "
                       "time, S and B at every γ (baseline: the official's faster of fp32 and "
                       "TF32)", text, _verdict(fp32, lambda v: v >= SPEEDUP_FP32, why)))
    half = {}
    for precision in ("fp16", "bf16"):
        for key, value in speedups(rows, precision, (precision,)).items():
            half[(key[0], key[1], precision)] = value
    out.append(Verdict(f"fp16 and bf16: ≥ {SPEEDUP_HALF:g}× the official eager time in the "
                       "same precision", _half_text(half) if rows else why,
                       _verdict(half, lambda v: v >= SPEEDUP_HALF, why)))
    return out


def _half_text(half: dict) -> str:
    parts = []
    for precision in ("fp16", "bf16"):
        for model in MODELS:
            vals = [v for (m, _, p), v in half.items() if m == model and p == precision
                    and v is not None]
            if vals:
                parts.append(f"{model} {precision} {min(vals):.2f}–{max(vals):.2f}×")
    missing = sum(v is None for v in half.values())
    if missing:
        parts.append(f"{missing} of {len(half)} not measured")
    return "; ".join(parts) or "—"


def target_gamma_scaling(record: dict | None) -> Verdict:
    rows = latency_rows(record)
    ratios = {}
    for model in MODELS:
        t1 = _ms(_find(rows, model=model, gamma=1.0, impl="triton", precision="fp32"))
        t25 = _ms(_find(rows, model=model, gamma=0.25, impl="triton", precision="fp32"))
        ratios[(model, 0.25)] = t25 / t1 if t1 and t25 else None
    text = _span(ratios, "{:.2f}") if rows else _why_missing(record, "latency")
    return Verdict(f"γ scaling (ours, fp32 parity): t(0.25) / t(1) ≤ {GAMMA_RATIO}", text,
                   _verdict(ratios, lambda v: v <= GAMMA_RATIO, ""))


def kernel_tables(record: dict | None) -> dict[str, list[dict]]:
    """Roofline rows (bench/roofline.py) per profiled case: "inference <precision>" and
    "training <mode>"; empty without the kernels or ceilings section."""
    data, ceilings = section(record, "kernels"), section(record, "ceilings")
    if not data or not ceilings:
        return {}
    peaks = roofline.Ceilings.from_record(ceilings)
    tables = {}
    for precision, entry in data.get("inference", {}).items():
        if "kernels" not in entry:
            continue
        h, w = entry["padded_hw"]
        shape = roofline.Shape(1, entry["channels"], h, w, itemsize=entry["itemsize"])
        costs = roofline.inference_costs(shape, entry["hard_per_block"],
                                         fused_block="_predictor_kernel" in entry["kernels"])
        tables[f"inference {precision}"] = roofline.roofline_rows(
            _ours(entry["kernels"], costs), costs, peaks, entry["dot_precision"])
    for mode, entry in data.get("training", {}).items():
        if "kernels" not in entry:
            continue
        args = (entry["batch"], entry["channels"], entry["patch"], entry["patch"])
        attention = roofline.training_costs(
            roofline.Shape(*args, itemsize=entry["itemsize_attention"]), entry["blocks"])
        warp = roofline.training_costs(
            roofline.Shape(*args, itemsize=entry["itemsize_warp"]), entry["blocks"])
        costs = {k: (warp if "deform" in k else attention)[k] for k in attention}
        tables[f"training {mode}"] = roofline.roofline_rows(
            _ours(entry["kernels"], costs), costs, peaks, entry["dot_precision"])
    return tables


def _ours(kernels: dict, costs: dict) -> dict[str, float]:
    """Per-forward µs of our Triton kernels: those with a cost model, and any other
    ``*_kernel`` (Triton names kernels after their functions; PyTorch's are ``void ...``)."""
    return {name: k["us"] for name, k in kernels.items()
            if name in costs or (name.startswith("_") and name.endswith("_kernel"))}


def target_roofline(record: dict | None) -> Verdict:
    target = (f"every kernel of ours ≥ {ROOFLINE_SHARE:.0%} of its roofline (measured copy "
              "bandwidth and matmul rates)")
    tables = kernel_tables(record)
    shares = {}
    unmodelled = set()
    for case, rows in tables.items():
        for row in rows:
            if row["share"] is None:
                unmodelled.add(row["kernel"])
            else:
                shares[(case, row["kernel"])] = row["share"]
    if not tables:
        why = ("no GPU run yet" if record is None else
               _why_missing(record, "kernels" if not section(record, "kernels") else "ceilings"))
        return Verdict(target, why, NOT_RUN)
    worst = min(shares.items(), key=lambda kv: kv[1]) if shares else None
    below = sum(v < ROOFLINE_SHARE for v in shares.values())
    text = (f"lowest {worst[1]:.0%} ({worst[0][1]}, {worst[0][0]}); {below} of {len(shares)} "
            "kernel rows below" if worst else "—")
    if unmodelled:
        text += f"; no cost model for {', '.join(sorted(unmodelled))}"
    status = FAIL if below else (NOT_RUN if unmodelled or not shares else PASS)
    return Verdict(target, text, status)


def target_launches(record: dict | None) -> Verdict:
    data = section(record, "kernels")
    entry = (data or {}).get("inference", {}).get("fp32", {})
    launches = entry.get("launches") or None      # none recorded: no device was profiled
    if launches is not None:
        text = f"{launches:.0f} device launches per forward (S, 720p, fp32)"
    elif not entry:
        text = _why_missing(record, "kernels")
    elif not entry.get("parity_ok"):
        text = entry.get("error") or "the forward failed its check: not profiled"
    else:
        text = "no device launches recorded"
    status = NOT_RUN if launches is None else (PASS if launches <= LAUNCHES else FAIL)
    return Verdict(f"launches ≤ {LAUNCHES} per S forward at 720p", text, status)


def _variant_rows(record: dict | None, kind: str) -> list[dict]:
    data = section(record, "variants")
    return [r for r in (data or {}).get("rows", []) if r.get("kind") == kind]


def target_variant(record: dict | None, kind: str) -> Verdict:
    rows = _variant_rows(record, kind)
    label = ("capturable as a CUDA graph: replay matches eager" if kind == "cuda-graph"
             else "torch.compile(model, fullgraph=True) matches eager")
    target = f"{label} within 1e-4"
    if not rows:
        return Verdict(target, _why_missing(record, "variants"), NOT_RUN)
    parts = []
    for r in rows:
        if r.get("ok"):
            speed = f", {r['ms']:.2f} ms vs eager {r['eager_ms']:.2f} ms" if r.get("ms") and \
                r.get("eager_ms") else ""
            parts.append(f"{r['variant']}: {r.get('max_abs_vs_eager', 0):.1e}{speed}")
        else:
            detail = r.get("error") or (f"{r['max_abs_vs_eager']:.1e} from eager"
                                        if r.get("max_abs_vs_eager") is not None else "failed")
            parts.append(f"{r['variant']}: {detail}"[:200])
    return Verdict(target, "; ".join(parts), PASS if all(r.get("ok") for r in rows) else FAIL)


def _impl_row(record: dict | None, name: str, impl: str, **keys) -> dict | None:
    data = section(record, name)
    return _find((data or {}).get("rows", []), impl=impl, **keys)


def target_batch(record: dict | None) -> list[Verdict]:
    ours, official = (_impl_row(record, "batch", i) for i in ("triton", "official"))
    why = _why_missing(record, "batch")
    if ours is None or "max_abs_vs_solo" not in ours:
        independent = Verdict("batch images independent: each within 1e-5 of its solo run",
                              (ours or {}).get("error", why), NOT_RUN)
    else:
        err = ours["max_abs_vs_solo"]
        independent = Verdict("batch images independent: each within 1e-5 of its solo run",
                              f"{err:.1e}", PASS if err <= SOLO_TOL else FAIL)
    speed = None
    if ours and official and ours.get("images_per_s") and official.get("images_per_s"):
        speed = ours["images_per_s"] / official["images_per_s"]
    text = (f"{speed:.2f}× ({ours['images_per_s']:.0f} vs {official['images_per_s']:.0f} "
            "images/s)" if speed else why if ours is None else "not timed")
    status = NOT_RUN if speed is None else (PASS if speed >= BATCH_SPEEDUP else FAIL)
    return [independent, Verdict(f"16 × 128² batch: ≥ {BATCH_SPEEDUP:g}× the official "
                                 "throughput", text, status)]


def target_large(record: dict | None) -> list[Verdict]:
    ours, official = (_impl_row(record, "large", i) for i in ("triton", "official"))
    why = _why_missing(record, "large")
    speed = _ms(official) / _ms(ours) if _ms(ours) and _ms(official) else None
    text = (f"{speed:.2f}× ({_ms(ours):.1f} vs {_ms(official):.1f} ms)" if speed else why)
    verdicts = [Verdict(f"1024×768 input: ≥ {LARGE_SPEEDUP:g}× the official speed", text,
                        NOT_RUN if speed is None else PASS if speed >= LARGE_SPEEDUP else FAIL)]
    share = None
    if ours and official and ours.get("peak_gib") and official.get("peak_gib"):
        share = ours["peak_gib"] / official["peak_gib"]
    text = (f"{share:.2f} of the official peak ({ours['peak_gib']:.2f} vs "
            f"{official['peak_gib']:.2f} GiB)" if share else
            why if ours is None or official is None else "peak memory not measured")
    verdicts.append(Verdict(f"1024×768 input: at most {LARGE_MEMORY:g} of the official peak "
                            "GPU memory", text,
                            NOT_RUN if share is None else PASS if share <= LARGE_MEMORY
                            else FAIL))
    return verdicts


def target_training(record: dict | None) -> list[Verdict]:
    why = _why_missing(record, "training")
    ours = _impl_row(record, "training", "triton", mode="fp32")
    official = _impl_row(record, "training", "official", mode="fp32")
    speed = _ms(official) / _ms(ours) if _ms(ours) and _ms(official) else None
    text = f"{speed:.2f}× ({_ms(ours):.1f} vs {_ms(official):.1f} ms)" if speed else why
    verdicts = [Verdict(f"training step (S, 16 × 64², fp32): ≥ {TRAIN_SPEEDUP:g}× the "
                        "official", text,
                        NOT_RUN if speed is None else PASS if speed >= TRAIN_SPEEDUP else FAIL)]
    amp = _impl_row(record, "training", "triton", mode="bf16-autocast")
    if amp is None:
        verdicts.append(Verdict("bf16 autocast training with fp32 master weights (Triton)",
                                why, NOT_RUN))
    elif not amp.get("parity_ok") or _ms(amp) is None:
        detail = amp.get("error") or (
            f"loss {amp.get('loss_rel_vs_reference', float('nan')):.1e}, gradients "
            f"{amp.get('grad_rel_l2_vs_reference', float('nan')):.1e} from the fp32 "
            "reference step")
        verdicts.append(Verdict("bf16 autocast training with fp32 master weights (Triton)",
                                detail, FAIL))
    else:
        vs = f", {_ms(official) / _ms(amp):.2f}× the official fp32 step" if _ms(official) \
            else ""
        verdicts.append(Verdict(
            "bf16 autocast training with fp32 master weights (Triton)",
            f"{_ms(amp):.1f} ms a step{vs}; gradients {amp['grad_rel_l2_vs_reference']:.1e} "
            "(relative L2) from the fp32 reference step", PASS))
    return verdicts


def targets(record: dict | None) -> list[Verdict]:
    """Every target of issue 11 with its verdict, from a benchmark record (None: no run)."""
    record = bench_record(record)
    return [*target_speedup(record), target_gamma_scaling(record), target_roofline(record),
            target_launches(record), target_variant(record, "cuda-graph"),
            target_variant(record, "compile"), *target_batch(record), *target_large(record),
            *target_training(record)]


# --- rendering ----------------------------------------------------------------------------

def targets_table(record: dict | None) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | **{v.status}** |" for v in targets(record)]
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def latency_tables(record: dict) -> list[str]:
    rows = latency_rows(record)
    if not rows:
        return []
    out = []
    data = section(record, "latency")
    shape = data.get("input", [1, 3, 180, 320])
    for model in MODELS:
        if not any(r["model"] == model for r in rows):
            continue
        out += [f"#### {model}, {shape[3]}×{shape[2]} → {4 * shape[3]}×{4 * shape[2]}", "",
                "| precision | γ | official ms | reference ms | triton ms | speed-up | "
                "K/N | max abs(triton − official fp32) |", "|---|---|---|---|---|---|---|---|"]
        for precision in dict.fromkeys(r["precision"] for r in rows):
            for gamma in GAMMAS:
                cells = {impl: _find(rows, model=model, precision=precision, gamma=gamma,
                                     impl=impl) for impl in ("official", "reference", "triton")}
                if not any(cells.values()):
                    continue
                ours = cells["triton"] or {}
                base = official_ms(rows, model, gamma, (precision,) if precision in (
                    "fp16", "bf16") else ("fp32", "tf32"))
                speed = base / ours["median_ms"] if base and ours.get("median_ms") else None
                err = ours.get("max_abs_vs_official_fp32")
                err_text = _fmt(err, "{:.1e}")
                if ours.get("passed_on"):
                    err_text += (f" (mean {ours['mean_abs_vs_official_fp32']:.1e}: "
                                 f"{ours['passed_on']})")
                if ours and not ours.get("parity_ok"):
                    err_text += (f" **> {ours['tolerance']:.0e}: not timed**" if err is not None
                                 else f" **{ours.get('error', 'failed')[:80]}**")
                out.append(f"| {precision} | {gamma:g} | {_fmt(_ms(cells['official']))} | "
                           f"{_fmt(_ms(cells['reference']))} | {_fmt(_ms(ours))} | "
                           f"{_fmt(speed, '{:.2f}×')} | {_fmt(ours.get('k_fraction'))} | "
                           f"{err_text} |")
        out.append("")
    return out


def roofline_lines(record: dict) -> list[str]:
    tables = kernel_tables(record)
    data, ceilings = section(record, "kernels"), section(record, "ceilings")
    out = []
    if ceilings:
        rates = ceilings["matmul_tflops"]
        out += [f"Measured ceilings: copy {ceilings['copy_gb_s']:.0f} GB/s (bytes read + "
                f"written); matmul {rates['fp32']:.1f} (fp32, TF32 off) / {rates['tf32']:.0f} "
                f"(TF32) / {rates['fp16']:.0f} (fp16) / {rates['bf16']:.0f} (bf16) TFLOP/s "
                f"({ceilings['matmul_size']}³ products). Floors by `bench/roofline.py` (bytes "
                "and FLOPs per kernel with the run's K per block).", ""]
    if data:
        for case, entry in (("inference " + k, v) for k, v in data["inference"].items()):
            launches = entry.get("launches")
            out.append(f"- {case}: {_fmt(launches, '{:.0f}')} device launches and "
                       f"{_fmt(entry.get('device_ms'))} ms of device time per forward")
    for case, rows in tables.items():
        out += ["", f"#### {case}", "", "| kernel | µs per forward | floor µs | roofline share "
                "| bound by |", "|---|---|---|---|---|"]
        for row in rows:
            out.append(f"| {row['kernel']} | {row['us']:.1f} | {_fmt(row['floor_us'], '{:.1f}')}"
                       f" | {_fmt(row['share'], '{:.0%}')} | {row['bound'] or 'no cost model'} |")
    return out + [""] if out else []


def other_lines(record: dict) -> list[str]:
    out = []
    for name, label in (("batch", "Batch of 16 × 128²"), ("large", "1024×768 input"),
                        ("training", "Training step")):
        data = section(record, name)
        if not data:
            continue
        out += [f"#### {label}", "", "| implementation | ms | check | peak GiB | details |",
                "|---|---|---|---|---|"]
        for row in data.get("rows", []):
            impl = row["impl"] + (f" ({row['mode']})" if "mode" in row else "")
            details = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in row.items() if k in (
                                    "images_per_s", "max_abs_vs_solo", "max_abs_vs_official",
                                    "loss_rel_vs_reference", "grad_rel_l2_vs_reference",
                                    "error"))
            out.append(f"| {impl} | {_fmt(_ms(row))} | "
                       f"{'ok' if row.get('parity_ok') else '**failed**'} | "
                       f"{_fmt(row.get('peak_gib'))} | {details} |")
        out.append("")
    data = section(record, "upscale")
    if data:
        w, h = data["size"]
        out += [f"`camixer_fast.upscale` of a {w}×{h} PIL image: first call "
                f"{data['first_s']:.2f} s (a fresh process, empty Triton cache), second call "
                f"{data['second_s']:.3f} s; output within {data['max_levels_vs_reference']} "
                "level(s) of the reference backend.", ""]
    for kind in ("cuda-graph", "compile"):
        for row in _variant_rows(record, kind):
            out.append(f"- {row['variant']}: " + ("ok" if row.get("ok") else "**failed**") +
                       f", {_fmt(row.get('ms'))} ms (eager {_fmt(row.get('eager_ms'))} ms), "
                       f"max abs vs eager {_fmt(row.get('max_abs_vs_eager'), '{:.1e}')}" +
                       (f", compile {row['compile_s']:.0f} s" if row.get("compile_s") else "") +
                       (f"; {row['error'][:200]}" if row.get("error") else ""))
    return out


def render_section(record: dict | None, source: str = "") -> str:
    """The GPU section (between :data:`BEGIN` and :data:`END`) for ``record`` (None: no run)."""
    record = bench_record(record)
    lines = [BEGIN, "## GPU: the speed targets (issue 11)", ""]
    if record is None:
        lines += ["No GPU run of `bench/gpu_bench.py` yet: every target is NOT RUN. Run "
                  "`bash bench/gpu_check.sh` on a CUDA machine (README, \"Running on a GPU\"), "
                  "then `python bench/gpu_report.py bench/results/gpu-<date>.json "
                  "--results-md bench/RESULTS.md`.", ""]
    else:
        env, settings = record.get("environment", {}), record.get("settings", {})
        origin = f" from `{source}`" if source else ""
        sms = f", {env['multiprocessors']} SMs" if env.get("multiprocessors") else ""
        commit = f", commit {env['commit']}" if env.get("commit") else ""
        lines += [f"Written by `bench/gpu_report.py`{origin}; do not edit by hand.", "",
                  f"- card: {env.get('gpu', '?')} (sm_{env.get('capability', '?')}{sms}), "
                  f"driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')}, "
                  f"cuDNN {env.get('cudnn', '?')}, torch {env.get('torch', '?')}, triton "
                  f"{env.get('triton', '?')}, Python {env.get('python', '?')}{commit}; "
                  f"{env.get('date', '')}",
                  f"- mode {settings.get('mode', '?')}: {settings.get('warmup', '?')} warm-up "
                  f"and {settings.get('runs', '?')} timed calls per case (medians, CUDA events);"
                  f" S weights {settings.get('weights', '?')}, B weights "
                  f"{settings.get('weights_b', '?')}; input {settings.get('image', '?')}",
                  f"- {BASELINE}", ""]
    lines += ["### Targets", "", targets_table(record), ""]
    if record is not None:
        latency = latency_tables(record)
        if latency:
            lines += ["### Latency per precision and γ", "",
                      "Speed-up: the official's time (fp16 / bf16: in the same precision; fp32 "
                      "modes: the faster of its fp32 and TF32 times) over ours. A case is timed "
                      "after its check: max |output − official fp32| within 1e-4 in the fp32 "
                      "parity modes; in TF32, fp16 and bf16 within 2e-2 / 2e-2 / 1e-1, or a mean "
                      "within 1e-3 / 1e-3 / 5e-3 (a window routed the other way at the "
                      "threshold moves the max, not the mean).", "", *latency]
        kernels = roofline_lines(record)
        if kernels:
            lines += ["### Kernels and roofline", "", *kernels]
        others = other_lines(record)
        if others:
            lines += ["### Batch, large image, training, upscale, variants", "", *others, ""]
        lines += ["### Sections", "", "| section | status | seconds | error |",
                  "|---|---|---|---|"]
        for name, entry in record.get("sections", {}).items():
            status = entry.get("status", "?") + (" (what it measured is kept)"
                                                 if entry.get("partial") else "")
            lines.append(f"| {name} | {status} | {entry.get('seconds', 0):.0f} | "
                         f"{(entry.get('error') or '')[:200]} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def extract_section(text: str) -> str | None:
    """The GPU section of a RESULTS.md text, markers included, or None."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(END)] + "\n"


def update_results_md(path: Path, section_text: str) -> None:
    """Replace the GPU section of ``path`` (or append it); the rest of the file is kept."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        tail = text[end + len(END):].lstrip("\n")
        text = text[:start] + section_text + (("\n" + tail) if tail else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section_text
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, nargs="?", help="gpu_bench.py or gpu_check JSON")
    parser.add_argument("--no-run", action="store_true",
                        help="no record: the section of a project not yet run on a GPU")
    parser.add_argument("--results-md", type=Path, help="rewrite this file's GPU section")
    args = parser.parse_args(argv)
    if (args.record is None) == (not args.no_run):
        parser.error("give a record, or --no-run")
    record = None
    if args.record is not None:
        record = bench_record(json.loads(args.record.read_text()))
        if record is None:
            parser.error(f"{args.record} holds no gpu_bench record")
    text = render_section(record, args.record.name if args.record else "")
    if args.results_md:
        update_results_md(args.results_md, text)
        print(f"rewrote the GPU section of {args.results_md}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
