"""A GGUF policy: dequantised once, cached as safetensors by content, loaded like any HF dir.

The file is a real GGUF written by the ``gguf`` package (a 2-layer Llama over
a byte-level vocabulary with a ChatML template, ``tiny_gguf.py`` beside this file),
loaded by transformers' own GGUF reader: nothing is mocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from daemon.config import PolicySettings
from daemon.policy.hf import HFRolloutEngine
from daemon.policy.rollout import make_rollout_engine
from daemon.policy.store import (
    GGUF_MARKER,
    format_prompt,
    gguf_cache_path,
    gguf_file,
    load_policy,
    materialize_gguf,
)

pytest.importorskip("gguf", reason="the gguf package writes the test file (pip install gguf)")

# Beside this file (the test's folder is on sys.path).
from tiny_gguf import tiny_llama, write_tiny_gguf


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return tiny_llama(seed=0)


@pytest.fixture
def gguf_path(tmp_path: Path, original: torch.nn.Module) -> Path:
    return write_tiny_gguf(tmp_path / "src" / "tiny.gguf", original)  # type: ignore[arg-type]


def _write(path: Path, model: torch.nn.Module) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tiny_gguf(path, model)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _mkdirs(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir(exist_ok=True)


def test_gguf_loads_back_the_original_weights_and_chat_template(
    tmp_path: Path, gguf_path: Path, original: torch.nn.Module
) -> None:
    cache = tmp_path / "cache"
    model, tok = load_policy(gguf_path, cache_dir=cache)
    ref = original.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:  # F32 in the file, Q/K un-permuted: exact
        assert torch.equal(got[k], ref[k]), k
    assert tok.chat_template and "<|im_start|>" in format_prompt(tok, "hi")
    assert tok.padding_side == "left" and tok.pad_token is not None
    cached = gguf_cache_path(gguf_path, cache)
    assert (cached / GGUF_MARKER).exists() and (cached / "config.json").exists()
    assert not any(p.name.endswith(".gguf") for p in cached.iterdir())
    # No half-built directory is left beside it.
    assert [p.name for p in cache.iterdir()] == [cached.name]


def test_second_load_uses_the_cache_not_the_gguf(tmp_path: Path, gguf_path: Path) -> None:
    cache = tmp_path / "cache"
    first = materialize_gguf(gguf_path, cache)
    stamp = (first / GGUF_MARKER).stat().st_mtime_ns
    # The cache is keyed by content: the same bytes under another name and
    # folder hit it; the loader never opens the GGUF again.
    moved = tmp_path / "elsewhere" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copy(gguf_path, moved)
    assert materialize_gguf(moved, cache) == first
    assert (first / GGUF_MARKER).stat().st_mtime_ns == stamp


def test_different_weights_get_their_own_cache_entry(tmp_path: Path, gguf_path: Path) -> None:
    cache = tmp_path / "cache"
    a = materialize_gguf(gguf_path, cache)
    other = _write(tmp_path / "src" / "other.gguf", tiny_llama(seed=1))
    b = materialize_gguf(other, cache)
    assert a != b
    ma, _ = load_policy(a)
    mb, _ = load_policy(b)
    assert not torch.equal(ma.lm_head.weight, mb.lm_head.weight)


def test_an_incomplete_cache_entry_is_rebuilt(tmp_path: Path, gguf_path: Path) -> None:
    cache = tmp_path / "cache"
    path = gguf_cache_path(gguf_path, cache)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")  # a crash before the marker
    assert materialize_gguf(gguf_path, cache) == path
    assert (path / GGUF_MARKER).exists()
    load_policy(path)  # a complete, loadable checkpoint now


def test_gguf_file_resolution(tmp_path: Path, gguf_path: Path) -> None:
    assert gguf_file(gguf_path) == gguf_path
    assert gguf_file(gguf_path.parent) == gguf_path  # a folder with one GGUF
    _write(tmp_path / "src" / "second.gguf", tiny_llama(seed=2))
    with pytest.raises(ValueError, match=r"policy.model_path: .*several GGUF"):
        gguf_file(gguf_path.parent)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    shutil.copy(gguf_path, hf / "x.gguf")
    assert gguf_file(hf) is None  # a HF checkpoint stays one


def test_the_rollout_engine_samples_from_a_gguf_policy(tmp_path: Path, gguf_path: Path) -> None:
    settings = PolicySettings(model_path=gguf_path, device="cpu", cache_dir=tmp_path / "cache")
    engine = make_rollout_engine(settings)
    assert isinstance(engine, HFRolloutEngine)
    [group] = engine.sample(["What is 1 + 1?"], 3, max_new_tokens=4, seed=0)
    assert len(group) == 3
    assert all(len(a.token_logprobs) == a.n_tokens for a in group)
    # The engine feeds the chat-formatted prompt: its template is applied.
    assert engine.format_prompt("q").startswith("<|im_start|>user\nq")
