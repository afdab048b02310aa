"""The scorer core, pure: records and a clock in, effects out."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import CohortingSettings, GRPOParams, TapdSettings, Thresholds
from daemon.core.cohorting import CohortBuilder
from daemon.core.decision import decide
from daemon.core.features import FEATURE_SCHEMA, featurize
from daemon.core.pipeline import Effects, Scorer
from daemon.core.predictor import Predictor
from daemon.core.tenants import TenantLabels
from daemon.policy.rollout import fill_attempts
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.observe import observe
from lab import tasks
from streams.schemas import (
    LIFT_SCHEMA,
    MAX_MESSAGE_BYTES,
    Attempt,
    DeadLetter,
    Dispatch,
    LiftResult,
    SchemaError,
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


def test_per_tenant_counters_move_and_stay_bounded() -> None:
    """Consumed, dead-lettered and dispatched traces by tenant: two labels, the rest other."""
    settings = _settings()
    metrics = ScorerMetrics(tenant_labels=TenantLabels(2))
    scorer = _scorer(settings, metrics)

    def as_tenant(t: Trace, tenant: str) -> Trace:
        return t.model_copy(update={"tenant": tenant})

    frontier = _traces("add", "2d_carry", 4, seed=1, passes=2)
    frontier = [as_tenant(t, "acme" if i < 2 else "globex") for i, t in enumerate(frontier)]
    other = [as_tenant(t, "initech") for t in _traces("sub", "2d_borrow", 4, seed=2, passes=1)]
    bad_schema = json.loads(encode(frontier[0]))  # acme's, with a wrong field
    bad_schema["attempts"][0]["reward"] = "high"
    batch: list[Trace | bytes] = [
        *frontier[:2],
        *other[:2],
        b"not json",  # no readable tenant
        json.dumps(bad_schema).encode(),
        frontier[0],  # a redelivery: consumed again, counted once downstream
        *frontier[2:],  # globex: seen third, so "other"
        *other[2:],
    ]

    def value(name: str, tenant: str) -> float:
        got = metrics.registry.get_sample_value(f"tapd_tenant_{name}_total", {"tenant": tenant})
        assert got is not None, (name, tenant)
        return got

    def by_tenant(name: str) -> dict[str, float]:
        return {t: value(name, t) for t in ("acme", "initech", "other", "unknown")}

    for name in ("traces_consumed", "traces_dead_lettered", "traces_dispatched"):
        # Shown at zero before any traffic; a tenant's series from its first trace.
        assert value(name, "other") == value(name, "unknown") == 0
        assert (
            metrics.registry.get_sample_value(f"tapd_tenant_{name}_total", {"tenant": "acme"})
            is None
        )
    scorer.on_traces(_records(batch), now=1.0)
    assert by_tenant("traces_consumed") == {"acme": 4, "initech": 4, "other": 2, "unknown": 1}
    assert by_tenant("traces_dead_lettered") == {"acme": 1, "initech": 0, "other": 0, "unknown": 1}
    assert sum(by_tenant("traces_consumed").values()) == metrics.traces_consumed._value.get()
    assert metrics.tenant_labels.tenants == ("acme", "initech")

    fx = scorer.step(now=2.0, max_cohorts=10)
    assert len(fx.dispatches) == 2
    assert by_tenant("traces_dispatched") == {"acme": 2, "initech": 4, "other": 2, "unknown": 0}
    assert sum(by_tenant("traces_dispatched").values()) == sum(len(d.items) for d in fx.dispatches)
    # Bounded: no series for globex, only the two labels and the reserved words.
    for name in ("consumed", "dead_lettered", "dispatched"):
        metric = getattr(metrics, f"tenant_traces_{name}")
        labels = {s.labels["tenant"] for m in metric.collect() for s in m.samples}
        assert labels == {"acme", "initech", "other", "unknown"}, name


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


def test_a_journaled_snapshot_through_the_store_is_the_whole_snapshot(tmp_path: Path) -> None:
    from daemon.runtime.state import StateStore

    settings = _settings()
    scorer = _scorer(settings)
    store = StateStore(tmp_path / "state.sqlite")
    traces = _traces("add", "2d_carry", 4, 1, 2) + _traces("sub", "2d_borrow", 4, 2, 1)
    scorer.on_traces(_records(list(traces)), 1.0)
    store.save(scorer.snapshot(journaled=True), {}, [], journals=scorer.journals())
    d = scorer.step(2.0, 10).dispatches[0]
    scorer.on_lift(_records([_lift(d, 0.3)]), 3.0)
    # Three traces of a third slice stay open: held as journaled originals.
    scorer.on_traces(_records(list(_traces("mul", "2x1", 3, 3, 1)), start=8), 3.5)
    snap = scorer.snapshot(journaled=True)
    assert snap["learned"] == [] and snap["cohorts"]["decided"] == {}
    assert all(len(ref) == 3 for g in snap["cohorts"]["open"] for ref in g["traces"])
    store.save(snap, {}, [], journals=scorer.journals())
    whole = json.loads(json.dumps(scorer.snapshot()))
    assert whole["learned"] == [d.cohort_id] and whole["cohorts"]["decided"]
    assert [len(g["traces"]) for g in whole["cohorts"]["open"]] == [3]
    assert store.load_snapshot() == whole
    # A restart: restored from what the store loads, the scorer holds the same state.
    again = _scorer(settings)
    loaded = store.load_snapshot()
    assert loaded is not None
    again.restore(loaded)
    assert json.loads(json.dumps(again.snapshot())) == whole
    store.save(again.snapshot(journaled=True), {}, [], journals=again.journals())
    assert store.load_snapshot() == whole


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


def test_a_lift_of_an_older_feature_schema_is_dead_lettered_saying_so() -> None:
    """A lift in flight across an upgrade that added a feature cannot be learned:
    its dead letter names the missing feature and both schemas."""
    scorer = _scorer(_settings())
    scorer.on_traces(_records(list(_traces("add", "2d_carry", 4, 1, 2))), 1.0)
    (d,) = scorer.step(2.0, 10).dispatches
    old = json.loads(_lift(d, 0.1))
    del old["features"]["pass_var_per_token"]
    old["feature_schema"] = "tapd.features/1"
    fx = scorer.on_lift(_records([json.dumps(old).encode()]), 3.0)
    (dl,) = fx.dead_letters
    assert (dl.stage, dl.field) == ("lift", "features.pass_var_per_token")
    assert "'tapd.features/1'" in dl.reason and repr(FEATURE_SCHEMA) in dl.reason
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


# --- issue 13: hostile input never stops the pipeline, and harms no cohort-mate ---

HUGE_INT = b"9" * 5_000  # over Python's 4,300-digit int-to-string limit


def _raw(trace: Trace, **extra: Any) -> bytes:
    d = json.loads(encode(trace))
    d.update(extra)
    return json.dumps(d).encode()


def _fates(fxs: list[Effects]) -> tuple[dict[str, int], list[DeadLetter]]:
    """How many decision records each trace id is in, and every dead letter."""
    member: dict[str, int] = {}
    letters: list[DeadLetter] = []
    for fx in fxs:
        for d in fx.decisions:
            for tid in d.trace_ids:
                member[tid] = member.get(tid, 0) + 1
        letters += fx.dead_letters
    return member, letters


def test_a_poison_integer_on_every_topic_is_a_dead_letter_and_the_batch_goes_on() -> None:
    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    good = _traces("add", "2d_carry", 4, seed=1, passes=2)
    poison_extra = _raw(good[0], trace_id="p1")[:-1] + b', "junk": ' + HUGE_INT + b"}"
    poison_args = (
        _raw(good[0], trace_id="p2")[:-1] + b', "verifier_args": {"n": ' + HUGE_INT + b"}}"
    )
    batch: list[Trace | bytes] = [good[0], poison_extra, good[1], poison_args, *good[2:]]
    fx = scorer.on_traces(_records(batch), 1.0)
    assert [(d.stage, d.field, d.offset) for d in fx.dead_letters] == [
        ("decode", "junk", 1),
        ("decode", "verifier_args.n", 3),
    ]
    assert [base64.b64decode(d.original_b64) for d in fx.dead_letters] == [
        poison_extra,
        poison_args,
    ]
    (d,) = scorer.step(2.0, 10).dispatches  # the valid traces after the poison are scored
    assert sorted(i.trace_id for i in d.items) == sorted(t.trace_id for t in good)

    # The lift topic: a dead letter; the dead-letter topic: ignored (never re-dead-lettered).
    bad_lift = _lift(d, 0.1)[:-1] + b', "x": ' + HUGE_INT + b"}"
    fx = scorer.on_lift(_records([bad_lift]), 3.0)
    assert [(x.stage, x.field) for x in fx.dead_letters] == [("lift", "x")]
    fx = scorer.on_lift(_dlq_records([b'{"schema":"tapd.dlq/1","n":' + HUGE_INT + b"}"]), 3.0)
    assert not fx.dead_letters and d.cohort_id in scorer.in_flight
    assert metrics.dead_letters.labels(stage="decode")._value.get() == 2
    assert metrics.dead_letters.labels(stage="lift")._value.get() == 1
    # The messages for all of it can be produced.
    assert fx.messages(settings.topics) == []


def _wide(traces: list[Trace], chars: int) -> list[Trace]:
    """The traces with prompts and references of ``chars`` three-byte characters."""
    return [
        t.model_copy(update={"prompt": f"{t.prompt} " + "€" * chars, "reference": t.reference})
        for t in traces
    ]


def test_a_cohort_too_big_for_one_dispatch_is_split_by_construction() -> None:
    """Issue 13 item 3: traces with 32k-character prompts no longer vanish with their
    cohort: ~97 kB per item, so 7 fit one dispatch and the 8th opens the next cohort."""
    settings = _settings(max_in_flight=8)
    settings = settings.model_copy(
        update={"cohorting": CohortingSettings(max_groups=16, min_groups=2, max_age_s=60.0)}
    )
    scorer = _scorer(settings)
    traces = _wide(_traces("add", "2d_carry", 14, seed=1, passes=2), 32_000)
    fxs = [scorer.on_traces(_records(list(traces)), 1.0)]
    assert len(scorer.pending) == 1  # closed by size at 7, before the 8th
    fxs += [scorer.flush(2.0), scorer.step(3.0, 10)]
    member, letters = _fates(fxs)
    assert not letters
    assert member == {t.trace_id: 1 for t in traces}  # every trace in exactly one cohort
    dispatches = [d for fx in fxs for d in fx.dispatches]
    assert [len(d.items) for d in dispatches] == [7, 7]
    for d in dispatches:
        assert len(encode(d)) <= MAX_MESSAGE_BYTES
    assert set(scorer.in_flight) == {d.cohort_id for d in dispatches}
    for fx in fxs:
        fx.messages(settings.topics)  # all of it can be sent


def test_a_dispatch_that_cannot_be_sent_is_refused_before_any_slot_is_taken() -> None:
    """The last guard, should a cohort ever be built too big: its members are dead
    letters with their original bytes, no slot is held, nothing raises."""
    settings = _settings(max_in_flight=4)
    settings = settings.model_copy(
        update={"cohorting": CohortingSettings(max_groups=8, min_groups=2, max_age_s=60.0)}
    )
    scorer = _scorer(settings)
    scorer.cohorts = CohortBuilder(settings.cohorting, "v0", max_dispatch_bytes=10**9)
    traces = _wide(_traces("add", "2d_carry", 8, seed=1, passes=2), 32_000)
    records = _records(list(traces))
    scorer.on_traces(records, 1.0)
    fx = scorer.step(2.0, 10)
    assert not fx.dispatches and not fx.decisions and not scorer.in_flight
    assert sorted(d.offset for d in fx.dead_letters) == list(range(8))
    assert {(d.stage, d.field) for d in fx.dead_letters} == {("dispatch", "$")}
    assert all("over the 700000-byte limit" in d.reason for d in fx.dead_letters)
    by_offset = {d.offset: base64.b64decode(d.original_b64) for d in fx.dead_letters}
    assert by_offset == {r.offset: r.value for r in records}
    fx.messages(settings.topics)
    assert scorer.accepting_traces()


def test_a_valid_trace_whose_re_encoding_is_oversize_is_dead_lettered_whole() -> None:
    """Issue 13 item 5: integer log-probs re-encode as floats, 1.7x bigger; the
    dead letter carries the original, the snapshot too, and nothing raises."""
    settings = _settings()
    scorer = _scorer(settings)
    (t,) = _traces("add", "2d_carry", 1, seed=1, passes=2)
    d = json.loads(encode(t))
    d["attempts"] = [
        {"completion": "x", "reward": 0, "n_tokens": 8192, "token_logprobs": [-1] * 8192}
        for _ in range(27)
    ]
    raw = json.dumps(d, separators=(",", ":")).encode()
    assert len(raw) <= MAX_MESSAGE_BYTES
    with pytest.raises(SchemaError, match="over the 700000-byte limit"):
        encode(decode(raw, Trace))  # what the dead letter used to be built from
    fx = scorer.on_traces(_records([raw], start=3), 1.0)
    assert not fx.dead_letters and scorer.cohorts.n_open == 1
    snap = json.loads(json.dumps(scorer.snapshot()))
    again = _scorer(settings)
    again.restore(snap)
    fx = again.on_tick(1.0 + settings.cohorting.max_age_s)  # too small a cohort: dead letter
    (letter,) = fx.dead_letters
    assert (letter.stage, letter.offset) == ("cohorting", 3)
    assert base64.b64decode(letter.original_b64) == raw
    assert len(fx.messages(settings.topics)[0].value) < 990_000


def _picky(bad: set[str], error: Exception) -> Callable[[Any], Any]:
    """featurize, except that it fails whenever a trace in ``bad`` is in the cohort."""

    def run(traces: Any) -> Any:
        if any(t.trace_id in bad for t in traces):
            raise error
        return featurize(traces)

    return run


def test_a_trace_that_breaks_a_feature_is_dead_lettered_alone_and_the_cohort_goes_on() -> None:
    """Issue 13 item 8: one poisoned trace no longer takes its cohort-mates with it."""
    from daemon.core.features import FeatureError

    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    traces = _traces("add", "2d_carry", 4, seed=1, passes=2)
    poisoned = traces[1].trace_id
    scorer.featurize = _picky({poisoned}, FeatureError("features.mean_logprob", "computed -inf"))
    records = _records(list(traces))
    scorer.on_traces(records, 1.0)
    fx = scorer.step(2.0, 10)
    (letter,) = fx.dead_letters
    assert (letter.stage, letter.field, letter.offset) == ("features", "features.mean_logprob", 1)
    assert base64.b64decode(letter.original_b64) == records[1].value
    (d,) = fx.dispatches
    assert sorted(i.trace_id for i in d.items) == sorted(
        t.trace_id for t in traces if t.trace_id != poisoned
    )
    assert metrics.dead_letters.labels(stage="features")._value.get() == 1


def test_an_unforeseen_exception_is_an_internal_dead_letter_for_what_it_touched() -> None:
    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    traces = _traces("add", "2d_carry", 4, seed=1, passes=2)
    scorer.featurize = _picky({traces[0].trace_id}, RuntimeError("a bug"))
    scorer.on_traces(_records(list(traces)), 1.0)
    fx = scorer.step(2.0, 10)
    assert [(x.stage, x.field) for x in fx.dead_letters] == [("internal", "$")]
    assert "a bug" in fx.dead_letters[0].reason and len(fx.dispatches) == 1
    assert metrics.dead_letters.labels(stage="internal")._value.get() == 1

    # A predictor that blows up takes only the cohort it was asked about.
    class Broken:
        def predict(self, features: Any) -> Any:
            raise RuntimeError("predictor bug")

    scorer.predictor = Broken()  # type: ignore[assignment]
    more = _traces("sub", "2d_borrow", 4, seed=2, passes=1)
    scorer.on_traces(_records(list(more), start=10), 3.0)
    fx = scorer.step(4.0, 10)
    assert sorted(x.offset for x in fx.dead_letters) == [10, 11, 12, 13]
    assert {x.stage for x in fx.dead_letters} == {"internal"}
    assert not fx.dispatches


def test_rollouts_that_fail_for_one_trace_reject_only_that_trace() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    traces = _traces("add", "2d_carry", 4, seed=1, passes=2)
    bad = traces[2].trace_id
    fill = scorer.fill

    def flaky(cohort: Any, seed: int) -> Any:
        if any(t.trace_id == bad for t in cohort.traces):
            raise MemoryError("rollout")
        return fill(cohort, seed)

    scorer.fill = flaky
    scorer.on_traces(_records(list(traces)), 1.0)
    fx = scorer.step(2.0, 10)
    assert [(x.stage, x.offset) for x in fx.dead_letters] == [("internal", 2)]
    (d,) = fx.dispatches
    assert len(d.items) == 3


def test_the_innocent_rest_of_a_cohort_under_min_groups_is_readmitted() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    first = _traces("add", "2d_carry", 2, seed=1, passes=2)
    scorer.featurize = _picky({first[0].trace_id}, RuntimeError("poisoned"))
    scorer.on_traces(_records(list(first)), 1.0)
    scorer.flush(1.5)  # a cohort of 2 closes; one member is poisoned
    fx = scorer.step(2.0, 10)
    assert [x.offset for x in fx.dead_letters] == [0]  # the poisoned one only
    assert not fx.decisions and scorer.cohorts.holds(first[1].trace_id)
    later = _traces("add", "2d_carry", 3, seed=9, passes=2)
    fxs = [scorer.on_traces(_records(list(later), start=2), 3.0), scorer.step(4.0, 10)]
    member, letters = _fates(fxs)
    assert not letters
    assert member == {t.trace_id: 1 for t in [first[1], *later]}
    # A snapshot in between keeps the readmitted trace's original bytes.
    assert not scorer._origins


def test_post_decode_dead_letters_keep_the_original_bytes() -> None:
    """Issue 13 item 9: extra fields and integer numbers survive into the dead letter,
    also when the trace waited in a snapshot first."""
    settings = _settings()
    scorer = _scorer(settings)
    (t,) = _traces("mul", "2x1", 1, seed=3, passes=2)
    d = json.loads(encode(t))
    d["verifier_args"] = {"no_such_argument": 1}
    d["from_a_newer_producer"] = {"kept": [1, 2]}
    d["attempts"][0]["reward"] = 1  # an integer, re-encoded as 1.0
    raw = json.dumps(d, indent=1).encode()  # and whitespace
    mate = _traces("mul", "2x1", 3, seed=4, passes=1)
    scorer.on_traces(_records([raw]), 1.0)
    restored = _scorer(settings)
    restored.restore(json.loads(json.dumps(scorer.snapshot())))
    fx = restored.on_traces(_records(list(mate), start=1), 2.0)
    fx = restored.step(3.0, 10)  # the verifier refuses its arguments at rollouts
    (letter,) = fx.dead_letters
    assert (letter.stage, letter.offset) == ("verifier", 0)
    assert base64.b64decode(letter.original_b64) == raw
    assert len(fx.dispatches) == 1 and len(fx.dispatches[0].items) == 3


def test_a_conflicting_duplicate_is_dead_lettered_with_both_hashes() -> None:
    """Issue 13 item 10: the same id with other content is kept, not dropped."""
    from streams.deadletter import content_digest

    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    traces = _traces("add", "2d_carry", 4, seed=1, passes=2)
    first = encode(traces[0])
    other = _raw(traces[0], reference="999")
    fx = scorer.on_traces(_records([first, other, first, *traces[1:]]), 1.0)
    (letter,) = fx.dead_letters
    assert (letter.stage, letter.field, letter.offset) == ("cohorting", "trace_id", 1)
    assert content_digest(first) in letter.reason and content_digest(other) in letter.reason
    assert base64.b64decode(letter.original_b64) == other
    assert metrics.traces_duplicate._value.get() == 1  # the identical copy
    (d,) = scorer.step(2.0, 10).dispatches
    assert [i.reference for i in d.items if i.trace_id == traces[0].trace_id] == [
        traces[0].reference
    ]


def test_a_snapshot_trace_that_no_longer_decodes_is_dead_lettered_on_restore() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    traces = _traces("add", "2d_carry", 2, seed=1, passes=2)
    scorer.on_traces(_records(list(traces)), 1.0)
    snap = json.loads(json.dumps(scorer.snapshot()))
    # As if a stricter schema now refused what an older version accepted.
    [group] = snap["cohorts"]["open"]
    topic, part, off, text = group["traces"][0]
    group["traces"][0] = [topic, part, off, text.replace('"ts":', '"ts":0,"was":')]
    again = _scorer(settings)
    again.restore(snap)
    assert again.cohorts.n_open_traces == 1
    fx = again.on_tick(2.0)
    (letter,) = fx.dead_letters
    assert (letter.stage, letter.field, letter.offset) == ("decode", "ts", 0)
    assert not again.on_tick(3.0).dead_letters  # once


def test_a_snapshot_from_before_originals_were_kept_still_restores() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    traces = _traces("add", "2d_carry", 3, seed=1, passes=2)
    scorer.on_traces(_records(list(traces), start=5), 1.0)
    snap = json.loads(json.dumps(scorer.snapshot()))
    for g in snap["cohorts"]["open"]:
        g["traces"] = [json.loads(encode(decode(x[3].encode(), Trace))) for x in g["traces"]]
        del g["digests"]
    snap["cohorts"]["decided"] = []
    snap["origins"] = {t.trace_id: ["tap.traces", 0, 5 + i] for i, t in enumerate(traces)}
    again = _scorer(settings)
    again.restore(snap)
    fx = again.on_tick(1.0 + settings.cohorting.max_age_s)
    fx += again.step(100.0, 10)
    assert [sorted(d.trace_ids) for d in fx.decisions] == [sorted(t.trace_id for t in traces)]


def test_traces_not_keyed_by_their_slice_key_are_counted_and_still_cohorted() -> None:
    """The producer contract made visible: a trace keyed otherwise (or unkeyed) is
    counted as misrouted; undecodable records are not traces and are not counted."""
    from daemon.core.cohorting import partition_key, slice_key_of, validate_slice_key

    settings = _settings()
    metrics = ScorerMetrics()
    scorer = _scorer(settings, metrics)
    fields = validate_slice_key(settings.cohorting.slice_key)
    traces = _traces("add", "2d_carry", 4, seed=1, passes=2)
    right = slice_key_of(traces[0], fields).encode()
    assert partition_key(encode(traces[0]), fields) == right
    assert partition_key(b"not json", fields) is None
    keys: list[bytes | None] = [right, right, None, traces[3].trace_id.encode(), None]
    values = [encode(t) for t in traces] + [b"not json"]
    records = [
        Record("tap.traces", 0, i, k, v, 0)
        for i, (k, v) in enumerate(zip(keys, values, strict=True))
    ]
    assert metrics.traces_misrouted._value.get() == 0
    scorer.on_traces(records, now=1.0)
    assert metrics.traces_misrouted._value.get() == 2  # the unkeyed and the trace-id-keyed trace
    fx = scorer.step(now=2.0, max_cohorts=10)
    assert len(fx.dispatches) + len(fx.decisions) >= 1  # all four were cohorted together
    assert sorted(len(c.trace_ids) for c in fx.decisions) == [4]
