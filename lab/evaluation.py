"""The statistics of the evaluation benchmark (SPEC part 11), pure and I/O-free.

Input: a table of cohorts, each with its features, subject, control variant
and the lift measured by probe-and-revert GRPO under several seeds. Output:
the numbers the seeds report, each with a percentile-bootstrap confidence
interval over cohorts (fixed seed, so a rerun prints the same table).

Definitions (the ones ``docs/RESULTS.md`` quotes):

* **actual lift** of a cohort: the mean of its per-seed NLL-lifts.
* **pairwise accuracy**: among cohort pairs whose actual lifts differ, the
  share the score orders the same way; a tied score counts one half.
* **top-q selection gain** of a score: ``S`` = the expected mean actual lift of
  the ``k = ceil(q * n)`` cohorts with the highest score, ties at the cut
  broken uniformly at random (computed exactly, not sampled); ``R`` = the
  mean actual lift of all cohorts, which is what a random pick of ``k``
  gets in expectation. Gain = ``(S - R) / |R|`` ("+68 % over random"), and
  the absolute ``S - R`` in nats alongside, because the ratio is unstable
  when ``R`` is near zero.
* **baselines** users run today, each a single-signal score: ``adv_std``;
  ``frac_nondegenerate``; **DAPO filter** (drop cohorts in which every prompt
  group is all-correct or all-wrong, pick at random among the rest: score =
  1 if ``frac_nondegenerate > 0`` else 0, random tie-break); **pass-rate
  middle** ``p(1-p)`` with ``p = pass_rate``.
* **oracle** (seed cross-fit): rank by the mean lift of all seeds but one,
  score the pick on the held-out seed's lift, average over held-out seeds.
  It is the best a ranking can do when the label carries this much seed
  noise; with noise-free labels it equals the perfect ranking.
* **compute-savings curve**: for training only the top ``x`` of cohorts by
  a score, the total lift of the selected cohorts (lifts taken as additive);
  as a share of the train-on-everything total when that total is positive.
  A share above ``x`` means the score saves compute; above 1 means the
  dropped cohorts were harmful.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from daemon.core.ranking import pairwise_accuracy, spearman

Array = NDArray[np.float64]

# fit_predict(train_features, train_lifts, test_features) -> predicted lifts.
FitPredict = Callable[
    [Sequence[Mapping[str, float]], Sequence[float], Sequence[Mapping[str, float]]], Sequence[float]
]

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
TOP_FRACTION = 0.10
BASELINES = ("adv_std", "frac_nondegenerate", "dapo_filter", "pass_rate_middle")


@dataclass(frozen=True, slots=True)
class CohortResult:
    """One row of the battery: what was scored before training, and what training did."""

    cohort_id: str
    subject: str
    variant: str
    features: Mapping[str, float]
    lifts: tuple[float, ...]  # NLL-lift per seed, nats (positive = the probe got easier)
    accuracy_lifts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.lifts:
            raise ValueError(f"lifts: cohort {self.cohort_id} has no measured seed")
        if not all(math.isfinite(x) for x in self.lifts):
            raise ValueError(f"lifts: cohort {self.cohort_id} has a non-finite lift {self.lifts}")

    @property
    def lift(self) -> float:
        return float(np.mean(self.lifts))


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    lo: float
    hi: float

    def fmt(self, digits: int = 2, percent: bool = False) -> str:
        if percent:
            return f"{self.value * 100:+.{max(digits - 2, 0)}f} % [{self.lo * 100:+.0f}, {self.hi * 100:+.0f}]"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


@dataclass(frozen=True, slots=True)
class Gain:
    """Top-q selection against random, on one label vector."""

    selected: float  # expected mean lift of the selected cohorts
    random: float  # mean lift of all cohorts
    fraction: float

    @property
    def absolute(self) -> float:
        return self.selected - self.random

    @property
    def relative(self) -> float:
        if self.random == 0.0:
            return math.copysign(math.inf, self.absolute) if self.absolute else 0.0
        return self.absolute / abs(self.random)


# ---------------------------------------------------------------- primitives


def _as_array(x: ArrayLike) -> Array:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-d vector, got shape {a.shape}")
    return a


def actual_lifts(table: Sequence[CohortResult]) -> Array:
    return np.array([c.lift for c in table], dtype=np.float64)


def seed_matrix(table: Sequence[CohortResult]) -> Array:
    """Lifts as cohorts x seeds; every cohort must have the same seed count."""
    counts = {len(c.lifts) for c in table}
    if len(counts) != 1:
        raise ValueError(f"lifts: cohorts have different seed counts {sorted(counts)}")
    return np.array([c.lifts for c in table], dtype=np.float64)


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    a, b = _as_array(x), _as_array(y)
    if len(a) < 2 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def top_k(n: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: must be in (0, 1], got {fraction}")
    # The small epsilon keeps 0.3 * 10 from rounding up to 4.
    return max(1, math.ceil(fraction * n - 1e-9))


def top_mean(score: ArrayLike, values: ArrayLike, fraction: float) -> float:
    """Expected mean of ``values`` over the top ``fraction`` by ``score``, ties broken at random."""
    return top_sum(score, values, fraction) / top_k(len(_as_array(values)), fraction)


def top_sum(score: ArrayLike, values: ArrayLike, fraction: float) -> float:
    """Expected sum of ``values`` over the top ``fraction`` by ``score``, ties broken at random."""
    s, v = _as_array(score), _as_array(values)
    if len(s) != len(v) or len(s) == 0:
        raise ValueError(f"score/values: lengths {len(s)} and {len(v)} must match and be > 0")
    k = top_k(len(s), fraction)
    cut = np.sort(s)[::-1][k - 1]
    above = s > cut
    tied = s == cut
    # Every cohort tied at the cut is taken with the same probability.
    share = (k - int(above.sum())) / int(tied.sum())
    return float(v[above].sum() + share * v[tied].sum())


def selection_gain(score: ArrayLike, values: ArrayLike, fraction: float = TOP_FRACTION) -> Gain:
    v = _as_array(values)
    return Gain(top_mean(score, v, fraction), float(v.mean()), fraction)


def bootstrap(
    statistic: Callable[..., float],
    *arrays: ArrayLike,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Estimate:
    """Statistic on the data, with a percentile-bootstrap CI over rows (cohorts)."""
    cols = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError("bootstrap: arrays must have the same number of rows")
    value = statistic(*cols)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        d = statistic(*(c[idx] for c in cols))
        if math.isfinite(d):
            draws.append(d)
    if not draws:
        return Estimate(value, math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return Estimate(float(value), float(lo), float(hi))


def t_interval(samples: ArrayLike, level: float = DEFAULT_LEVEL) -> Estimate:
    """Mean with a Student-t CI: for a handful of seeds, where a bootstrap is meaningless."""
    x = _as_array(samples)
    m = float(x.mean())
    if len(x) < 2:
        return Estimate(m, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + level / 2.0, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Estimate(m, m - half, m + half)


# ----------------------------------------------------------- cross-validation


def loo_predictions(table: Sequence[CohortResult], fit_predict: FitPredict) -> Array:
    """Leave-one-cohort-out: each cohort predicted by a model fit on the other n-1 labels."""
    feats = [c.features for c in table]
    lifts = [c.lift for c in table]
    out = np.empty(len(table), dtype=np.float64)
    for i in range(len(table)):
        train_x = feats[:i] + feats[i + 1 :]
        train_y = lifts[:i] + lifts[i + 1 :]
        (out[i],) = fit_predict(train_x, train_y, [feats[i]])
    return out


@dataclass(frozen=True, slots=True)
class SubjectResult:
    subject: str
    n: int
    spearman: float
    gain: Gain


def leave_one_subject_out(
    table: Sequence[CohortResult], fit_predict: FitPredict, fraction: float = TOP_FRACTION
) -> tuple[list[SubjectResult], Array]:
    """Fit on the other subjects, predict the held-out one; per-subject results and all predictions."""
    subjects = sorted({c.subject for c in table})
    if len(subjects) < 2:
        raise ValueError(f"subject: leave-one-subject-out needs >= 2 subjects, got {subjects}")
    preds = np.empty(len(table), dtype=np.float64)
    results = []
    for s in subjects:
        test = [i for i, c in enumerate(table) if c.subject == s]
        train = [i for i, c in enumerate(table) if c.subject != s]
        p = np.asarray(
            fit_predict(
                [table[i].features for i in train],
                [table[i].lift for i in train],
                [table[i].features for i in test],
            ),
            dtype=np.float64,
        )
        preds[test] = p
        actual = np.array([table[i].lift for i in test])
        results.append(
            SubjectResult(s, len(test), spearman(p, actual), selection_gain(p, actual, fraction))
        )
    return results, preds


# ------------------------------------------------------------ scores compared


def gated_scores(
    table: Sequence[CohortResult], trainable: ArrayLike, fit_predict: FitPredict
) -> Array:
    """What tapd ranks by: leave-one-out predictions among the cohorts it would train.

    The decision policy never trains a cohort whose verifier is under the
    reward-trust floor, so in production the predictor never learns from
    such a cohort either; it is fit and scored here on the trainable cohorts
    alone, and the gated ones rank last.
    """
    mask = np.asarray(trainable, dtype=bool)
    if len(mask) != len(table):
        raise ValueError(f"trainable: {len(mask)} flags for {len(table)} cohorts")
    out = np.full(len(table), -np.inf)
    idx = np.flatnonzero(mask)
    if len(idx) >= 2:
        out[idx] = loo_predictions([table[int(i)] for i in idx], fit_predict)
    elif len(idx) == 1:
        out[idx] = 0.0
    finite = out[np.isfinite(out)]
    floor = (float(finite.min()) - 1.0 - float(np.abs(finite).max())) if len(finite) else 0.0
    return np.where(np.isfinite(out), out, floor)


def baseline_scores(table: Sequence[CohortResult]) -> dict[str, Array]:
    """The single-signal scores users rank by today (see the module docstring)."""

    def feat(name: str) -> Array:
        try:
            return np.array([float(c.features[name]) for c in table], dtype=np.float64)
        except KeyError:
            raise ValueError(f"features.{name}: missing, the baselines need it") from None

    p = feat("pass_rate")
    return {
        "adv_std": feat("adv_std"),
        "frac_nondegenerate": feat("frac_nondegenerate"),
        "dapo_filter": (feat("frac_nondegenerate") > 0.0).astype(np.float64),
        "pass_rate_middle": p * (1.0 - p),
    }


def oracle_crossfit_gain(lifts: ArrayLike, fraction: float = TOP_FRACTION) -> Gain:
    """Seed cross-fit oracle: rank by the other seeds' mean lift, score on the held-out seed."""
    m = np.asarray(lifts, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"lifts: the cross-fit oracle needs cohorts x >= 2 seeds, got {m.shape}")
    gains = []
    for b in range(m.shape[1]):
        rest = np.delete(m, b, axis=1).mean(axis=1)
        gains.append(selection_gain(rest, m[:, b], fraction))
    return Gain(
        float(np.mean([g.selected for g in gains])),
        float(np.mean([g.random for g in gains])),
        fraction,
    )


