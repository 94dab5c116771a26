"""The results of ``bench/gpu_check.sh``: gathered from its work folder into one JSON record,
and rendered as a readable markdown summary.

    python bench/gpu_summary.py env [--commit SHA]        # the machine, as JSON on stdout
    python bench/gpu_summary.py summarize --work DIR --out DIR

``summarize`` reads the work folder the check filled -- ``steps.tsv`` (one line per step: name,
status, seconds, detail), ``env.json``, ``tests-<group>.xml`` (pytest's JUnit XML) with
``tests-<group>.log``, ``sanitizer-<dtype>.log``, ``bench.json`` (bench/gpu_bench.py),
``compile-graphs.json`` (bench/gpu_compile_graphs.py) -- and writes ``gpu-<date>.json`` and
``gpu-<date>.md`` into ``--out``. The benchmark's part of the markdown is bench/gpu_report.py's
GPU section (the speed targets with their verdicts; the compile-graphs step gives its
``variants``), which ``--results-md bench/RESULTS.md`` (or later ``python bench/gpu_report.py
gpu-<date>.json --results-md bench/RESULTS.md``) writes into bench/RESULTS.md. Nothing here
needs torch or a GPU except ``env``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import gpu_report

STEP_STATUSES = ("ok", "failed", "timeout", "out-of-time", "skipped", "unavailable")
"""A step's fate: ``skipped`` when asked (``--skip-...``), ``unavailable`` when its tool or data
is missing, ``out-of-time`` when the check's budget ran out before it (the check then fails)."""


def read_steps(path: Path) -> list[dict]:
    """``steps.tsv``: name, status, seconds, detail (tab-separated, detail optional)."""
    steps = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, status, seconds, *detail = line.split("\t")
        if status not in STEP_STATUSES:
            raise ValueError(f"{path}: unknown status {status!r} in {line!r}")
        steps.append({"name": name, "status": status, "seconds": float(seconds),
                      "detail": detail[0] if detail else ""})
    return steps


