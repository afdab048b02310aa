"""The predictor: contract, learning curve, promotion, restart, drift, quality."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from daemon.config import PredictorSettings
from daemon.core.features import FEATURE_NAMES, FEATURE_SCHEMA, FeatureError, feature_vector
from daemon.core.pipeline import Label
from daemon.core.predictor import (
    BATCH_KINDS,
    AdvStdHeuristic,
    EnsembleStage,
    KNNStage,
    LightGBMStage,
    OnlineQuality,
    Predictor,
    RidgeStage,
    RiverStage,
    choose_kind,
    cv_spearman,
    fit_batch,
    predict_rows,
    run_refit,
)
from daemon.core.ranking import pairwise_accuracy, spearman
from daemon.runtime.modelstore import ModelStore
from daemon.runtime.predictor_host import PredictorHost
from daemon.runtime.state import StateStore
from lab.checks import check_stage, synthetic_features, synthetic_lift, synthetic_stream

REPO = Path(__file__).resolve().parents[2]


def take(
    stream: Iterator[tuple[dict[str, float], float]], n: int
) -> list[tuple[dict[str, float], float]]:
    return [next(stream) for _ in range(n)]


def _xy(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    data = take(synthetic_stream(seed), n)
    return np.asarray([feature_vector(x) for x, _ in data]), np.asarray([y for _, y in data])


def _fitted_lgbm() -> LightGBMStage:
    return LightGBMStage.fit(*_xy(11, 80), seed=0)


def _fitted_ridge() -> RidgeStage:
    return RidgeStage.fit(*_xy(11, 80))


def _fitted_knn() -> KNNStage:
    return KNNStage.fit(*_xy(11, 80))


def _fitted_ensemble() -> EnsembleStage:
    return EnsembleStage.fit(*_xy(11, 80), seed=0)


@pytest.mark.parametrize(
    "make",
    [
        AdvStdHeuristic,
        RiverStage,
        _fitted_lgbm,
        _fitted_ridge,
        _fitted_knn,
        _fitted_ensemble,
        lambda: Predictor(PredictorSettings(river_after=5, lgbm_after=10)),
    ],
    ids=["heuristic", "river", "lightgbm", "ridge", "knn", "ensemble", "predictor"],
)
def test_every_stage_meets_the_scorer_contract(make) -> None:
    check_stage(make)


def test_bad_feature_names_the_field() -> None:
    x = synthetic_features(random.Random(0))
    del x["entropy_mean"]
    with pytest.raises(FeatureError, match=r"features\.entropy_mean: missing"):
        Predictor().predict(x)


def _holdout_spearman(p: Predictor, holdout: list[tuple[dict[str, float], float]]) -> float:
    return spearman([p.predict(x).lift for x, _ in holdout], [y for _, y in holdout])


def test_learning_curve_and_stage_handover() -> None:
    """Rank correlation on unseen cohorts rises with labels and ends >= 0.85."""
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    p = Predictor(settings)
    stream = synthetic_stream(0, noise=0.06)
    holdout = take(synthetic_stream(99, noise=0.0), 200)
    start = _holdout_spearman(p, holdout)
    stages: list[str] = []
    for _ in range(240):
        x, y = next(stream)
        p.learn(x, y)
        stages.append(p.stage)
    end = _holdout_spearman(p, holdout)
    assert stages[: settings.river_after - 1] == ["heuristic"] * (settings.river_after - 1)
    assert stages[settings.river_after - 1] == "river"
    # The label count at which a batch refit (any of BATCH_KINDS) took over.
    first_batch = next(i for i, s in enumerate(stages) if s in BATCH_KINDS) + 1
    assert first_batch >= settings.lgbm_after
    assert (first_batch - settings.lgbm_after) % settings.refit_every_labels == 0
    assert stages[-1] in BATCH_KINDS
    assert end >= 0.85, f"held-out Spearman {end:.3f}"
    assert end > start + 0.05, f"no improvement over the cold start ({start:.3f} -> {end:.3f})"
    # Every promotion is a new version: online handovers and batch refits.
    online = sum(
        a != b and b in ("heuristic", "river")
        for a, b in zip(["heuristic", *stages], stages, strict=False)
    )
    assert p.refits["promoted"] >= 1
    assert int(p.model_version[1:]) == online + p.refits["promoted"]


def _history(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = random.Random(seed)
    xs = [synthetic_features(rng) for _ in range(n)]
    truth = np.asarray([synthetic_lift(x, rng, noise=0.0) for x in xs])
    y = truth + np.asarray([rng.gauss(0.0, 0.04) for _ in xs])
    return np.asarray([feature_vector(x) for x in xs]), y, truth


def test_refit_promoted_only_when_it_beats_the_served_model() -> None:
    X, y, truth = _history(120, seed=3)
    noise = np.random.default_rng(0).normal(size=len(y))
    # Served predictions were noise: any sensible refit ranks the holdout better.
    better = run_refit(X, y, noise, holdout_fraction=0.25, seed=0, model_version="v5")
    assert better.promoted and better.stage is not None
    assert better.candidate_score > better.incumbent_score
    assert better.n_holdout == 30 and better.n_train == 90
    # Served predictions were the noiseless truth: a refit on noisy labels cannot beat it.
    worse = run_refit(X, y, truth, holdout_fraction=0.25, seed=0, model_version="v5")
    assert not worse.promoted and worse.stage is None
    assert worse.candidate_score <= worse.incumbent_score


def test_refit_chooses_the_model_kind_that_ranks_held_out_labels_best() -> None:
    """The router serves what ranks best: ridge on a linear law, LightGBM or kNN on a step."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, len(feature_vector(synthetic_features(random.Random(0))))))
    # Every cohort carries a learning signal (a share of mixed-reward groups > 0).
    X[:, FEATURE_NAMES.index("frac_nondegenerate")] = rng.uniform(0.1, 1.0, size=160)
    linear = X[:, 0] - 0.5 * X[:, 3] + rng.normal(scale=0.3, size=160)
    kind, scores = choose_kind(X, linear)
    assert kind == "ridge", scores
    assert set(scores) == set(BATCH_KINDS)
    # A threshold on one feature among many irrelevant ones: no linear model fits it.
    step = (X[:, 2] > 0.5).astype(float) + rng.normal(scale=0.05, size=160)
    kind, scores = choose_kind(X, step)
    assert kind == max(scores, key=lambda k: scores[k]), scores
    assert kind in ("lightgbm", "ensemble") and scores["lightgbm"] > scores["knn"], scores
    # The ensemble's score, from its members' out-of-fold predictions, is
    # the one its own fits on each fold give.
    assert cv_spearman("ensemble", X, step) == pytest.approx(scores["ensemble"], abs=1e-12)
    # The score is out of fold: pure noise gets no credit.
    assert abs(cv_spearman("ridge", X, rng.normal(size=160))) < 0.25
    # The promoted stage is the chosen kind, refit on every label.
    r = run_refit(X, linear, np.zeros(160), holdout_fraction=0.25, seed=0, model_version="v3")
    assert r.promoted and r.kind == "ridge" and isinstance(r.stage, RidgeStage)


