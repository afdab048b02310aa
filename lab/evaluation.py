"""The statistics of the evaluation benchmark, pure and I/O-free.

Input: a table of cohorts, each with its features, subject, control variant
and the lift on its own target measured by probe-and-revert GRPO under
several seeds. Output: the numbers ``docs/RESULTS.md`` reports, with
confidence intervals from a *cluster* bootstrap over cells (a cell is a
(subject, variant) pair: cohorts of one cell are alike, so resampling cohorts
would overstate the precision).

Definitions (the ones ``docs/RESULTS.md`` quotes):

* **label** of a cohort: the mean over seeds of its NLL-lift on its target's
  items with a foothold (``LiftResult.target_lift``), nats per answer token.
* **label reliability**: the mean Spearman between single-seed labels over
  every pair of seeds (test-retest, ``r1``), stepped up to the ``k``-seed
  mean by Spearman-Brown: ``k r1 / (1 + (k - 1) r1)``. The **noise ceiling**
  of any predictor's Spearman against those labels is its square root.
* **held-out predictions**: leave-one-cell-out (every cohort predicted by a
  model fit on the other cells) and leave-one-subject-out; within one run
  the model kind is fixed, so the pooled predictions share one scale.
* **top-q gain** of a score: ``S - R`` in nats, ``S`` the expected mean label
  of the ``k = ceil(q n)`` cohorts with the highest score (ties at the cut
  broken uniformly at random, computed exactly), ``R`` the mean label of all
  cohorts (what a random pick of ``k`` gets in expectation). The relative
  gain ``(S - R) / |R|`` is only reported where ``R`` is well away from zero.
* **baselines**, single signals users rank by today: ``adv_std``; the
  un-normalised advantage spread ``adv_raw_std`` (the spread of ``r - group
  mean``; with binary rewards it is ``sqrt(m - m^2 - s^2)`` from the group
  pass rates' mean ``m`` and spread ``s``, whereas ``adv_std`` carries only
  ``frac_nondegenerate``); ``frac_nondegenerate``; pass rate in the middle
  ``p(1 - p)``; the **DAPO filter** (drop cohorts whose groups all agree,
  random among the rest); **random** (gain 0, Spearman 0 in expectation).
  Fitted baselines (plain ridge, 3-nearest-neighbours) are scored on the
  same folds as tapd's predictor.
* **oracle** (seed cross-fit): rank by the mean label of all seeds but one,
  score the pick on the held-out seed, average over held-out seeds: the
  best a ranking can do with labels this noisy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
BROKEN_VARIANTS = ("scrambled", "weak_verifier")
SIGNALS = ("adv_std", "adv_raw_std", "frac_nondegenerate", "pass_rate_middle", "dapo_filter")

__all__ = ["pairwise_accuracy", "spearman"]


@dataclass(frozen=True, slots=True)
class CohortResult:
    """One row of the battery: what was scored before training, and what training did."""

    cohort_id: str
    subject: str
    variant: str
    features: Mapping[str, float]
    lifts: tuple[float, ...]  # label per seed: target NLL-lift, nats (positive = better)
    accuracy_lifts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.lifts:
            raise ValueError(f"lifts: cohort {self.cohort_id} has no measured seed")
        if not all(math.isfinite(x) for x in self.lifts):
            raise ValueError(f"lifts: cohort {self.cohort_id} has a non-finite lift {self.lifts}")

    @property
    def lift(self) -> float:
        return float(np.mean(self.lifts))

    @property
    def cell(self) -> str:
        return f"{self.subject}|{self.variant}"

    @property
    def broken(self) -> bool:
        return self.variant in BROKEN_VARIANTS


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    lo: float
    hi: float


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
    """Labels as cohorts x seeds; every cohort must have the same seed count."""
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


def top_mean(score: ArrayLike, values: ArrayLike, fraction: float) -> float:
    """Expected mean of ``values`` over the top ``fraction`` by ``score``, ties broken at random."""
    return top_sum(score, values, fraction) / top_k(len(_as_array(values)), fraction)


def selection_gain(score: ArrayLike, values: ArrayLike, fraction: float = TOP_FRACTION) -> Gain:
    v = _as_array(values)
    return Gain(top_mean(score, v, fraction), float(v.mean()), fraction)


def t_interval(samples: ArrayLike, level: float = DEFAULT_LEVEL) -> Estimate:
    """Mean with a Student-t CI: for a handful of runs, where a bootstrap is meaningless."""
    x = _as_array(samples)
    m = float(x.mean())
    if len(x) < 2:
        return Estimate(m, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + level / 2.0, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Estimate(m, m - half, m + half)


def cluster_bootstrap(
    statistic: Callable[..., float],
    clusters: Sequence[str],
    *arrays: ArrayLike,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> Estimate:
    """Statistic on the data, with a percentile CI from resampling whole clusters (cells)."""
    cols = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(clusters)
    if any(len(c) != n for c in cols):
        raise ValueError("cluster_bootstrap: arrays must have one row per cluster label")
    value = statistic(*cols)
    names = sorted(set(clusters))
    members = {c: np.flatnonzero(np.asarray(clusters) == c) for c in names}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        picked = rng.integers(0, len(names), size=len(names))
        idx = np.concatenate([members[names[i]] for i in picked])
        d = statistic(*(c[idx] for c in cols))
        if math.isfinite(d):
            draws.append(d)
    if not draws:
        return Estimate(float(value), math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return Estimate(float(value), float(lo), float(hi))


# ------------------------------------------------------------ label noise


@dataclass(frozen=True, slots=True)
class Reliability:
    seeds: int
    test_retest: float  # mean Spearman between single-seed labels, over seed pairs
    reliability: float  # Spearman-Brown for the mean of ``seeds`` seeds
    ceiling: float  # sqrt(reliability): the Spearman a perfect predictor can reach


def spearman_brown(r1: float, k: int) -> float:
    """Reliability of the mean of ``k`` measurements whose single-measurement reliability is r1."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    return k * r1 / (1.0 + (k - 1) * r1)