def oracle_crossfit_spearman(lifts: ArrayLike) -> float:
    """The Spearman a noise-limited ranking reaches: other seeds' mean vs the held-out seed."""
    m = np.asarray(lifts, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"lifts: the cross-fit oracle needs cohorts x >= 2 seeds, got {m.shape}")
    rhos = [spearman(np.delete(m, b, axis=1).mean(axis=1), m[:, b]) for b in range(m.shape[1])]
    return float(np.nanmean(rhos)) if any(math.isfinite(r) for r in rhos) else math.nan


def savings_curve(
    score: ArrayLike, values: ArrayLike, fractions: Sequence[float] = tuple(np.arange(1, 11) / 10)
) -> list[tuple[float, float]]:
    """(x, total lift of the top x by ``score``), nats; x = 1 is train-on-everything.

    Divide by the last point for the share kept; that share is only meaningful
    when training on everything helps (a positive total), see :func:`kept_share`.
    """
    v = _as_array(values)
    return [(float(x), top_sum(score, v, x)) for x in fractions]


def kept_share(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]] | None:
    """The curve as shares of the train-on-everything total; None unless that total is > 0."""
    total = curve[-1][1]
    if curve[-1][0] != 1.0 or not total > 0.0:
        return None
    return [(x, y / total) for x, y in curve]


