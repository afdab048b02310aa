"""The scorer core, pure: records and a clock in, effects out."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from daemon.config import CohortingSettings, GRPOParams, TapdSettings, Thresholds
from daemon.core.cohorting import CohortBuilder
from daemon.core.decision import decide
from daemon.core.features import featurize
from daemon.core.pipeline import Effects, Scorer
from daemon.core.predictor import Predictor
from daemon.policy.rollout import fill_attempts
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.observe import observe
from lab import tasks
from streams.schemas import (
    LIFT_SCHEMA,
    Attempt,
    DeadLetter,
    Dispatch,
    LiftResult,
    Trace,
    decode,
    encode,
)
from streams.transport import Record

K = 4


def _settings(**thresholds: object) -> TapdSettings:
    return TapdSettings(
        cohorting=CohortingSettings(max_groups=4, min_groups=2, max_age_s=60.0),
        grpo=GRPOParams(num_generations=K),
        # Arithmetic prompts share one template: keep "diversify" out of the way.
        thresholds=Thresholds.model_validate(
            {
                "redundancy_ceiling": 0.95,
                "max_in_flight": 2,
                "min_predicted_lift": -10.0,
                "exploration_share": 0.0,
                **thresholds,
            }
        ),
    )


def _traces(subject: str, difficulty: str, n: int, seed: int, passes: int) -> list[Trace]:
    """``n`` traces carrying K attempts, ``passes`` of them correct: a disagreeing group."""
    out = []
    for i, task in enumerate(tasks.make_tasks(subject, difficulty, n, seed)):
        attempts = [
            Attempt(
                completion=task.reference if j < passes else "x",
                reward=1.0 if j < passes else 0.0,
                n_tokens=len(task.reference) + 1,
                token_logprobs=[-0.5] * (len(task.reference) + 1),
            )
            for j in range(K)
        ]
        out.append(tasks.to_trace(task, policy_version="v0", attempts=attempts, key=i))
    return out


def _records(traces: list[Trace | bytes], start: int = 0) -> list[Record]:
    return [
        Record("tap.traces", 0, start + i, None, t if isinstance(t, bytes) else encode(t), 0)
        for i, t in enumerate(traces)
    ]


def _scorer(settings: TapdSettings, metrics: ScorerMetrics | None = None) -> Scorer:
    # Traces carry K attempts, so the rollout engine is never asked for more.
    scorer = Scorer(
        settings,
        CohortBuilder(settings.cohorting, "v0"),
        Predictor(settings.predictor),
        decide,
        lambda cohort, seed: fill_attempts(cohort.traces, None, K, seed),  # type: ignore[arg-type,unused-ignore]
        lambda traces: featurize(traces),
        lambda: settings.thresholds,
    )
    if metrics is not None:
        # What the shell does with every call's events: log and count them.
        for name in ("on_traces", "on_tick", "flush", "step", "on_lift"):
            setattr(scorer, name, _observed(getattr(scorer, name), metrics))
    return scorer


def _observed(call: Callable[..., Effects], metrics: ScorerMetrics) -> Callable[..., Effects]:
    def run(*args: Any, **kw: Any) -> Effects:
        fx = call(*args, **kw)
        observe(fx.events, metrics)
        return fx

    return run


def _lift(d: Dispatch, nll_lift: float) -> bytes:
    return encode(
        LiftResult.model_validate(
            {
                "schema": LIFT_SCHEMA,
                "cohort_id": d.cohort_id,
                "ts": 10.0,
                "trainer_id": "t",
                "mode": "continual",
                "feature_schema": d.feature_schema,
                "features": d.features,
                "model_version": d.model_version,
                "predicted_lift": d.predicted_lift,
                "selection": d.selection,
                "nll_before": 2.0,
                "nll_after": 2.0 - nll_lift,
                "nll_lift": nll_lift,
                "acc_before": 0.1,
                "acc_after": 0.2,
                "acc_lift": 0.1,
                "train_reward_before": 0.3,
                "train_reward_after": 0.5,
                "policy_version_before": "v0",
                "policy_version_after": "v0",
                "steps": 2,
                "duration_s": 1.0,
                "plasticity": {
                    "dormant_fraction": 0.1,
                    "effective_rank": 3.0,
                    "weight_norm": 1.0,
                    "grad_norm": 0.1,
                    "policy_entropy": 1.0,
                    "probe_nll": 2.0 - nll_lift,
                },
            }
        )
    )


def test_a_batch_yields_dispatches_and_dead_letters() -> None:
    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    frontier = _traces("add", "2d_carry", 4, seed=1, passes=2)  # disagreement: learnable
    other = _traces("sub", "2d_borrow", 4, seed=2, passes=1)
    bad_schema = json.loads(encode(frontier[0]))
    bad_schema["attempts"][0]["reward"] = "high"
    batch: list[Trace | bytes] = [
        *frontier[:2],
        *other[:2],
        b"not json",
        json.dumps(bad_schema).encode(),
        frontier[0],  # a redelivered trace: counted once
        *frontier[2:],
        *other[2:],
    ]
    fx = scorer.on_traces(_records(batch), now=1.0)

    assert [(d.stage, d.field) for d in fx.dead_letters] == [
        ("decode", "$"),
        ("decode", "attempts[0].reward"),
    ]
    assert base64.b64decode(fx.dead_letters[0].original_b64) == b"not json"
    assert fx.dead_letters[1].offset == 5
    assert not fx.dispatches  # scoring is the separate, bounded step
    assert len(scorer.pending) == 2

    fx = scorer.step(now=2.0, max_cohorts=10)
    assert len(fx.dispatches) == 2
    members = [sorted(i.trace_id for i in d.items) for d in fx.dispatches]
    assert members == [sorted(t.trace_id for t in frontier), sorted(t.trace_id for t in other)]
    assert {d.selection for d in fx.dispatches} == {"exploit"}
    assert all(d.features["frac_nondegenerate"] == 1.0 for d in fx.dispatches)
    assert [d.cohort_id for d in fx.decisions] == [d.cohort_id for d in fx.dispatches]
    assert metrics.traces_duplicate._value.get() == 1
    assert metrics.dead_letters.labels(stage="decode")._value.get() == 2

    # The messages carry their idempotency keys.
    msgs = fx.messages(settings.topics)
    assert {m.key for m in msgs if m.topic == "tap.dispatch"} == {
        d.cohort_id.encode() for d in fx.dispatches
    }


def test_in_flight_cap_pauses_and_lift_frees_a_slot() -> None:
    settings = _settings(max_in_flight=1)
    scorer = _scorer(settings)
    traces = _traces("add", "2d_carry", 4, 1, 2) + _traces("sub", "2d_borrow", 4, 2, 1)
    scorer.on_traces(_records(list(traces)), 1.0)
    first = scorer.step(2.0, 10)
    assert len(first.dispatches) == 1 and len(scorer.pending) == 1
    assert not scorer.accepting_traces()
    assert not scorer.step(2.5, 10)  # no slot: the second cohort waits, unscored
    assert not scorer.on_lift(_records([_lift(first.dispatches[0], 0.2)]), 3.0).dispatches
    assert scorer.accepting_traces()
    fx = scorer.step(3.5, 10)
    assert len(fx.dispatches) == 1  # the waiting cohort takes the freed slot
    assert fx.dispatches[0].cohort_id != first.dispatches[0].cohort_id


def test_a_replayed_lift_result_is_learned_once() -> None:
    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    scorer.on_traces(_records(list(_traces("add", "2d_carry", 4, 1, 2))), 1.0)
    (d,) = scorer.step(2.0, 10).dispatches
    lift = _lift(d, 0.3)
    fx = scorer.on_lift(_records([lift, lift]), 3.0)
    assert [lb.cohort_id for lb in fx.labels] == [d.cohort_id]
    assert scorer.predictor.n_labels == 1  # type: ignore[attr-defined]
    assert metrics.lift_labels._value.get() == 1
    assert not scorer.in_flight

    # Across a restart: the snapshot remembers, so a redelivery is still a no-op.
    snap = json.loads(json.dumps(scorer.snapshot()))
    again = _scorer(settings)
    again.restore(snap)
    assert not again.on_lift(_records([lift]), 4.0).labels


def test_snapshot_round_trip_keeps_open_cohorts() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    traces = _traces("add", "2d_carry", 4, 1, 2)
    scorer.on_traces(_records(list(traces[:3])), 1.0)
    assert scorer.cohorts.n_open == 1
    restored = _scorer(settings)
    restored.restore(json.loads(json.dumps(scorer.snapshot())))
    restored.on_traces(_records([traces[3], traces[0]], start=3), 2.0)
    (d,) = restored.step(3.0, 10).dispatches
    assert sorted(i.trace_id for i in d.items) == sorted(t.trace_id for t in traces)


def test_small_cohort_closed_by_age_goes_to_the_dead_letter_topic() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    (t,) = _traces("mul", "2x1", 1, 3, 2)
    scorer.on_traces(_records([t], start=7), 1.0)
    fx = scorer.on_tick(1.0 + settings.cohorting.max_age_s)
    (dl,) = fx.dead_letters
    assert isinstance(dl, DeadLetter) and dl.stage == "cohorting" and dl.offset == 7
    assert decode(base64.b64decode(dl.original_b64), Trace).trace_id == t.trace_id


def test_shadow_mode_scores_without_dispatching() -> None:
    scorer = _scorer(_settings(shadow_mode=True))
    scorer.on_traces(_records(list(_traces("add", "2d_carry", 4, 1, 2))), 1.0)
    fx = scorer.step(2.0, 10)
    assert not fx.dispatches
    (rec,) = fx.decisions
    # The choice it would have made is recorded; nothing is in flight.
    assert rec.shadow and not rec.dispatched and rec.selection == "exploit"
    assert not scorer.in_flight


def test_a_lift_the_predictor_cannot_use_is_dead_lettered_not_fatal() -> None:
    scorer = _scorer(_settings())
    scorer.on_traces(_records(list(_traces("add", "2d_carry", 4, 1, 2))), 1.0)
    (d,) = scorer.step(2.0, 10).dispatches
    bad = json.loads(_lift(d, 0.1))
    del bad["features"]["adv_std"]
    fx = scorer.on_lift(_records([json.dumps(bad).encode()]), 3.0)
    (dl,) = fx.dead_letters
    assert (dl.stage, dl.field) == ("lift", "features.adv_std")
    assert not fx.labels and not scorer.in_flight


def _dlq_records(letters: list[bytes]) -> list[Record]:
    return [Record("tap.dlq", 0, i, None, v, 0) for i, v in enumerate(letters)]


def test_a_dispatch_the_trainer_rejects_frees_its_slot() -> None:
    from streams.deadletter import dead_letter

    settings = _settings(max_in_flight=1)
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    scorer.on_traces(_records(list(_traces("add", "2d_carry", 4, 1, 2))), 1.0)
    (d,) = scorer.step(2.0, 10).dispatches
    assert not scorer.accepting_traces()
    raw = encode(d)
    unrelated = dead_letter(
        b"junk",
        topic="tap.traces",
        partition=0,
        offset=3,
        stage="decode",
        field="$",
        reason="not valid JSON",
        ts=2.0,
    )
    rejected = dead_letter(
        raw,
        topic="tap.dispatch",
        partition=0,
        offset=0,
        stage="lift",
        field="$",
        reason="training failed",
        ts=3.0,
    )
    # An unrelated dead letter, and one that is not even a dead letter, change nothing
    # (and are never dead-lettered again).
    fx = scorer.on_lift(_dlq_records([encode(unrelated), b"garbage"]), 3.0)
    assert not fx.dead_letters and d.cohort_id in scorer.in_flight
    fx = scorer.on_lift(_dlq_records([encode(rejected)]), 3.5)
    assert not fx.dead_letters and not fx.labels
    assert not scorer.in_flight and scorer.accepting_traces()
    assert metrics.dispatches_released.labels(cause="rejected")._value.get() == 1


def test_an_overdue_dispatch_is_released_by_its_lease() -> None:
    settings = _settings(max_in_flight=1, dispatch_timeout_s=60.0)
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    scorer.on_traces(_records(list(_traces("add", "2d_carry", 4, 1, 2))), 1.0)
    (d,) = scorer.step(2.0, 10).dispatches
    scorer.on_tick(2.0 + 59.0)
    assert d.cohort_id in scorer.in_flight
    scorer.on_tick(2.0 + 61.0)
    assert not scorer.in_flight
    assert metrics.dispatches_released.labels(cause="expired")._value.get() == 1
    # A late lift is still learned: the label is real, only the slot was reclaimed.
    fx = scorer.on_lift(_records([_lift(d, 0.2)]), 70.0)
    assert [lb.cohort_id for lb in fx.labels] == [d.cohort_id]
