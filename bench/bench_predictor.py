"""Predictor latency: score one cohort, learn one label, refit LightGBM.

Prints p50/p99 per stage and each stage's ratio to the heuristic baseline
measured in the same run, then the LightGBM refit time on 10k labels (the
whole background job: candidate fit, held-out score, refit on all labels).

    python bench/bench_predictor.py [--labels 10000] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np

from daemon.core.predictor import (
    AdvStdHeuristic,
    LightGBMStage,
    PredictorStage,
    RiverStage,
    feature_vector,
    run_refit,
)
from lab.checks import synthetic_stream


def _percentiles(samples: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return qs[49], qs[98]


def _time_each(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2_000)
    args = ap.parse_args()

    stream = synthetic_stream(0)
    data = [next(stream) for _ in range(args.labels)]
    X = np.asarray([feature_vector(x) for x, _ in data])
    y = np.asarray([v for _, v in data])
    warm = data[:500]

    river = RiverStage()
    for x, v in warm:
        river.learn(x, v)
    stages: dict[str, PredictorStage] = {
        "heuristic": AdvStdHeuristic(),
        "river": river,
        "lightgbm": LightGBMStage.fit(X[:500], y[:500]),
    }
    probe = [x for x, _ in data[500 : 500 + args.repeats]]

    rows = []
    labelled = data[500 : 500 + args.repeats]
    for name, stage in stages.items():
        features = iter(probe)
        labels = iter(labelled)

        def score(s: PredictorStage = stage, it: Iterator[dict[str, float]] = features) -> object:
            return s.predict(next(it))

        def learn(
            s: PredictorStage = stage, it: Iterator[tuple[dict[str, float], float]] = labels
        ) -> None:
            s.learn(*next(it))

        rows.append(
            (
                name,
                *_percentiles(_time_each(score, len(probe))),
                *_percentiles(_time_each(learn, len(labelled))),
            )
        )

    base_score, base_learn = rows[0][1], rows[0][3]
    print(
        f"{'stage':<10} {'score p50':>10} {'score p99':>10} {'x heur':>7} "
        f"{'learn p50':>10} {'learn p99':>10} {'x heur':>7}   (microseconds)"
    )
    for name, s50, s99, l50, l99 in rows:
        print(
            f"{name:<10} {s50 * 1e6:10.1f} {s99 * 1e6:10.1f} {s50 / base_score:7.1f} "
            f"{l50 * 1e6:10.1f} {l99 * 1e6:10.1f} {l50 / base_learn:7.1f}"
        )

    served = np.zeros_like(y)  # a served model that knew nothing: the refit is promoted
    t0 = time.perf_counter()
    result = run_refit(X, y, served, holdout_fraction=0.25, seed=0, model_version="v2")
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    LightGBMStage.fit(X, y)
    one_fit = time.perf_counter() - t0
    print(
        f"lightgbm refit on {len(y)} labels: {total:.2f} s (one fit {one_fit:.2f} s, "
        f"{one_fit / base_score:.0f}x one heuristic score); promoted={result.promoted} "
        f"held-out spearman {result.candidate_score:.3f}"
    )


if __name__ == "__main__":
    main()
