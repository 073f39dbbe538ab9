# One-command set-up: every target installs what it needs into .venv from nothing.
# torch goes in first and alone, pinned by constraints.txt, so that no package pulls CUDA wheels
# onto a CPU machine. Extra pip arguments for torch alone (e.g. another wheel index): TORCH_PIP_ARGS.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIP_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint typecheck unit bench constraints clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt $(TORCH_PIP_ARGS) torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

## demo: the main job on embedded defaults: a whole HERO training on the toy model (hero run)
demo: install
	$(BIN)/hero run --run-id demo-$$(date +%Y%m%d-%H%M%S)

## test: lint, format check, type check, and the whole test suite
test: lint typecheck unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

## bench: the sampler benchmark (writes benchmarks/results/sampler.json and RESULTS.md)
bench: install
	$(BIN)/python benchmarks/sampler.py

## constraints: re-pin every tested version after a deliberate upgrade
constraints: install
	{ head -n 2 constraints.txt; $(BIN)/pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
