"""The evaluation statistics against hand-computed small cases."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from lab import evaluation as ev

BASE = {
    "adv_std": 0.0,
    "frac_nondegenerate": 0.0,
    "pass_rate": 0.5,
    "group_passrate_mean": 0.5,
    "group_passrate_std": 0.0,
}


def row(
    i: int, lifts: Sequence[float], subject: str = "math", variant: str = "mixed", **features: float
) -> ev.CohortResult:
    return ev.CohortResult(f"c{i}", subject, variant, {**BASE, **features}, tuple(lifts))


def test_selection_gain_of_a_known_table() -> None:
    # k = ceil(0.25 * 4) = 1: picks the lift 10; random = 2.5
    g = ev.selection_gain([4, 3, 2, 1], [10, 0, 0, 0], 0.25)
    assert (g.selected, g.random, g.absolute) == (10.0, 2.5, 7.5)
    assert g.relative == pytest.approx(3.0)
    assert ev.top_k(10, 0.1) == 1 and ev.top_k(11, 0.1) == 2 and ev.top_k(10, 0.3) == 3


def test_ties_at_the_cut_are_broken_at_random_in_expectation() -> None:
    assert ev.top_mean([1, 1, 0, 0], [4, 2, 0, 0], 0.25) == pytest.approx(3.0)
    g = ev.selection_gain([7, 7, 7, 7], [1, 2, 3, 6], 0.5)
    assert g.selected == pytest.approx(g.random)


def test_spearman_brown_and_label_reliability() -> None:
    assert ev.spearman_brown(0.5, 1) == 0.5
    assert ev.spearman_brown(0.5, 3) == pytest.approx(0.75)
    assert ev.spearman_brown(0.874, 3) == pytest.approx(3 * 0.874 / (1 + 2 * 0.874))
    truth = np.linspace(0.0, 1.0, 30)
    perfect = ev.label_reliability(np.stack([truth, truth, truth], axis=1))
    assert (perfect.test_retest, perfect.reliability, perfect.ceiling) == pytest.approx((1, 1, 1))
    rng = np.random.default_rng(0)
    noisy = ev.label_reliability(truth[:, None] + rng.normal(0, 0.3, (30, 3)))
    assert noisy.test_retest < noisy.reliability < 1.0
    assert noisy.ceiling == pytest.approx(math.sqrt(noisy.reliability))
    with pytest.raises(ValueError, match="seeds"):
        ev.label_reliability(truth[:, None])


def test_adv_raw_std_is_the_spread_of_unnormalised_advantages() -> None:
    # Groups of 8 binary rewards with pass rates 1/8 and 4/8: advantages r - mean.
    groups = [np.array([1] + [0] * 7), np.array([1] * 4 + [0] * 4)]
    adv = np.concatenate([g - g.mean() for g in groups])
    p = np.array([g.mean() for g in groups])
    f = {"group_passrate_mean": p.mean(), "group_passrate_std": p.std()}
    assert ev.adv_raw_std(f) == pytest.approx(adv.std())


def test_signals_follow_their_definitions() -> None:
    table = [
        row(0, [1.0], adv_std=0.4, frac_nondegenerate=0.5, pass_rate=0.5),
        row(1, [0.0], adv_std=0.0, frac_nondegenerate=0.0, pass_rate=1.0),
        row(2, [0.5], adv_std=0.2, frac_nondegenerate=0.25, pass_rate=0.9),
    ]
    s = ev.signal_scores(table)
    assert list(s["dapo_filter"]) == [1.0, 0.0, 1.0]
    assert s["pass_rate_middle"] == pytest.approx([0.25, 0.0, 0.09])
    assert list(s["adv_std"]) == [0.4, 0.0, 0.2]
    assert set(s) == set(ev.SIGNALS)
    with pytest.raises(ValueError, match=r"features\.pass_rate"):
        ev.signal_scores([ev.CohortResult("x", "s", "v", {"adv_std": 1.0}, (1.0,))])


def test_oracle_of_a_noise_free_table_equals_perfect() -> None:
    lift = np.array([3.0, 1.0, 0.5, -1.0, 2.0, 0.0, 0.1, 0.2, 0.3, 0.4])
    noise_free = np.stack([lift, lift, lift], axis=1)
    oracle = ev.oracle_crossfit_gain(noise_free, 0.2)
    perfect = ev.selection_gain(lift, lift, 0.2)
    assert oracle.selected == pytest.approx(perfect.selected)
    with pytest.raises(ValueError, match="lifts"):
        ev.oracle_crossfit_gain(lift[:, None])


def mean_model(
    train_x: Sequence[Mapping[str, float]],
    train_y: Sequence[float],
    test_x: Sequence[Mapping[str, float]],
) -> list[float]:
    return [float(np.mean(train_y))] * len(test_x)


def linear_model(
    train_x: Sequence[Mapping[str, float]],
    train_y: Sequence[float],
    test_x: Sequence[Mapping[str, float]],
) -> list[float]:
    x = np.array([f["adv_std"] for f in train_x])
    slope, icpt = np.polyfit(x, np.asarray(train_y), 1)
    return [float(slope * f["adv_std"] + icpt) for f in test_x]


def test_leave_one_cell_out_holds_the_whole_cell_out() -> None:
    # Two cells of two cohorts: each cohort is predicted from the *other* cell only.
    table = [
        row(0, [1.0], variant="easy"),
        row(1, [3.0], variant="easy"),
        row(2, [10.0], variant="hard"),
        row(3, [20.0], variant="hard"),
        row(4, [5.0], variant="mixed"),
        row(5, [7.0], variant="mixed"),
    ]
    pred = ev.leave_one_cell_out(table, mean_model)
    assert list(pred) == pytest.approx([10.5, 10.5, 4.0, 4.0, 8.5, 8.5])


def test_leave_one_subject_out_on_a_universal_law() -> None:
    table = [
        row(i + 10 * k, [2.0 * x], subject=s, adv_std=x)
        for k, s in enumerate(["code", "math", "science"])
        for i, x in enumerate([0.1, 0.3, 0.2, 0.5, 0.4])
    ]
    preds = ev.leave_one_subject_out(table, linear_model)
    assert preds == pytest.approx([c.lift for c in table])
    with pytest.raises(ValueError, match="fewer than 4"):
        ev.leave_one_subject_out(table[:6], linear_model)


def test_cluster_bootstrap_resamples_whole_cells() -> None:
    rng = np.random.default_rng(1)
    cells = [f"c{i // 5}" for i in range(60)]
    x = rng.normal(size=60)
    y = x + rng.normal(scale=0.5, size=60)
    a = ev.cluster_bootstrap(ev.spearman, cells, x, y, n_resamples=300, seed=3)
    assert a == ev.cluster_bootstrap(ev.spearman, cells, x, y, n_resamples=300, seed=3)
    assert a.lo < a.value < a.hi and 0.5 < a.value < 1.0
    # Cells of identical cohorts: resampling cells sees 4 independent units, not 40.
    same = [f"k{i // 10}" for i in range(40)]
    v = np.repeat([0.0, 1.0, 2.0, 3.0], 10)
    per_cohort = ev.cluster_bootstrap(lambda z: float(z.mean()), list(map(str, range(40))), v)
    per_cell = ev.cluster_bootstrap(lambda z: float(z.mean()), same, v)
    assert per_cell.hi - per_cell.lo > 2 * (per_cohort.hi - per_cohort.lo)


def test_score_report_against_known_labels() -> None:
    rng = np.random.default_rng(0)
    adv = rng.uniform(0, 1, 40)
    table = [
        row(i, list(2.0 * adv[i] + rng.normal(0, 0.05, 3)), variant=f"v{i % 8}", adv_std=adv[i])
        for i in range(40)
    ]
    r = ev.score_report(table, adv, n_resamples=200)
    assert r.spearman.value > 0.95 and r.pairwise.value > 0.9
    assert r.gain_nats.value > 0.5
    # The mean label is far from zero here, so a relative gain is given.
    assert r.gain_relative is not None and r.gain_relative > 0.5
    centred = [
        ev.CohortResult(
            c.cohort_id, c.subject, c.variant, c.features, tuple(x - 1 for x in c.lifts)
        )
        for c in table
    ]
    assert ev.score_report(centred, adv, n_resamples=200).gain_relative is None
    with pytest.raises(ValueError, match="score"):
        ev.score_report(table, adv[:-1])


def test_loop_auc_and_paired_comparison() -> None:
    assert ev.loop_auc([5.0, 4.0, 3.0]) == pytest.approx(1.5)
    assert ev.loop_auc([5.0, 5.5, 5.0]) == pytest.approx(-0.25)
    outcome = {"tapd": [0.3, 0.2, 0.4, 0.25], "random": [0.1, 0.1, 0.2, 0.3]}
    c = ev.paired(outcome, "tapd", "random")
    assert c.n == 4 and c.wins == 3
    assert c.mean.value == pytest.approx(0.1125)
    assert 0.0 < c.p_value < 0.1 and 0.0 < c.p_wilcoxon <= 0.25
    tie = ev.paired({"a": [1.0, 2.0], "b": [1.0, 2.0]}, "a", "b")
    assert tie.p_value == 1.0 and tie.wins == 0
    with pytest.raises(ValueError, match="paired"):
        ev.paired({"a": [1.0], "b": [1.0]}, "a", "b")


def test_t_interval() -> None:
    e = ev.t_interval([1.0, 2.0, 3.0])
    assert e.value == 2.0
    assert e.hi - e.value == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ev.t_interval([1.0]).lo)


def test_cohort_result_rejects_bad_lifts() -> None:
    with pytest.raises(ValueError, match="lifts"):
        ev.CohortResult("c", "s", "v", {}, ())
    with pytest.raises(ValueError, match="lifts"):
        ev.CohortResult("c", "s", "v", {}, (math.nan,))
    with pytest.raises(ValueError, match="seed counts"):
        ev.seed_matrix([row(0, [1.0]), row(1, [1.0, 2.0])])
    assert row(0, [1.0], variant="scrambled").broken and not row(0, [1.0]).broken
