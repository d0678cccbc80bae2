"""Shared by every benchmark: one JSON shape for results, with the machine and versions that produced them."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


def versions() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    return {"ray": ray.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def write_result(name: str, figures: dict, **extra) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(), "figures": figures, **extra}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return path


def raypt_command(*args: str, capture: bool = False) -> str:
    """Run a raypt command as a user would, from the repository root, on its own embedded cluster (RAY_ADDRESS
    dropped); its output (when `capture`) is returned too."""
    print("$ raypt", " ".join(args), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "raypt", *args], check=True, cwd=RESULTS.parents[1], env=env,
                          text=True, stdout=subprocess.PIPE if capture else None)
    print(done.stdout or "", end="")
    return done.stdout or ""


def timed_unless_report(name: str, run) -> float:
    """A paper script's wall time: with `--report`, the one its last full run recorded in results/<name>.json (the
    tables are rewritten from the runs on disk); otherwise `run()` is timed, the user's commands in order."""
    if sys.argv[1:] == ["--report"]:
        return json.loads((RESULTS / f"{name}.json").read_text())["figures"]["wall_s"]
    began = datetime.datetime.now().timestamp()
    run()
    return datetime.datetime.now().timestamp() - began
