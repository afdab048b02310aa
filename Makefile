# Two entry points for a newcomer: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test demo test test-fast lint typecheck eval bench clean

setup:
	./scripts/setup.sh

setup-test:
	WITH_TEST_DEPS=1 ./scripts/setup.sh

# The main job on its embedded default: no broker, no GPU.
demo: setup
	$(VENV)/bin/tapd demo

# Everything CI checks.
test: setup-test
	$(VENV)/bin/ruff check daemon streams lab tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check daemon streams lab tests bench
	$(VENV)/bin/ruff format --check daemon streams lab tests bench
	$(VENV)/bin/lint-imports

typecheck:
	$(VENV)/bin/mypy

eval: setup
	$(VENV)/bin/tapd eval

clean:
	rm -rf var out .pytest_cache .mypy_cache .ruff_cache
