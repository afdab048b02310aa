"""Partitioned cohorts and their hand-over, pure: a partition's state leaves one scorer
as a state record (member offsets) and is rebuilt in another from the traces topic."""

from __future__ import annotations

import json
import random
from pathlib import Path

from daemon.config import CohortingSettings, GRPOParams, TapdSettings, Thresholds
from daemon.core.cohorting import Duplicate, held_bytes
from daemon.core.decision import decide
from daemon.core.features import featurize
from daemon.core.pipeline import Scorer
from daemon.core.predictor import Predictor
from daemon.policy.rollout import fill_attempts
from daemon.runtime.partitions import (
    PartitionedCohorts,
    PartitionState,
    Token,
    describe,
    join,
    migrate,
    part_key,
    rebuild,
    record,
    split,
)
from daemon.runtime.state import StateStore
from lab import tasks
from streams.deadletter import original
from streams.schemas import Attempt, Trace, encode
from streams.transport import Record, TopicPartition

K = 4
T0, T1 = TopicPartition("tap.traces", 0), TopicPartition("tap.traces", 1)


def _settings() -> TapdSettings:
    return TapdSettings(
        cohorting=CohortingSettings(max_groups=4, min_groups=2, max_age_s=60.0),
        grpo=GRPOParams(num_generations=K),
        thresholds=Thresholds(
            redundancy_ceiling=0.95,
            max_in_flight=4,
            min_predicted_lift=-10.0,
            exploration_share=0.0,
        ),
    )


def _scorer(settings: TapdSettings) -> Scorer:
    return Scorer(
        settings,
        PartitionedCohorts(settings.cohorting, "v0"),
        Predictor(settings.predictor),
        decide,
        lambda cohort, seed: fill_attempts(cohort.traces, None, K, seed),  # type: ignore[arg-type,unused-ignore]
        lambda traces: featurize(traces),
        lambda: settings.thresholds,
    )


def _traces(subject: str, difficulty: str, n: int, seed: int) -> list[Trace]:
    out = []
    for i, task in enumerate(tasks.make_tasks(subject, difficulty, n, seed)):
        attempts = [
            Attempt(
                completion=task.reference if j < 2 else "x",
                reward=1.0 if j < 2 else 0.0,
                n_tokens=2,
                token_logprobs=[-0.5, -0.4],
            )
            for j in range(K)
        ]
        out.append(tasks.to_trace(task, policy_version="v0", attempts=attempts, key=f"{seed}-{i}"))
    return out


class Log:
    """A traces topic: records per partition, appended in order."""

    def __init__(self) -> None:
        self.records: dict[TopicPartition, list[Record]] = {T0: [], T1: []}

    def append(self, tp: TopicPartition, values: list[bytes]) -> list[Record]:
        out = []
        for v in values:
            r = Record(tp.topic, tp.partition, len(self.records[tp]), None, v, 0)
            self.records[tp].append(r)
            out.append(r)
        return out


def feed(scorer: Scorer, tp: TopicPartition, records: list[Record], now: float) -> list[str]:
    """Feed one partition's records; the ids of the cohorts decided meanwhile."""
    cohorts = scorer.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    with cohorts.feeding(tp) as part:
        fx = scorer.on_traces(records, now)
        part.position = records[-1].offset + 1
    while scorer.pending:
        fx += scorer.step(now, 4)
    return [d.cohort_id for d in fx.decisions]


def test_a_cohort_never_mixes_partitions_and_each_partition_keeps_its_position() -> None:
    scorer = _scorer(_settings())
    log = Log()
    same_slice = _traces("add", "2d_carry", 6, 1)
    # Three traces of one slice in each partition: neither reaches max_groups=4.
    feed(scorer, T0, log.append(T0, [encode(t) for t in same_slice[:3]]), 1.0)
    feed(scorer, T1, log.append(T1, [encode(t) for t in same_slice[3:]]), 1.0)
    cohorts = scorer.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    assert cohorts.n_open == 2 and cohorts.n_open_traces == 6
    assert {tp: p.position for tp, p in cohorts.parts.items()} == {T0: 3, T1: 3}
    # A policy version reaches every partition.
    cohorts.set_policy_version("v1")
    assert all(p.builder.policy_version == "v1" for p in cohorts.parts.values())