def label_reliability(lifts: ArrayLike) -> Reliability:
    """Test-retest of single-seed labels, stepped up to the seed mean (Spearman-Brown)."""
    m = np.asarray(lifts, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"lifts: test-retest needs cohorts x >= 2 seeds, got {m.shape}")
    rhos = [spearman(m[:, a], m[:, b]) for a, b in itertools.combinations(range(m.shape[1]), 2)]
    r1 = float(np.nanmean(rhos))
    rel = spearman_brown(r1, m.shape[1])
    return Reliability(m.shape[1], r1, rel, math.sqrt(rel) if rel > 0 else math.nan)


# ----------------------------------------------------------- cross-validation


def grouped_predictions(
    table: Sequence[CohortResult], fit_predict: FitPredict, group: Callable[[CohortResult], str]
) -> Array:
    """Every cohort predicted by a model fit on the cohorts of every *other* group."""
    groups = [group(c) for c in table]
    out = np.empty(len(table), dtype=np.float64)
    for g in sorted(set(groups)):
        test = [i for i, x in enumerate(groups) if x == g]
        train = [i for i, x in enumerate(groups) if x != g]
        if len(train) < 4:
            raise ValueError(f"group {g!r}: fewer than 4 cohorts left to fit on")
        p = fit_predict(
            [table[i].features for i in train],
            [table[i].lift for i in train],
            [table[i].features for i in test],
        )
        out[test] = np.asarray(p, dtype=np.float64)
    return out


def leave_one_cell_out(table: Sequence[CohortResult], fit_predict: FitPredict) -> Array:
    return grouped_predictions(table, fit_predict, lambda c: c.cell)


def leave_one_subject_out(table: Sequence[CohortResult], fit_predict: FitPredict) -> Array:
    return grouped_predictions(table, fit_predict, lambda c: c.subject)


# ------------------------------------------------------------ scores compared


def adv_raw_std(features: Mapping[str, float]) -> float:
    """Spread of the un-normalised advantages ``r - group mean`` (binary rewards).

    Over K attempts a group with pass rate ``p`` has within-group variance
    ``p (1 - p)``; pooled over groups (mean zero) the variance is
    ``mean(p) - mean(p^2) = m - m^2 - s^2``.
    """
    m, s = float(features["group_passrate_mean"]), float(features["group_passrate_std"])
    return math.sqrt(max(0.0, m - m * m - s * s))


