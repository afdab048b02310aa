"""The hostile-input corpus and its audit (lab/hostile.py), and its short run.

The corpus's expectations are checked against the schemas alone (every
mutation meant to be refused is refused naming the field it was built to
break; every other message decodes), the audit is checked on crafted topic
contents (it must see a lost trace, an innocent cohort-mate, a silently
dropped mutation, a dead letter that is not the input, a wrong field), and
the short form of ``tapd reliability``'s hostile run goes through real
processes. The full form (20,000 mutations, 5,000 valid traces, Kafka) is
``tapd reliability``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lab.hostile import (
    HostileContext,
    HostilePlan,
    audit_hostile,
    check_plan,
    plan_hostile,
)
from lab.reliability import hostile_config, hostile_run, valid_trace
from streams.deadletter import Poison, dead_letter, decode_or_dead_letter
from streams.schemas import Dispatch, LiftResult, Trace, encode
from streams.transport import Record

TOPIC = {"traces": "tap.traces", "lift": "tap.lift", "dlq": "tap.dlq", "dispatch": "tap.dispatch"}


@pytest.fixture(scope="module")
def plan() -> HostilePlan:
    return plan_hostile(
        120, 2_500, seed=5, valid_trace=valid_trace, n_side=60, ctx=HostileContext(".", 1)
    )


def test_every_mutation_is_refused_naming_the_field_it_breaks(plan: HostilePlan) -> None:
    assert check_plan(plan) == []
    kinds = Counter(h.kind for h in plan.items)
    for kind in (
        "type_confusion",
        "huge_number",
        "huge_string",
        "deep_nesting",
        "invalid_utf8",
        "conflict",
        "hostile_arguments",
        "hostile_regex",
        "benign",
    ):
        assert kinds[kind] > 0, kind
    # The poison of issue 13 is in it, on every topic.
    huge = [h for h in plan.items if h.kind == "huge_number" and b"9" * 4_400 in h.raw]
    assert {h.role for h in huge} == {"traces", "lift", "dispatch"}


def test_the_plan_is_seeded_and_conflicts_follow_their_original(plan: HostilePlan) -> None:
    again = plan_hostile(
        120, 2_500, seed=5, valid_trace=valid_trace, n_side=60, ctx=HostileContext(".", 1)
    )
    assert again == plan
    first_seen: dict[str, int] = {}
    for i, h in enumerate(plan.items):
        if h.expect == "valid" and h.trace_id:
            first_seen.setdefault(h.trace_id, i)
        if h.expect == "conflict":
            assert h.trace_id is not None and first_seen[h.trace_id] < i
            assert h.key == h.trace_id.encode()  # the same partition as the original


def _correct_service(
    plan: HostilePlan,
) -> tuple[dict[str, list[Record]], list[Record], list[Record]]:
    """What a correct service leaves on the topics for ``plan`` (one partition each)."""
    records: dict[str, list[Record]] = {role: [] for role in TOPIC}
    letters: list[Record] = []
    members: list[str] = []
    model = {"traces": Trace, "lift": LiftResult, "dispatch": Dispatch}
    for h in plan.items:
        rec = Record(TOPIC[h.role], 0, len(records[h.role]), h.key, h.raw, 0)
        records[h.role].append(rec)
        if h.role == "dlq":
            continue
        if h.expect == "conflict":
            letter = dead_letter(
                h.raw,
                topic=rec.topic,
                partition=0,
                offset=rec.offset,
                stage="cohorting",
                field="trace_id",
                reason="conflicting duplicate",
            )
        elif h.expect in ("valid", "fate"):
            assert h.trace_id is not None
            members.append(h.trace_id)
            continue
        else:
            out = decode_or_dead_letter(
                h.raw,
                model[h.role],
                topic=rec.topic,
                partition=0,
                offset=rec.offset,  # type: ignore[call-overload]
                stage="lift" if h.role == "lift" else "decode",
            )
            assert isinstance(out, Poison)
            letter = out.letter
        letters.append(Record(TOPIC["dlq"], 0, len(letters), None, encode(letter), 0))
    decisions = [
        Record(
            "tap.decisions",
            0,
            i,
            None,
            json.dumps({"cohort_id": f"c{i}", "trace_ids": members[i : i + 8]}).encode(),
            0,
        )
        for i in range(0, len(members), 8)
    ]
    return records, letters, decisions


def test_the_audit_passes_a_correct_service(plan: HostilePlan) -> None:
    records, letters, decisions = _correct_service(plan)
    a = audit_hostile(plan, records, letters, decisions)  # type: ignore[arg-type]
    assert a.ok, a.problems()
    assert a.valid_in_one_cohort == a.valid == plan.count("valid")
    assert a.byte_identical + a.truncated_oversize == a.dead_letters == len(letters)
    assert a.refused_right_field == plan.count("decode", "traces")
    assert a.side_refused == plan.count("decode", "lift") + plan.count("decode", "dispatch")


def test_the_audit_catches_loss_harm_silence_and_altered_letters(plan: HostilePlan) -> None:
    records, letters, decisions = _correct_service(plan)
    # A valid trace lost: its cohort record is gone.
    lost = json.loads(decisions.pop(0).value)["trace_ids"]
    # An innocent cohort-mate dead-lettered (and so not in a cohort).
    rec = json.loads(decisions[0].value)
    valid_ids = {h.trace_id for h in plan.items if h.expect == "valid"}
    victim = next(t for t in reversed(rec["trace_ids"]) if t in valid_ids)
    rec["trace_ids"].remove(victim)
    decisions[0] = Record("tap.decisions", 0, 0, None, json.dumps(rec).encode(), 0)
    [raw] = [h.raw for h in plan.items if h.trace_id == victim and h.expect != "conflict"]
    [vrec] = [r for r in records["traces"] if r.value == raw]
    letters.append(
        Record(
            "tap.dlq",
            0,
            10**6,
            None,
            encode(
                dead_letter(
                    vrec.value,
                    topic="tap.traces",
                    partition=0,
                    offset=vrec.offset,
                    stage="features",
                    field="cohort",
                    reason="a cohort-mate broke the features",
                )
            ),
            0,
        )
    )
    # A refused mutation whose letter vanished, one with an altered original, one
    # with the wrong field.
    dropped = letters.pop(0)
    altered = json.loads(letters[0].value)
    altered["original_b64"] = "e30="
    letters[0] = Record("tap.dlq", 0, 0, None, json.dumps(altered).encode(), 0)
    wrong = json.loads(letters[1].value)
    wrong["field"] = "somewhere.else"
    letters[1] = Record("tap.dlq", 0, 1, None, json.dumps(wrong).encode(), 0)
    a = audit_hostile(plan, records, letters, decisions)  # type: ignore[arg-type]
    assert sorted(a.valid_lost) == sorted(t for t in lost if t in valid_ids)
    assert len(a.innocent) == 1 and a.innocent[0].startswith(victim)
    # The hostile-but-valid members of the lost cohort, and the mutation whose letter vanished.
    assert len(a.silently_dropped) == 1 + sum(t not in valid_ids for t in lost)
    assert json.loads(dropped.value)["offset"] >= 0
    assert len(a.not_identical) == 1
    assert len(a.refused_wrong_field) >= 1
    assert not a.ok


@pytest.mark.slow
def test_short_hostile_run_crashes_freezes_drops_and_harms_nothing(tmp_path: Path) -> None:
    """1,200 mutations and 300 valid traces through real ``tapd run`` and
    ``tapd trainer`` processes on the embedded log, ``/healthz`` probed throughout."""
    r = hostile_run(hostile_config(short=True), tmp_path)
    a = r.audit
    assert not r.crashes, r.events
    assert r.frozen == 0, r.health.slow(1.0)
    assert len(r.health.probes) > 20
    assert a.ok, a.problems()
    assert a.valid_in_one_cohort + a.valid_dead_lettered_small_cohort == a.valid
    assert a.byte_identical + a.truncated_oversize == a.dead_letters > 1_000
    assert r.canaries == 0


def test_only_the_hostile_section_of_the_report_is_replaced(plan: HostilePlan) -> None:
    from lab.hostile import HostileAudit
    from lab.reliability import HostileResult, with_hostile_section

    result = HostileResult(hostile_config(short=True), plan, HostileAudit(valid=3, mutations=9))
    before = "# Reliability figures\n\n## chaos: kept\n\nfigures\n"
    once = with_hostile_section(before, result, "tapd reliability --only hostile")
    assert once.startswith(before)
    assert "## hostile input: 9 mutations and 3 valid traces" in once
    assert "This section generated by `tapd reliability --only hostile`" in once
    result.audit = HostileAudit(valid=4, mutations=9)
    twice = with_hostile_section(once + "\n## fuzz: kept too\n", result, "again")
    assert twice.count("## hostile input:") == 1 and "4 valid traces" in twice
    assert "## chaos: kept" in twice and "## fuzz: kept too" in twice
