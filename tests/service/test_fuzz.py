"""Fuzzing: generated bad traces, dispatches and lift messages are all rejected
with a reason naming the field, kept whole in a dead letter, and never crash
anything; valid traffic beside them is unaffected.

The bulk runs through the pure validation path (``schemas.decode`` +
``deadletter.route``); duplicates and out-of-order timestamps, which are valid
messages, go through the real cohort builder; a smaller mix goes through a
real ``tapd run`` process in tests/service/test_chaos.py. The full form (10,000+
cases) is ``tapd reliability``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import CohortingSettings
from daemon.core.cohorting import Closed, CohortBuilder, Duplicate, Rejected
from lab.reliability import (
    FuzzCase,
    bad_message_strategy,
    plan_stream,
    top_field,
    valid_trace,
)
from streams.deadletter import MAX_ORIGINAL_BYTES, original, route
from streams.schemas import Dispatch, LiftResult, Trace, decode
from streams.transport import Record

REQUIRED = {
    "trace": ["trace_id", "ts", "subject", "prompt", "reference", "verifier", "policy_version"],
    "dispatch": [
        "cohort_id",
        "slice_key",
        "subject",
        "ts",
        "policy_version",
        "model_version",
        "feature_schema",
        "features",
        "predicted_lift",
        "uncertainty",
        "selection",
        "items",
    ],
    "lift": [
        "cohort_id",
        "ts",
        "trainer_id",
        "mode",
        "feature_schema",
        "features",
        "model_version",
        "predicted_lift",
        "selection",
        "nll_before",
        "nll_after",
        "nll_lift",
        "acc_before",
        "acc_after",
        "acc_lift",
        "train_reward_before",
        "train_reward_after",
        "policy_version_before",
        "policy_version_after",
        "steps",
        "duration_s",
        # not "plasticity": optional by the trainer contract (a custom loop may
        # not measure it)
    ],
}
MODELS: dict[str, type[Trace] | type[Dispatch] | type[LiftResult]] = {
    "trace": Trace,
    "dispatch": Dispatch,
    "lift": LiftResult,
}
# Examples per schema; three schemas, so 3x this many cases in the short form.
SHORT_EXAMPLES = 700
FUZZ = settings(
    max_examples=SHORT_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_batch(cases: list[FuzzCase], valid: bytes, model: Any) -> None:
    """Route the cases with valid traffic between them, as a consumer batch would."""
    records: list[Record] = []
    for i, c in enumerate(cases):
        records.append(Record("fuzz.in", 0, 2 * i, None, c.raw, 0))
        records.append(Record("fuzz.in", 0, 2 * i + 1, None, valid, 0))
    oks, errs = route(records, model, stage="decode")
    expected_valid = [r for r in records[1::2]] + [
        records[2 * i] for i, c in enumerate(cases) if c.field is None
    ]
    assert sorted(r.offset for r, _ in oks) == sorted(r.offset for r in expected_valid)
    good = decode(valid, model)
    for rec, msg in oks:
        if rec.offset % 2 == 1:
            assert msg == good  # valid traffic is untouched by its neighbours
    by_offset = {e.offset: e for e in errs}
    rejected = [(i, c) for i, c in enumerate(cases) if c.field is not None]
    assert len(errs) == len(rejected)  # every bad one rejected, nothing else
    for i, c in rejected:
        letter = by_offset[2 * i]
        assert letter.stage == "decode" and letter.source_topic == "fuzz.in"
        assert letter.reason, c.kind
        assert top_field(letter.field) == c.field, (c.kind, letter.field, letter.reason)
        kept = original(letter)
        assert kept == c.raw[:MAX_ORIGINAL_BYTES]  # the input is kept, byte for byte


@pytest.mark.parametrize("schema", ["trace", "dispatch", "lift"])
def test_generated_bad_messages_are_all_dead_lettered_with_their_field(
    schema: str,
    trace_dict: dict[str, Any],
    dispatch_dict: dict[str, Any],
    lift_dict: dict[str, Any],
) -> None:
    valid = {"trace": trace_dict, "dispatch": dispatch_dict, "lift": lift_dict}[schema]
    raw_valid = json.dumps(valid).encode()
    strategy = bad_message_strategy(valid, REQUIRED[schema])
    seen: list[FuzzCase] = []

    @FUZZ
    @given(st.lists(strategy, min_size=1, max_size=1))
    def run(cases: list[FuzzCase]) -> None:
        check_batch(cases, raw_valid, MODELS[schema])
        seen.extend(cases)

    run()
    kinds = {c.kind for c in seen}
    assert len(seen) >= SHORT_EXAMPLES
    expected = {
        "wrong_type",
        "missing_field",
        "extra_fields",
        "nan",
        "infinity",
        "huge_string",
        "huge_message",
        "deep_nesting",
        "invalid_utf8",
        "not_json",
        "wrong_schema",
    }
    if schema != "lift":
        expected.add("huge_array")  # a lift result has no top-level array
    assert expected <= kinds, expected - kinds


def test_seeded_corrupter_of_the_chaos_stream_is_rejected_with_a_reason() -> None:
    plan = plan_stream(3_000, seed=3, bad_share=0.2)
    records = [Record("t", 0, i, None, raw, 0) for i, raw in enumerate(plan.messages)]
    oks, errs = route(records, Trace)
    assert len(errs) == plan.n_bad and plan.n_bad > 400
    assert len(plan.bad_kinds) == 10  # every kind of corruption appears
    assert all(e.field and e.reason for e in errs)
    ids = [t.trace_id for _, t in oks]
    assert set(ids) == plan.valid_ids
    assert len(ids) - len(set(ids)) == plan.n_duplicates


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(
    n=st.integers(1, 120),
    dup_share=st.floats(0.0, 0.5),
    disorder=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    max_groups=st.integers(1, 6),
    max_open=st.integers(1, 4),
)
def test_duplicates_and_out_of_order_traces_each_meet_exactly_one_fate(
    n: int, dup_share: float, disorder: float, seed: int, max_groups: int, max_open: int
) -> None:
    """Valid but awkward traffic: resent ids and late timestamps are handled
    idempotently: each id ends in exactly one closed cohort or one rejection,
    and every resent copy is reported as a duplicate."""
    rng = random.Random(seed)
    traces = [
        Trace.model_validate(
            valid_trace(f"t{i}", rng.randrange(5), rng, k=2, learnable=True, ts=1e9 + i)
        )
        for i in range(n)
    ]
    stream = list(traces)
    n_dup = int(n * dup_share)
    stream += [rng.choice(traces) for _ in range(n_dup)]
    rng.shuffle(stream)  # out-of-order arrival, duplicates anywhere
    stream = [
        t.model_copy(update={"ts": t.ts - rng.uniform(0, 1e5)}) if rng.random() < disorder else t
        for t in stream
    ]
    builder = CohortBuilder(
        CohortingSettings(max_groups=max_groups, max_open=max_open, min_groups=1, max_age_s=50.0),
        "v0",
    )
    events: list[Any] = []
    now = 0.0
    for t in stream:
        now += rng.uniform(0, 20)
        events += builder.on_item(t, now)
        events += builder.on_tick(now)
    events += builder.flush_all(now)
    fates: dict[str, int] = {}
    for ev in events:
        if isinstance(ev, Closed):
            for t in ev.cohort.traces:
                fates[t.trace_id] = fates.get(t.trace_id, 0) + 1
        elif isinstance(ev, Rejected):
            fates[ev.trace.trace_id] = fates.get(ev.trace.trace_id, 0) + 1
    assert set(fates) == {t.trace_id for t in traces}
    assert set(fates.values()) == {1}
    assert sum(isinstance(ev, Duplicate) for ev in events) == n_dup
