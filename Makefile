# refvllm: set-up, demo, tests. Every target installs what it needs into .venv first.
#
#   make demo   the embedded default end to end (synthetic data, tiny checkpoints, training, eval)
#   make test   the test suite (what CI runs)
#
# torch: on a machine without an NVIDIA GPU the CPU build is installed first (TORCH_CPU), so the package's
# `torch>=2.11` requirement is already met and pip does not fetch a multi-GB CUDA build. On a GPU machine pip
# resolves torch normally (a CUDA build). Override with e.g. `make TORCH_CPU="torch==2.11.0" test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= runs/demo

.PHONY: install demo train eval test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install --quiet "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

# pytest exits 5 when no test was collected: not a failure of the suite.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check refvllm scripts tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/region_encoder.py
	$(BIN)/python benchmarks/data_loading.py

clean:
	rm -rf runs .pytest_cache
