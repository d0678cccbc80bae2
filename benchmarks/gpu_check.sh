#!/usr/bin/env bash
# One short GPU check (a few minutes) for a machine that may have no network and may lack DeepSpeed: installs
# what is missing from the wheels in WHEELS (default .device/wheels: DeepSpeed and its small dependencies, a few
# MB; Ray is not needed), then runs benchmarks/gpu_check.py, which writes gpu.json to $OUT or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.device/wheels}"
python -c "import deepspeed, pydantic, hjson" 2>/dev/null || \
  python -m pip install -q --no-index --find-links "$WHEELS" deepspeed pydantic hjson ninja py-cpuinfo msgpack einops psutil
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py