def test_rejected_refit_keeps_the_served_model() -> None:
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    p = Predictor(settings)
    stream = synthetic_stream(5, noise=0.06)
    for _ in range(39):
        p.learn(*next(stream))
    # Make the served predictions look perfect on the coming holdout.
    p._history.served[-10:] = p._history.y[-10:]
    stage, version = p.stage, p.model_version
    x, y = next(stream)
    p.learn(x, y)
    assert p.last_refit is not None and not p.last_refit.promoted
    assert stage in ("heuristic", "river")
    assert (p.stage, p.model_version, p.refits["rejected"]) == (stage, version, 1)


def test_background_refit_does_not_block_and_is_applied_on_poll() -> None:
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    host = PredictorHost(Predictor(settings), None, background=True)
    stream = synthetic_stream(2)
    for _ in range(39):
        host.learn(*next(stream))
    assert not host.refit_running  # not due below lgbm_after
    host.learn(*next(stream))  # the 40th label: due, starts on the worker thread
    assert host.refit_running
    host.predict(next(stream)[0])  # scoring goes on meanwhile
    result = host.poll_refit(wait=True)
    host.close()
    assert result is not None and result.n_labels == 40
    assert host.stage == (result.kind if result.promoted else host.predictor.active)


def test_background_refits_give_every_replica_the_same_model_at_every_label() -> None:
    """Replicas that learn one label sequence, in batches of different sizes and
    with refits finishing at different moments, agree label by label with a
    predictor that refits inline."""
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=15)
    labels = take(synthetic_stream(9), 130)
    inline = Predictor(settings)
    hosts = [PredictorHost(Predictor(settings), None, background=True) for _ in range(2)]
    probe = _probe()
    seen_versions = set()
    for i, (x, y) in enumerate(labels):
        inline.learn(x, y)
        for h in hosts:
            h.learn(x, y)
        if i % 7 == 0:
            hosts[0].after_batch()  # one replica applies finished refits early
        if i % 10 == 9:
            # At a label boundary every refit started before it is applied.
            for h in hosts:
                h.poll_refit(wait=True)
            versions = {inline.model_version, *(h.model_version for h in hosts)}
            assert len(versions) == 1, versions
            seen_versions |= versions
            expected = [inline.predict(p) for p in probe]
            for h in hosts:
                assert [h.predict(p) for p in probe] == expected
    for h in hosts:
        h.close()
    assert inline.refits["promoted"] + inline.refits["rejected"] >= 5
    assert len(seen_versions) > 1  # the models did change on the way


