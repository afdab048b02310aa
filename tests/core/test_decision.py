"""The decision policy: the rule table, selection, exploration, shadow mode, thresholds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import Thresholds
from daemon.core.decision import (
    ScoredCohort,
    decide,
    recommend,
)
from daemon.core.predictor import Prediction
from daemon.core.vocabulary import RECOMMENDATIONS
from lab.checks import synthetic_features

T = Thresholds()

# A cohort that trains: trusted verifier, distinct prompts, a real foothold.
GOOD = {
    **synthetic_features(random.Random(0)),
    "reward_trust": 0.95,
    "near_duplicate_rate": 0.1,
    "template_repetition": 0.1,
    "group_passrate_mean": 0.5,
    "frac_all_correct": 0.1,
    "frac_all_wrong": 0.1,
    "target_similarity": 0.3,
}

CASES = {
    "train": ({}, 0.2),
    "fix_verifier": ({"reward_trust": 0.3}, 5.0),
    "diversify": ({"near_duplicate_rate": 0.9}, 0.2),
    "skip_known": ({"group_passrate_mean": 0.97, "frac_all_correct": 0.9}, 0.2),
    "skip_no_foothold": ({"group_passrate_mean": 0.01, "frac_all_wrong": 0.95}, 0.2),
    "curriculum": (
        {"group_passrate_mean": 0.01, "frac_all_wrong": 0.95, "target_similarity": 0.9},
        0.2,
    ),
}


def pred(lift: float, unc: float = 0.1) -> Prediction:
    return Prediction(lift, unc, "river", "v1")


def test_every_case_reaches_a_known_recommendation() -> None:
    assert set(CASES) == set(RECOMMENDATIONS)


@pytest.mark.parametrize("expected", sorted(CASES))
def test_each_recommendation_is_reached(expected: str) -> None:
    changes, lift = CASES[expected]
    rec, reason, numbers = recommend({**GOOD, **changes}, pred(lift), T)
    assert rec == expected
    assert reason and numbers


def test_below_min_lift_is_skipped_with_the_numbers() -> None:
    rec, reason, numbers = recommend(GOOD, pred(-0.3), T.replace(min_predicted_lift=0.05))
    assert rec == "skip_known" and "under" in reason
    assert numbers == {"predicted_lift": -0.3, "uncertainty": 0.1, "min_predicted_lift": 0.05}


def test_rule_order_fix_verifier_first() -> None:
    # Every other rule would match too; the weak verifier wins.
    worst = {**GOOD, "reward_trust": 0.1, "near_duplicate_rate": 0.9, "group_passrate_mean": 0.99}
    assert recommend(worst, pred(9.0), T)[0] == "fix_verifier"


def _cohorts(specs: list[tuple[str, float, float]]) -> list[ScoredCohort]:
    return [
        ScoredCohort(f"c{i}", {**GOOD, **CASES[kind][0]}, pred(lift, unc))
        for i, (kind, lift, unc) in enumerate(specs)
    ]


def test_exploit_takes_top_k_bounded_by_free_slots() -> None:
    cohorts = _cohorts([("train", v / 10, 0.1) for v in range(8)])
    t = T.replace(exploration_share=0.0, top_k_per_window=3, max_in_flight=4)
    chosen = [d for d in decide(cohorts, t, in_flight=2, rng=random.Random(0)) if d.selection]
    assert [d.cohort_id for d in chosen] == ["c6", "c7"]  # 2 free slots, best lifts
    assert all(d.selection == "exploit" and d.dispatch for d in chosen)
    chosen = [d for d in decide(cohorts, t, in_flight=0, rng=random.Random(0)) if d.selection]
    assert sorted(d.cohort_id for d in chosen) == ["c5", "c6", "c7"]
    assert not any(d.selection for d in decide(cohorts, t, in_flight=4, rng=random.Random(0)))


def test_exploration_reaches_cohorts_the_predictor_would_skip() -> None:
    cohorts = _cohorts(
        [
            ("skip_known", 0.0, 0.1),
            ("skip_no_foothold", 0.0, 0.9),
            ("fix_verifier", 9.0, 9.0),
            ("train", 0.5, 0.1),
        ]
    )
    t = T.replace(exploration_share=1.0, explore_uncertain_share=1.0, top_k_per_window=1)
    (d,) = [d for d in decide(cohorts, t, 0, random.Random(0)) if d.selection]
    # The fix_verifier cohort is the most uncertain, and still not taken.
    assert (d.cohort_id, d.selection) == ("c1", "explore_uncertain")
    t = t.replace(explore_uncertain_share=0.0, top_k_per_window=3, max_in_flight=10)
    picked = {d.recommendation for d in decide(cohorts, t, 0, random.Random(1)) if d.selection}
    assert picked == {"skip_known", "skip_no_foothold", "train"}


def test_shadow_mode_selects_but_never_dispatches() -> None:
    cohorts = _cohorts([("train", 0.3, 0.1), ("train", 0.2, 0.1)])
    ds = decide(cohorts, T.replace(shadow_mode=True), 0, random.Random(0))
    assert any(d.selection for d in ds) and not any(d.dispatch for d in ds)


def test_same_seed_same_decisions() -> None:
    rng = random.Random(3)
    kinds = sorted(CASES)
    cohorts = _cohorts([(rng.choice(kinds), rng.random(), rng.random()) for _ in range(30)])
    t = T.replace(exploration_share=0.5, top_k_per_window=10, max_in_flight=10)
    assert decide(cohorts, t, 0, random.Random(9)) == decide(cohorts, t, 0, random.Random(9))


thresholds_st = st.builds(
    Thresholds,
    min_predicted_lift=st.floats(-1.0, 1.0),
    top_k_per_window=st.integers(1, 20),
    max_in_flight=st.integers(1, 20),
    exploration_share=st.floats(0.0, 1.0),
    explore_uncertain_share=st.floats(0.0, 1.0),
    reward_trust_floor=st.floats(0.0, 1.0),
    redundancy_ceiling=st.floats(0.0, 1.0),
    shadow_mode=st.booleans(),
)
cohort_st = st.tuples(
    st.floats(0.0, 1.0),  # reward_trust
    st.floats(-10.0, 10.0),  # predicted lift
    st.floats(0.0, 10.0),  # uncertainty
    st.floats(0.0, 1.0),  # pass rate
)


@settings(max_examples=200, deadline=None)
@given(
    t=thresholds_st,
    specs=st.lists(cohort_st, min_size=1, max_size=25),
    in_flight=st.integers(0, 25),
    seed=st.integers(0, 2**16),
)
def test_weak_verifier_is_never_dispatched(t, specs, in_flight, seed) -> None:
    cohorts = [
        ScoredCohort(
            f"c{i}",
            {**GOOD, "reward_trust": trust, "group_passrate_mean": pr},
            Prediction(lift, unc, "lightgbm", "v3"),
        )
        for i, (trust, lift, unc, pr) in enumerate(specs)
    ]
    ds = decide(cohorts, t, in_flight, random.Random(seed))
    assert [d.cohort_id for d in ds] == [c.cohort_id for c in cohorts]
    for c, d in zip(cohorts, ds, strict=True):
        if c.features["reward_trust"] < t.reward_trust_floor:
            assert d.recommendation == "fix_verifier"
            assert d.selection is None and not d.dispatch
    chosen = [d for d in ds if d.selection]
    assert len(chosen) <= max(0, min(t.top_k_per_window, t.max_in_flight - in_flight))
    assert all(d.recommendation == "train" for d in chosen if d.selection == "exploit")
    if t.shadow_mode:
        assert not any(d.dispatch for d in ds)


def test_a_shared_template_alone_does_not_diversify_by_default() -> None:
    # A capability slice repeats one template by construction (1 - 1/G).
    sliced = {**GOOD, "template_repetition": 0.875, "near_duplicate_rate": 0.0}
    assert recommend(sliced, pred(0.5), T)[0] == "train"
    strict = T.replace(template_ceiling=0.5)
    assert recommend(sliced, pred(0.5), strict)[0] == "diversify"
    assert recommend({**sliced, "near_duplicate_rate": 0.9}, pred(0.5), T)[0] == "diversify"
