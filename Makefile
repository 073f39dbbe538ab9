# One-command set-up: every target installs what it needs into .venv from nothing.
# torch goes in first and alone, pinned by constraints.txt, so that no other package picks its build;
# the wheel index picks CPU or CUDA. Extra pip arguments for torch alone (e.g. PyTorch's CPU index on a
# machine without a GPU): TORCH_PIP_ARGS.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Label Studio pins old redis, pytz and python-json-logger, which break the Prefect server (`No module named
# 'redis.auth'`), and resolving both together backtracks for minutes: it gets its own environment.
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed
TORCH_PIP_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install label-studio browser demo test test-long audit audit-ci lint typecheck unit bench gpu-wheels constraints clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt $(TORCH_PIP_ARGS) torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

$(LS_STAMP): infra/label-studio-constraints.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet -c infra/label-studio-constraints.txt label-studio
	touch $@

## label-studio: the Label Studio server's own environment (infra/label-studio.sh runs it)
label-studio: $(LS_STAMP)

## browser: Debian's Chromium and its driver, for the labeling-page test (needs apt and root)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "installing Debian's chromium and chromium-driver"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

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

unit: install label-studio browser
	$(BIN)/pytest --durations=15  # the slowest tests, to keep the whole run under 25 minutes

## test-long: only the long variants of the tests (the crash points but Label Studio's two); CI runs them after `make test`
test-long: install label-studio browser
	$(BIN)/pytest --long -m long --durations=15

## audit: known vulnerabilities of the pinned dependencies, the app's and Label Studio's (pip-audit;
## needs PyPI's per-release JSON API, or OSV with AUDIT_SERVICE=osv)
## pip-audit gets an environment of its own: installed into .venv, it and its dependencies would be
## pinned into constraints.txt by the next `make constraints`
AUDIT_SERVICE ?= pypi
AUDIT_VENV ?= .venv-audit
audit:
	$(PYTHON) -m venv $(AUDIT_VENV)
	$(AUDIT_VENV)/bin/pip install --quiet pip-audit
	$(AUDIT_VENV)/bin/pip-audit -s $(AUDIT_SERVICE) -r constraints.txt --no-deps --disable-pip \
		--progress-spinner off
	$(AUDIT_VENV)/bin/pip-audit -s $(AUDIT_SERVICE) -r infra/label-studio-constraints.txt --no-deps --disable-pip \
		--progress-spinner off

## audit-ci: `make audit` against whichever vulnerability service answers; where none does (this
## project's CI machine reaches package indexes only) it says so loudly instead of failing
audit-ci:
	@if curl -sf -m 20 -o /dev/null https://pypi.org/pypi/jinja2/2.4.1/json; then \
		$(MAKE) audit AUDIT_SERVICE=pypi; \
	elif curl -sf -m 20 -o /dev/null https://api.osv.dev/v1/query \
		-d '{"package": {"name": "jinja2", "ecosystem": "PyPI"}, "version": "2.4.1"}'; then \
		$(MAKE) audit AUDIT_SERVICE=osv; \
	else \
		echo "DEPENDENCY AUDIT NOT RUN: neither PyPI's per-release JSON API nor OSV answers from here"; \
	fi

## bench: the sampler benchmark (writes benchmarks/results/sampler.json and RESULTS.md)
bench: install
	$(BIN)/python benchmarks/sampler.py

## gpu-wheels: the pinned packages a lent GPU machine's image lacks (its Python 3.12), into .whl/, for
## benchmarks/gpu_lease.sh (docs/PERFORMANCE.md); the image has torch, transformers and accelerate
GPU_WHEELS := diffusers peft pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions
gpu-wheels: install
	rm -rf .whl
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for name in $(GPU_WHEELS); do grep -i "^$$name==" constraints.txt; done)

## constraints: re-pin every tested version after a deliberate upgrade
constraints: install
	{ head -n 2 constraints.txt; $(BIN)/pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) $(LS_VENV) $(AUDIT_VENV) .pytest_cache .mypy_cache .ruff_cache
