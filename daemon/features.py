"""Cohort features: the ordered, versioned vector the predictor sees.

The names and their order are a contract (``FEATURE_SCHEMA``); a change of
either bumps the schema version, and persisted predictor models record the
version they were trained on. Formulas are in ``docs/FEATURES.md``.
"""

from __future__ import annotations

FEATURE_SCHEMA = "tapd.features/1"

# The 23 features of the TAP appendix (seed 001), then reward integrity and
# coverage from xLift (seed 000).
LEARNABILITY = (
    "adv_std",
    "frac_nondegenerate",
    "adv_absmean",
    "frac_all_correct",
    "frac_all_wrong",
    "reward_mean",
    "reward_std",
    "pass_rate",
    "group_passrate_mean",
    "group_passrate_std",
)
RELEVANCE = ("target_similarity",)
SHAPE = ("len_mean", "len_std", "n_groups")
FAMILIARITY = (
    "mean_logprob",
    "surprisal_mean",
    "entropy_mean",
    "logprob_p10",
    "logprob_p50",
    "logprob_p90",
    "confidence_slope",
    "redundancy_mean",
    "min_logprob_mean",
)
INTEGRITY = ("reward_trust",)
COVERAGE = ("near_duplicate_rate", "template_repetition")

FEATURE_NAMES: tuple[str, ...] = (
    LEARNABILITY + RELEVANCE + SHAPE + FAMILIARITY + INTEGRITY + COVERAGE
)

# Directions the seeds establish (TAP appendix, "Monotone"): +1 lift rises
# with the feature, -1 it falls, 0 no constraint.
MONOTONE: dict[str, int] = {
    "adv_std": 1,
    "frac_nondegenerate": 1,
    "frac_all_correct": -1,
    "frac_all_wrong": -1,
}