def test_a_partition_is_changed_by_what_a_re_read_would_not_redo() -> None:
    """``Part.changed`` (a state record due now) is set by a close or a scored
    cohort, not by traces that only join open cohorts. (A message the batch owes
    for the partition, such as a dead letter at decode, is the scorer service's
    to mark.)"""
    scorer = _scorer(_settings())
    log = Log()
    cohorts = scorer.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    same_slice = _traces("add", "2d_carry", 4, 1)
    feed(scorer, T0, log.append(T0, [encode(t) for t in same_slice[:2]]), 1.0)
    part = cohorts.parts[T0]
    assert part.changed  # a new partition: never recorded
    part.changed = False
    feed(scorer, T0, log.append(T0, [encode(same_slice[2])]), 1.0)
    assert not part.changed and cohorts.n_open_traces == 3
    # The fourth trace fills the cohort (max_groups=4): closed and scored.
    decided = feed(scorer, T0, log.append(T0, [encode(same_slice[3])]), 1.0)
    assert decided and part.changed
    part.changed = False
    cohorts.forget(decided[0])  # scored: no longer the partition's
    assert part.changed


def test_a_partition_moves_to_another_scorer_without_loss_or_second_decision() -> None:
    settings = _settings()
    a, b = _scorer(settings), _scorer(settings)
    log = Log()
    adds = _traces("add", "2d_carry", 6, 2)  # one cohort of 4 closes, 2 stay open
    subs = _traces("sub", "2d_borrow", 3, 3)  # stays open
    decided_a = feed(a, T0, log.append(T0, [encode(t) for t in adds + subs]), 5.0)
    feed(a, T1, log.append(T1, [encode(t) for t in _traces("mul", "2x1", 2, 4)]), 5.0)
    assert len(decided_a) == 1

    # A hands T0 back: its state record holds offsets only.
    snap = a.snapshot()
    cohorts = a.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    state = describe(snap, T0, cohorts.parts[T0].position or 0, Token("inc-a", 7), "a", 9.0)
    assert state.missing == 0
    assert sorted(state.held()) == [4, 5, 6, 7, 8]
    assert state.commit_offset == 4  # never past a trace still open
    wire = PartitionState.decode(state.encode())
    assert wire == state and len(state.encode()) < 2_000  # offsets, not traces
    rest, taken = split(snap, T0)
    assert taken is not None
    a.restore(rest)
    assert set(cohorts.parts) == {T1} and cohorts.n_open == 1

    # B rebuilds T0 from the record and the topic, then reads on.
    detached, missing = rebuild(wire, log.records[T0], ["v0"], dedup_window=100)
    assert missing == []
    b.restore(join(b.snapshot(), T0, detached))
    b_cohorts = b.cohorts
    assert isinstance(b_cohorts, PartitionedCohorts)
    assert b_cohorts.n_open_traces == 5 and b_cohorts.parts[T0].position == 9
    # A redelivered copy of a decided trace is a duplicate in B too; the open
    # slices fill up and close with the members A had.
    more = [encode(adds[0]), *[encode(t) for t in _traces("add", "2d_carry", 8, 2)[6:8]]]
    assert adds[0].trace_id in detached.part["cohorts"]["decided"]
    assert adds[4].trace_id not in detached.part["cohorts"]["decided"]  # open: known as open
    decided_b = feed(b, T0, log.append(T0, more), 6.0)
    assert len(decided_b) == 1 and decided_b[0] not in decided_a
    decisions = b.flush(7.0)
    while b.pending:
        decisions += b.step(7.0, 4)
    members = {t.trace_id for t in adds + subs} | {
        t.trace_id for t in _traces("add", "2d_carry", 8, 2)[6:8]
    }
    snap_b = b.snapshot()
    assert json.dumps(snap_b)  # still plain JSON
    decided_ids = {tid for d in decisions.decisions for tid in d.trace_ids}
    assert adds[0].trace_id not in decided_ids  # not cohorted twice
    assert decided_ids <= members


