"""Does `raypt data prepare` stay within its memory setting on a corpus larger than one process should hold, and
write the same bytes at any parallelism? A text corpus of at least 200 MB (the Python sources of installed
packages, through the `text` source's globs) prepared with 1 task (no Ray), 2 and 4 Ray tasks (an embedded
cluster), each run in a fresh process as `raypt data prepare` would be: wall times, the peak resident memory of the
driver and of the largest task, and whether every file (shards, tokenizer, manifest) is identical. One invocation,
one machine: ratios, not absolute speeds.
Usage: python benchmarks/prepare_scale.py [--corpus-mb 200] [--max-memory-mb 1024]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from raypt.config import DataConfig, PrepareConfig  # noqa: E402
from raypt.data.prepare import prepare  # noqa: E402

PARALLEL = (1, 2, 4)
# Empty files (many an __init__.py) are bad records, skipped and listed: a few percent of a package's files.
EMPTY_FILES_ARE_FINE = DataConfig(max_bad_fraction=0.1)
# Large pure-Python packages, taken in this order until the corpus is big enough (torch and transformers alone
# are ~100 MB of sources).
PACKAGES = ("numpy", "pandas", "ray", "scipy", "sympy", "torch", "transformers", "sklearn", "mlflow", "moto")


def corpus(min_mb: float) -> tuple[list[str], float]:
    """Globs over the installed packages' .py files, whole packages, until they hold min_mb; and their MB."""
    site = Path(sysconfig.get_paths()["purelib"])
    globs, total = [], 0
    for package in PACKAGES:
        if total >= min_mb * 2 ** 20:
            break
        if (site / package).is_dir():
            globs.append(f"{site / package}/**/*.py")
            total += sum(f.stat().st_size for f in (site / package).rglob("*.py") if f.is_file())
    if total < min_mb * 2 ** 20:
        raise SystemExit(f"only {total / 2 ** 20:.0f} MB of sources in {', '.join(PACKAGES)}; lower --corpus-mb")
    return globs, total / 2 ** 20


def digests(folder: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one(spec: dict) -> None:
    """A child process's preparation, as `raypt data prepare` runs it: Ray (an embedded cluster) only for more than
    one task. Prints its wall time and memory figures as the last line."""
    cfg = PrepareConfig(source="text", inputs=spec["inputs"], max_memory_mb=spec["max_memory_mb"],
                        parallel=spec["parallel"])
    if cfg.parallel > 1:
        from raypt.driver import init_ray

        init_ray()  # as the CLI does: not timed
    memory: dict = {}
    began = time.perf_counter()
    prepare(spec["out"], cfg, EMPTY_FILES_ARE_FINE, memory)
    print(json.dumps({**memory, "seconds": time.perf_counter() - began}))


def run(spec: dict) -> dict:
    """One preparation in a fresh process, so each run's peaks are its own (a driver keeps what its allocator
    once took) and each Ray run starts its own cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)], check=True,
                          env=env, text=True, stdout=subprocess.PIPE)
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_figures(corpus_mb: float = 200, max_memory_mb: int = 1024) -> dict:
    """Prepare the corpus with 1, 2 and 4 tasks, each run in a fresh process, and compare the files they wrote."""
    globs, size_mb = corpus(corpus_mb)
    runs, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in PARALLEL:
            out = os.path.join(tmp, f"p{n}")
            runs[n] = run({"inputs": globs, "max_memory_mb": max_memory_mb, "parallel": n, "out": out})
            files[n] = digests(out)
            print(f"{n} task(s): {runs[n]}", flush=True)
        manifest = json.loads(Path(tmp, "p1", "manifest.json").read_text())
    tasks = [runs[n] for n in PARALLEL if n > 1]
    rows = sum(s["rows"] for s in manifest["splits"].values())
    return {
        "prepare_corpus_mb": round(size_mb, 1),
        "prepare_max_memory_mb": max_memory_mb,
        "prepare_speedup_2_tasks": round(runs[1]["seconds"] / runs[2]["seconds"], 2),
        "prepare_seconds": {str(n): round(r["seconds"], 1) for n, r in runs.items()},
        "prepare_peak_rss_driver_mb": round(max(r["driver_peak_mb"] for r in runs.values()), 1),
        "prepare_peak_rss_driver_with_ray_mb": round(max(r["driver_peak_mb"] for r in tasks), 1),
        "prepare_peak_rss_task_mb": round(max(r["task_peak_mb"] for r in tasks), 1),
        "prepare_identical_1_vs_4": files[1] == files[4],
        "prepare_identical_all": all(f == files[1] for f in files.values()),
        "prepare_documents": manifest["documents"],
        "prepare_bad_records": manifest["bad_records"]["count"],
        "prepare_tokens": rows * manifest["seq_len"],
        "prepare_shards": sum(len(s["files"]) for s in manifest["splits"].values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-mb", type=float, default=200)
    ap.add_argument("--max-memory-mb", type=int, default=1024)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child's run, see `run`
    args = ap.parse_args()
    if args.one:
        one(json.loads(args.one))
        return
    write_result("prepare_scale", prepare_figures(args.corpus_mb, args.max_memory_mb))


if __name__ == "__main__":
    main()