# ---------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class RankingReport:
    n: int
    spearman: Estimate
    pearson: Estimate
    pairwise: Estimate
    gain: dict[str, Estimate]  # score name -> relative top-q gain over random, with CI
    gain_abs: dict[str, float]  # score name -> absolute gain, nats
    gain_abs_ci: dict[str, Estimate]  # the same with its bootstrap CI
    oracle_gain: Gain
    oracle_spearman: float
    curves: dict[str, list[tuple[float, float]]]
    fraction: float

    @property
    def share_of_oracle(self) -> float:
        o = self.oracle_gain.absolute
        return self.gain_abs["predictor"] / o if o > 0 else math.nan


def ranking_report(
    table: Sequence[CohortResult],
    predicted: ArrayLike,
    fraction: float = TOP_FRACTION,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tapd: ArrayLike | None = None,
) -> RankingReport:
    """Every ranking metric of the predictor's (held-out) predictions, vs baselines and oracle.

    ``tapd`` adds the score tapd's decision policy acts on (see
    :func:`gated_scores`). The raw predictor and the baselines stay ungated,
    as users run them today.
    """
    pred = _as_array(predicted)
    actual = actual_lifts(table)
    if len(pred) != len(actual):
        raise ValueError(f"predicted: {len(pred)} predictions for {len(actual)} cohorts")
    scores = {"predictor": pred}
    if tapd is not None:
        gated = _as_array(tapd)
        if len(gated) != len(pred):
            raise ValueError(f"tapd: {len(gated)} scores for {len(pred)} cohorts")
        scores["tapd"] = gated
    scores.update(baseline_scores(table))

    def rel_gain(s: Array, a: Array) -> float:
        return selection_gain(s, a, fraction).relative

    def abs_gain(s: Array, a: Array) -> float:
        return selection_gain(s, a, fraction).absolute

    def boot(stat: Callable[..., float], *xs: Array) -> Estimate:
        return bootstrap(stat, *xs, n_resamples=n_resamples, seed=seed)

    matrix = seed_matrix(table)
    fractions = tuple(np.arange(1, 11) / 10)
    return RankingReport(
        n=len(table),
        spearman=boot(spearman, pred, actual),
        pearson=boot(pearson, pred, actual),
        pairwise=boot(pairwise_accuracy, pred, actual),
        gain={k: boot(rel_gain, s, actual) for k, s in scores.items()},
        gain_abs={k: selection_gain(s, actual, fraction).absolute for k, s in scores.items()},
        gain_abs_ci={k: boot(abs_gain, s, actual) for k, s in scores.items()},
        oracle_gain=oracle_crossfit_gain(matrix, fraction)
        if matrix.shape[1] >= 2
        else selection_gain(actual, actual, fraction),
        oracle_spearman=oracle_crossfit_spearman(matrix) if matrix.shape[1] >= 2 else math.nan,
        curves={
            "predictor": savings_curve(pred, actual, fractions),
            **(
                {"tapd": savings_curve(scores["tapd"], actual, fractions)}
                if "tapd" in scores
                else {}
            ),
            "adv_std": savings_curve(scores["adv_std"], actual, fractions),
            "oracle (actual lift)": savings_curve(actual, actual, fractions),
            "random": [(float(x), float(x) * float(actual.sum())) for x in fractions],
        },
        fraction=fraction,
    )


