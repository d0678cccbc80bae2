"""benchmarks/RESULTS.md from benchmarks/results/*.json: the machine, the versions, and each benchmark's figures
that are ratios measured within one invocation (raypt against the bare loop, with against without a fast path,
fractions of wall time, differences of losses), never a bare absolute time. The last step of `make bench`.
Usage: python benchmarks/report.py
"""
from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, versions  # noqa: E402

OUT = RESULTS.parent / "RESULTS.md"
# A figure is a ratio when its name says so; absolute seconds, sizes and rates stay in the JSON files.
RATIO = re.compile(r"_vs_|fraction|mfu|hfu|amplification|max_abs_diff|speedup|overhead|lost_steps|identical|"
                   r"_equal|_diff$|ratio")
PAPERS = {"amcl": "papers/amcl.md", "rewarm": "papers/rewarm.md", "sparsity": "papers/sparsity.md"}
NO_GPU = ("No GPU machine was at hand when this file was written, so the GPU figures below are those of the "
          "last GPU check ({date}); `bash benchmarks/gpu_check.sh` on a GPU machine measures them again.")


def shown(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def section(name: str, body: dict) -> list[str]:
    device = body.get("machine", {}).get("gpu") or body["figures"].get("device", "cpu")
    lines = [f"## {name}", "", f"{body.get('date', '?')}; {device}", ""]
    if name in PAPERS:
        return lines + [f"A paper reproduction: its tables are in [{PAPERS[name]}]({PAPERS[name]}).", ""]
    rows = [(k, v) for k, v in body["figures"].items() if RATIO.search(k) and isinstance(v, (int, float, bool, list))]
    lines += ["| figure | value |", "|---|---|", *(f"| `{k}` | {shown(v)} |" for k, v in rows), ""]
    if name == "mfu":
        lines += ["![tokens/s and MFU against model size](results/mfu.png)", ""]
    return lines


def main(results: Path = RESULTS, out: Path = OUT) -> None:
    import torch

    bodies = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    here = machine()
    lines = ["# Benchmark results", "",
             f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench` "
             "(`benchmarks/report.py`) from `benchmarks/results/*.json`; each section gives the date and device "
             "of its own run.", "",
             f"- machine: {here['platform']}, {here['cpus']} CPUs, Python {here['python']}"
             + (f", {here['gpus']}x {here['gpu']}" if "gpu" in here else ", no GPU"),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
    if not torch.cuda.is_available() and "gpu" in bodies:
        lines += [NO_GPU.format(date=bodies["gpu"]["date"]), ""]
    for name, body in bodies.items():
        lines += section(name, body)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
