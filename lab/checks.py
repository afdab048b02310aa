"""The predictor-stage contract as a reusable check suite (River's ``check_estimator``).

``check_stage(make)`` runs every check over stages built by ``make`` (a
factory, so that checks start from a fresh scorer and can compare two).
Each check raises ``AssertionError`` saying what broke. Also here: a synthetic
cohort-feature generator with realistic ranges and a known lift function,
shared by the tests and the benchmark.
"""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Callable, Iterator, Mapping

from daemon.core.features import FeatureError
from daemon.core.predictor import BATCH_KINDS, Prediction, PredictorStage


def synthetic_features(rng: random.Random) -> dict[str, float]:
    """One cohort's features, drawn from the ranges real cohorts show."""
    n_groups = rng.randint(2, 8)
    p = rng.random()
    frac_all_correct = max(0.0, min(1.0, p**3 + rng.uniform(-0.05, 0.05)))
    frac_all_wrong = max(0.0, min(1.0 - frac_all_correct, (1 - p) ** 3 + rng.uniform(-0.05, 0.05)))
    nondeg = 1.0 - frac_all_correct - frac_all_wrong
    adv_std = nondeg * rng.uniform(0.3, 0.5)
    lp50 = rng.uniform(-2.0, 0.0)
    # Drawn from no new random number: a stream's other features stay as they were.
    answer_tokens = 1.0 + 3.0 * (1.0 - p)
    return {
        "adv_std": adv_std,
        "frac_nondegenerate": nondeg,
        "adv_absmean": adv_std * rng.uniform(0.7, 0.9),
        "frac_all_correct": frac_all_correct,
        "frac_all_wrong": frac_all_wrong,
        "reward_mean": p,
        "reward_std": math.sqrt(p * (1 - p)),
        "pass_rate": p,
        "group_passrate_mean": p,
        "group_passrate_std": rng.uniform(0.0, 0.4),
        "pass_var_per_token": nondeg * p * (1.0 - p) / answer_tokens,
        "target_similarity": rng.random(),
        # Not measured (traces carrying their own attempts, no policy at hand).
        "update_alignment": 0.0,
        "len_mean": rng.uniform(20.0, 400.0),
        "len_std": rng.uniform(0.0, 100.0),
        "n_groups": float(n_groups),
        "mean_logprob": lp50 - rng.uniform(0.0, 1.0),
        "surprisal_mean": -lp50 + rng.uniform(0.0, 1.0),
        "entropy_mean": rng.uniform(0.0, 3.0),
        "logprob_p10": lp50 - rng.uniform(1.0, 6.0),
        "logprob_p50": lp50,
        "logprob_p90": rng.uniform(-0.5, 0.0),
        "confidence_slope": rng.uniform(-1.0, 1.0),
        "redundancy_mean": rng.random(),
        "min_logprob_mean": rng.uniform(-15.0, -3.0),
        "reward_trust": rng.random(),
        "near_duplicate_rate": rng.uniform(0.0, 0.6),
        "template_repetition": rng.uniform(0.0, 0.6),
    }


def synthetic_lift(features: Mapping[str, float], rng: random.Random, noise: float = 0.03) -> float:
    """The known lift function of the tests: disagreement helps, all-wrong hurts."""
    return 0.8 * features["adv_std"] - 0.3 * features["frac_all_wrong"] + rng.gauss(0.0, noise)


def synthetic_stream(seed: int, noise: float = 0.03) -> Iterator[tuple[dict[str, float], float]]:
    rng = random.Random(seed)
    while True:
        x = synthetic_features(rng)
        yield x, synthetic_lift(x, rng, noise)


# --- the checks ---------------------------------------------------------------------


def check_prediction_shape(make: Callable[[], PredictorStage]) -> None:
    s = make()
    x = synthetic_features(random.Random(1))
    p = s.predict(x)
    assert isinstance(p, Prediction), f"predict returned {type(p).__name__}, not Prediction"
    assert math.isfinite(p.lift), f"lift not finite: {p.lift}"
    assert math.isfinite(p.uncertainty) and p.uncertainty >= 0, f"bad uncertainty {p.uncertainty}"
    assert p.stage in ("heuristic", "river", *BATCH_KINDS), f"unknown stage {p.stage!r}"
    assert p.model_version.startswith("v") and p.model_version[1:].isdigit(), (
        f"model_version {p.model_version!r} is not v<integer>"
    )


