"""One-off (dates: the files' own, else their last commit's): the measured figures of bench/results/*.json and bench/kernels.md that still matter
as rows of bench/results.jsonl (run once when the results moved to one file, then deleted)."""

import json
import subprocess

from common import BENCH, append_rows, row
from report import rows_from_benchmark

OLD = BENCH / "results"


def stamp_of(machine: dict, date: str, commit: str = "unknown") -> dict:
    return {"device": f"{machine['cpu_model']} ({machine['cpu_count']} cores, "
                      f"{machine['threads']} threads)",
            "versions": {"torch": machine["torch"], "triton": machine["triton"]},
            "commit": commit, "date": date[:10]}


rows = []
for name in ("backends.json", "upscale.json"):
    rows += rows_from_benchmark(json.loads((OLD / name).read_text()))
for name, allocator in (("official_code.json", "default"), ("official_code_kept.json", "kept")):
    data = json.loads((OLD / name).read_text())
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(OLD / name)],
                            capture_output=True, text=True, check=True).stdout.strip()
    stamp = stamp_of(data["machine"], data["date"], commit)
    for r in data["rows"]:
        if "speedup" in r:
            rows.append(row("official-code", f"{allocator} {r['image']} {r['size']} gamma={r['gamma']}",
                            "speedup", r["speedup"], "×", stamp, allocator=allocator,
                            image=r["image"], size=r["size"], gamma=r["gamma"],
                            official_ms=r["official_s"] * 1e3, ours_ms=r["ours_s"] * 1e3,
                            official_commit=data["official"]["commit"][:7], **r["check"]))
quality = json.loads((OLD / "quality.json").read_text())
for s, scores in quality["sets"].items():
    for q in scores:
        for metric, key, unit in (("psnr", "mean_psnr", "dB"), ("ssim", "mean_ssim", ""),
                                  ("k_fraction", "mean_k_fraction", ""), ("madds", "mean_madds", "MAdds")):
            rows.append(row("quality", f"{s} gamma={q['gamma']}", metric, q[key], unit,
                            stamp_of(quality["machine"], "2026-11-25"), set=s, gamma=q["gamma"],
                            backend=quality["backend"]))
onnx = json.loads((OLD / "onnx.json").read_text())
for r in onnx["rows"]:
    for runtime in ("onnxruntime", "cpu"):
        rows.append(row("onnx", f"onnx gamma={r['gamma']} {runtime}", "median", r[f"{runtime}_s"] * 1e3,
                        "ms", stamp_of(onnx["machine"], "2026-12-01"), runtime=runtime,
                        gamma=r["gamma"], max_abs_error=r["errors"][runtime],
                        onnxruntime=onnx["onnxruntime"], opset=onnx["opset"]))
memory = json.loads((OLD / "memory.json").read_text())
rows.append(row("memory", "cpu S gamma=1 LR 1024x1024 (peak RSS)", "peak_rss", memory["peak_mb"],
                "MB", stamp_of(onnx["machine"], "2026-11-25"), backend="cpu", gamma=1.0,
                lr_size="1024x1024"))
kernels = (BENCH / "kernels.md").read_text().split("## Compiled resource use")[1]
archs = []
for line in kernels.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] == "kernel variant":
        archs = [c.split()[0] for c in cells[1::4]]
    elif archs and len(cells) == 1 + 4 * len(archs) and not cells[0].startswith("---"):
        for i, arch in enumerate(archs):
            regs, spill, smem = cells[1 + 4 * i: 4 + 4 * i]
            for metric, value in (("registers", regs), ("spill_bytes", spill), ("smem_bytes", smem)):
                rows.append(row("kernel-resources", f"{cells[0]}@{arch}", metric, int(value), "",
                                {"device": f"AOT compile for {arch}", "versions": {"triton": "3.9.0"},
                                 "commit": "8bc0b23", "date": "2026-12-01"},
                                variant=cells[0], arch=arch, tensor_cores=cells[4 + 4 * i]))
append_rows(rows, BENCH / "results.jsonl")
print(len(rows), "rows")
