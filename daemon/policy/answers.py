"""Probe answers in the policy's own words (``ProbeItem.answer``).

The lift is the drop in the NLL of a probe item's answer, and an item counts
for its target only where the policy has a foothold on that answer (it would
write it with probability >= 1/64: ``daemon.trainer.probe``). A bare
reference ("5") is not what a chat model writes ("4 + 1 equals 5."): for
SmolLM2-135M-Instruct on reasoning-gym no bare reference comes within the
foothold, so every target's lift and ``update_alignment`` would be empty.

:func:`own_answers` samples the policy on each item, keeps the attempts the
item's verifier accepts against its reference and that end (an answer cut
off at the token limit is not one the policy gives), and takes the most
probable of them: the policy's own words for a right answer. It samples
twice: at the sampling temperature, which finds a right answer where the
policy's likeliest words are wrong, and at a low one, which finds its
likeliest phrasing where they are right. A sentence drawn at temperature 1
is rarely the likeliest way to say it, and the foothold asks for the whole
answer's probability (docs/REAL_MODEL.md gives the counts on SmolLM2). The
probability compared is always the policy's
own (temperature 1), whichever temperature drew the attempt. An item with no
such attempt keeps what it had: the policy has no foothold there, which is
what the probe should then say. Run it once per probe, on the policy the
lift is measured from (``tapd probe answers``); the answers are then fixed,
as the probe's items are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.policy.rollout import RolloutEngine
from daemon.verify.registry import get_verifier
from streams.probes import ProbeItem

# A completion scoring at least this is a right answer (the probe's accuracy rule).
CORRECT_AT = 0.5
# The second draw: near the policy's likeliest phrasing, still varied enough
# that 8 draws are not 8 copies of one wrong greedy answer.
LOW_TEMPERATURE = 0.3
LOW_TEMPERATURE_ATTEMPTS = 8


def _right(verify: Callable[[str, str], float], completion: str, reference: str) -> bool:
    """The verifier's judgement; one that fails on an attempt rejects that attempt only."""
    try:
        return float(verify(completion, reference)) >= CORRECT_AT
    except Exception:  # a policy's attempt is untrusted text: any failure is "not right"
        return False


@dataclass(frozen=True)
class AnswerReport:
    items: int
    answered: int  # items given an answer from the policy's own attempts
    attempts: int  # per item, at the sampling temperature
    low_temperature_attempts: int  # per item, at the low temperature


def own_answers(
    items: Sequence[ProbeItem],
    engine: RolloutEngine,
    attempts: int = 16,
    seed: int = 0,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    low_temperature_attempts: int = LOW_TEMPERATURE_ATTEMPTS,
    low_temperature: float = LOW_TEMPERATURE,
) -> tuple[list[ProbeItem], AnswerReport]:
    """Each item with ``answer`` set to the policy's most probable right, finished attempt.

    ``attempts`` draws per item at ``temperature`` and ``low_temperature_attempts``
    (0: none) at ``low_temperature``, one pool of candidates.
    Items whose attempts are all wrong or unfinished are returned unchanged.
    A verifier that cannot be built for an item (unknown name, refused
    arguments) raises with the item's index: a probe file is the platform's
    own, and a broken one should be fixed, not half-answered.
    """
    if attempts < 1:
        raise ValueError(f"attempts: must be >= 1, got {attempts}")
    if low_temperature_attempts < 0:
        raise ValueError(f"low_temperature_attempts: must be >= 0, got {low_temperature_attempts}")
    if not items:
        return [], AnswerReport(0, 0, attempts, low_temperature_attempts)
    verifiers = []
    for i, it in enumerate(items):
        try:
            verifiers.append(get_verifier(it.verifier, dict(it.verifier_args)))
        except ValueError as e:
            raise ValueError(f"items[{i}].verifier: {e}") from e
    prompts = [it.prompt for it in items]
    sampled = engine.sample(
        prompts, attempts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    if low_temperature_attempts:
        low = engine.sample(
            prompts,
            low_temperature_attempts,
            max_new_tokens=max_new_tokens,
            temperature=low_temperature,
            seed=seed,
        )
        sampled = [a + b for a, b in zip(sampled, low, strict=True)]
    out: list[ProbeItem] = []
    answered = 0
    for it, verify, group in zip(items, verifiers, sampled, strict=True):
        right = [
            a
            for a in group
            if a.completion.strip()
            and a.n_tokens < max_new_tokens
            and _right(verify, a.completion, it.reference)
        ]
        if not right:
            out.append(it)
            continue
        # The policy's most probable right answer; ties to the shorter.
        best = max(right, key=lambda a: (sum(a.token_logprobs), -a.n_tokens))
        out.append(ProbeItem.model_validate({**it.model_dump(), "answer": best.completion}))
        answered += 1
    return out, AnswerReport(len(items), answered, attempts, low_temperature_attempts)
