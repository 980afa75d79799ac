# tmr-ray: the README's commands. `make demo` and `make test` install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tmr-installed
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export AWS_EC2_METADATA_DISABLED ?= true
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: install demo test bench lint clean

install: $(STAMP)

# torch goes first so nothing pulls a CUDA build; the stamp makes a second run take seconds.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,plots]"
	@# the browser test drives Debian's chromium (never a downloaded browser build)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "warning: chromium not installed; tests/test_serve_browser.py will fail"; }
	@touch $(STAMP)

demo: install
	$(PY) -m jobs.run_demo --config configs/demo.tiny.yaml $(if $(PORT),--port $(PORT))

# -X faulthandler: a crash after the last test (CI once saw "Segmentation fault" after 633 passed)
# prints every thread's Python stack; pytest's own faulthandler stops at its unconfigure
test: install
	$(PY) -X faulthandler -m pytest -q

# SIZE=paper (default: bert-base, ResNet-50, SD v1.5 at 128 px... with random weights, built once) or SIZE=tiny
bench: install
	$(PY) -m benchmarks.run_all --size $(or $(SIZE),paper)

lint: install
	$(PY) -m ruff check tmr_core jobs serve tests benchmarks

clean:
	rm -rf outputs .cache mlruns mlflow.db .pytest_cache
