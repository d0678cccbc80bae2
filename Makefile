# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv with pip if missing.
PYTHON ?= python3
VENV   ?= .venv
# Without CUDA, take the CPU build of torch; on a GPU machine choose your own, e.g. `make demo TORCH=torch==2.13.0`.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
BIN    := $(VENV)/bin
JOB    ?= jobs/quickstart.yaml

.PHONY: demo test bench clean

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

test: $(VENV)/.installed
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m autoscaler

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf runs data benchmarks/results/*.tmp
