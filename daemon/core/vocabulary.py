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
# The predictor's stages, in the order the router hands over between them.
PREDICTOR_STAGES = ("heuristic", "river", "lightgbm")
