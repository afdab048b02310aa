"""The cohort builder: grouping, closing, dedup, staleness, eviction, snapshots."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import CohortingSettings
from daemon.core.cohorting import (
    Closed,
    Cohort,
    CohortBuilder,
    Conflict,
    Duplicate,
    Event,
    Rejected,
    Stale,
    cohort_id,
    held_bytes,
    slice_key_of,
    validate_slice_key,
)
from daemon.core.features import prepare_many
from streams.schemas import DISPATCH_ENVELOPE_BYTES, Trace, dispatch_item_bytes


def _trace(
    tid: str,
    *,
    subject: str = "math",
    task_type: str | None = "add",
    policy: str = "p1",
    verifier: str = "exact",
    tenant: str = "default",
) -> Trace:
    return Trace(
        schema="tapd.trace/1",
        trace_id=tid,
        ts=0.0,
        tenant=tenant,
        subject=subject,
        tags={} if task_type is None else {"task_type": task_type},
        prompt=f"prompt {tid}",
        reference="1",
        verifier=verifier,
        policy_version=policy,
    )


def _settings(**kw: object) -> CohortingSettings:
    base: dict[str, object] = {
        "slice_key": ("subject", "tags.task_type"),
        "max_groups": 4,
        "min_groups": 2,
        "max_age_s": 10.0,
        "max_open": 100,
    }
    return CohortingSettings.model_validate({**base, **kw})


def _closed(events: Iterable[Event]) -> list[Cohort]:
    return [e.cohort for e in events if isinstance(e, Closed)]


def test_size_closes_a_cohort_of_max_groups_traces() -> None:
    b = CohortBuilder(_settings(), "p1")
    events: list[Event] = []
    for i in range(9):
        events += b.on_item(_trace(f"t{i}"), now=float(i))
    cohorts = _closed(events)
    assert [len(c.traces) for c in cohorts] == [4, 4]
    assert [c.cause for c in cohorts] == ["size", "size"]
    c = cohorts[0]
    assert [t.trace_id for t in c.traces] == ["t0", "t1", "t2", "t3"]
    assert (c.opened_ts, c.closed_ts, c.subject) == (0.0, 3.0, "math")
    assert json.loads(c.slice_key) == {"subject": "math", "tags.task_type": "add"}
    assert c.cohort_id == cohort_id(c.slice_key, ["t3", "t2", "t1", "t0"])
    assert b.n_open == 1 and b.n_open_traces == 1


def test_slices_are_kept_apart_and_a_missing_tag_is_its_own_slice() -> None:
    b = CohortBuilder(_settings(max_groups=2), "p1")
    events: list[Event] = []
    for i, tt in enumerate(["add", "sub", None, "add", "sub", None]):
        events += b.on_item(_trace(f"t{i}", task_type=tt), now=0.0)
    by_key = {json.loads(c.slice_key)["tags.task_type"]: c for c in _closed(events)}
    assert set(by_key) == {"add", "sub", ""}
    assert [t.trace_id for t in by_key[""].traces] == ["t2", "t5"]


def test_cohort_id_is_stable_under_reordering_and_duplication() -> None:
    traces = [_trace(f"t{i}") for i in range(4)]
    ids = set()
    for order in (traces, traces[::-1], [traces[2], traces[0], traces[2], traces[3], traces[1]]):
        b = CohortBuilder(_settings(), "p1")
        events = [e for t in order for e in b.on_item(t, now=0.0)]
        [c] = _closed(events)
        ids.add(c.cohort_id)
        assert sorted(t.trace_id for t in c.traces) == ["t0", "t1", "t2", "t3"]
    assert len(ids) == 1
    # The slice is part of the id: the same members in another slice differ.
    assert cohort_id("a", ["t0"]) != cohort_id("b", ["t0"])
    assert cohort_id("a", ["t0", "t0", "t1"]) == cohort_id("a", ["t1", "t0"])


def test_duplicates_are_reported_while_open_and_after_close() -> None:
    b = CohortBuilder(_settings(max_groups=2, dedup_window=2), "p1")
    assert b.on_item(_trace("a"), 0.0) == []
    assert b.on_item(_trace("a"), 0.0) == [Duplicate("a")]
    assert len(_closed(b.on_item(_trace("b"), 0.0))) == 1
    assert b.on_item(_trace("a"), 0.0) == [Duplicate("a")]
    # The window of closed ids is bounded: after two more decided ids, "a" is forgotten.
    b.on_item(_trace("c"), 0.0)
    b.on_item(_trace("d"), 0.0)
    assert b.on_item(_trace("a"), 0.0) == []


def test_age_closes_or_rejects_by_min_groups() -> None:
    b = CohortBuilder(_settings(), "p1")
    b.on_item(_trace("a1", task_type="a"), 0.0)
    b.on_item(_trace("a2", task_type="a"), 1.0)
    b.on_item(_trace("b1", task_type="b"), 5.0)
    assert b.on_tick(9.9) == []
    events = b.on_tick(10.0)
    [c] = _closed(events)
    assert c.cause == "age" and len(c.traces) == 2
    events = b.on_tick(15.0)
    [r] = events
    assert isinstance(r, Rejected)
    assert (r.trace.trace_id, r.stage) == ("b1", "cohorting")
    assert "min_groups" in r.reason and "1 of 2" in r.reason
    assert b.n_open == 0


def test_stale_traces_are_reprobed_or_dropped() -> None:
    b = CohortBuilder(_settings(max_groups=2, stale_policy="reprobe"), "p2")
    events = b.on_item(_trace("old", policy="p1"), 0.0)
    assert events == [Stale(_trace("old", policy="p1"), "reprobe")]
    [c] = _closed(b.on_item(_trace("new", policy="p2"), 0.0))
    assert c.reprobe_ids == frozenset({"old"}) and c.policy_version == "p2"

    d = CohortBuilder(_settings(stale_policy="drop"), "p2")
    events = d.on_item(_trace("old", policy="p1"), 0.0)
    assert isinstance(events[0], Stale) and events[0].action == "drop"
    assert isinstance(events[1], Rejected) and events[1].field == "policy_version"
    assert "stale" in events[1].reason
    assert d.n_open == 0


def test_policy_lag_and_traces_that_go_stale_while_open() -> None:
    b = CohortBuilder(_settings(max_groups=3, max_policy_lag=1), "p1")
    b.set_policy_version("p2")
    assert b.on_item(_trace("lag1", policy="p1"), 0.0) == []  # one version behind: fresh
    b.on_item(_trace("cur", policy="p2"), 0.0)
    b.set_policy_version("p3")  # now "p1" is two behind
    [c] = _closed(b.on_item(_trace("next", policy="p3"), 0.0))
    assert c.reprobe_ids == frozenset({"lag1"})
    [stale] = b.on_item(_trace("older", policy="p0"), 0.0)
    assert isinstance(stale, Stale)


def test_eviction_closes_or_rejects_the_oldest_open_cohort() -> None:
    b = CohortBuilder(_settings(max_open=2), "p1")
    b.on_item(_trace("a1", task_type="a"), 0.0)
    b.on_item(_trace("a2", task_type="a"), 0.0)
    b.on_item(_trace("b1", task_type="b"), 1.0)
    [c] = _closed(b.on_item(_trace("c1", task_type="c"), 2.0))
    assert c.cause == "evicted" and {t.trace_id for t in c.traces} == {"a1", "a2"}
    [r] = b.on_item(_trace("d1", task_type="d"), 3.0)
    assert isinstance(r, Rejected) and r.trace.trace_id == "b1"
    assert "evicted before reaching min_groups" in r.reason
    assert b.n_open == 2


def test_flush_on_eof() -> None:
    b = CohortBuilder(_settings(), "p1")
    for i in range(3):
        b.on_item(_trace(f"a{i}", task_type="a"), 0.0)
    b.on_item(_trace("b0", task_type="b"), 0.0)
    events = b.on_eof()
    [c] = _closed(events)
    assert c.cause == "flush" and len(c.traces) == 3
    assert [e.trace.trace_id for e in events if isinstance(e, Rejected)] == ["b0"]


def test_snapshot_round_trips_through_json_and_resumes_identically() -> None:
    rng = random.Random(1)
    stream = [
        _trace(
            f"t{rng.randrange(60)}", task_type=rng.choice("abc"), policy=rng.choice(["p0", "p1"])
        )
        for _ in range(80)
    ]
    whole = CohortBuilder(_settings(), "p1")
    ref = [e for i, t in enumerate(stream) for e in whole.on_item(t, float(i))] + whole.flush_all()

    first = CohortBuilder(_settings(), "p1")
    events = [e for i, t in enumerate(stream[:40]) for e in first.on_item(t, float(i))]
    snap = json.loads(json.dumps(first.snapshot()))
    resumed = CohortBuilder(_settings(), "p0")
    resumed.restore(snap)
    assert resumed.policy_version == "p1"
    events += [e for i, t in enumerate(stream[40:], 40) for e in resumed.on_item(t, float(i))]
    events += resumed.flush_all()
    assert events == ref
    with pytest.raises(ValueError, match="schema"):
        resumed.restore({"schema": "other"})


def test_invalid_slice_key_names_the_field() -> None:
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        validate_slice_key(["subject", "colour"])
    with pytest.raises(ValueError, match="names no tag"):
        CohortBuilder(_settings(slice_key=("tags.",)), "p1")
    key = slice_key_of(_trace("x", verifier="mcq"), ("verifier", "tags.level"))
    assert json.loads(key) == {"verifier": "mcq", "tags.level": ""}


def test_tenants_are_pooled_by_default_and_split_with_tenant_in_the_slice_key() -> None:
    """The documented default: one cohort for both tenants; "tenant" in the key splits them."""
    assert "tenant" not in CohortingSettings().slice_key
    assert validate_slice_key([*CohortingSettings().slice_key, "tenant"])[-1] == "tenant"
    traces = [_trace(f"t{i}", tenant="acme" if i % 2 else "globex") for i in range(4)]

    def cohorts(slice_key: tuple[str, ...], max_groups: int) -> list[Cohort]:
        b = CohortBuilder(_settings(slice_key=slice_key, max_groups=max_groups), "p1")
        return _closed([e for i, t in enumerate(traces) for e in b.on_item(t, float(i))])

    (pooled,) = cohorts(("subject",), 4)
    assert {t.tenant for t in pooled.traces} == {"acme", "globex"}
    split = cohorts(("subject", "tenant"), 2)
    assert sorted(json.loads(c.slice_key)["tenant"] for c in split) == ["acme", "globex"]
    assert all({t.tenant for t in c.traces} == {json.loads(c.slice_key)["tenant"]} for c in split)


def test_open_cap_holds_and_every_trace_is_accounted_for_over_100k() -> None:
    """100k traces, 5,000 slices, 10% redeliveries, a cap of 64 open cohorts."""
    settings = _settings(max_open=64, max_groups=8, min_groups=3, max_age_s=50.0)
    b = CohortBuilder(settings, "p1")
    rng = random.Random(7)
    fates: dict[str, int] = {}
    n_dup = 0

    def account(events: list[Event]) -> None:
        nonlocal n_dup
        for e in events:
            if isinstance(e, Closed):
                assert len(e.cohort.traces) >= settings.min_groups
                for t in e.cohort.traces:
                    fates[t.trace_id] = fates.get(t.trace_id, 0) + 1
            elif isinstance(e, Rejected):
                assert e.reason
                fates[e.trace.trace_id] = fates.get(e.trace.trace_id, 0) + 1
            elif isinstance(e, Duplicate):
                n_dup += 1

    sent: list[str] = []
    for i in range(100_000):
        if sent and rng.random() < 0.1:
            tid = sent[-rng.randrange(1, min(len(sent), 500) + 1)]  # a redelivery
        else:
            tid = f"t{i}"
            sent.append(tid)
        key = int(rng.paretovariate(1.2)) % 5000
        trace = Trace(
            schema="tapd.trace/1",
            trace_id=tid,
            ts=float(i),
            subject=f"s{key % 7}",
            tags={"task_type": f"k{key}"},
            prompt="p",
            reference="1",
            verifier="exact",
            policy_version="p1",
        )
        now = i / 100.0
        account(b.on_item(trace, now))
        assert b.n_open <= settings.max_open
        if i % 500 == 0:
            account(b.on_tick(now))
    account(b.flush_all())
    assert b.n_open == 0
    # Every distinct trace met exactly one fate; every redelivery was a duplicate.
    assert set(fates) == set(sent)
    assert max(fates.values()) == 1
    assert n_dup == 100_000 - len(sent)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from("abcde"), st.floats(0.0, 4.0)),
        max_size=120,
    ),
    cut=st.integers(0, 120),
)
def test_every_trace_meets_one_fate_and_snapshots_change_nothing(
    ops: list[tuple[int, str, float]], cut: int
) -> None:
    """Any stream (redeliveries, ticks, a snapshot/restore anywhere) keeps the invariants."""
    cfg = _settings(max_open=3, max_groups=3, min_groups=2, max_age_s=5.0)

    def run(restart_at: int | None) -> list[Event]:
        b = CohortBuilder(cfg, "p1")
        events: list[Event] = []
        now = 0.0
        for i, (tid, key, dt) in enumerate(ops):
            if i == restart_at:
                fresh = CohortBuilder(cfg, "p1")
                fresh.restore(json.loads(json.dumps(b.snapshot())))
                b = fresh
            now += dt
            events += b.on_item(_trace(f"t{tid}", task_type=key), now)
            assert b.n_open <= cfg.max_open
            events += b.on_tick(now)
        return events + b.flush_all()

    events = run(None)
    assert run(cut) == events
    fates: dict[str, int] = {}
    for e in events:
        if isinstance(e, Closed):
            c = e.cohort
            assert c.cohort_id == cohort_id(c.slice_key, [t.trace_id for t in c.traces])
            assert cfg.min_groups <= len(c.traces) <= cfg.max_groups
            for t in c.traces:
                fates[t.trace_id] = fates.get(t.trace_id, 0) + 1
        elif isinstance(e, Rejected):
            fates[e.trace.trace_id] = fates.get(e.trace.trace_id, 0) + 1
    assert set(fates) == {f"t{tid}" for tid, _, _ in ops}
    assert all(n == 1 for n in fates.values())


# --- issue 13: conflicting duplicates, dispatch bound, readmission ------------------


def test_a_reused_trace_id_with_other_content_is_a_conflict_not_a_duplicate() -> None:
    b = CohortBuilder(_settings(), "p1")
    assert b.on_item(_trace("t0"), 0.0, digest="sha256:aaaa") == []
    # The same bytes again (a redelivery): a duplicate, silently harmless.
    assert b.on_item(_trace("t0"), 1.0, digest="sha256:aaaa") == [Duplicate("t0")]
    other = _trace("t0", verifier="numeric")
    [conflict] = b.on_item(other, 2.0, digest="sha256:bbbb")
    assert isinstance(conflict, Conflict) and conflict.trace is other
    assert "sha256:aaaa" in conflict.reason and "sha256:bbbb" in conflict.reason
    # Without digests (a snapshot from before they were kept) it can only be a duplicate.
    assert b.on_item(other, 3.0) == [Duplicate("t0")]
    # After the first copy's cohort closed, the digest is still remembered.
    for i in range(1, 4):
        b.on_item(_trace(f"t{i}"), 4.0, digest=f"sha256:{i}")
    assert b.n_open == 0
    restored = CohortBuilder(_settings(), "p1")
    restored.restore(json.loads(json.dumps(b.snapshot())))
    [again] = restored.on_item(other, 5.0, digest="sha256:bbbb")
    assert isinstance(again, Conflict) and again.first_digest == "sha256:aaaa"


def _sized(tid: str, chars: int, task_type: str = "add") -> Trace:
    return _trace(tid, task_type=task_type).model_copy(update={"prompt": "p" * chars})


def test_a_cohort_never_outgrows_one_dispatch_message() -> None:
    budget = 5_000
    b = CohortBuilder(
        _settings(max_groups=256), "p1", max_dispatch_bytes=DISPATCH_ENVELOPE_BYTES + budget
    )
    assert b.item_budget == budget
    events: list[Event] = []
    traces = [_sized(f"t{i}", 1_500) for i in range(10)]
    for i, t in enumerate(traces):
        events += b.on_item(t, float(i))
    events += b.flush_all()
    cohorts = _closed(events)
    # ~1,550 bytes per item: three fit in 5,000, the fourth opens the next cohort.
    assert [len(c.traces) for c in cohorts] == [3, 3, 3]
    assert [c.cause for c in cohorts] == ["size", "size", "size"]
    for c in cohorts:
        assert sum(dispatch_item_bytes(t) for t in c.traces) <= budget
    rejected = [e.trace.trace_id for e in events if isinstance(e, Rejected)]
    members = [t.trace_id for c in cohorts for t in c.traces]
    assert sorted(members + rejected) == sorted(t.trace_id for t in traces)  # one fate each


def test_a_trace_too_big_for_any_dispatch_is_rejected_alone() -> None:
    b = CohortBuilder(_settings(), "p1", max_dispatch_bytes=DISPATCH_ENVELOPE_BYTES + 2_000)
    b.on_item(_sized("small", 10), 0.0)
    [rej] = b.on_item(_sized("huge", 3_000), 1.0)
    assert isinstance(rej, Rejected) and rej.field == "prompt"
    assert "over the 2000 bytes" in rej.reason
    assert b.n_open_traces == 1  # the small one is untouched
    assert b.on_item(_sized("huge", 3_000), 2.0) == [Duplicate("huge")]


def test_a_slice_key_too_long_for_a_dispatch_is_rejected() -> None:
    b = CohortBuilder(_settings(), "p1")
    t = _trace("t").model_copy(update={"subject": "s" * 128, "tags": {"task_type": "é" * 128}})
    b2 = CohortBuilder(_settings(slice_key=("subject", *(f"tags.k{i}" for i in range(9)))), "p1")
    long = t.model_copy(update={"tags": {f"k{i}": "x" * 128 for i in range(9)}})
    [rej] = b2.on_item(long, 0.0)
    assert isinstance(rej, Rejected) and rej.field == "tags"
    assert b.on_item(t, 0.0) == []  # a long but acceptable key


def test_readmitted_traces_are_open_again_and_meet_one_fate() -> None:
    b = CohortBuilder(_settings(), "p1")
    events: list[Event] = []
    for i in range(4):
        events += b.on_item(_trace(f"t{i}"), float(i), digest=f"d{i}")
    [c] = _closed(events)
    assert not b.holds("t1")
    # Two members were rejected downstream; the other two are innocent.
    assert b.readmit([c.traces[1], c.traces[3]], 5.0) == []
    assert b.holds("t1") and b.holds("t3") and not b.holds("t0")
    assert b.on_item(_trace("t1"), 6.0, digest="d1") == [Duplicate("t1")]
    assert isinstance(b.on_item(_trace("t1"), 6.0, digest="x")[0], Conflict)
    events = b.on_item(_trace("t4"), 7.0) + b.on_item(_trace("t5"), 7.0)
    [again] = _closed(events)
    assert sorted(t.trace_id for t in again.traces) == ["t1", "t3", "t4", "t5"]
    assert again.cohort_id != c.cohort_id


def test_snapshot_hooks_hold_traces_as_the_caller_wants() -> None:
    b = CohortBuilder(_settings(), "p1")
    b.on_item(_trace("keep"), 0.0, digest="d1")
    b.on_item(_trace("gone"), 0.0, digest="d2")
    snap = json.loads(json.dumps(b.snapshot(lambda t: ["ref", t.trace_id])))
    assert snap["open"][0]["traces"] == [["ref", "keep"], ["ref", "gone"]]
    restored = CohortBuilder(_settings(), "p1")
    restored.restore(snap, lambda ref: _trace(ref[1]) if ref[1] == "keep" else None)
    assert restored.holds("keep") and not restored.holds("gone")
    assert isinstance(restored.on_item(_trace("keep"), 1.0, digest="zz")[0], Conflict)


# --- issue 17: a byte budget on open state ---------------------------------------------


def _heavy(tid: str, task_type: str, tokens: int, attempts: int = 4) -> Trace:
    """A trace holding ``attempts`` attempts of ``tokens`` log-probs and entropies."""
    return Trace.model_validate(
        {
            "schema": "tapd.trace/1",
            "trace_id": tid,
            "ts": 1.7e9,
            "subject": "math",
            "tags": {"task_type": task_type},
            "prompt": f"prompt {tid}",
            "reference": "1",
            "verifier": "exact",
            "policy_version": "p1",
            "attempts": [
                {
                    "completion": "1",
                    "reward": 1.0,
                    "n_tokens": tokens,
                    "token_logprobs": [-0.5] * tokens or None,
                    "token_entropies": [0.5] * tokens or None,
                }
                for _ in range(attempts)
            ],
        }
    )


def test_held_bytes_is_close_to_what_a_held_trace_takes_in_memory() -> None:
    """The estimate against measured allocations: a decoded trace, its original
    message and its prepared features part, as a scorer holds each open trace."""
    import tracemalloc

    from streams.schemas import decode, encode

    for attempts, tokens in ((1, 0), (8, 0), (8, 4), (8, 32), (4, 256)):
        raws = [encode(_heavy(f"t{i}", "add", tokens, attempts)) for i in range(50)]
        raws = [r.replace(b"-0.5", b"-0.123456789012345") for r in raws]  # model-like floats
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        held = [(decode(r, Trace), bytes(r)) for r in raws]
        prepared = prepare_many([t for t, _ in held])  # as the scorer prepares a batch
        measured = (tracemalloc.get_traced_memory()[0] - before) / len(held)
        tracemalloc.stop()
        del prepared
        estimate = held_bytes(held[0][0])
        assert 0.7 * measured <= estimate <= 1.4 * measured, (attempts, tokens, estimate, measured)


def test_open_bytes_stay_within_the_budget_and_every_trace_meets_one_fate() -> None:
    """Traces a hundredfold apart in size over 200 slices: the open traces never hold
    more than max_open_bytes; the oldest cohorts make room (closed if big enough,
    else rejected with the reason); a trace alone over the budget is rejected."""
    budget = 400_000
    settings = _settings(
        max_open=10_000, max_groups=8, min_groups=2, max_age_s=1e9, max_open_bytes=budget
    )
    b = CohortBuilder(settings, "p1")
    rng = random.Random(11)
    fates: dict[str, int] = {}
    sent: list[str] = []
    causes: Counter[str] = Counter()

    def account(events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Closed):
                causes[e.cause] += 1
                for t in e.cohort.traces:
                    fates[t.trace_id] = fates.get(t.trace_id, 0) + 1
            elif isinstance(e, Rejected):
                causes[e.field] += 1
                assert "max_open_bytes" in e.reason or e.field == "slice_key"
                fates[e.trace.trace_id] = fates.get(e.trace.trace_id, 0) + 1

    for i in range(3_000):
        tokens = rng.choice((0, 0, 4, 32, 256))
        tid = f"t{i}"
        sent.append(tid)
        trace = _heavy(tid, f"k{rng.randrange(200)}", tokens)
        if i == 1_500:
            trace = _heavy(tid, "k0", 4_000, attempts=8)  # alone over the budget
            assert held_bytes(trace) > budget
        account(b.on_item(trace, float(i)))
        assert b.open_bytes <= budget
        # The running total is what the open traces hold.
        held = [t for g in b.open_cohorts() for t in g.traces]
        assert b.open_bytes == sum(held_bytes(t) for t in held)
        if i % 100 == 0:
            account(b.on_tick(float(i)))
    account(b.flush_all())
    assert b.open_bytes == 0
    assert set(fates) == set(sent) and max(fates.values()) == 1
    assert causes["evicted"] > 0 and causes["attempts"] == 1
    assert causes["slice_key"] > 0  # small evicted cohorts: rejected with their reason


def test_the_budget_is_restored_and_a_lowered_budget_is_met_at_the_next_tick() -> None:
    settings = _settings(max_groups=8, max_age_s=1e9)
    b = CohortBuilder(settings, "p1")
    for i in range(40):
        b.on_item(_heavy(f"t{i}", f"k{i % 10}", 32), float(i))
    snap = json.loads(json.dumps(b.snapshot()))
    same = CohortBuilder(settings, "p1")
    same.restore(snap)
    assert same.open_bytes == b.open_bytes > 0
    lower = b.open_bytes // 2
    tight = CohortBuilder(settings.model_copy(update={"max_open_bytes": lower}), "p1")
    tight.restore(snap)
    events = tight.on_tick(100.0)
    assert tight.open_bytes <= lower
    # The oldest slices went first, each closed whole (4 traces >= min_groups).
    closed = _closed(events)
    assert closed and all(c.cause == "evicted" and c.n_groups == 4 for c in closed)
    assert [c.slice_key for c in closed] == [g["slice_key"] for g in snap["open"][: len(closed)]]
    assert tight.n_open_traces + sum(c.n_groups for c in closed) == 40


def test_a_journaled_snapshot_and_its_rows_are_the_whole_snapshot() -> None:
    """What the state store writes per batch (the rows that changed) loads as the
    snapshot a whole write would have held, open cohorts in opening order."""
    from daemon.core.journal import fill, stored

    settings = _settings(max_open=6, max_groups=3, max_age_s=3.0, max_open_bytes=60_000)
    b = CohortBuilder(settings, "p1")
    rng = random.Random(5)
    rows: dict[str, dict[str, str | None]] = {}
    for batch in range(150):
        for _ in range(rng.randrange(6)):
            tid = f"t{rng.randrange(400)}"  # redeliveries too
            b.on_item(_heavy(tid, f"k{rng.randrange(9)}", rng.choice((0, 4, 32))), batch, "d")
        b.on_tick(float(batch))
        snap = b.snapshot(journaled=True)
        assert snap["open"] == [] and snap["decided"] == {}
        for name, j in b.journals().items():
            if name not in rows or j.overflowed:
                rows[name] = {k: stored(v) for k, v in j.items()}
            else:
                for key, moved in j.changes.items():
                    if key not in j:
                        rows[name].pop(key, None)
                    else:
                        if moved:
                            rows[name].pop(key, None)
                        rows[name][key] = stored(j[key])
            j.drained()
        loaded = fill(json.loads(json.dumps(snap)), {n: list(r.items()) for n, r in rows.items()})
        assert loaded == json.loads(json.dumps(b.snapshot()))