def test_a_snapshot_from_before_partitions_is_split_by_where_members_were_read() -> None:
    settings = _settings()
    scorer = _scorer(settings)
    log = Log()
    feed(scorer, T0, log.append(T0, [encode(t) for t in _traces("add", "2d_carry", 3, 5)]), 1.0)
    feed(scorer, T1, log.append(T1, [encode(t) for t in _traces("sub", "2d_borrow", 2, 6)]), 1.0)
    snap = scorer.snapshot()
    # The single-builder form the state store held before.
    legacy_open = [g for p in snap["cohorts"]["parts"].values() for g in p["cohorts"]["open"]]
    legacy = {
        **snap,
        "cohorts": {
            "schema": "tapd.cohorting/1",
            "versions": ["v0"],
            "now": 1.0,
            "open": legacy_open,
            "decided": [],
        },
    }
    migrated = migrate(legacy, {T0: 3, T1: 2})
    again = _scorer(settings)
    again.restore(migrated)
    cohorts = again.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    assert {tp: (p.builder.n_open_traces, p.position) for tp, p in cohorts.parts.items()} == {
        T0: (3, 3),
        T1: (2, 2),
    }
    assert part_key(T1) == "tap.traces/1"


def test_members_of_a_queued_cohort_stay_duplicates_after_the_move() -> None:
    """A cohort closed but not yet scored moves with its partition; a resent copy
    of one of its members must not start a second cohort in the new owner."""
    settings = _settings()
    a, b = _scorer(settings), _scorer(settings)
    log = Log()
    adds = _traces("add", "2d_carry", 4, 7)
    cohorts = a.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    with cohorts.feeding(T0) as part:
        a.on_traces(log.append(T0, [encode(t) for t in adds]), 1.0)  # closes at 4: queued
        part.position = 4
    assert len(a.pending) == 1
    state = describe(a.snapshot(), T0, 4, Token("inc-a", 1), "a", 2.0)
    assert len(state.pending) == 1 and state.open == ()
    detached, missing = rebuild(state, log.records[T0], ["v0"], dedup_window=100)
    assert missing == []
    b.restore(join(b.snapshot(), T0, detached))
    assert [c.cohort_id for c in b.pending] == [c.cohort_id for c in a.pending]
    again = log.append(T0, [encode(adds[1])])
    with b.cohorts.feeding(T0) as part:  # type: ignore[attr-defined]
        fx = b.on_traces(again, 3.0)
    assert b.cohorts.n_open == 0  # a duplicate, not a new cohort
    while b.pending:
        fx += b.step(3.0, 4)
    assert [len(d.trace_ids) for d in fx.decisions] == [4]


# --- issue 17: open state by the byte, records by the cohort that changed ----------


def _stream(rng: random.Random, n: int, seed: int) -> list[Trace]:
    """Traces of many slices (a subject each), in random order."""
    out = []
    for s, subject in enumerate(("add", "sub", "mul")):
        for difficulty in ("2d_carry", "2d_borrow", "2x1"):
            try:
                out += _traces(subject, difficulty, n, seed + s)
            except (KeyError, ValueError):
                continue
    rng.shuffle(out)
    return out


def test_state_records_from_the_builders_are_those_described_from_a_whole_snapshot(
    tmp_path: Path,
) -> None:
    """The scorer's per-batch path (journaled snapshot, records from the builders'
    cohorts, each encoded once until it changes) against the whole-snapshot
    definition: the same records, byte for byte in content, and the state store
    loads the whole snapshot from the journaled one and its rows."""
    settings = _settings()
    scorer = _scorer(settings)
    cohorts = scorer.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    store = StateStore(tmp_path / "state.sqlite")
    log = Log()
    rng = random.Random(4)
    traces = _stream(rng, 30, 40)
    # As producers key them: a slice's traces (and their copies) in one partition.
    by_tp = {
        T0: [t for t in traces if t.subject == "add"],
        T1: [t for t in traces if t.subject != "add"],
    }
    read = {T0: 0, T1: 0}
    now = 1.0
    while read[T0] < len(by_tp[T0]) or read[T1] < len(by_tp[T1]):
        tp = T0 if rng.random() < 0.4 else T1
        batch = read[tp]
        chunk = by_tp[tp][batch : batch + 5]
        read[tp] += len(chunk)
        # Redeliveries, and cohorts queued unscored for a while.
        if batch and rng.random() < 0.3:
            chunk.append(by_tp[tp][rng.randrange(batch)])
        if not chunk:
            continue
        now += rng.choice((1.0, 30.0))
        with cohorts.feeding(tp) as part:
            scorer.on_traces(log.append(tp, [encode(t) for t in chunk]), now)
            part.position = len(log.records[tp])
        scorer.on_tick(now)
        if rng.random() < 0.5:
            scorer.step(now, 2)
        journaled = scorer.snapshot(journaled=True)
        whole = scorer.snapshot(journaled=False)
        token = Token("inc", int(now))
        for tp_, p in cohorts.parts.items():
            assert p.position is not None
            fast = record(cohorts, journaled, scorer.where, tp_, p.position, token, "r", now)
            ref = describe(whole, tp_, p.position, token, "r", now)
            assert fast.content() == ref.content()
            assert PartitionState.decode(fast.encode()) == PartitionState.decode(ref.encode())
            assert fast.commit_offset == ref.commit_offset and fast.missing == ref.missing == 0
        store.save(journaled, {}, [], journals=scorer.journals())
        assert store.load_snapshot() == json.loads(json.dumps(whole))
    store.close()