def _probe() -> list[dict[str, float]]:
    return [x for x, _ in take(synthetic_stream(1234), 20)]


def _label(cohort_id: str, x: dict[str, float], y: float) -> Label:
    return Label(cohort_id, 0.0, x, FEATURE_SCHEMA, y, 0.0, "exploit", "v0")


def _open(root: Path, settings: PredictorSettings) -> tuple[PredictorHost, StateStore]:
    state = StateStore(root / "state.sqlite")
    host = PredictorHost.open(
        settings, ModelStore(root / "models"), state.labels_since(0), background=False
    )
    return host, state


def test_restart_resumes_identically(tmp_path: Path) -> None:
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    host, state = _open(tmp_path, settings)
    p = host.predictor
    stream = synthetic_stream(4)
    for i in range(67):  # the last labels come after the last snapshot: replayed
        x, y = next(stream)
        p.learn(x, y)
        host.after_batch(state.save(None, {}, [], [_label(f"c{i}", x, y)]))
    # A redelivered label is stored once.
    state.save(None, {}, [], [_label("c3", *next(stream))])
    assert state.label_count() == 67
    expected = [p.predict(x) for x in _probe()]
    version, stage, n = p.model_version, p.stage, p.n_labels
    assert n == 67 and host.store is not None and host.store.latest() is not None
    state.close()

    again, _ = _open(tmp_path, settings)
    q = again.predictor
    assert (q.model_version, q.stage, q.n_labels) == (version, stage, n)
    assert [q.predict(x) for x in _probe()] == expected