# --------------------------------------------------------------- closed loop


@dataclass(frozen=True, slots=True)
class LoopSummary:
    """Probe NLL per cumulative step, per arm: mean and t-CI over seeds."""

    steps: int
    per_step: dict[str, list[Estimate]]  # arm -> NLL change from step 0, steps 0..n
    final_change: dict[str, Estimate]  # arm -> NLL(final) - NLL(step 0)
    advantage: Estimate  # random final change - predictor final change (> 0: predictor wins)


def loop_summary(
    curves: Mapping[str, Sequence[Sequence[float]]],
    arm: str = "predictor",
    baseline: str = "random",
) -> LoopSummary:
    """``curves[arm][seed]`` = probe NLL at steps 0 (before training) .. n."""
    for name in (arm, baseline):
        if name not in curves or not curves[name]:
            raise ValueError(f"curves.{name}: missing")
    lengths = {len(c) for runs in curves.values() for c in runs}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(
            f"curves: every run needs the same >= 2 points, got lengths {sorted(lengths)}"
        )
    steps = lengths.pop() - 1
    deltas = {
        k: np.array(v, dtype=np.float64) - np.array(v, dtype=np.float64)[:, :1]
        for k, v in curves.items()
    }
    per_step = {k: [t_interval(d[:, j]) for j in range(steps + 1)] for k, d in deltas.items()}
    final = {k: t_interval(d[:, -1]) for k, d in deltas.items()}
    n = min(len(deltas[arm]), len(deltas[baseline]))
    adv = t_interval(deltas[baseline][:n, -1] - deltas[arm][:n, -1])
    return LoopSummary(steps, per_step, final, adv)


