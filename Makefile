# refvllm: set-up, demo, tests. Every target installs what it needs into .venv first.
#
#   make demo   the embedded default end to end (synthetic data, tiny checkpoints, training, eval)
#   make demo-vlm   the same on a tiny pretrained-VLM family (a tiny Qwen2.5-VL, configs/demo_vlm.yaml)
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
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: install demo demo-vlm demo-data train eval test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install --quiet "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed]"
	rm -f $(VENV)/.installed-*
	touch $@

# The embedded default, end to end: data (validated, one sample rendered), training, evaluation.
demo: $(STAMP) demo-data train eval

# The same steps on the Qwen2.5-VL family: its config's paths are under runs/demo-vlm.
demo-vlm: $(STAMP)
	$(MAKE) demo DEMO_DIR=runs/demo-vlm DEMO_CONFIG=configs/demo_vlm.yaml

demo-data: $(STAMP)
	$(BIN)/refvllm synth $(DEMO_DIR)/data --train 4000 --eval 960 --seed 0
	$(BIN)/refvllm validate $(DEMO_DIR)/data/train.json --data-root $(DEMO_DIR)/data --report $(DEMO_DIR)/data/validate.jsonl
	$(BIN)/refvllm show $(DEMO_DIR)/data/train.json --data-root $(DEMO_DIR)/data --index 0 --out $(DEMO_DIR)/sample.png

# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: the one training process gets every core.
train: $(STAMP)
	$(BIN)/accelerate launch --num_processes 1 --num_cpu_threads_per_process $$(nproc) scripts/train.py \
		--config $(DEMO_CONFIG)

# BENCH_Q=FILE [BENCH_Q_ROOT=DIR]: also a VideoRefer-Bench-Q file, single- and multi-frame mode, each table with
# the published scorer's accuracy and refvllm's extractor's beside it (docs/evaluation.md).
# Evaluates the newest demo checkpoint on the eval split and on a fresh split generated with another seed, each
# as is and with the region tokens zeroed (--ablate-regions). 120 questions per type: a region-blind guesser
# then lands within 10 points of chance with high probability (one standard deviation is 4 points at 25%).
eval: $(STAMP)
	$(BIN)/refvllm synth $(DEMO_DIR)/data_seed1 --train 0 --eval 960 --seed 1
	$(BIN)/refvllm eval --model $(DEMO_DIR)/train --data $(DEMO_DIR)/data/eval.json --data-root $(DEMO_DIR)/data \
		--out $(DEMO_DIR)/eval/metrics.json
	$(BIN)/refvllm eval --model $(DEMO_DIR)/train --data $(DEMO_DIR)/data/eval.json --data-root $(DEMO_DIR)/data \
		--out $(DEMO_DIR)/eval/metrics_ablated.json --ablate-regions
	$(BIN)/refvllm eval --model $(DEMO_DIR)/train --data $(DEMO_DIR)/data_seed1/eval.json \
		--data-root $(DEMO_DIR)/data_seed1 --out $(DEMO_DIR)/eval/metrics_seed1.json
	$(BIN)/refvllm eval --model $(DEMO_DIR)/train --data $(DEMO_DIR)/data_seed1/eval.json \
		--data-root $(DEMO_DIR)/data_seed1 --out $(DEMO_DIR)/eval/metrics_seed1_ablated.json --ablate-regions
	$(BIN)/refvllm region-check $(DEMO_DIR)/eval/metrics.json $(DEMO_DIR)/eval/metrics_ablated.json \
		$(DEMO_DIR)/eval/metrics_seed1.json $(DEMO_DIR)/eval/metrics_seed1_ablated.json
	if [ -n "$(BENCH_Q)" ]; then for mode in single multi; do \
		$(BIN)/refvllm eval --model $(DEMO_DIR)/train --data $(BENCH_Q) --format bench-q --mode $$mode \
			--data-root $(or $(BENCH_Q_ROOT),$(dir $(BENCH_Q))) --out $(DEMO_DIR)/eval/bench_q_$$mode.json || exit 1; \
	done; fi

# pytest exits 5 when no test was collected: not a failure of the suite. On a machine without an NVIDIA GPU the
# DeepSpeed tests run on DeepSpeed's CPU accelerator, whose communication op is compiled on first use (about
# 40 s, once per machine; cached in ~/.cache/torch_extensions): built first, as part of the set-up.
test: $(STAMP)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -c "from deepspeed.accelerator import \
		get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"; fi
	$(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check refvllm scripts tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/region_encoder.py
	$(BIN)/python benchmarks/data_loading.py
	$(BIN)/python benchmarks/hostile_inputs.py

clean:
	rm -rf runs .pytest_cache
