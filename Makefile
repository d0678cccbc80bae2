# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv with pip if missing.
PYTHON ?= python3
VENV   ?= .venv
# Without CUDA, take the CPU build of torch; on a GPU machine choose your own, e.g. `make demo TORCH=torch==2.13.0`.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
BIN    := $(VENV)/bin
JOB    ?= jobs/quickstart.yaml

.PHONY: demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	test -f data/stdlib/manifest.json || $(BIN)/raypt data prepare $(JOB)
	$(BIN)/raypt train $(JOB)
	$(BIN)/raypt generate runs/quickstart "def parse_args(" --max-new-tokens 120

# The tiers below Ray first (config, schedules, data order, the gloo engine/checkpoint matrix: under 2 minutes),
# then everything on Ray, then the autoscaler drill, which stops every Ray process and so runs alone.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not ray and not slow and not autoscaler"

test: test-fast
	$(BIN)/python -m pytest -m "(ray or slow) and not autoscaler"
	$(BIN)/python -m pytest -m autoscaler

# Every benchmark (each writes benchmarks/results/<name>.json), the GPU check where there is a GPU, then
# benchmarks/RESULTS.md from all results. The paper reproductions (benchmarks/papers/) take hours: run them alone.
bench: $(VENV)/.installed
	test -f data/stdlib/manifest.json || $(BIN)/raypt data prepare $(JOB)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/mfu.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/same_losses.py
	$(BIN)/python benchmarks/tune.py
	$(BIN)/python benchmarks/pruning.py
	if command -v nvidia-smi >/dev/null; then PATH="$(abspath $(BIN)):$$PATH" bash benchmarks/gpu_check.sh; fi
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf runs data benchmarks/results/*.tmp