def test_partitions_share_one_byte_budget_and_evictions_keep_their_partition() -> None:
    """The open traces of every partition together stay within max_open_bytes; room
    is made from the oldest cohort of any partition, whose events (and queued
    cohort) stay with the partition it was read from."""
    base = _settings()
    one = held_bytes(_traces("add", "2d_carry", 1, 9)[0])
    settings = base.model_copy(
        update={"cohorting": base.cohorting.model_copy(update={"max_open_bytes": 7 * one})}
    )
    scorer = _scorer(settings)
    cohorts = scorer.cohorts
    assert isinstance(cohorts, PartitionedCohorts)
    log = Log()
    rng = random.Random(8)
    traces = _stream(rng, 10, 50)
    fates: dict[str, int] = {}
    origin: dict[str, TopicPartition] = {}
    for i, t in enumerate(traces):
        tp = T0 if i % 3 else T1
        origin[t.trace_id] = tp
        with cohorts.feeding(tp) as part:
            fx = scorer.on_traces(log.append(tp, [encode(t)]), float(i))
            part.position = len(log.records[tp])
        for letter in fx.dead_letters:
            tid = json.loads(original(letter))["trace_id"]
            fates[tid] = fates.get(tid, 0) + 1
        assert cohorts.open_bytes <= 7 * one
        for c in scorer.pending:
            # A queued cohort belongs to the partition its members were read from.
            assert {origin[m.trace_id] for m in c.traces} == {cohorts.closed[c.cohort_id]}
    evicted = [c for c in scorer.pending if c.cause == "evicted"]
    assert evicted
    fx = scorer.flush(1e4)
    for c in scorer.pending:
        for m in c.traces:
            fates[m.trace_id] = fates.get(m.trace_id, 0) + 1
    for letter in fx.dead_letters:
        tid = json.loads(original(letter))["trace_id"]
        fates[tid] = fates.get(tid, 0) + 1
    assert set(fates) == {t.trace_id for t in traces} and max(fates.values()) == 1


def test_the_dedup_window_is_shared_by_the_partitions_owned() -> None:
    """``dedup_window`` bounds a replica's remembered ids as a whole: each owned
    partition remembers an even share, re-split when partitions come and go."""
    cohorting = CohortingSettings(max_groups=4, min_groups=2, max_age_s=60.0, dedup_window=12)
    cohorts = PartitionedCohorts(cohorting, "v0")
    fed: dict[TopicPartition, list[Trace]] = {
        T0: _traces("add", "2d_carry", 16, seed=1),
        T1: _traces("sub", "2d_borrow", 16, seed=2),
    }
    for tp, traces in fed.items():
        with cohorts.feeding(tp):
            for t in traces:
                cohorts.on_item(t, 0.0)
    # 16 decided per partition (4 cohorts of 4), 6 remembered each: 12 in all.
    decided = {tp: list(cohorts.parts[tp].builder._decided) for tp in fed}
    assert {tp: len(ids) for tp, ids in decided.items()} == {T0: 6, T1: 6}
    assert decided[T0] == [t.trace_id for t in fed[T0][-6:]]  # the newest kept
    with cohorts.feeding(T0):
        assert cohorts.on_item(fed[T0][-1], 1.0) == [Duplicate(fed[T0][-1].trace_id)]
        assert cohorts.on_item(fed[T0][0], 1.0) == []  # beyond its share: forgotten
    # T1 handed over: T0 alone may remember the whole window again.
    cohorts.detach(T1)
    assert cohorts.parts[T0].builder.dedup_limit == 12
    # Restored from a snapshot, the shares are set again.
    with cohorts.feeding(T1):
        pass
    snap = cohorts.snapshot()
    again = PartitionedCohorts(cohorting, "v0")
    again.restore(json.loads(json.dumps(snap)))
    assert {p.builder.dedup_limit for p in again.parts.values()} == {6}