def read_junit(path: Path, log: Path | None = None) -> dict:
    """Counts, time and failures of one pytest run's JUnit XML; a missing file (the process
    died before writing it) is reported as ``crashed`` with the end of its log."""
    if not path.exists():
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        return {"status": "crashed", "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                "seconds": 0.0, "failures": [], "log_tail": tail}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    seconds = 0.0
    failures = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                found = case.find(kind)
                if found is not None:
                    name = f"{case.get('classname', '')}::{case.get('name', '')}"
                    message = (found.get("message") or found.text or "").strip()
                    failures.append({"test": name, "kind": kind,
                                     "message": message.splitlines()[0][:300] if message
                                     else ""})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "passed" if counts["failures"] == counts["errors"] == 0 else "failed"
    return {"status": status, "passed": passed, "failed": counts["failures"],
            "errors": counts["errors"], "skipped": counts["skipped"],
            "seconds": round(seconds, 1), "failures": failures}


def read_sanitizer(path: Path) -> dict:
    """compute-sanitizer's verdict from its log: clean, errors (with the first ones), or
    unavailable (the tool refused the device, as it does under gVisor)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if not text:
        return {"status": "unavailable", "errors": None, "first": "no log"}
    if "Device not supported" in text or "not supported on this" in text:
        return {"status": "unavailable", "errors": None, "first": "device not supported"}
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    if summary is None:
        return {"status": "incomplete", "errors": None, "first": text.strip()[-500:]}
    errors = int(summary.group(1))
    first = [line.removeprefix("=========").strip() for line in text.splitlines()
             if line.startswith("=========") and ("Invalid" in line or " at " in line
                                                  or "Program hit" in line)][:3]
    return {"status": "clean" if errors == 0 else "errors", "errors": errors,
            "first": " | ".join(first)}


def gather(work: Path) -> dict:
    """One record of a check's work folder (see the module docstring)."""
    steps = read_steps(work / "steps.tsv")
    env_path = work / "env.json"
    environment = json.loads(env_path.read_text()) if env_path.exists() else {}
    groups = sorted({p.stem.removeprefix("tests-") for p in work.glob("tests-*")
                     if p.suffix in (".xml", ".log")})
    tests = {g: read_junit(work / f"tests-{g}.xml", work / f"tests-{g}.log") for g in groups}
    sanitizer = {p.stem.removeprefix("sanitizer-"): read_sanitizer(p)
                 for p in sorted(work.glob("sanitizer-*.log"))}
    bench_path = work / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    compiled_path = work / "compile-graphs.json"
    compiled = json.loads(compiled_path.read_text()) if compiled_path.exists() else None
    ok = (all(s["status"] in ("ok", "skipped", "unavailable") for s in steps)
          and all(t["status"] == "passed" for t in tests.values())
          and all(s["status"] in ("clean", "unavailable") for s in sanitizer.values())
          and (bench is None or gpu_report.bench_ok(bench))
          and (compiled is None or all(r["ok"] for r in _variants(compiled).values())))
    return {"date": environment.get("date") or datetime.now(timezone.utc).isoformat(
                timespec="seconds"),
            "ok": ok, "environment": environment, "steps": steps, "tests": tests,
            "sanitizer": sanitizer, "bench": bench, "compile_graphs": compiled}


def _variants(compiled: dict) -> dict[str, dict]:
    """The variant rows of a ``compile-graphs.json`` (the entries with an ``ok``)."""
    return {name: row for name, row in compiled.items()
            if isinstance(row, dict) and "ok" in row}


def _compiled_rows(compiled: dict) -> list[str]:
    rows = ["| variant | ok | max abs diff to eager | same K / order | eager ms | "
            "compiled / replay ms |", "|---|---|---|---|---|---|"]
    for name, r in _variants(compiled).items():
        if "error" in r:
            rows.append(f"| {name} | no | {r['error'][:120]} | — | — | — |")
            continue
        fast = r.get("compiled_ms", r.get("replay_ms"))
        rows.append(f"| {name} | {'yes' if r['ok'] else '**no**'} | {r['max_diff']:.1e} | "
                    f"{r['same_k']} / {r['same_order']} | {_ms(r.get('eager_ms'))} | "
                    f"{_ms(fast)} |")
    return rows


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render(result: dict) -> str:
    """The markdown summary of a :func:`gather` record."""
    env = result.get("environment", {})
    lines = [f"# GPU check, {result['date']}", ""]
    machine = ", ".join(f"{k} {env[k]}" for k in ("gpu", "torch", "cuda", "triton", "commit")
                        if env.get(k))
    lines += [f"{machine or 'machine unknown'}.", "",
              f"**Overall: {'PASS' if result['ok'] else 'FAIL'}**", ""]
    if result["steps"]:
        lines += ["## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |"
                  for s in result["steps"]]
        lines.append("")
    if result["tests"]:
        lines += ["## Tests (one process per group)", "",
                  "| group | status | passed | failed | errors | skipped | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for group, t in result["tests"].items():
            lines.append(f"| {group} | {t['status']} | {t['passed']} | {t['failed']} | "
                         f"{t['errors']} | {t['skipped']} | {t['seconds']:.0f} |")
        failures = [(g, f) for g, t in result["tests"].items() for f in t["failures"]]
        if failures:
            lines += ["", "Failures:", ""]
            lines += [f"- `{f['test']}` ({g}, {f['kind']}): {f['message']}" for g, f in failures]
        for group, t in result["tests"].items():
            if t["status"] == "crashed":
                lines += ["", f"`{group}` died before reporting; the end of its log:", "",
                          "```", t.get("log_tail", "").strip()[-1500:], "```"]
        lines.append("")
    if result["sanitizer"]:
        lines += ["## compute-sanitizer memcheck", "",
                  "A forward per dtype; in fp16 and bf16 a training step too.", "",
                  "| dtype | status | errors | first report |", "|---|---|---|---|"]
        for dtype, s in result["sanitizer"].items():
            errors = "—" if s["errors"] is None else str(s["errors"])
            lines.append(f"| {dtype} | {s['status']} | {errors} | {s['first']} |")
        lines.append("")
    bench = gpu_report.bench_record(result)
    if bench:
        section = gpu_report.render_section(bench, "bench/gpu_bench.py")
        lines += [line for line in section.splitlines()
                  if line not in (gpu_report.BEGIN, gpu_report.END)]
        lines.append("")
    compiled = result.get("compile_graphs")
    if compiled:
        lines += ["## torch.compile and CUDA graphs (S, γ = 0.5, fp32)", "",
                  "Each variant checked against eager (≤ 1e-4, the same K and window order) "
                  "before it is timed.", ""]
        lines += _compiled_rows(compiled)
        lines.append("")
    return "\n".join(lines)


def summarize(work: Path, out: Path, results_md: Path | None = None
              ) -> tuple[Path, Path, dict]:
    """Gather ``work`` and write ``gpu-<date>.json`` and ``gpu-<date>.md`` into ``out``; with
    ``results_md``, also that file's GPU section (when the check ran the benchmark)."""
    result = gather(work)
    out.mkdir(parents=True, exist_ok=True)
    stamp = result["date"][:10]
    json_path, md_path = out / f"gpu-{stamp}.json", out / f"gpu-{stamp}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(render(result))
    if results_md is not None and gpu_report.bench_record(result) is not None:
        gpu_report.update_results_md(results_md, gpu_report.render_section(result,
                                                                            json_path.name))
    return json_path, md_path, result


def environment(commit: str | None = None) -> dict:
    """This machine: GPU, driver-side versions (``gpu_bench.environment``), tools, commit."""
    import shutil

    import gpu_bench

    env = gpu_bench.environment()
    env["compute_sanitizer"] = shutil.which("compute-sanitizer") or ""
    if commit:
        env["commit"] = commit
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print this machine's environment as JSON")
    env.add_argument("--commit", help="the project's commit, recorded as given")
    summ = sub.add_parser("summarize", help="gather a work folder, write the JSON and markdown")
    summ.add_argument("--work", type=Path, required=True)
    summ.add_argument("--out", type=Path, required=True)
    summ.add_argument("--results-md", type=Path, default=None,
                      help="also rewrite this file's GPU section (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.command == "env":
        print(json.dumps(environment(args.commit), indent=1))
        return 0
    if not args.work.is_dir():
        parser.error(f"no work folder {args.work}")
    json_path, md_path, result = summarize(args.work, args.out, args.results_md)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
