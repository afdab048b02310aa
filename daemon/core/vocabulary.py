"""The bounded words tapd's decisions and stages are made of.

Shared by the decision policy, the metrics (as label values), the schemas'
readers and the docs, so that a recommendation or a selection has one name
everywhere. Kept apart from both so that importing the metric catalog does
not import the predictor's libraries.
"""

from __future__ import annotations

RECOMMENDATIONS = (
    "train",
    "skip_known",
    "skip_no_foothold",
    "fix_verifier",
    "diversify",
    "curriculum",
)
SELECTIONS = ("exploit", "explore_random", "explore_uncertain")

# Stages a trace or cohort passes through (metrics labels, dead-letter stage).
PIPELINE_STAGES = (
    "decode",
    "cohorting",
    "verifier",
    "rollout",
    "features",
    "predict",
    "decision",
    "dispatch",
    "lift",
    # A failure nobody foresaw (a bug): still a dead letter and a metric.
    "internal",
)
# The scorer loop's own steps around the pipeline (processing-time metric
# only, never a dead letter): reading every input topic, the batch's
# transaction (state, offsets, owed messages, labels), and the offset commits.
# With the pipeline's stages and dispatch they account for a loop's wall time.
SERVICE_STAGES = ("poll", "persist", "commit")
# The predictor's stages, in the order the router hands over between them.
PREDICTOR_STAGES = ("heuristic", "river", "lightgbm")
# Stages a dead letter can name: the pipeline's, plus "internal" for a
# failure no stage foresaw (still a dead letter, never a crash).
DEAD_LETTER_STAGES = (*PIPELINE_STAGES, "internal")
# Why a cohort closed (daemon.core.cohorting.CloseCause).
CLOSE_CAUSES = ("size", "age", "evicted", "flush")
# Why an in-flight dispatch was freed without a lift.
RELEASE_CAUSES = ("rejected", "expired")
# Why a partition state record was written (daemon/service/scorer.py ``_states``).
STATE_RECORD_CAUSES = ("changed", "interval", "handback")
# A predictor refit's outcome.
REFIT_OUTCOMES = ("promoted", "rejected", "failed")
# What the trainer did with a dispatched cohort.
TRAINER_OUTCOMES = ("trained", "duplicate", "rolled_back", "failed")
# Training reward measured before and after a cohort's GRPO steps.
REWARD_PHASES = ("before", "after")
# Why a trained cohort's lift has no target part (its label falls back to the
# whole probe): the probe names no target for its subject, or the policy has
# a foothold on none of its target's items.
NO_TARGET_REASONS = ("no_target", "no_foothold")
# An admin API request's outcome.
ADMIN_OUTCOMES = ("ok", "noop", "unauthorized", "forbidden", "invalid", "too_large")
# Where a threshold change came from.
THRESHOLD_SOURCES = ("admin", "file", "signal", "expired")
