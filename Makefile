# The two commands of the README: `make launch` and `make test`. Both set up .venv if missing.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= configs/cpu-demo.yaml
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE ?= disabled
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install test test-fast test-slow test-faults lint format launch bench bench-logprobs bench-rollout bench-train bench-update bench-load bench-vs-trl eval sft ui clean

.venv/.installed: pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

install: .venv/.installed

# Everything CI runs: fast unit tests, then the slow end-to-end ones.
test: install
	$(PY) -m pytest -q -ra --durations=15

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

test-slow: install
	$(PY) -m pytest -q -ra -m slow

# The reliability suite: every injected-fault test, then a table of scenario, expected, observed, result.
test-faults: install
	$(PY) -m pytest -q -ra -m faults -p no:cacheprovider

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

launch: install
	$(PY) -m launch --config $(CONFIG) $(ARGS)

bench: bench-logprobs bench-rollout bench-train bench-update

bench-logprobs: install
	$(PY) scripts/bench_logprobs.py

bench-rollout: install
	$(PY) scripts/bench_rollout.py
	$(PY) scripts/bench_zero3_sync.py
	$(PY) scripts/bench_vllm.py
	$(PY) scripts/bench_vllm_reload.py

bench-train: install
	$(PY) scripts/bench_train.py

# The update side alone, prompts shared (each prompt through the model once) against not (ARGS="--tokens 256").
bench-update: install
	$(PY) scripts/bench_update.py $(ARGS)

# N concurrent OpenAI-SDK clients against a real rollout server for a fixed time (ARGS="--backend vllm").
bench-load: install
	$(PY) scripts/bench_load.py $(ARGS)

# Our step against TRL's GRPOTrainer on identical work, alternating (ARGS="--configs small:64:1 --rounds 1").
bench-vs-trl: install
	$(PY) scripts/bench_vs_trl.py $(ARGS)

eval: install
	$(PY) -m trainer.eval --model $(MODEL) $(ARGS)

sft: install
	$(PY) -m trainer.sft --config $(CONFIG) $(ARGS)

ui: install
	$(PY) -m launch.ui $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
