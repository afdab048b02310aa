"""The reward-trust gate catches every scrambled verifier, few-symbol answer spaces included."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from daemon.config import Thresholds
from daemon.core.decision import recommend
from daemon.core.features import featurize, reward_trust, target_prompts, target_similarity
from daemon.core.predictor import Prediction
from daemon.verify.registry import register
from lab import tasks
from streams.schemas import Attempt, Trace

FLOOR = Thresholds().reward_trust_floor


def traces(cohort: Sequence[tasks.Task], key: str) -> list[Trace]:
    return [tasks.to_trace(t, policy_version="v0", key=f"{key}/{i}") for i, t in enumerate(cohort)]


@pytest.mark.parametrize("subject", tasks.SUBJECTS)
def test_no_scrambled_cohort_passes_the_floor(subject: str) -> None:
    """300 scrambled cohorts per subject; comparisons answer with one of 3 symbols.

    Before the reference probes 5 of 300 compare cohorts passed the floor.
    """
    worst = max(
        reward_trust(traces(tasks.control_cohort("scrambled", 8, seed, subject), str(seed)))
        for seed in range(300)
    )
    assert worst < FLOOR, worst


def test_a_verifier_that_ignores_the_reference_is_caught_by_construction() -> None:
    """Whatever symbols it rewards, it rewards a wrong one or rejects a right one."""

    def answers(accepted: frozenset[str]) -> None:
        name = "accepts_" + "".join(sorted(accepted)).replace("<", "lt").replace(">", "gt")
        if name not in _REGISTERED:
            _REGISTERED.add(name)
            register(name)(lambda _args, a=accepted: lambda c, _r: float(c.strip() in a))
        cohort = [
            tasks.Task(p, r, "compare", {}, name)
            for p, r in (("1?2=", "<"), ("3?2=", ">"), ("4?5=", "<"), ("2?2=", "="))
        ]
        trust = reward_trust(traces(cohort, name))
        assert trust <= 0.5, (accepted, trust)

    for accepted in ({"<"}, {">"}, {"<", ">"}, {"<", ">", "="}, set()):
        answers(frozenset(accepted))


_REGISTERED: set[str] = set()


def test_honest_and_weak_verifiers_keep_their_trust() -> None:
    for subject in tasks.SUBJECTS:
        for seed in range(20):
            for variant in ("easy", "frontier", "mixed"):
                c = traces(tasks.control_cohort(variant, 8, seed, subject), f"{variant}{seed}")
                assert reward_trust(c) >= FLOOR
            weak = traces(tasks.control_cohort("weak_verifier", 8, seed, subject), f"w{seed}")
            assert reward_trust(weak) < FLOOR


def test_scrambled_cohorts_get_fix_verifier_never_train() -> None:
    t = Thresholds()
    for seed in range(20):
        cohort = traces(tasks.control_cohort("scrambled", 8, seed, "compare"), f"s{seed}")
        cohort = [
            tr.model_copy(update={"attempts": [Attempt(completion="<", reward=1.0, n_tokens=1)]})
            for tr in cohort
        ]
        f = featurize(cohort)
        rec, _, _ = recommend(f, Prediction(1.0, 0.0, "test", "v0"), t)
        assert rec == "fix_verifier"


def test_target_similarity_uses_the_cohorts_target_items() -> None:
    probe = {"add": ["12+34=", "56+78="], "compare": ["123?456=", "999?111="]}
    prompts = ["12+35=", "51+78="]
    own = target_similarity(prompts, target_prompts("add", probe))
    other = target_similarity(prompts, probe["compare"])
    assert own == target_similarity(prompts, probe["add"]) and own > other
    # A cohort whose subject is no target is compared with every probe item.
    assert target_prompts("poetry", probe) == [*probe["add"], *probe["compare"]]
    assert target_prompts("add", ["a", "b"]) == ["a", "b"]
    cohort = [
        tasks.to_trace(tasks.Task(p, "1", "add", {}, "numeric"), policy_version="v0", key=i)
        for i, p in enumerate(prompts)
    ]
    cohort = [
        tr.model_copy(update={"attempts": [Attempt(completion="1", reward=1.0, n_tokens=1)]})
        for tr in cohort
    ]
    assert featurize(cohort, probe_prompts=probe)["target_similarity"] == pytest.approx(own)
