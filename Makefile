# Two commands do everything on a fresh machine:  make run  ·  make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False

.PHONY: run test setup models lint format bench clean

run: setup ## serve the studio at http://127.0.0.1:7860 (SQLite in ./data, SmolLM2 offline)
	$(PY) app.py

test: setup ## the whole suite (unit, slow with the real model, browser)
	$(PY) -m pytest

setup: $(STAMP) models

# torch==2.13.0 first: anything that depends on torch would otherwise pull a CUDA build (GBs).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

models: $(STAMP) ## download + convert the default models once (idempotent)
	$(VENV)/bin/studio fetch-models

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) bench/generation_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