def test_a_build_of_another_feature_schema_sets_the_old_model_aside_and_learns_on(
    tmp_path: Path,
) -> None:
    """An upgrade that changes the feature schema neither crashes at start-up nor
    serves the old model: the old snapshot and the labels it cannot relearn are
    set aside (kept in the store), and the new labels are learned from the heuristic on."""
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    host, state = _open(tmp_path, settings)
    stream = synthetic_stream(5)
    old_schema = "tapd.features/0"
    for i in range(45):
        x, y = next(stream)
        host.predictor.learn(x, y)
        # What the old build stored: a vector without the newest feature.
        old = {k: v for k, v in x.items() if k != "pass_var_per_token"}
        label = Label(f"c{i}", 0.0, old, old_schema, y, 0.0, "exploit", "v0")
        host.after_batch(state.save(None, {}, [], [label]))
    assert host.store is not None
    host.checkpoint()
    old_name = host.store.latest()
    assert old_name is not None
    # Rewrite the newest snapshot's manifest as the old build wrote it.
    manifest = tmp_path / "models" / old_name / "manifest.json"
    raw = json.loads(manifest.read_text())
    old_version = raw["version"]
    manifest.write_text(json.dumps({**raw, "feature_schema": old_schema}))
    # Labels the old build stored after its last snapshot, and the new build's first.
    for i in range(45, 48):
        x, y = next(stream)
        old = {k: v for k, v in x.items() if k != "pass_var_per_token"}
        state.save(None, {}, [], [Label(f"c{i}", 0.0, old, old_schema, y, 0.0, "exploit", "v0")])
    x, y = next(stream)
    state.save(None, {}, [], [_label("c48", x, y)])
    state.close()

    again, state = _open(tmp_path, settings)
    q = again.predictor
    assert q.n_labels == 1 and q.stage == "heuristic"  # only the new label is learned
    assert q.version == old_version + 1  # versions stay unique and ordered
    assert q.label_seq == state.label_count() == 49
    assert again.store is not None and old_name in again.store.versions()  # kept
    assert again.store.latest() != old_name
    q.predict(x)
    state.close()
    # The next start resumes the new model: nothing is set aside or replayed twice.
    third, state = _open(tmp_path, settings)
    assert (third.predictor.version, third.predictor.n_labels) == (old_version + 1, 1)
    state.close()

    # A label of this build's own schema that cannot be learned is not skipped.
    bad = {k: v for k, v in x.items() if k != "pass_var_per_token"}
    state = StateStore(tmp_path / "state.sqlite")
    state.save(None, {}, [], [_label("c49", bad, y)])
    state.close()
    with pytest.raises(FeatureError, match="pass_var_per_token"):
        _open(tmp_path, settings)


def test_same_labels_same_model() -> None:
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    a, b = (Predictor(settings) for _ in range(2))
    for x, y in take(synthetic_stream(8), 100):
        a.learn(x, y)
    for x, y in take(synthetic_stream(8), 100):
        b.learn(x, y)
    assert a.model_version == b.model_version
    assert [a.predict(x) for x in _probe()] == [b.predict(x) for x in _probe()]


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from lab.checks import synthetic_stream
    from daemon.config import PredictorSettings
    from daemon.core.features import FEATURE_SCHEMA
    from daemon.core.pipeline import Label
    from daemon.runtime.modelstore import ModelStore
    from daemon.runtime.predictor_host import PredictorHost
    from daemon.runtime.state import StateStore

    root = Path(sys.argv[1])
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    state = StateStore(root / "state.sqlite")
    host = PredictorHost.open(settings, ModelStore(root / "models"), state.labels_since(0),
                              background=False)
    p = host.predictor
    stream = synthetic_stream(21)
    for i in range(55):
        x, y = next(stream)
        p.learn(x, y)
        host.after_batch(state.save(None, {}, [], [Label(f"c{i}", 0.0, x, FEATURE_SCHEMA, y,
                                                         0.0, "exploit", "v0")]))
    stream = synthetic_stream(1234)
    probe = [next(stream)[0] for _ in range(20)]
    out = [[q.lift, q.uncertainty, q.stage, q.model_version] for q in map(p.predict, probe)]
    (root / "expected.json").write_text(json.dumps(out))
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_after_labels_loses_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        lines = iter(child.stdout.readline, "")
        assert "ready" in (line.strip() for line in lines)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    settings = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)
    q = _open(tmp_path, settings)[0].predictor
    got = [[p.lift, p.uncertainty, p.stage, p.model_version] for p in map(q.predict, _probe())]
    assert got == json.loads((tmp_path / "expected.json").read_text())
    assert q.n_labels == 55


def _drift_run(seed: int, n_before: int, n_after: int) -> tuple[int, int]:
    """Drift counts (before, after) the lift function flips at ``n_before``."""
    p = Predictor(PredictorSettings(river_after=8, lgbm_after=10**6))
    rng = random.Random(seed)
    for _ in range(n_before):
        x = synthetic_features(rng)
        p.learn(x, synthetic_lift(x, rng, noise=0.04))
    before = p.drift_detected
    for _ in range(n_after):
        x = synthetic_features(rng)
        # The world changed: disagreement no longer pays, all-wrong cohorts do.
        p.learn(x, -0.8 * x["adv_std"] + 0.3 * x["frac_all_wrong"] + rng.gauss(0.0, 0.04))
    return before, p.drift_detected - before


