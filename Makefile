# vlm_mamba: `make help` lists the targets. Each target installs what it needs into .venv.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Exact pins for this CPU machine (served from local disk); pyproject.toml keeps ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev tools

demo: $(STAMP) ## generate shapes data, train the demo model on CPU, evaluate both tasks, show results
	$(BIN)/python -m vlm_mamba.demo --out $(DEMO_DIR)

test: $(STAMP) ## run the default test suite (CPU; gpu tests skip without CUDA)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

test-all: $(STAMP) ## every test, slow ones included
	$(BIN)/python -m pytest -q --timeout=1800

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff autofix + format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## CPU benchmarks (tables printed, JSON in benchmarks/results/)
	$(BIN)/python benchmarks/bench_lm.py
	$(BIN)/python benchmarks/bench_loader.py

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs multirun lightning_logs runs