def signal_scores(table: Sequence[CohortResult]) -> dict[str, Array]:
    """The single-signal scores users rank by today (see the module docstring)."""

    def feat(name: str) -> Array:
        try:
            return np.array([float(c.features[name]) for c in table], dtype=np.float64)
        except KeyError:
            raise ValueError(f"features.{name}: missing, the baselines need it") from None

    p = feat("pass_rate")
    feat("group_passrate_mean")
    feat("group_passrate_std")
    return {
        "adv_std": feat("adv_std"),
        "adv_raw_std": np.array([adv_raw_std(c.features) for c in table], dtype=np.float64),
        "frac_nondegenerate": feat("frac_nondegenerate"),
        "pass_rate_middle": p * (1.0 - p),
        "dapo_filter": (feat("frac_nondegenerate") > 0.0).astype(np.float64),
    }


def oracle_crossfit_gain(lifts: ArrayLike, fraction: float = TOP_FRACTION) -> Gain:
    """Seed cross-fit oracle: rank by the other seeds' mean label, score on the held-out seed."""
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


def savings_curve(
    score: ArrayLike, values: ArrayLike, fractions: Sequence[float] = tuple(np.arange(1, 11) / 10)
) -> list[tuple[float, float]]:
    """(x, total label of the top x by ``score``), nats; x = 1 is train-on-everything."""
    v = _as_array(values)
    return [(float(x), top_sum(score, v, x)) for x in fractions]


# ---------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class ScoreReport:
    """How one score ranks the cohorts' labels, with cluster-bootstrap CIs."""

    spearman: Estimate
    pairwise: Estimate
    gain_nats: Estimate  # top-q mean label minus the mean label
    gain_relative: float | None  # (S - R) / |R|, only when R's CI excludes zero


def score_report(
    table: Sequence[CohortResult],
    score: ArrayLike,
    *,
    fraction: float = TOP_FRACTION,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> ScoreReport:
    s = _as_array(score)
    y = actual_lifts(table)
    if len(s) != len(y):
        raise ValueError(f"score: {len(s)} values for {len(y)} cohorts")
    cells = [c.cell for c in table]

    def gain(a: Array, b: Array) -> float:
        return selection_gain(a, b, fraction).absolute

    boot = {"n_resamples": n_resamples, "seed": seed}
    g = cluster_bootstrap(gain, cells, s, y, **boot)
    mean = cluster_bootstrap(lambda v: float(v.mean()), cells, y, **boot)
    away = mean.lo > 0.0 or mean.hi < 0.0
    return ScoreReport(
        spearman=cluster_bootstrap(spearman, cells, s, y, **boot),
        pairwise=cluster_bootstrap(pairwise_accuracy, cells, s, y, **boot),
        gain_nats=g,
        gain_relative=g.value / abs(mean.value) if away else None,
    )


# --------------------------------------------------------------- closed loop


@dataclass(frozen=True, slots=True)
class PairedComparison:
    """Per-run differences of an outcome between two arms (``arm - other``)."""

    arm: str
    other: str
    n: int
    mean: Estimate  # with a Student-t CI over runs
    wins: int  # runs where the arm did strictly better
    p_value: float  # one-sided paired t-test (arm better)
    p_wilcoxon: float  # one-sided Wilcoxon signed-rank (arm better)


def loop_auc(curve: Sequence[float]) -> float:
    """Mean target-NLL improvement over the steps of one run (nats, positive = better).

    ``curve[t]`` is the target NLL after ``t`` steps; the area between the
    starting level and the curve, per step.
    """
    c = _as_array(curve)
    if len(c) < 2:
        raise ValueError("curve: needs the start and at least one step")
    return float(np.mean(c[0] - c[1:]))


def paired(
    outcome: Mapping[str, Sequence[float]], arm: str, other: str, level: float = DEFAULT_LEVEL
) -> PairedComparison:
    a, b = _as_array(outcome[arm]), _as_array(outcome[other])
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"{arm}/{other}: needs >= 2 paired runs, got {len(a)} and {len(b)}")
    d = a - b
    if np.all(d == 0):
        p_t = p_w = 1.0
    else:
        p_t = float(stats.ttest_rel(a, b, alternative="greater").pvalue)
        p_w = float(stats.wilcoxon(d, alternative="greater", zero_method="zsplit").pvalue)
    return PairedComparison(arm, other, len(d), t_interval(d, level), int((d > 0).sum()), p_t, p_w)