def check_predict_is_pure(make: Callable[[], PredictorStage]) -> None:
    s = make()
    x = synthetic_features(random.Random(2))
    before = dict(x)
    a, b = s.predict(x), s.predict(x)
    assert a == b, f"predict changed state: {a} then {b}"
    assert x == before, "predict mutated its input"


def check_learn_keeps_input(make: Callable[[], PredictorStage]) -> None:
    s = make()
    x = synthetic_features(random.Random(3))
    before = dict(x)
    s.learn(x, 0.1)
    assert x == before, "learn mutated its input"


def check_bad_features(make: Callable[[], PredictorStage]) -> None:
    s = make()
    x = synthetic_features(random.Random(4))
    for name, bad, reason in (
        ("adv_std", None, "missing"),
        ("frac_all_wrong", math.nan, "not finite"),
        ("reward_trust", "0.5", "not a number"),
    ):
        y = dict(x)
        if bad is None:
            del y[name]
        else:
            y[name] = bad  # type: ignore[assignment]
        for call in (lambda y=y: s.predict(y), lambda y=y: s.learn(y, 0.1)):
            try:
                call()
            except FeatureError as exc:
                assert exc.feature == name and reason in str(exc), f"unclear error: {exc}"
            else:
                raise AssertionError(f"{name}={bad!r} was accepted")
    for bad_y in (math.nan, math.inf):
        try:
            s.learn(x, bad_y)
        except ValueError as exc:
            assert "realized_lift" in str(exc), f"unclear error: {exc}"
        else:
            raise AssertionError(f"realized_lift={bad_y} was accepted")


def check_extra_features_ignored(make: Callable[[], PredictorStage]) -> None:
    s = make()
    x = synthetic_features(random.Random(5))
    assert s.predict({**x, "from_a_newer_schema": 1.0}) == s.predict(x)


def check_deterministic(make: Callable[[], PredictorStage]) -> None:
    a, b = make(), make()
    stream = synthetic_stream(6)
    for _ in range(30):
        x, y = next(stream)
        a.learn(x, y)
        b.learn(x, y)
    probe = [next(stream)[0] for _ in range(10)]
    assert [a.predict(x) for x in probe] == [b.predict(x) for x in probe], (
        "two scorers fed the same labels disagree"
    )


def check_pickle_roundtrip(make: Callable[[], PredictorStage]) -> None:
    s = make()
    stream = synthetic_stream(7)
    for _ in range(20):
        s.learn(*next(stream))
    t = pickle.loads(pickle.dumps(s))
    probe = [next(stream)[0] for _ in range(10)]
    assert [s.predict(x) for x in probe] == [t.predict(x) for x in probe], (
        "a pickled copy predicts differently"
    )


def check_ranks_adv_std(make: Callable[[], PredictorStage]) -> None:
    """With no contrary evidence, more disagreement must never predict less lift."""
    s = make()
    x = synthetic_features(random.Random(8))
    lo = {**x, "adv_std": 0.05, "frac_nondegenerate": 0.2}
    hi = {**x, "adv_std": 0.4, "frac_nondegenerate": 0.9}
    assert s.predict(hi).lift >= s.predict(lo).lift, "higher adv_std predicted lower lift"


ALL_CHECKS: tuple[Callable[[Callable[[], PredictorStage]], None], ...] = (
    check_prediction_shape,
    check_predict_is_pure,
    check_learn_keeps_input,
    check_bad_features,
    check_extra_features_ignored,
    check_deterministic,
    check_pickle_roundtrip,
    check_ranks_adv_std,
)


def check_stage(make: Callable[[], PredictorStage]) -> None:
    """Run every contract check over scorers from ``make``."""
    for check in ALL_CHECKS:
        check(make)