def test_drift_fires_after_the_lift_function_changes() -> None:
    """Found within 100 labels of the change in at least 18 of 20 runs."""
    runs = [_drift_run(seed, 150, 100) for seed in range(20)]
    detected = sum(after > 0 for _, after in runs)
    assert detected >= 18, f"drift found in only {detected}/20 runs"


def test_drift_false_alarm_rate_on_a_stationary_stream() -> None:
    """At most 10 % of 50 stationary runs of 200 labels raise a false alarm."""
    false_alarms = sum(_drift_run(seed, 200, 0)[0] > 0 for seed in range(100, 150))
    assert false_alarms <= 5, f"{false_alarms}/50 stationary runs raised drift"


def test_drift_requests_a_refit() -> None:
    p = Predictor(PredictorSettings(river_after=8, lgbm_after=10, refit_every_labels=10**6))
    rng = random.Random(7)
    for _ in range(150):
        x = synthetic_features(rng)
        p.learn(x, synthetic_lift(x, rng))
    refits = sum(p.refits.values())
    assert p.drift_detected == 0
    for _ in range(200):
        x = synthetic_features(rng)
        p.learn(x, -0.8 * x["adv_std"] + 0.3 * x["frac_all_wrong"] + rng.gauss(0.0, 0.04))
        if p.drift_detected:
            break
    assert p.drift_detected >= 1
    assert sum(p.refits.values()) == refits + 1, "drift did not trigger a refit"


def test_online_quality_matches_reference_formulas() -> None:
    rng = random.Random(0)
    pred = [rng.gauss(0, 1) for _ in range(30)]
    real = [v + rng.gauss(0, 1) for v in pred]
    sel = ["exploit"] * 20 + ["explore_random"] * 10
    q = OnlineQuality(window=25)
    for a, b, s in zip(pred, real, sel, strict=True):
        q.update(a, b, s)
    assert q.n == 25
    assert q.spearman == pytest.approx(sps.spearmanr(pred[5:], real[5:]).statistic)
    pairs = [(i, j) for i in range(5, 30) for j in range(i + 1, 30)]
    right = sum((pred[i] - pred[j]) * (real[i] - real[j]) > 0 for i, j in pairs)
    assert q.pairwise_accuracy == pytest.approx(right / len(pairs))
    assert q.selection_gain == pytest.approx(np.mean(real[:20]) - np.mean(real[20:]))
    assert math.isnan(OnlineQuality(5).spearman)
    with pytest.raises(ValueError, match="selection"):
        q.update(0.0, 0.0, "lucky")


def test_spearman_handles_ties_and_constants() -> None:
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
        sps.spearmanr([1, 2, 2, 3], [1, 2, 3, 4]).statistic
    )
    assert pairwise_accuracy([1, 2, 3], [3, 2, 1]) == 0.0


def test_river_does_not_replace_a_heuristic_that_ranks_better() -> None:
    """Lift that is exactly the disagreement signal: nothing can out-rank adv_std.

    River takes over by count, and hands back once the test-then-train
    evidence shows the heuristic ranking the recent labels better.
    """
    p = Predictor(PredictorSettings(river_after=8, lgbm_after=10**6))
    rng = random.Random(5)
    stages = []
    for _ in range(60):
        x = synthetic_features(rng)
        p.learn(x, 0.01 * x["adv_std"])
        stages.append(p.stage)
    assert stages[7] == "river"
    assert p.stage == "heuristic"
    assert p.predict(x).stage == "heuristic"
    h = p._history
    assert spearman(h.heuristic[-30:], h.y[-30:]) > spearman(h.river[-30:], h.y[-30:])


