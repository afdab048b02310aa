"""Rollout engine: sample K attempts per prompt from the current policy.

Production traffic usually carries one attempt per prompt; the features need
a group of K (disagreement within a group is the top signal). One interface,
``RolloutEngine``, has two implementations: Hugging Face ``generate`` on any
device (the CPU default, and the tiny built-in policy), and vLLM where it is
installed and a GPU is present. ``fill_attempts`` tops traces up to K and
scores the new attempts with each trace's verifier.

Token log-probs and entropies are those of the model's own next-token
distribution (temperature 1, no top-k/top-p), whatever temperature sampling
used: they measure the policy's familiarity, not the sampler's.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from daemon.cohorting import Rejected
from streams.schemas import MAX_ATTEMPTS, Attempt, Trace


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
    from daemon.policy import format_prompt

    return lambda prompt: format_prompt(tokenizer, prompt)


def _check_args(k: int, max_new_tokens: int, temperature: float) -> None:
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not temperature > 0.0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch for one block without disturbing the caller's random state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFRolloutEngine:
    """Batched sampling with ``transformers`` ``generate``.

    Rows (prompt x attempt) are sampled ``batch_size`` at a time, left-padded.
    With a ``seed``, batch ``b`` is sampled under ``seed + b``: the same
    prompts, ``k``, ``batch_size`` and seed give the same attempts.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        format_prompt: Callable[[str], str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.format_prompt = format_prompt or _prompt_formatter(tokenizer)
        self.eos_id: int | None = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id or 0)
        cfg = model.config
        self.max_positions: int | None = getattr(cfg, "n_positions", None) or getattr(
            cfg, "max_position_embeddings", None
        )

    def _encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids: list[int] = self.tokenizer(self.format_prompt(prompt))["input_ids"]
        if self.max_positions is not None:
            room = self.max_positions - max_new_tokens
            if room < 1:
                raise ValueError(
                    f"max_new_tokens: {max_new_tokens} leaves no room for a prompt "
                    f"in the model's {self.max_positions} positions"
                )
            # Keep the end of an over-long prompt: the question is usually last.
            ids = ids[-room:]
        return ids

    def sample(
        self,
        prompts: Sequence[str],
        k: int,
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[list[SampledAttempt]]:
        _check_args(k, max_new_tokens, temperature)
        encoded = [self._encode(p, max_new_tokens) for p in prompts]
        rows = [ids for ids in encoded for _ in range(k)]
        flat: list[SampledAttempt] = []
        for b, start in enumerate(range(0, len(rows), self.batch_size)):
            batch = rows[start : start + self.batch_size]
            batch_seed = None if seed is None else seed + b
            flat.extend(self._sample_batch(batch, max_new_tokens, temperature, batch_seed))
        return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]

    @torch.no_grad()
    def _sample_batch(
        self, rows: list[list[int]], max_new_tokens: int, temperature: float, seed: int | None
    ) -> list[SampledAttempt]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r) :] = 1
        with _seeded(seed, self.device):
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
        new = out.sequences[:, width:]  # (rows, steps)
        logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab), raw
        logp = torch.log_softmax(logits, dim=-1)
        token_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        results = []
        for i in range(len(rows)):
            ids = new[i].tolist()
            # The completion ends before EOS; EOS itself is not a completion token.
            n = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
            results.append(
                SampledAttempt(
                    completion=self.tokenizer.decode(ids[:n], skip_special_tokens=True),
                    n_tokens=n,
                    token_logprobs=[min(x, 0.0) for x in token_lp[i, :n].tolist()],
                    token_entropies=[max(x, 0.0) for x in entropy[i, :n].tolist()],
                )
            )
        return results


class VLLMRolloutEngine:
    """Sampling with vLLM on a GPU (``pip install tapd[gpu]``).

    vLLM returns the top-``top_logprobs`` log-probs per position, not the full
    distribution, so the entropy is the entropy of that truncated head (a
    lower bound of the true entropy; close to it for a peaked policy).
    """

    def __init__(
        self,
        model_path: str,
        *,
        top_logprobs: int = 20,
        format_prompt: Callable[[str], str] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        import vllm

        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model_path), **llm_kwargs)
        self.top_logprobs = top_logprobs
        self.format_prompt = format_prompt or _prompt_formatter(self.llm.get_tokenizer())

    def sample(
        self,
        prompts: Sequence[str],
        k: int,
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[list[SampledAttempt]]:
        _check_args(k, max_new_tokens, temperature)
        params = self._vllm.SamplingParams(
            n=k,
            temperature=temperature,
            top_k=-1,
            top_p=1.0,
            max_tokens=max_new_tokens,
            seed=seed,
            logprobs=self.top_logprobs,
        )
        outputs = self.llm.generate([self.format_prompt(p) for p in prompts], params)
        result: list[list[SampledAttempt]] = []
        for out in outputs:
            group = []
            for comp in out.outputs:
                lps: list[float] = []
                ents: list[float] = []
                for tok, pos in zip(comp.token_ids, comp.logprobs or [], strict=False):
                    lps.append(min(float(pos[tok].logprob), 0.0))
                    ents.append(
                        max(
                            -sum(math.exp(p.logprob) * p.logprob for p in pos.values()),
                            0.0,
                        )
                    )
                group.append(SampledAttempt(comp.text, len(lps), lps, ents))
            result.append(group)
        return result


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_rollout_engine(model_path: str | Path | None, device: str = "auto") -> RolloutEngine:
    """vLLM when installed, on a GPU, with a model on disk; else Hugging Face."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_path is not None and device.startswith("cuda") and vllm_available():
        return VLLMRolloutEngine(str(model_path))
    from daemon.policy import load_policy

    model, tokenizer = load_policy(None if model_path is None else Path(model_path), device)
    return HFRolloutEngine(model, tokenizer, device=device)


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
) -> FillResult:
    """Give every trace ``k`` attempts, sampling and scoring the missing ones.

    A trace in ``reprobe_ids`` (stale policy) has its attempts replaced by
    ``k`` fresh ones and, if given, its ``policy_version`` set to the current
    one. Attempts already carried are kept as they are. A trace whose
    verifier is unknown, refuses its arguments or fails is rejected (stage
    ``"verifier"``) rather than scored with a made-up reward.
    """
    from daemon.verifiers import get_verifier

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
