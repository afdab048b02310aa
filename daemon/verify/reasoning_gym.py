"""reasoning-gym's own answer scorers as tapd verifiers (optional dependency).

``reasoning_gym`` with ``{"task": "<family>"}`` scores a completion with the
family's ``score_answer`` (reasoning-gym 0.1.25: 100+ procedural task
families, each with its own scorer), so a team that trains on those families
gets the verifier they were designed with, not a re-implementation. The
reference is the family's ``answer``; a family whose scorer also reads the
item's ``metadata`` (``word_sorting``, ...) gets it through
``verifier_args.metadata``.

``extract`` chooses what part of the completion is the answer:

* ``whole`` (default): the stripped completion, as reasoning-gym scores it.
* ``answer_tag``: the last ``<answer>...</answer>`` (reasoning-gym's own
  prompt convention); no tag is no answer.
* ``last_number``: the last number in the completion that stands alone
  (not glued to letters or digits: "zq10qz" holds no number, "5th" neither):
  lenient, for chat models that answer numeric families in prose
  ("5 + 3 = 8"). Leniency is still gameable (a list of numbers ends on the
  right one by chance), so it is an explicit choice per slice, and
  ``reward_trust`` probes it like any other.

``partial_credit`` (default true: the family's scorer as designed) keeps the
scorer's fractional rewards. reasoning-gym's default ``score_answer`` gives
``len(reference) / len(answer)`` to any answer that *contains* the reference,
so "109" earns 0.67 for "10": a policy can raise its reward by padding a
number. ``reward_trust`` counts it (the padded number is one of its bad
answers), but as one bad answer of about seven, so it alone does not bring
a cohort under the default 0.80 floor. ``partial_credit: false`` rewards 1
only where the scorer gives full credit, else 0: the setting to train
numeric families on.

The package is optional (``pip install 'tapd[reasoning-gym]'``); without it
building this verifier fails with that instruction, as a ``VerifierError``
that the scorer and the trainer route to the dead-letter topic.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from daemon.verify.registry import (
    Args,
    Verifier,
    VerifierArgsError,
    VerifierError,
    _allow,
    register,
)

EXTRACTORS = ("whole", "answer_tag", "last_number")
# A number standing alone: no letter, digit, underscore or point glued to
# either end, so junk around the reference ("zq10qz") is not read as it.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?!\w)")
_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


class ReasoningGymMissing(VerifierError):
    def __init__(self) -> None:
        super().__init__(
            "verifier",
            "reasoning_gym: the reasoning-gym package is not installed "
            "(pip install 'tapd[reasoning-gym]', which pins reasoning-gym==0.1.25)",
        )


@functools.cache
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    """The family's ``score_answer`` (its dataset is built once, with default settings)."""
    try:
        import reasoning_gym
    except ImportError:
        raise ReasoningGymMissing() from None
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise VerifierArgsError(
            "verifier_args.task", f"reasoning_gym: unknown task family {task!r}"
        )
    fn: Callable[[str | None, dict[str, Any]], float] = reasoning_gym.get_score_answer_fn(task)
    return fn


def extract(completion: str, how: str) -> str | None:
    """The answer part of ``completion`` under extraction rule ``how``."""
    if how == "answer_tag":
        found = _TAG.findall(completion)
        return found[-1].strip() if found else None
    if how == "last_number":
        nums = _NUMBER.findall(completion)
        return nums[-1].replace(",", "") if nums else None
    return completion.strip()


@register("reasoning_gym")
def _reasoning_gym(args: Args) -> Verifier:
    _allow("reasoning_gym", args, {"task", "extract", "metadata", "partial_credit"})
    task = args.get("task")
    if not isinstance(task, str) or not task:
        raise VerifierArgsError(
            "verifier_args.task", "reasoning_gym: a task family name is required"
        )
    how = args.get("extract", "whole")
    if how not in EXTRACTORS:
        raise VerifierArgsError(
            "verifier_args.extract",
            f"reasoning_gym: must be one of {', '.join(EXTRACTORS)}, got {how!r}",
        )
    metadata = args.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise VerifierArgsError("verifier_args.metadata", "reasoning_gym: must be a mapping")
    partial = args.get("partial_credit", True)
    if not isinstance(partial, bool):
        raise VerifierArgsError(
            "verifier_args.partial_credit", f"reasoning_gym: must be true or false, got {partial!r}"
        )
    score = _scorer(task)

    def verify(completion: str, reference: str) -> float:
        answer = extract(completion, how)
        if not answer:
            return 0.0
        entry = {"answer": reference, "metadata": dict(metadata)}
        try:
            reward = float(score(answer, entry))
        except Exception:  # a family's scorer choking on a malformed answer: wrong, not a crash
            return 0.0
        if not math.isfinite(reward):
            return 0.0
        if not partial:
            return 1.0 if reward >= 1.0 else 0.0
        return min(max(reward, 0.0), 1.0)

    return verify
