"""The evaluation statistics against hand-computed small cases."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from lab import evaluation as ev


def row(
    i: int, lifts: Sequence[float], subject: str = "math", **features: float
) -> ev.CohortResult:
    base = {"adv_std": 0.0, "frac_nondegenerate": 0.0, "pass_rate": 0.5}
    return ev.CohortResult(f"c{i}", subject, "mixed", {**base, **features}, tuple(lifts))


def test_pairwise_accuracy_of_known_rankings() -> None:
    assert ev.pairwise_accuracy([1, 2, 3], [10, 20, 30]) == 1.0
    assert ev.pairwise_accuracy([3, 2, 1], [10, 20, 30]) == 0.0
    # (0,1) tied score: 1/2; (0,2) and (1,2) right: 2.5 / 3
    assert ev.pairwise_accuracy([1, 1, 2], [1, 2, 3]) == pytest.approx(2.5 / 3)
    # the pair with equal actual lift is not counted
    assert ev.pairwise_accuracy([2, 1, 3], [1, 1, 2]) == 1.0
    assert math.isnan(ev.pairwise_accuracy([1, 2], [5, 5]))


def test_spearman_and_pearson() -> None:
    assert ev.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert ev.pearson([1, 2, 3, 4], [1, 4, 9, 16]) < 1.0
    assert ev.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(ev.spearman([1, 1, 1], [1, 2, 3]))


def test_selection_gain_of_a_known_table() -> None:
    # k = ceil(0.25 * 4) = 1: picks the lift 10; random = 2.5; gain = 7.5 / 2.5 = +300 %
    g = ev.selection_gain([4, 3, 2, 1], [10, 0, 0, 0], 0.25)
    assert (g.selected, g.random) == (10.0, 2.5)
    assert g.absolute == 7.5
    assert g.relative == pytest.approx(3.0)
    # top 10 % of 10 cohorts is exactly one
    assert ev.top_k(10, 0.1) == 1 and ev.top_k(11, 0.1) == 2 and ev.top_k(10, 0.3) == 3
    # a negative mean lift: gain is relative to its magnitude, still positive when better
    assert ev.selection_gain([1, 0], [1.0, -3.0], 0.5).relative == pytest.approx(2.0)


def test_ties_at_the_cut_are_broken_at_random_in_expectation() -> None:
    # two cohorts tie for the single slot: expected lift (4 + 2) / 2
    assert ev.top_mean([1, 1, 0, 0], [4, 2, 0, 0], 0.25) == pytest.approx(3.0)
    # a constant score is exactly random selection
    g = ev.selection_gain([7, 7, 7, 7], [1, 2, 3, 6], 0.5)
    assert g.selected == pytest.approx(g.random) and g.relative == pytest.approx(0.0)


def test_baselines_follow_their_definitions() -> None:
    table = [
        row(0, [1.0], adv_std=0.4, frac_nondegenerate=0.5, pass_rate=0.5),
        row(1, [0.0], adv_std=0.0, frac_nondegenerate=0.0, pass_rate=1.0),
        row(2, [0.5], adv_std=0.2, frac_nondegenerate=0.25, pass_rate=0.9),
    ]
    b = ev.baseline_scores(table)
    assert list(b["dapo_filter"]) == [1.0, 0.0, 1.0]
    assert b["pass_rate_middle"] == pytest.approx([0.25, 0.0, 0.09])
    assert list(b["adv_std"]) == [0.4, 0.0, 0.2]
    with pytest.raises(ValueError, match=r"features\.pass_rate"):
        ev.baseline_scores([ev.CohortResult("x", "s", "v", {"adv_std": 1.0}, (1.0,))])


def test_oracle_of_a_noise_free_table_equals_perfect() -> None:
    lift = np.array([3.0, 1.0, 0.5, -1.0, 2.0, 0.0, 0.1, 0.2, 0.3, 0.4])
    noise_free = np.stack([lift, lift, lift], axis=1)
    oracle = ev.oracle_crossfit_gain(noise_free, 0.2)
    perfect = ev.selection_gain(lift, lift, 0.2)
    assert oracle.selected == pytest.approx(perfect.selected)
    assert oracle.relative == pytest.approx(perfect.relative)
    assert ev.oracle_crossfit_spearman(noise_free) == pytest.approx(1.0)
    # seed noise lowers the ceiling below perfect
    rng = np.random.default_rng(0)
    noisy = noise_free + rng.normal(0, 2.0, noise_free.shape)
    assert ev.oracle_crossfit_spearman(noisy) < 0.99
    with pytest.raises(ValueError, match="lifts"):
        ev.oracle_crossfit_gain(lift[:, None])


def test_savings_curve() -> None:
    curve = ev.savings_curve([3, 1, 0, -1], [3.0, 1.0, 0.0, -1.0], (0.25, 0.5, 0.75, 1.0))
    assert dict(curve) == pytest.approx({0.25: 3.0, 0.5: 4.0, 0.75: 4.0, 1.0: 3.0})
    # total = 3: the top quarter keeps it all, the top half more than all (drops a harmful one)
    share = ev.kept_share(curve)
    assert share is not None
    assert dict(share) == pytest.approx({0.25: 1.0, 0.5: 4 / 3, 0.75: 4 / 3, 1.0: 1.0})
    # training on everything hurts: no share to speak of
    assert ev.kept_share(ev.savings_curve([1, 2], [1.0, -2.0])) is None


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


def test_leave_one_out_holds_each_label_out() -> None:
    table = [row(i, [float(v)]) for i, v in enumerate([1, 2, 3])]
    # each prediction is the mean of the other two: the held-out label never leaks in
    assert list(ev.loo_predictions(table, mean_model)) == [2.5, 2.0, 1.5]


def test_leave_one_subject_out_on_a_universal_law() -> None:
    table = [
        row(i + 10 * k, [2.0 * x], subject=s, adv_std=x)
        for k, s in enumerate(["code", "math", "science"])
        for i, x in enumerate([0.1, 0.3, 0.2, 0.5, 0.4])
    ]
    results, preds = ev.leave_one_subject_out(table, linear_model, fraction=0.2)
    assert [r.subject for r in results] == ["code", "math", "science"]
    for r in results:
        assert r.n == 5 and r.spearman == pytest.approx(1.0)
        assert r.gain.selected == pytest.approx(1.0)  # the 0.5 cohort, lift 1.0
    assert preds == pytest.approx([c.lift for c in table])
    with pytest.raises(ValueError, match="subject"):
        ev.leave_one_subject_out(table[:5], linear_model)


def test_bootstrap_is_deterministic_and_brackets_the_value() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(scale=0.5, size=60)
    a = ev.bootstrap(ev.spearman, x, y, n_resamples=300, seed=3)
    b = ev.bootstrap(ev.spearman, x, y, n_resamples=300, seed=3)
    assert a == b
    assert a.lo < a.value < a.hi
    assert 0.5 < a.value < 1.0


def test_t_interval() -> None:
    e = ev.t_interval([1.0, 2.0, 3.0])
    assert e.value == 2.0
    assert e.hi - e.value == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ev.t_interval([1.0]).lo)


def test_ranking_report_predictor_vs_baselines_and_oracle() -> None:
    rng = np.random.default_rng(0)
    n = 40
    adv = rng.uniform(0, 1, n)
    true = 2.0 * adv
    table = [
        row(
            i,
            list(true[i] + rng.normal(0, 0.05, 3)),
            adv_std=adv[i],
            frac_nondegenerate=adv[i],
            pass_rate=0.5,
        )
        for i in range(n)
    ]
    rep = ev.ranking_report(table, true, n_resamples=200)
    assert rep.n == n
    assert rep.spearman.value > 0.95 and rep.pairwise.value > 0.9
    assert rep.gain["predictor"].value > 0.5
    # a constant pass rate makes the middle baseline a random pick
    assert rep.gain["pass_rate_middle"].value == pytest.approx(0.0, abs=1e-12)
    assert 0.8 < rep.share_of_oracle < 1.2
    kept = ev.kept_share(rep.curves["predictor"])
    assert kept is not None
    assert dict(kept)[1.0] == pytest.approx(1.0) and dict(kept)[0.5] > 0.5
    with pytest.raises(ValueError, match="predicted"):
        ev.ranking_report(table, true[:-1])


def test_loop_summary() -> None:
    curves = {
        "predictor": [[5.0, 4.0, 3.0], [5.0, 4.5, 3.5]],
        "random": [[5.0, 5.5, 6.0], [5.0, 5.0, 6.0]],
    }
    s = ev.loop_summary(curves)
    assert s.steps == 2
    assert s.final_change["predictor"].value == pytest.approx(-1.75)
    assert s.final_change["random"].value == pytest.approx(1.0)
    assert s.advantage.value == pytest.approx(2.75)
    assert [e.value for e in s.per_step["predictor"]] == pytest.approx([0.0, -0.75, -1.75])
    with pytest.raises(ValueError, match="curves"):
        ev.loop_summary({"predictor": [[1.0, 2.0]], "random": [[1.0]]})


def test_integrity_summary_counts_flags_before_training() -> None:
    cases = [
        ev.IntegrityCase("w1", "weak_verifier", 0.2, "fix_verifier", 0.3, 0.8, 0.4, 0.3),
        ev.IntegrityCase("w2", "weak_verifier", 0.9, "train", 0.3, 0.7, 0.4, 0.2),
        ev.IntegrityCase("s1", "frontier", 1.0, "train", 0.5, 0.6, 0.5, 0.6),
        ev.IntegrityCase("s2", "easy", 0.7, "fix_verifier", 0.9, 0.9, 0.9, 0.9),
        # A scrambled reward is a broken verifier: flagging it is no false alarm.
        ev.IntegrityCase("x1", "scrambled", 0.3, "fix_verifier", 0.5, 0.6, 0.5, 0.5),
    ]
    s = ev.integrity_summary(cases, floor=0.8)
    assert (s.n_weak, s.n_weak_flagged, s.n_sound, s.n_sound_flagged) == (2, 1, 2, 1)
    assert s.weak_reward_change.value == pytest.approx(0.45)
    assert s.weak_accuracy_change.value == pytest.approx(-0.15)


def test_cohort_result_rejects_bad_lifts() -> None:
    with pytest.raises(ValueError, match="lifts"):
        ev.CohortResult("c", "s", "v", {}, ())
    with pytest.raises(ValueError, match="lifts"):
        ev.CohortResult("c", "s", "v", {}, (math.nan,))
    with pytest.raises(ValueError, match="seed counts"):
        ev.seed_matrix([row(0, [1.0]), row(1, [1.0, 2.0])])
