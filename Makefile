# Thin wrappers over the CLIs. `make help` lists the targets.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
export SIMFLUENCE_DATA_DIR ?= $(SHARED)/data
export SIMFLUENCE_TOKENIZER ?= $(SHARED)/tokenizers/t5
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
OUT ?= runs/demo/output

.PHONY: help install test demo bench lint

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PY_BOOT) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed  ## Create .venv and install the project with its test extra.

test: install  ## Run the default test suite (CPU, no network).
	$(PYTHON) -m pytest -q tests

demo: install  ## The embedded default end to end on CPU; writes $(OUT).
	$(PYTHON) -m simfluence.cli demo-data $(OUT) --overwrite
	$(PYTHON) -m simfluence.cli evaluate $(OUT) --split 20,2,10 --out $(OUT)/results.json

bench: install  ## Every benchmark script that fits this machine.
	$(PYTHON) scripts/bench_fit.py

lint: install  ## ruff format --check and ruff check.
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .
