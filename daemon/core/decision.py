"""The decision policy: scored cohorts -> a recommendation each -> what to dispatch.

Pure functions of (features, prediction, thresholds, in-flight count, rng).

Rules, first match wins (the order is the policy):

1. ``reward_trust < reward_trust_floor``            -> ``fix_verifier``
   A gameable verifier makes training reward rise while accuracy falls
   (seed 000): such a cohort is never dispatched, not even to explore.
2. ``near_duplicate_rate > redundancy_ceiling`` or
   ``template_repetition > template_ceiling``         -> ``diversify``
   (a capability slice shares one prompt template by construction, so the
   template ceiling is off, 1.0, unless a deployment's slices are broader)
3. ``group_passrate_mean >= known_pass_rate`` or
   ``frac_all_correct >= dead_end_share``            -> ``skip_known``
4. ``group_passrate_mean <= no_foothold_pass_rate`` and
   ``frac_all_wrong >= dead_end_share``              -> ``curriculum`` when
   ``target_similarity >= curriculum_similarity``, else ``skip_no_foothold``
5. ``predicted lift >= min_predicted_lift``          -> ``train``
6. otherwise                                         -> ``skip_known``: the
   predictor expects no gain, the usual reason being that the slice is
   already learned.

Selection within a window: free slots = min(top_k_per_window,
max_in_flight - in_flight). Each slot is, with probability
``exploration_share``, an exploration slot (``explore_uncertain`` with
probability ``explore_uncertain_share``, else ``explore_random``) drawn from
every cohort not yet taken except ``fix_verifier`` ones, so that labels are not
only those the predictor already likes; otherwise it takes the best remaining
``train`` cohort by predicted lift (``exploit``). In shadow mode every decision
is made and recorded, and none is dispatched.

The thresholds themselves (configuration, file, run-time overrides) are held
by the shell: :mod:`daemon.runtime.thresholds`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from daemon.config import Thresholds
from daemon.core.predictor import Prediction


@dataclass(frozen=True)
class ScoredCohort:
    cohort_id: str
    features: Mapping[str, float]
    prediction: Prediction


@dataclass(frozen=True)
class Decision:
    cohort_id: str
    recommendation: str
    reason: str
    numbers: dict[str, float]
    predicted_lift: float
    uncertainty: float
    model_version: str
    rank: int  # 1 = highest predicted lift in the window
    selection: str | None = None  # set when chosen for training
    dispatch: bool = False  # chosen and not in shadow mode


def recommend(
    features: Mapping[str, float], prediction: Prediction, t: Thresholds
) -> tuple[str, str, dict[str, float]]:
    """One cohort's recommendation, a human reason, and the numbers behind it."""

    def f(name: str) -> float:
        if name not in features:
            raise ValueError(f"features.{name}: missing (the decision policy needs it)")
        return float(features[name])

    trust = f("reward_trust")
    if trust < t.reward_trust_floor:
        return (
            "fix_verifier",
            f"reward trust {trust:.2f} is under the floor {t.reward_trust_floor:.2f}: "
            "the verifier rewards wrong answers, training would learn to game it",
            {"reward_trust": trust, "reward_trust_floor": t.reward_trust_floor},
        )
    dup, tmpl = f("near_duplicate_rate"), f("template_repetition")
    if dup > t.redundancy_ceiling or tmpl > t.template_ceiling:
        return (
            "diversify",
            f"near-duplicates {dup:.2f} (ceiling {t.redundancy_ceiling:.2f}) / template "
            f"repetition {tmpl:.2f} (ceiling {t.template_ceiling:.2f}): too little distinct signal",
            {
                "near_duplicate_rate": dup,
                "template_repetition": tmpl,
                "redundancy_ceiling": t.redundancy_ceiling,
                "template_ceiling": t.template_ceiling,
            },
        )
    pass_rate, all_correct, all_wrong = (
        f("group_passrate_mean"),
        f("frac_all_correct"),
        f("frac_all_wrong"),
    )
    if pass_rate >= t.known_pass_rate or all_correct >= t.dead_end_share:
        return (
            "skip_known",
            f"pass rate {pass_rate:.2f} / all-correct share {all_correct:.2f}: already known",
            {
                "group_passrate_mean": pass_rate,
                "frac_all_correct": all_correct,
                "known_pass_rate": t.known_pass_rate,
                "dead_end_share": t.dead_end_share,
            },
        )
    if pass_rate <= t.no_foothold_pass_rate and all_wrong >= t.dead_end_share:
        sim = f("target_similarity")
        numbers = {
            "group_passrate_mean": pass_rate,
            "frac_all_wrong": all_wrong,
            "no_foothold_pass_rate": t.no_foothold_pass_rate,
            "target_similarity": sim,
            "curriculum_similarity": t.curriculum_similarity,
        }
        if sim >= t.curriculum_similarity:
            return (
                "curriculum",
                f"pass rate {pass_rate:.2f}, all-wrong share {all_wrong:.2f}, but close to the "
                f"target (similarity {sim:.2f}): build easier steps towards it",
                numbers,
            )
        return (
            "skip_no_foothold",
            f"pass rate {pass_rate:.2f}, all-wrong share {all_wrong:.2f}: no reward signal "
            "to learn from",
            numbers,
        )
    numbers = {
        "predicted_lift": prediction.lift,
        "uncertainty": prediction.uncertainty,
        "min_predicted_lift": t.min_predicted_lift,
    }
    if prediction.lift >= t.min_predicted_lift:
        return (
            "train",
            f"predicted lift {prediction.lift:+.3f} nats (±{prediction.uncertainty:.3f}) "
            f"at or over {t.min_predicted_lift:+.3f}",
            numbers,
        )
    return (
        "skip_known",
        f"predicted lift {prediction.lift:+.3f} nats under {t.min_predicted_lift:+.3f}: "
        "nothing left to gain",
        numbers,
    )


def decide(
    cohorts: Sequence[ScoredCohort],
    thresholds: Thresholds,
    in_flight: int,
    rng: random.Random,
) -> list[Decision]:
    """A decision per cohort (in input order); the chosen ones carry a selection."""
    if in_flight < 0:
        raise ValueError(f"in_flight: must be >= 0, got {in_flight}")
    order = sorted(
        range(len(cohorts)), key=lambda i: (-cohorts[i].prediction.lift, cohorts[i].cohort_id)
    )
    rank = {i: r + 1 for r, i in enumerate(order)}
    recs = [recommend(c.features, c.prediction, thresholds) for c in cohorts]

    exploit = [i for i in order if recs[i][0] == "train"]
    explorable = [i for i in order if recs[i][0] != "fix_verifier"]
    taken: dict[int, str] = {}
    slots = max(0, min(thresholds.top_k_per_window, thresholds.max_in_flight - in_flight))
    for _ in range(slots):
        if rng.random() < thresholds.exploration_share:
            pool = [i for i in explorable if i not in taken]
            if not pool:
                continue
            if rng.random() < thresholds.explore_uncertain_share:
                pick = max(pool, key=lambda i: (cohorts[i].prediction.uncertainty, -rank[i]))
                taken[pick] = "explore_uncertain"
            else:
                taken[rng.choice(pool)] = "explore_random"
        else:
            best = next((i for i in exploit if i not in taken), None)
            if best is not None:
                taken[best] = "exploit"

    decisions = []
    for i, c in enumerate(cohorts):
        rec, reason, numbers = recs[i]
        selection = taken.get(i)
        if selection is not None and rec == "fix_verifier":
            # Rule 1 is the one that must never leak, whatever changes above.
            raise RuntimeError(f"cohort {c.cohort_id}: fix_verifier cohort was selected")
        decisions.append(
            Decision(
                cohort_id=c.cohort_id,
                recommendation=rec,
                reason=reason,
                numbers=numbers,
                predicted_lift=c.prediction.lift,
                uncertainty=c.prediction.uncertainty,
                model_version=c.prediction.model_version,
                rank=rank[i],
                selection=selection,
                dispatch=selection is not None and not thresholds.shadow_mode,
            )
        )
    return decisions