def test_a_cohort_without_a_learning_signal_is_predicted_zero_and_not_fitted() -> None:
    """No prompt group with mixed rewards: GRPO's gradient is zero, so is the predicted lift.

    Whatever the stage learned, and however the rest of its features look; the
    batch kinds fit only the cohorts with a signal, so a label history full of
    zeros does not drag their predictions for the others.
    """
    rng = random.Random(3)
    p = Predictor(PredictorSettings(lgbm_after=40, refit_every_labels=20))
    for _ in range(120):
        x = synthetic_features(rng)
        p.learn(x, synthetic_lift(x, rng) + 0.05)  # every label well above zero
    dead = {**synthetic_features(rng), "frac_nondegenerate": 0.0, "adv_std": 0.0}
    alive = {**dead, "frac_nondegenerate": 0.5, "adv_std": 0.4}
    got = p.predict(dead)
    assert got.lift == 0.0 and got.uncertainty == 0.0
    assert p.predict(alive).lift > 0.0
    with pytest.raises(ValueError, match="adv_std"):
        p.predict({**dead, "adv_std": math.nan})
    # The batch fit: the zero-signal rows are left out of the model.
    X = np.asarray([feature_vector(synthetic_features(rng)) for _ in range(60)])
    s = FEATURE_NAMES.index("frac_nondegenerate")
    X[:, s] = np.where(np.arange(60) % 2 == 0, 0.0, 0.6)
    y = np.where(X[:, s] > 0, 1.0, -5.0)
    stage = fit_batch("ridge", X, y)
    assert np.allclose(stage.predict_matrix(X[X[:, s] > 0]), 1.0, atol=1e-6)
    assert np.array_equal(predict_rows(stage, X)[X[:, s] == 0], np.zeros(30))


def test_ensemble_serves_its_members_mean_and_survives_a_snapshot() -> None:
    X, y = _xy(13, 90)
    e = fit_batch("ensemble", X, y, seed=0, model_version="v4")
    assert isinstance(e, EnsembleStage)
    alone = [fit_batch(k, X, y, seed=0).predict_matrix(X[:7]) for k in EnsembleStage.MEMBERS]
    assert np.allclose(e.predict_matrix(X[:7]), np.mean(alone, axis=0))
    x = synthetic_features(random.Random(8))
    p = e.predict(x)
    members = [m.predict(x).lift for m in e.members]
    assert p.lift == pytest.approx(float(np.mean(members)))
    assert p.uncertainty == pytest.approx(float(np.std(members)))
    # A promoted ensemble travels in the predictor's snapshot and serves the same after restore.
    pred = Predictor(PredictorSettings(river_after=5, lgbm_after=10))
    pred.batch, pred.active = e, "ensemble"
    back = Predictor(PredictorSettings(river_after=5, lgbm_after=10))
    back.restore(pred.snapshot())
    assert back.stage == "ensemble" and back.predict(x).lift == pytest.approx(p.lift)


def test_knn_shortlist_finds_the_exact_neighbours_on_a_long_history() -> None:
    """Past EXACT_UP_TO labels neighbours are shortlisted by a matrix product, then
    ranked exactly: the same neighbours (ties to the earlier label) as the full sort."""
    rng = np.random.default_rng(4)
    n, d = 3000, len(FEATURE_NAMES)
    X = rng.normal(size=(n, d))
    X[:, FEATURE_NAMES.index("frac_nondegenerate")] = rng.uniform(0.1, 1.0, size=n)
    X[1500:1520] = X[100]  # exact ties: the earliest label must win them
    y = rng.normal(size=n)
    knn = KNNStage.fit(X, y)
    assert n > knn.EXACT_UP_TO
    Q = np.vstack([rng.normal(size=(40, d)), X[100:101], X[7:8] + 1e-9])
    Zq, Zs = knn._scaler(Q), knn._Z
    full = np.argsort(((Zq[:, None, :] - Zs[None, :, :]) ** 2).sum(axis=2), axis=1, kind="stable")
    assert np.array_equal(knn._neighbours(Q), full[:, : knn.k])
    assert knn._neighbours(X[100:101])[0].tolist() == [100, 1500, 1501]
    # An older pickle without the row norms still predicts the same.
    state = dict(knn.__dict__)
    del state["_sq"]
    old = KNNStage.__new__(KNNStage)
    old.__setstate__(state)
    assert np.array_equal(old.predict_matrix(Q), knn.predict_matrix(Q))
