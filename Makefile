# Two set-up commands: `make demo` (train, build a bundle, verify it in ExecuTorch) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

demo: $(STAMP)
	$(BIN)/tbsm-sdk demo --out runs/demo

# One worker per core (pytest-xdist), whole files per worker so that a file's module fixtures
# (exports, trained runs) are built once; each worker builds the session fixtures it needs. On CI's
# 2 cores: 547 and 641 s in two fresh clones, against 674-846 s in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/on_device.py

# pip, not uv/poetry: torch==2.13.0's CPU wheel is on these machines; other tools fetch a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf runs build .pytest_cache
