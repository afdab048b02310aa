"""The rollout engine on a small real GPT-2 (random weights) and the char tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from daemon.config import PolicySettings
from daemon.policy.hf import HFRolloutEngine
from daemon.policy.rollout import fill_attempts, make_rollout_engine
from daemon.policy.vllm import VLLMRolloutEngine, vllm_available
from daemon.verify.registry import get_verifier
from lab.tokenizer import build_char_tokenizer
from streams.schemas import Attempt, Trace

PROMPTS = ["1+1=", "What is 12 + 30?", "7"]  # different lengths: left padding is exercised


@pytest.fixture(scope="module")
def engine() -> Iterator[HFRolloutEngine]:
    # One thread: a tiny model gains nothing from more, and on a shared
    # 2-core box spinning threads slow every generation step tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    # Give EOS a logit of about 3 (layer-norm outputs have zero mean, so only
    # the bias term counts): some attempts stop early and lengths vary.
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[tok.eos_token_id] = 0.1
    yield HFRolloutEngine(model, tok, device="cpu", batch_size=4)
    torch.set_num_threads(threads)


def _forward_logprobs(
    engine: HFRolloutEngine, prompt: str, completion_ids: list[int]
) -> list[float]:
    ids = engine.tokenizer(prompt)["input_ids"] + completion_ids
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    start = len(ids) - len(completion_ids)
    return [float(logp[start + i - 1, t]) for i, t in enumerate(completion_ids)]


def test_sample_returns_k_consistent_attempts(engine: HFRolloutEngine) -> None:
    groups = engine.sample(PROMPTS, 5, max_new_tokens=10, seed=1)
    assert len(groups) == len(PROMPTS)
    checked = 0
    lengths = set()
    for prompt, group in zip(PROMPTS, groups, strict=True):
        assert len(group) == 5
        for a in group:
            assert 0 <= a.n_tokens <= 10
            assert len(a.token_logprobs) == len(a.token_entropies) == a.n_tokens
            assert all(lp <= 0.0 for lp in a.token_logprobs)
            assert all(h >= 0.0 for h in a.token_entropies)
            lengths.add(a.n_tokens)
            ids = engine.tokenizer(a.completion, add_special_tokens=False)["input_ids"]
            if len(ids) == a.n_tokens:  # no special token was dropped by decoding
                # The batched, left-padded log-probs equal an unpadded forward pass.
                assert a.token_logprobs == pytest.approx(
                    _forward_logprobs(engine, prompt, ids), abs=1e-4
                )
                checked += 1
    assert checked >= 5
    assert len(lengths) > 1  # EOS stops some attempts early


def test_seeded_sampling_is_reproducible(engine: HFRolloutEngine) -> None:
    a = engine.sample(PROMPTS, 3, max_new_tokens=8, seed=7)
    b = engine.sample(PROMPTS, 3, max_new_tokens=8, seed=7)
    c = engine.sample(PROMPTS, 3, max_new_tokens=8, seed=8)
    assert a == b
    assert a != c
    before = torch.random.get_rng_state()
    engine.sample(["x"], 1, seed=3)
    assert torch.equal(before, torch.random.get_rng_state())  # caller's RNG untouched


def test_bad_arguments_name_the_field(engine: HFRolloutEngine) -> None:
    with pytest.raises(ValueError, match="k:"):
        engine.sample(PROMPTS, 0)
    with pytest.raises(ValueError, match="temperature:"):
        engine.sample(PROMPTS, 2, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens:"):
        engine.sample(PROMPTS, 2, max_new_tokens=64)


def _trace(tid: str, verifier: str = "exact", attempts: int = 1, policy: str = "p1") -> Trace:
    return Trace(
        schema="tapd.trace/1",
        trace_id=tid,
        ts=0.0,
        subject="math",
        prompt="What is 1 + 1?",
        reference="2",
        verifier=verifier,
        policy_version=policy,
        attempts=[Attempt(completion="2", reward=1.0, n_tokens=1)] * attempts,
    )


def test_fill_attempts_tops_up_and_scores(engine: HFRolloutEngine) -> None:
    traces = [_trace("one"), _trace("full", attempts=4), _trace("bad", verifier="nope")]
    res = fill_attempts(traces, engine, k=4, seed=0)
    assert [t.trace_id for t in res.traces] == ["one", "full"]
    one, full = res.traces
    assert len(one.attempts) == 4
    assert one.attempts[0] == traces[0].attempts[0]  # the production attempt is kept
    exact = get_verifier("exact", {})
    for a in one.attempts[1:]:
        assert a.token_logprobs is not None and len(a.token_logprobs) == a.n_tokens
        assert a.reward == exact(a.completion, "2")
    assert full == traces[1]  # nothing to sample
    [rej] = res.rejected
    assert (rej.trace.trace_id, rej.stage, rej.field) == ("bad", "verifier", "verifier")
    assert "nope" in rej.reason
    assert fill_attempts(traces, engine, k=4, seed=0) == res  # seeded: reproducible


def test_fill_attempts_reprobes_stale_traces(engine: HFRolloutEngine) -> None:
    stale = _trace("old", attempts=3, policy="p0")
    res = fill_attempts([stale], engine, k=3, seed=0, reprobe_ids={"old"}, policy_version="p1")
    [t] = res.traces
    assert t.policy_version == "p1"
    assert len(t.attempts) == 3
    assert all(a.token_logprobs is not None for a in t.attempts)  # all re-sampled


def test_make_rollout_engine_uses_hf_on_cpu(engine: HFRolloutEngine, tmp_path: Path) -> None:
    engine.model.save_pretrained(str(tmp_path))
    engine.tokenizer.save_pretrained(str(tmp_path))
    made = make_rollout_engine(PolicySettings(model_path=tmp_path, device="cpu"))
    assert isinstance(made, HFRolloutEngine)
    made.batch_size = engine.batch_size  # batch b is sampled under seed + b
    # The same weights and seed sample the same attempts as the engine it was saved from.
    assert made.sample(PROMPTS, 2, max_new_tokens=6, seed=5) == engine.sample(
        PROMPTS, 2, max_new_tokens=6, seed=5
    )


@pytest.mark.skipif(
    not vllm_available(), reason="vLLM is not installed or no GPU is present (HF engine serves)"
)
def test_vllm_engine_samples_k_attempts() -> None:
    from lab.tiny_policy import build_tiny_policy

    path = build_tiny_policy()  # cached after the first build
    eng = VLLMRolloutEngine(str(path), gpu_memory_utilization=0.2)
    groups = eng.sample(PROMPTS, 4, max_new_tokens=8, seed=0)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(lp <= 0.0 for g in groups for a in g for lp in a.token_logprobs)