# ----------------------------------------------------------- reward integrity


@dataclass(frozen=True, slots=True)
class IntegrityCase:
    """A cohort checked before training (trust, decision) and measured after."""

    cohort_id: str
    variant: str
    reward_trust: float
    decision: str
    reward_before: float
    reward_after: float
    accuracy_before: float
    accuracy_after: float


@dataclass(frozen=True, slots=True)
class IntegritySummary:
    floor: float
    n_weak: int
    n_weak_flagged: int  # weak-verifier cohorts with trust under the floor AND fix_verifier
    n_sound_flagged: int  # false alarms among sound cohorts
    n_sound: int
    weak_reward_change: Estimate
    weak_accuracy_change: Estimate
    sound_reward_change: Estimate
    sound_accuracy_change: Estimate


def integrity_summary(
    cases: Sequence[IntegrityCase],
    floor: float,
    weak_variant: str = "weak_verifier",
    broken_variants: Sequence[str] = ("scrambled",),
) -> IntegritySummary:
    """The weak-verifier cohorts against the sound ones.

    Scrambled-reward cohorts (reward independent of correctness) have a
    broken verifier too: flagging them is right, so they are neither weak
    (the seeds' gameable case) nor counted as sound (a false alarm).
    """

    def flagged(c: IntegrityCase) -> bool:
        return c.reward_trust < floor and c.decision == "fix_verifier"

    weak = [c for c in cases if c.variant == weak_variant]
    sound = [c for c in cases if c.variant != weak_variant and c.variant not in broken_variants]

    def change(cs: Sequence[IntegrityCase], before: str, after: str) -> Estimate:
        if not cs:
            return Estimate(math.nan, math.nan, math.nan)
        return t_interval([getattr(c, after) - getattr(c, before) for c in cs])

    return IntegritySummary(
        floor=floor,
        n_weak=len(weak),
        n_weak_flagged=sum(flagged(c) for c in weak),
        n_sound_flagged=sum(flagged(c) for c in sound),
        n_sound=len(sound),
        weak_reward_change=change(weak, "reward_before", "reward_after"),
        weak_accuracy_change=change(weak, "accuracy_before", "accuracy_after"),
        sound_reward_change=change(sound, "reward_before", "reward_after"),
        sound_accuracy_change=change(sound, "accuracy_before", "accuracy_after"),
    )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything ``tapd eval`` publishes; rendered by :mod:`lab.eval_run`."""

    loo: RankingReport
    loso: list[SubjectResult]
    loso_pooled: RankingReport
    loop: LoopSummary | None
    integrity: IntegritySummary | None
    config: Mapping[str, object] = field(default_factory=dict)
