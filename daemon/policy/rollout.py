"""Rollout engine: sample K attempts per prompt from the current policy.

Production traffic usually carries one attempt per prompt; the features need
a group of K (disagreement within a group is the top signal). One interface,
``RolloutEngine``, has two implementations, chosen by ``policy.rollout_engine``:
Hugging Face ``generate`` on any device (:mod:`daemon.policy.hf`) and vLLM
(:mod:`daemon.policy.vllm`). ``fill_attempts`` tops traces up to K and scores
the new attempts with each trace's verifier. This module imports no model
library: a scorer whose traffic carries its K attempts never loads one.

Token log-probs and entropies are those of the model's own next-token
distribution (temperature 1, no top-k/top-p), whatever temperature sampling
used: they measure the policy's familiarity, not the sampler's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from daemon.core.cohorting import Rejected
from streams.schemas import MAX_ATTEMPTS, Attempt, Trace

if TYPE_CHECKING:
    from daemon.config import GRPOParams, PolicySettings


@dataclass(frozen=True)
class SampledAttempt:
    completion: str
    n_tokens: int
    token_logprobs: list[float]
    token_entropies: list[float]


class RolloutEngine(Protocol):
    def sample(
        self,
        prompts: Sequence[str],
        k: int,
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[list[SampledAttempt]]:
        """``k`` attempts for each prompt, in prompt order."""
        ...


def _prompt_formatter(tokenizer: Any) -> Callable[[str], str]:
    """The policy's own prompt formatting (a chat model's template, else the raw prompt)."""
    from daemon.policy.store import format_prompt

    return lambda prompt: format_prompt(tokenizer, prompt)


def _check_args(k: int, max_new_tokens: int, temperature: float) -> None:
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not temperature > 0.0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


# name -> "module:class"; a new engine is one module plus one line here.
ENGINES: dict[str, str] = {
    "hf": "daemon.policy.hf:HFRolloutEngine",
    "vllm": "daemon.policy.vllm:VLLMRolloutEngine",
}


def make_rollout_engine(policy: PolicySettings, model_path: str | None = None) -> RolloutEngine:
    """The engine ``policy.rollout_engine`` names, on ``model_path`` (default: the base policy)."""
    import importlib

    from daemon.policy.store import load_policy, resolve_device, resolve_policy_path

    name = policy.rollout_engine
    if name not in ENGINES:
        raise ValueError(
            f"policy.rollout_engine: unknown engine {name!r} (known: {sorted(ENGINES)})"
        )
    path = model_path or (str(policy.model_path) if policy.model_path else None)
    module, attr = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    device = resolve_device(policy.device)
    if name == "vllm":
        if path is None:
            raise ValueError("policy.model_path: the vllm engine needs a model directory")
        # vLLM reads the safetensors copy: its own GGUF path is slower and partial.
        hf_dir = resolve_policy_path(path, policy.cache_dir)
        engine: RolloutEngine = cls(str(hf_dir), device=device)
        return engine
    model, tokenizer = load_policy(path, device, cache_dir=policy.cache_dir)
    engine = cls(model, tokenizer, device=device)
    return engine


@dataclass(frozen=True)
class FillResult:
    """Topped-up traces (input order, rejected ones left out) and the rejections."""

    traces: list[Trace]
    rejected: list[Rejected]


def fill_attempts(
    traces: Sequence[Trace],
    engine: RolloutEngine,
    k: int,
    seed: int | None = None,
    *,
    reprobe_ids: Collection[str] = (),
    policy_version: str | None = None,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    grpo: GRPOParams | None = None,
) -> FillResult:
    """Give every trace ``k`` attempts, sampling and scoring the missing ones.

    A trace in ``reprobe_ids`` (stale policy) has its attempts replaced by
    ``k`` fresh ones and, if given, its ``policy_version`` set to the current
    one. Attempts already carried are kept as they are. A trace whose
    verifier is unknown, refuses its arguments or fails is rejected (stage
    ``"verifier"``) rather than scored with a made-up reward.
    """
    from daemon.verify.registry import get_verifier

    if grpo is not None:  # the trainer's completion length and temperature
        max_new_tokens, temperature = grpo.max_completion_length, grpo.temperature
    if not 1 <= k <= MAX_ATTEMPTS:
        raise ValueError(f"k: must be within 1..{MAX_ATTEMPTS}, got {k}")
    rejected: dict[int, Rejected] = {}
    verifiers: dict[int, Callable[[str, str], float]] = {}
    need: dict[int, list[int]] = defaultdict(list)  # missing count -> trace indices
    for i, t in enumerate(traces):
        try:
            verifiers[i] = get_verifier(t.verifier, t.verifier_args)
        except ValueError as e:  # UnknownVerifier and bad arguments (VerifierError)
            rejected[i] = Rejected(t, "verifier", getattr(e, "field", "verifier"), str(e))
            continue
        have = 0 if t.trace_id in reprobe_ids else len(t.attempts)
        if have < k:
            need[k - have].append(i)

    sampled: dict[int, list[SampledAttempt]] = {}
    for missing, idx in sorted(need.items()):
        groups = engine.sample(
            [traces[i].prompt for i in idx],
            missing,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=None if seed is None else seed + missing,
        )
        sampled.update(zip(idx, groups, strict=True))

    out: list[Trace] = []
    for i, t in enumerate(traces):
        if i in rejected:
            continue
        if i not in sampled:
            out.append(t)
            continue
        try:
            new = [_score(s, verifiers[i], t.reference) for s in sampled[i]]
        except ValueError as e:  # e.g. a reference the verifier cannot use
            rejected[i] = Rejected(t, "verifier", getattr(e, "field", "verifier"), str(e))
            continue
        except Exception as e:  # a verifier bug must not take the scorer down
            rejected[i] = Rejected(
                t, "verifier", "verifier", f"verifier {t.verifier!r} failed: {e!r}"
            )
            continue
        reprobe = t.trace_id in reprobe_ids
        update: dict[str, Any] = {"attempts": new if reprobe else [*t.attempts, *new]}
        if reprobe and policy_version is not None:
            update["policy_version"] = policy_version
        out.append(t.model_copy(update=update))
    return FillResult(out, [rejected[i] for i in sorted(rejected)])


def _score(s: SampledAttempt, verifier: Callable[[str, str], float], reference: str) -> Attempt:
    reward = float(verifier(s.completion, reference))
    if not math.isfinite(reward):
        raise ValueError(f"reward {reward} is not finite")
    return Attempt(
        completion=s.completion,
        reward=reward,
        n_tokens=s.n_tokens,
        token_logprobs=s.token_logprobs,
        token_entropies=s.token_entropies,
    )
