"""The reliability suite: streams with known ground truth, an audit of the topics, a report.

    plan (ground truth) ──► traces topic ──► tapd run / tapd trainer under chaos
                                                 │
    audit ◄── traces, dlq, decisions, dispatch, lift, labels topics + label log

The guarantee being checked is the spec's "no part may lose a trace, a
dispatch or a label silently": after the stream drains, every valid trace id
is a member of exactly one cohort (decision record) or exactly one dead
letter, every bad record has its dead letter, every dispatched cohort has one
lift result (trained at most once: every copy of its result is identical),
and every lift is learned as exactly one label. Redelivered *identical*
copies on a topic are at-least-once delivery working as designed and are
reported separately; two *different* outcomes for one idempotency key are
duplicates and fail the audit.

Everything here is pure (plans, mutations, the audit) except the thin
:class:`ServiceProcess` / :func:`read_topic` shell and :func:`run_suite`,
which drive real processes, a real broker and write ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.localbroker import KAFKA09_API_VERSION
from streams.schemas import (
    MAX_ATTEMPTS,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_TEXT_CHARS,
    DeadLetter,
    SchemaError,
    Trace,
    decode,
)
from streams.transport import Record, Transport

_WORDS = [
    "owl",
    "fig",
    "oak",
    "elk",
    "yak",
    "ant",
    "bee",
    "cod",
    "eel",
    "gnu",
    "hen",
    "jay",
    "kit",
    "emu",
    "ram",
    "sow",
    "asp",
    "bat",
    "cat",
    "dog",
    "fox",
    "hog",
    "koi",
    "orca",
    "pug",
    "rat",
]
SUBJECTS = ("arithmetic", "algebra", "logic", "geometry")


# --- streams with known ground truth -------------------------------------------


def valid_trace(
    trace_id: str,
    slice_no: int,
    rng: random.Random,
    *,
    k: int,
    learnable: bool,
    ts: float,
    task: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A trace that already carries ``k`` scored attempts (no rollouts needed).

    A learnable slice has attempts that disagree (half right), so the
    decision policy trains on it; the others are all correct (``skip_known``),
    which keeps the trainer's share of the stream small and controlled.
    """
    # Short prompts: the tiny policy has a 32-token context. Two random words
    # keep templates and 3-grams distinct, so no cohort reads as repetitive.
    x, y = rng.randint(1, 99), rng.randint(1, 99)
    reference = str(x + y)
    prompt = f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} {x}+{y}="
    if task is not None:  # (prompt, reference) of a task the policy half knows
        prompt, reference = task
    attempts = []
    for j in range(k):
        right = (j % 2 == 0) if learnable else True
        lp = [-round(rng.uniform(0.01, 2.0), 4) for _ in range(3)]
        attempts.append(
            {
                "completion": reference if right else str(int(reference) + 1),
                "reward": 1.0 if right else 0.0,
                "n_tokens": len(lp),
                "token_logprobs": lp,
            }
        )
    return {
        "schema": "tapd.trace/1",
        "trace_id": trace_id,
        "ts": ts,
        "tenant": "reliability",
        "source": "suite",
        "subject": SUBJECTS[slice_no % len(SUBJECTS)],
        "tags": {"task_type": f"slice{slice_no}", "operation": "recall"},
        "prompt": prompt,
        "reference": reference,
        "verifier": "exact",
        "policy_version": "v0",
        "attempts": attempts,
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def corrupt(valid: Mapping[str, Any], rng: random.Random) -> tuple[str, bytes]:
    """One bad message derived from a valid one: ``(kind, raw bytes)``.

    The cheap, seeded corrupter of the chaos and load streams; the fuzz part
    (:func:`bad_message_strategy`) explores the same kinds with hypothesis.
    """
    d = json.loads(json.dumps(valid))
    kind = rng.choice(
        (
            "wrong_type",
            "missing_field",
            "nan",
            "infinity",
            "huge_string",
            "huge_array",
            "deep_nesting",
            "invalid_utf8",
            "not_json",
            "unknown_version",
        )
    )
    if kind == "wrong_type":
        d["ts"] = {"seconds": d["ts"]}
    elif kind == "missing_field":
        del d["prompt"]
    elif kind == "nan":
        d["attempts"][0]["reward"] = float("nan")
    elif kind == "infinity":
        d["ts"] = float("inf")
    elif kind == "huge_string":
        d["prompt"] = "x" * (MAX_TEXT_CHARS + 1 + rng.randint(0, 1000))
    elif kind == "huge_array":
        d["attempts"] = d["attempts"] * (MAX_ATTEMPTS // len(d["attempts"]) + 1)
    elif kind == "deep_nesting":
        nest: Any = 1
        for _ in range(MAX_JSON_DEPTH + 5):
            nest = {"a": nest}
        d["verifier_args"] = nest
    elif kind == "invalid_utf8":
        raw = _dumps(d)
        i = raw.index(b'"prompt":"') + len(b'"prompt":"')
        return kind, raw[:i] + b"\xff\xfe" + raw[i:]
    elif kind == "not_json":
        return kind, _dumps(d)[: rng.randint(1, 40)]
    elif kind == "unknown_version":
        d["schema"] = "tapd.trace/99"
    return kind, _dumps(d)


@dataclass(frozen=True)
class StreamPlan:
    """A trace stream and what must become of it."""

    messages: tuple[bytes, ...]  # in send order
    valid_ids: frozenset[str]  # each must end in exactly one cohort or dead letter
    learnable_ids: frozenset[str]
    n_bad: int
    n_duplicates: int  # resent copies of valid traces (must be ignored)
    n_out_of_order: int  # valid traces whose ts is older than their predecessor's
    bad_kinds: Mapping[str, int]


def plan_stream(
    n_valid: int,
    seed: int = 0,
    *,
    slices: int = 8,
    learnable_slices: int = 1,
    learnable_share: float = 0.02,
    k: int = 4,
    bad_share: float = 0.02,
    duplicate_share: float = 0.02,
    disorder_share: float = 0.05,
    ts0: float = 1_700_000_000.0,
    learnable_tasks: tuple[str, str] | None = None,
) -> StreamPlan:
    """``n_valid`` distinct valid traces, plus bad messages, resent copies and
    out-of-order timestamps, in a seeded random order.

    ``learnable_tasks``: a ``lab.tasks`` family (subject, difficulty) whose
    prompts the learnable traces carry, so that a re-probe by the tiny policy
    still disagrees (the policy half knows the family) where made-up prompts
    would read as having no foothold."""
    rng = random.Random(seed)
    family = None
    if learnable_tasks is not None:
        from lab.tasks import FAMILIES

        family = FAMILIES[learnable_tasks]
    msgs: list[bytes] = []
    valid: list[str] = []
    learnable: list[str] = []
    kinds: Counter[str] = Counter()
    n_dup = n_disorder = 0
    sent: list[bytes] = []
    for i in range(n_valid):
        tid = f"rel{seed}-{i:07d}"
        is_learnable = rng.random() < learnable_share
        slice_no = (
            rng.randrange(learnable_slices)
            if is_learnable
            else learnable_slices + rng.randrange(max(1, slices - learnable_slices))
        )
        ts = ts0 + i
        if rng.random() < disorder_share:
            ts -= rng.uniform(10, 3600)  # late arrival: event time far behind
            n_disorder += 1
        task = family.generate(rng)[:2] if family is not None and is_learnable else None
        d = valid_trace(tid, slice_no, rng, k=k, learnable=is_learnable, ts=ts, task=task)
        raw = _dumps(d)
        msgs.append(raw)
        sent.append(raw)
        valid.append(tid)
        if is_learnable:
            learnable.append(tid)
        if rng.random() < duplicate_share and sent:
            msgs.append(rng.choice(sent))
            n_dup += 1
        if rng.random() < bad_share:
            kind, bad = corrupt(d, rng)
            msgs.append(bad)
            kinds[kind] += 1
    return StreamPlan(
        messages=tuple(msgs),
        valid_ids=frozenset(valid),
        learnable_ids=frozenset(learnable),
        n_bad=sum(kinds.values()),
        n_duplicates=n_dup,
        n_out_of_order=n_disorder,
        bad_kinds=dict(kinds),
    )


# --- the audit -------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """The topic contents an audit reads (values, with where they were read)."""

    traces: Sequence[Record]
    dlq: Sequence[Record]
    decisions: Sequence[Record]
    dispatch: Sequence[Record]
    lift: Sequence[Record]
    labels: Sequence[Record]


@dataclass
class Audit:
    """What became of a stream; the suite passes when every list is empty."""

    valid: int = 0
    bad: int = 0
    in_cohorts: int = 0
    valid_dead_lettered: int = 0
    bad_dead_lettered: int = 0
    cohorts: int = 0
    dispatched: int = 0
    lifts: int = 0
    trainer_dead_letters: int = 0
    labels: int = 0
    label_log: int | None = None
    redelivered_copies: int = 0  # identical extra copies (at-least-once, harmless)
    unexpected: list[str] = field(default_factory=list)  # records the plan did not send
    lost_traces: list[str] = field(default_factory=list)
    duplicated_traces: list[str] = field(default_factory=list)
    lost_bad: list[str] = field(default_factory=list)
    lost_dispatches: list[str] = field(default_factory=list)
    trained_twice: list[str] = field(default_factory=list)
    dispatch_not_decided: list[str] = field(default_factory=list)
    lost_labels: list[str] = field(default_factory=list)
    labels_counted_twice: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return (
            len(self.lost_traces)
            + len(self.lost_bad)
            + len(self.lost_dispatches)
            + len(self.lost_labels)
        )

    @property
    def duplicated(self) -> int:
        return (
            len(self.duplicated_traces) + len(self.trained_twice) + len(self.labels_counted_twice)
        )

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and not self.unexpected
            and not self.dispatch_not_decided
        )

    def problems(self, limit: int = 5) -> str:
        """The first few ids of each failure, for an error message an owner can act on."""
        parts = []
        for name in (
            "unexpected",
            "lost_traces",
            "duplicated_traces",
            "lost_bad",
            "lost_dispatches",
            "trained_twice",
            "dispatch_not_decided",
            "lost_labels",
            "labels_counted_twice",
        ):
            items = getattr(self, name)
            if items:
                parts.append(f"{name}={len(items)} e.g. {sorted(items)[:limit]}")
        return "; ".join(parts) or "none"

    def figures(self) -> dict[str, int | None]:
        return {
            "valid traces": self.valid,
            "bad messages": self.bad,
            "traces in exactly one cohort": self.in_cohorts,
            "valid traces dead-lettered (with reason)": self.valid_dead_lettered,
            "bad messages dead-lettered (with reason)": self.bad_dead_lettered,
            "cohorts decided": self.cohorts,
            "cohorts dispatched": self.dispatched,
            "lift results (distinct cohorts)": self.lifts,
            "dispatches dead-lettered by the trainer": self.trainer_dead_letters,
            "labels learned (labels topic)": self.labels,
            "labels in the predictor's label log": self.label_log,
            "identical redelivered copies": self.redelivered_copies,
            "lost": self.lost,
            "duplicated": self.duplicated,
        }


def _origin(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def _group_copies(records: Iterable[Record], key: Callable[[Any], str]) -> dict[str, set[bytes]]:
    """Distinct payloads per idempotency key, payloads compared without their ``ts``
    (a re-sent outbox message is byte-identical; a redone one differs)."""
    out: dict[str, set[bytes]] = defaultdict(set)
    for r in records:
        try:
            obj = json.loads(r.value)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            out[key(obj)].add(r.value)
    return out


def audit(
    plan: StreamPlan,
    topics: Topics,
    traces_topic: str,
    dispatch_topic: str,
    label_log: Sequence[str] | None = None,
) -> Audit:
    """Account for every message of ``plan`` from what the topics hold."""
    a = Audit(valid=len(plan.valid_ids), bad=plan.n_bad)
    planned = Counter(plan.messages)
    # The traces topic as sent: bad records by origin, valid ones by id.
    bad_origins: set[str] = set()
    seen = Counter(r.value for r in topics.traces)
    for value, n in seen.items():
        if n > planned.get(value, 0):
            a.unexpected.append(
                f"traces topic holds {n} copies of a message sent {planned.get(value, 0)} times"
            )
    for r in topics.traces:
        try:
            decode(r.value, Trace)
        except SchemaError:
            bad_origins.add(_origin(r.topic, r.partition, r.offset))
    missing = sum(planned.values()) - len(topics.traces)
    if missing > 0:
        a.unexpected.append(f"{missing} planned messages are not on the traces topic (producer)")

    # Dead letters, by origin; identical copies are redeliveries.
    letters: dict[str, set[bytes]] = defaultdict(set)
    trace_letters: dict[str, set[str]] = defaultdict(set)  # valid trace id -> origins
    for r in topics.dlq:
        try:
            letter = decode(r.value, DeadLetter)
        except SchemaError:
            a.unexpected.append(f"unreadable dead letter at {r.partition}/{r.offset}")
            continue
        origin = _origin(letter.source_topic, letter.partition, letter.offset)
        if letter.source_topic == dispatch_topic:
            letters["dispatch:" + origin].add(r.value)
            continue
        letters[origin].add(r.value)
        if letter.stage != "decode":
            try:
                tid = decode(base64.b64decode(letter.original_b64), Trace).trace_id
            except (SchemaError, binascii.Error):
                continue
            trace_letters[tid].add(origin)
    a.redelivered_copies += len(topics.dlq) - sum(len(v) for v in letters.values())
    a.lost_bad = sorted(o for o in bad_origins if o not in letters)
    a.bad_dead_lettered = len(bad_origins) - len(a.lost_bad)

    # Cohorts (decision records carry their members).
    decisions = _group_copies(topics.decisions, lambda o: str(o.get("cohort_id")))
    member_of: dict[str, set[str]] = defaultdict(set)
    dispatched_by_decision: set[str] = set()
    for cid, copies in decisions.items():
        for raw in copies:
            rec = json.loads(raw)
            for tid in rec.get("trace_ids", ()):
                member_of[tid].add(cid)
            if rec.get("dispatched"):
                dispatched_by_decision.add(cid)
    a.cohorts = len(decisions)
    a.redelivered_copies += len(topics.decisions) - sum(len(v) for v in decisions.values())

    for tid in plan.valid_ids:
        fates = len(member_of.get(tid, ())) + len(trace_letters.get(tid, ()))
        if fates == 0:
            a.lost_traces.append(tid)
        elif fates > 1:
            a.duplicated_traces.append(tid)
        elif member_of.get(tid):
            a.in_cohorts += 1
        else:
            a.valid_dead_lettered += 1

    # Dispatches -> lifts (or the trainer's dead letters).
    dispatches = _group_copies(topics.dispatch, lambda o: str(o.get("cohort_id")))
    a.redelivered_copies += len(topics.dispatch) - sum(len(v) for v in dispatches.values())
    a.dispatched = len(dispatches)
    a.dispatch_not_decided = sorted(set(dispatches) - dispatched_by_decision)
    lifts = _group_copies(topics.lift, lambda o: str(o.get("cohort_id")))
    a.lifts = len(lifts)
    a.redelivered_copies += len(topics.lift) - sum(len(v) for v in lifts.values())
    a.trained_twice = sorted(c for c, v in lifts.items() if len(v) > 1)
    rejected_dispatches: set[str] = set()
    for key, copies in letters.items():
        if key.startswith("dispatch:"):
            for raw in copies:
                try:
                    orig = base64.b64decode(json.loads(raw)["original_b64"])
                    rejected_dispatches.add(str(json.loads(orig).get("cohort_id")))
                except (ValueError, KeyError, binascii.Error, AttributeError):
                    continue
    a.trainer_dead_letters = len(rejected_dispatches)
    a.lost_dispatches = sorted(set(dispatches) - set(lifts) - rejected_dispatches)

    # Labels: one per lift, learned once.
    labels = _group_copies(topics.labels, lambda o: str(o.get("cohort_id")))
    a.labels = len(labels)
    a.redelivered_copies += len(topics.labels) - sum(len(v) for v in labels.values())
    a.labels_counted_twice = sorted(c for c, v in labels.items() if len(v) > 1)
    a.lost_labels = sorted(set(lifts) - set(labels))
    if label_log is not None:
        a.label_log = len(label_log)
        counts = Counter(label_log)
        a.labels_counted_twice += sorted(c for c, n in counts.items() if n > 1)
        a.lost_labels += sorted(set(lifts) - set(counts))
    return a


def label_log_ids(path: Path) -> list[str]:
    """Cohort ids of the labels in the scorer's state store, one per stored label."""
    if not path.exists():
        return []
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            rows = db.execute("SELECT cohort_id FROM labels ORDER BY seq").fetchall()
        except sqlite3.OperationalError:  # no labels table yet
            return []
    return [str(r[0]) for r in rows]


# --- fuzzing ---------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzCase:
    """A generated message and what validation must say about it."""

    kind: str
    raw: bytes
    # The top-level field the rejection must name ("$" for the whole message);
    # None for a message that is valid (extra fields) and must decode.
    field: str | None


def top_field(path: str) -> str:
    """``attempts[0].reward`` -> ``attempts``; ``$`` stays ``$``."""
    return path.split("[", 1)[0].split(".", 1)[0]


def bad_message_strategy(valid: Mapping[str, Any], required: Sequence[str]) -> Any:
    """A hypothesis strategy of :class:`FuzzCase` derived from one valid message.

    Kinds: wrong types, missing and extra fields, NaN and infinities, huge
    strings and arrays, deep nesting, invalid UTF-8, non-JSON, unknown schema.
    """
    from hypothesis import strategies as st

    base = json.loads(json.dumps(valid))
    fields = sorted(k for k in base if k != "schema")
    float_fields = sorted(k for k, v in base.items() if isinstance(v, float))
    str_fields = sorted(k for k, v in base.items() if isinstance(v, str) and k != "schema")
    list_fields = sorted(k for k, v in base.items() if isinstance(v, list))
    as_dict = st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=3)
    as_list = st.lists(st.integers(), min_size=1, max_size=3)

    def wrong_for(name: str) -> Any:
        # A JSON value that no lax coercion turns into the field's type.
        if isinstance(base[name], dict):
            return as_list
        if isinstance(base[name], list):
            return as_dict
        return as_dict | as_list

    def with_field(name: str, value: Any) -> dict[str, Any]:
        d = json.loads(json.dumps(base))
        d[name] = value
        return d

    def case(kind: str, obj: Any, fld: str | None) -> FuzzCase:
        return FuzzCase(kind, _dumps(obj), fld)

    wrong_type = st.sampled_from(fields).flatmap(
        lambda n: wrong_for(n).map(lambda v: case("wrong_type", with_field(n, v), n))
    )
    str_as_number = st.builds(
        lambda n, v: case("wrong_type", with_field(n, v), n),
        st.sampled_from(str_fields),
        st.integers() | st.floats(allow_nan=False, allow_infinity=False),
    )

    def drop(n: str) -> FuzzCase:
        d = json.loads(json.dumps(base))
        del d[n]
        return FuzzCase("missing_field", _dumps(d), "schema" if n == "schema" else n)

    missing = st.sampled_from([*required, "schema"]).map(drop)
    extra = st.builds(
        lambda extras: FuzzCase("extra_fields", _dumps({**extras, **base}), None),
        st.dictionaries(
            st.text(min_size=1, max_size=12).filter(lambda k: k not in base),
            st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.booleans())),
            min_size=1,
            max_size=5,
        ),
    )
    nonfinite = st.builds(
        lambda n, v: case("nan" if math.isnan(v) else "infinity", with_field(n, v), n),
        st.sampled_from(float_fields),
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    )
    huge_string = st.builds(
        lambda n, extra_len: case(
            "huge_string", with_field(n, "y" * (MAX_TEXT_CHARS + extra_len)), n
        ),
        st.sampled_from(
            [f for f in ("prompt", "reference", "completion") if f in base] or str_fields
        ),
        st.integers(1, 4000),
    )
    huge_message = st.integers(0, 50_000).map(
        lambda extra_len: case(
            "huge_message", with_field("padding", "z" * (MAX_MESSAGE_BYTES + extra_len)), "$"
        )
    )
    huge_array = (
        st.builds(
            lambda n, m: case("huge_array", with_field(n, [base[n][0]] * m), n),
            st.sampled_from([f for f in list_fields if base[f]] or ["$none"]),
            st.integers(300, 1200),
        )
        if any(base[f] for f in list_fields)
        else st.nothing()
    )

    def nested(depth: int) -> FuzzCase:
        nest: Any = [0]
        for _ in range(depth):
            nest = {"k": nest}
        return case("deep_nesting", with_field("nested", nest), "$")

    deep = st.integers(MAX_JSON_DEPTH + 1, 400).map(nested)

    def bad_utf8(junk: bytes, where: int) -> FuzzCase:
        raw = _dumps(base)
        i = 1 + where % (len(raw) - 2)
        return FuzzCase("invalid_utf8", raw[:i] + junk + raw[i:], "$")

    invalid_utf8 = st.builds(
        bad_utf8,
        st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"]),
        st.integers(0, 10_000),
    )
    not_json = st.one_of(
        st.binary(max_size=64).filter(lambda b: not _is_json_object(b)),
        st.integers(1, 200).map(lambda n: _dumps(base)[: min(n, len(_dumps(base)) - 1)]),
        st.sampled_from([b"[]", b"null", b"42", b'"trace"', b"", b"{", b"NaN"]),
    ).map(lambda raw: FuzzCase("not_json", raw, "$"))
    wrong_schema = (
        st.one_of(st.text(max_size=30), st.integers(), st.none())
        .filter(lambda s: s != base.get("schema"))
        .map(lambda s: case("wrong_schema", with_field("schema", s), "schema"))
    )
    return st.one_of(
        wrong_type,
        str_as_number,
        missing,
        extra,
        nonfinite,
        huge_string,
        huge_message,
        huge_array,
        deep,
        invalid_utf8,
        not_json,
        wrong_schema,
    )


TRACE_REQUIRED = ("trace_id", "ts", "subject", "prompt", "reference", "verifier", "policy_version")


@dataclass
class FuzzResult:
    """What the validation path made of generated bad traces."""

    cases: int = 0
    dead_lettered: int = 0  # rejected, naming the expected field, original kept
    accepted: int = 0  # valid (extra fields) and decoded
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def fuzz_validation(n_cases: int) -> FuzzResult:
    """``n_cases`` generated messages through ``route`` (decode + dead letter):
    every bad one must be dead-lettered naming its field, with its bytes kept."""
    from hypothesis import HealthCheck, given, settings

    from streams.deadletter import MAX_ORIGINAL_BYTES, original, route

    valid = valid_trace("fuzz-0", 0, random.Random(0), k=2, learnable=True, ts=1.7e9)
    out = FuzzResult()

    @settings(
        max_examples=n_cases,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(bad_message_strategy(valid, TRACE_REQUIRED))
    def one(case: FuzzCase) -> None:
        out.cases += 1
        out.kinds[case.kind] += 1
        oks, errs = route([Record("fuzz", 0, out.cases, None, case.raw, 0)], Trace)
        if case.field is None:
            if oks:
                out.accepted += 1
            else:
                out.failures.append(f"{case.kind}: a valid message was rejected: {errs}")
            return
        if (
            errs
            and top_field(errs[0].field) == case.field
            and errs[0].reason
            and original(errs[0]) == case.raw[:MAX_ORIGINAL_BYTES]
        ):
            out.dead_lettered += 1
        else:
            out.failures.append(f"{case.kind} ({case.field}): {errs or 'accepted'}")

    one()
    return out


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return False


# --- the shell: processes and topics --------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_topic(transport: Transport, topic: str, idle_s: float = 1.0) -> list[Record]:
    """Every record of ``topic`` (a throwaway group, from the beginning)."""
    consumer = transport.consumer([topic], f"tapd-audit-{os.urandom(6).hex()}")
    out: list[Record] = []
    try:
        idle_since = time.monotonic()
        while True:
            batch = consumer.poll(0.5, 5_000)
            if batch:
                out.extend(batch)
                idle_since = time.monotonic()
                continue
            lag = consumer.lag()
            if lag and not any(lag.values()) and time.monotonic() - idle_since >= 0.2:
                break
            if time.monotonic() - idle_since >= idle_s + (10.0 if not lag else 0.0):
                break
    finally:
        consumer.close()
    return out


def trace_key(raw: bytes) -> bytes | None:
    """The producer contract's key (the slice key under the default settings)."""
    from daemon.config import CohortingSettings
    from daemon.core.cohorting import partition_key, validate_slice_key

    return partition_key(raw, validate_slice_key(CohortingSettings().slice_key))


def produce(transport: Transport, topic: str, messages: Iterable[bytes], batch: int = 500) -> int:
    producer = transport.producer()
    n = 0
    try:
        for raw in messages:
            producer.send(topic, raw, key=trace_key(raw))
            n += 1
            if n % batch == 0:
                producer.flush(60.0)
        producer.flush(60.0)
    finally:
        producer.close()
    return n


class ServiceProcess:
    """A ``tapd`` role in its own process group, its JSON logs kept in a file."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, wait_s: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=wait_s)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events_all(self) -> list[dict[str, Any]]:
        """Every JSON log event of every start, in order."""
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            if f'"{name}"' not in line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == name:
                out.append(obj)
        return out


def tapd_argv(command: str) -> list[str]:
    """How to start a tapd role, with this interpreter."""
    from daemon import cli

    names = {
        c.name or (c.callback.__name__ if c.callback else "") for c in cli.app.registered_commands
    }
    if command not in names:
        raise ValueError(f"command: tapd has no {command!r} command")
    return [sys.executable, "-m", "daemon.cli", command]


# --- chaos and load runs ------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One chaos or load run; the short form is what the tests run."""

    n_valid: int = 20_000
    seed: int = 0
    scorer_kills: int = 5
    broker_restart: bool = True
    trainer_kill: bool = True
    transport: str = "kafka"  # "kafka" (needs the local broker) or "embedded"
    max_groups: int = 16
    learnable_share: float = 0.01
    burst_factor: float = 0.0  # >0: a load run, a burst at this multiple of the sustained rate
    sustained_per_s: float = 200.0
    timeout_s: float = 900.0
    dispatch_timeout_s: float = 20.0
    max_in_flight: int = 2
    max_rss_mb: float = 1024.0  # the scorer's memory bound under load


@dataclass
class RunResult:
    config: RunConfig
    plan: StreamPlan
    audit: Audit
    seconds: float
    kill_points: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)  # metrics over time (load)
    max_rss_bytes: int = 0
    bounds: dict[str, float] = field(default_factory=dict)


def service_env(cfg: RunConfig, state: Path, port: int, bootstrap: str | None) -> dict[str, str]:
    """Settings for both roles: tiny policy, traces that carry their attempts,
    a cheap trainer (one GRPO step, probe-and-revert so the policy version and
    thus trace freshness never change mid-run)."""
    from lab.tiny_policy import lab_policy_env

    env = {
        **lab_policy_env(state.parent, probe_size=4),
        "TAPD_STATE_DIR": str(state),
        "TAPD_LOG_LEVEL": "info",
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__GRACE_PERIOD_S": "20",
        "TAPD_COHORTING__MAX_GROUPS": str(cfg.max_groups),
        "TAPD_COHORTING__MAX_AGE_S": "4",
        "TAPD_COHORTING__MIN_GROUPS": "2",
        "TAPD_COHORTING__MAX_OPEN": "64",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "0",
        "TAPD_THRESHOLDS__MAX_IN_FLIGHT": str(cfg.max_in_flight),
        # A dispatch whose trainer was SIGKILLed mid-cohort normally comes back
        # (the trainer re-reads it); the short lease bounds the stall if not.
        "TAPD_THRESHOLDS__DISPATCH_TIMEOUT_S": str(cfg.dispatch_timeout_s),
        "TAPD_TRAINER__MODE": "probe_revert",
        "TAPD_GRPO__STEPS": "1",
        "TAPD_GRPO__NUM_GENERATIONS": "2",
        "TAPD_GRPO__MAX_COMPLETION_LENGTH": "4",
        "TAPD_GRPO__MAX_PROMPTS_PER_STEP": "4",
        "TAPD_TRAINER__METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if bootstrap is None:
        env["TAPD_TRANSPORT__KIND"] = "embedded"
        env["TAPD_TRANSPORT__EMBEDDED_PATH"] = str(state / "log.sqlite")
        env["TAPD_TRANSPORT__EMBEDDED_PARTITIONS"] = "2"
    else:
        env["TAPD_TRANSPORT__KIND"] = "kafka"
        env["TAPD_TRANSPORT__BOOTSTRAP_SERVERS"] = bootstrap
        env["TAPD_TRANSPORT__API_VERSION"] = KAFKA09_API_VERSION  # the 0.9 local broker
        env["TAPD_TRANSPORT__SESSION_TIMEOUT_MS"] = "6000"
    return env


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """A Prometheus text page as ``{name{labels}: value}`` (empty when unreachable)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children's group leader (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _wait_ready(url: str, proc: ServiceProcess, timeout_s: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"tapd run exited early:\n{proc.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2.0) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"tapd run not ready after {timeout_s:.0f}s:\n{proc.logs()[-3000:]}")


def _wait_event(proc: ServiceProcess, event: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(proc.events(event)) < proc.starts:
        if not proc.alive():
            raise RuntimeError(f"{proc.log_path.stem} exited early:\n{proc.logs()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {event} after {timeout_s:.0f}s:\n{proc.logs()[-3000:]}")
        time.sleep(0.3)


def read_topics(transport: Transport, topics: Any) -> Topics:
    return Topics(
        traces=read_topic(transport, topics.traces),
        dlq=read_topic(transport, topics.dlq),
        decisions=read_topic(transport, topics.decisions),
        dispatch=read_topic(transport, topics.dispatch),
        lift=read_topic(transport, topics.lift),
        labels=read_topic(transport, topics.labels),
    )


def run(cfg: RunConfig, workdir: Path, log: Callable[[str], None] = lambda m: None) -> RunResult:
    """Stream a plan through real ``tapd run`` and ``tapd trainer`` processes,
    with the chaos (or the burst) ``cfg`` asks for, then audit the topics."""
    from daemon.config import Topics as TopicNames
    from daemon.config import TransportSettings
    from streams.factory import open_transport

    t0 = time.monotonic()
    rng = random.Random(cfg.seed)
    state = workdir / "state"
    broker = None
    bootstrap = None
    if cfg.transport == "kafka":
        from lab.localbroker import LocalBroker

        (workdir / "broker").mkdir(parents=True, exist_ok=True)
        broker = LocalBroker(partitions=2, workdir=workdir / "broker").start()
        bootstrap = broker.bootstrap
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(cfg, state, port, bootstrap)
    ts = (
        TransportSettings(
            kind="kafka",
            bootstrap_servers=bootstrap,
            api_version=KAFKA09_API_VERSION,
            session_timeout_ms=6_000,
        )
        if bootstrap
        else TransportSettings(
            kind="embedded", embedded_path=state / "log.sqlite", embedded_partitions=2
        )
    )
    state.mkdir(parents=True, exist_ok=True)
    transport = open_transport(ts)
    names = TopicNames()
    plan = plan_stream(
        cfg.n_valid, cfg.seed, learnable_share=cfg.learnable_share, disorder_share=0.05
    )
    scorer = ServiceProcess(tapd_argv("run"), env, workdir / "scorer.log")
    trainer = ServiceProcess(tapd_argv("trainer"), env, workdir / "trainer.log")
    result = RunResult(cfg, plan, Audit(), 0.0)

    def say(message: str) -> None:
        result.events.append(f"{time.monotonic() - t0:7.1f}s {message}")
        log(message)

    try:
        scorer.start()
        trainer.start()
        _wait_ready(url, scorer)
        # The stream starts once the trainer consumes: its start-up (torch, the
        # policy) can take a minute on a loaded machine, and counting it as
        # trainer slowness would expire every lease before the first cohort.
        _wait_event(trainer, "trainer_started")
        say(f"scorer and trainer started; {len(plan.messages)} messages planned")
        if cfg.burst_factor > 0:
            _load_phase(cfg, plan, transport, names.traces, scorer, url, result, say)
        else:
            _chaos_phase(
                cfg, rng, plan, transport, names.traces, scorer, trainer, broker, url, result, say
            )
        # Drain: poll the audit until nothing is missing or the time is up.
        deadline = t0 + cfg.timeout_s
        while True:
            a = audit(plan, read_topics(transport, names), names.traces, names.dispatch)
            say(
                f"audit: lost={a.lost} duplicated={a.duplicated} cohorts={a.cohorts} lifts={a.lifts}"
            )
            if a.ok or time.monotonic() > deadline:
                break
            for p in (scorer, trainer):
                if not p.alive():
                    say(
                        f"{p.log_path.stem} died (rc={p.proc.returncode if p.proc else None}); restarting"
                    )
                    p.start()
            time.sleep(3.0)
        scorer.kill(signal.SIGTERM)
        trainer.kill(signal.SIGTERM)
        result.audit = audit(
            plan,
            read_topics(transport, names),
            names.traces,
            names.dispatch,
            label_log=label_log_ids(state / "scorer-state.sqlite"),
        )
    finally:
        scorer.kill()
        trainer.kill()
        transport.close()
        if broker is not None:
            broker.stop()
    result.seconds = time.monotonic() - t0
    return result


def _chaos_phase(
    cfg: RunConfig,
    rng: random.Random,
    plan: StreamPlan,
    transport: Transport,
    topic: str,
    scorer: ServiceProcess,
    trainer: ServiceProcess,
    broker: Any,
    url: str,
    result: RunResult,
    say: Callable[[str], None],
) -> None:
    """Produce the stream in chunks; SIGKILL the scorer at random points, bounce
    the broker once and SIGKILL the trainer once while it holds a cohort."""
    chunks = max(cfg.scorer_kills + 2, 6)
    size = math.ceil(len(plan.messages) / chunks)
    kills_after = sorted(rng.sample(range(chunks), cfg.scorer_kills)) if cfg.scorer_kills else []
    restart_after = chunks // 2 if cfg.broker_restart and broker is not None else -1
    trainer_killed = not cfg.trainer_kill
    for c in range(chunks):
        produce(transport, topic, plan.messages[c * size : (c + 1) * size])
        for _ in range(kills_after.count(c)):
            time.sleep(rng.uniform(0.5, 4.0))  # a random point in the scorer's work
            m = scrape(url + "/metrics")
            point = (
                f"chunk {c}: scorer SIGKILL after {m.get('tapd_traces_consumed_total', 0):.0f} "
                f"traces read, {m.get('tapd_cohorts_open', 0):.0f} cohorts open, "
                f"{m.get('tapd_dispatches_in_flight', 0):.0f} in flight"
            )
            scorer.kill(signal.SIGKILL)
            result.kill_points.append(point)
            say(point)
            scorer.start()
            _wait_ready(url, scorer)
        if c == restart_after:
            say("broker restart (SIGTERM, same port and data)")
            broker.restart()
            say("broker back")
        if not trainer_killed:
            trainer_killed = _kill_trainer_mid_cohort(
                scorer, trainer, url, rng, result, say, wait_s=5.0
            )
    if not trainer_killed:
        trainer_killed = _kill_trainer_mid_cohort(
            scorer, trainer, url, rng, result, say, wait_s=120.0
        )
        if not trainer_killed:
            say("trainer was never seen holding a cohort: no trainer kill")


def _dispatched_ids(scorer: ServiceProcess) -> set[str]:
    return {str(e.get("cohort_id")) for e in scorer.events("cohort_scored") if e.get("dispatched")}


def _kill_trainer_mid_cohort(
    scorer: ServiceProcess,
    trainer: ServiceProcess,
    url: str,
    rng: random.Random,
    result: RunResult,
    say: Callable[[str], None],
    wait_s: float,
) -> bool:
    """SIGKILL the trainer while a dispatched cohort awaits its lift (the
    trainer holds it), before the cohort's result is out."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        # Only a trainer that is up (policy loaded, consuming) can hold a cohort.
        ready = len(trainer.events("trainer_started")) >= trainer.starts
        if ready and scrape(url + "/metrics").get("tapd_dispatches_in_flight", 0) > 0:
            trained = len(trainer.events("cohort_trained"))
            time.sleep(rng.uniform(0.05, 0.3))
            if len(trainer.events("cohort_trained")) != trained:
                continue  # it finished meanwhile: wait for the next one
            held = _dispatched_ids(scorer) - {
                str(e.get("cohort_id")) for e in trainer.events("cohort_trained")
            }
            if not held:
                continue
            trainer.kill(signal.SIGKILL)
            point = (
                f"trainer SIGKILL mid-cohort after {trained} cohorts trained, "
                f"holding {len(held)} unanswered dispatch(es) {sorted(held)}"
            )
            result.kill_points.append(point)
            say(point)
            trainer.start()
            return True
        time.sleep(0.3)
    return False


def _load_phase(
    cfg: RunConfig,
    plan: StreamPlan,
    transport: Transport,
    topic: str,
    scorer: ServiceProcess,
    url: str,
    result: RunResult,
    say: Callable[[str], None],
) -> None:
    """A sustained rate for the first half of the stream, then the rest as one
    burst at ``burst_factor`` times that rate; sample memory, lag and pauses."""
    half = len(plan.messages) // 2
    rate = cfg.sustained_per_s
    sent = 0
    t = time.monotonic()
    while sent < half:
        n = min(max(1, int(rate / 10)), half - sent)
        produce(transport, topic, plan.messages[sent : sent + n])
        sent += n
        _sample(scorer, url, result)
        t += n / rate
        time.sleep(max(0.0, t - time.monotonic()))
    say(
        f"sustained {rate:.0f}/s for {half} messages; burst of {len(plan.messages) - half} at {cfg.burst_factor:.0f}x"
    )
    burst_rate = rate * cfg.burst_factor
    t = time.monotonic()
    while sent < len(plan.messages):
        n = min(max(1, int(burst_rate / 10)), len(plan.messages) - sent)
        produce(transport, topic, plan.messages[sent : sent + n])
        sent += n
        _sample(scorer, url, result)  # the lag must be seen rising during the burst
        t += n / burst_rate
        time.sleep(max(0.0, t - time.monotonic()))
    say("burst sent; sampling until drained")
    for _ in range(600):
        s = _sample(scorer, url, result)
        if s.get("lag", 1) == 0 and s.get("open", 1) == 0 and s.get("paused", 1) == 0:
            break
        time.sleep(1.0)


def _sample(scorer: ServiceProcess, url: str, result: RunResult) -> dict[str, float]:
    m = scrape(url + "/metrics")
    rss = rss_bytes(scorer.proc.pid) if scorer.proc else 0
    result.max_rss_bytes = max(result.max_rss_bytes, rss)
    s = {
        "t": time.monotonic(),
        "rss": float(rss),
        "lag": m.get('tapd_consumer_lag_messages{topic="tap.traces"}', -1.0),
        "open": m.get("tapd_cohorts_open", -1.0),
        "in_flight": m.get("tapd_dispatches_in_flight", -1.0),
        "paused": m.get("tapd_consumption_paused", -1.0),
        "consumed": m.get("tapd_traces_consumed_total", 0.0),
    }
    result.samples.append(s)
    return s


# --- the hostile-input run ------------------------------------------------------------


@dataclass(frozen=True)
class HostileConfig:
    """The hostile-input run: valid traces mixed with mutations on the real broker."""

    n_valid: int = 5_000
    n_mutations: int = 20_000
    n_side: int = 300  # mutations each on the lift and dispatch topics, junk on the DLQ
    seed: int = 0
    transport: str = "kafka"
    timeout_s: float = 2_400.0
    max_groups: int = 8
    probe_every_s: float = 0.25
    frozen_after_s: float = 1.0


@dataclass
class HealthLog:
    """Every ``/healthz`` probe of the scorer: (monotonic time, seconds, answered),
    the wall-clock time of each (to find it in the logs), and the host's load."""

    probes: list[tuple[float, float, bool]] = field(default_factory=list)
    down: list[tuple[float, float]] = field(default_factory=list)  # the process was not alive
    wall: dict[float, float] = field(default_factory=dict)  # monotonic -> unix time
    load: list[float] = field(default_factory=list)  # 1-minute load average, each second

    def slow(self, limit: float) -> list[tuple[float, float, bool]]:
        """Probes unanswered, or answered later than ``limit``, while the process lived."""
        return [
            p
            for p in self.probes
            if (not p[2] or p[1] > limit) and not any(a <= p[0] <= b for a, b in self.down)
        ]


class HealthProber:
    """Asks ``/healthz`` every ``every_s`` from a thread, each with a 5 s deadline."""

    def __init__(self, url: str, every_s: float, proc: ServiceProcess) -> None:
        import threading

        self.url = url
        self.every_s = every_s
        self.proc = proc
        self.log = HealthLog()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            t0 = time.monotonic()
            wall = time.time()
            alive = self.proc.alive()
            ok = False
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5.0) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            took = time.monotonic() - t0
            if alive and self.proc.alive():
                self.log.probes.append((t0, took, ok))
                if not ok or took > 1.0:
                    self.log.wall[t0] = wall
                if not self.log.load or len(self.log.probes) % 4 == 0:
                    self.log.load.append(os.getloadavg()[0])
            else:
                self.log.down.append((t0, t0 + took))
            self._stop.wait(max(0.0, self.every_s - took))

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class HostileResult:
    config: HostileConfig
    plan: Any  # lab.hostile.HostilePlan
    audit: Any  # lab.hostile.HostileAudit
    seconds: float = 0.0
    health: HealthLog = field(default_factory=HealthLog)
    crashes: list[str] = field(default_factory=list)
    canaries: int = 0  # files the hostile code managed to write outside its sandbox
    events: list[str] = field(default_factory=list)
    corpus_problems: list[str] = field(default_factory=list)  # lab.hostile.check_plan

    @property
    def frozen(self) -> int:
        return len(self.health.slow(self.config.frozen_after_s))

    @property
    def ok(self) -> bool:
        return (
            self.audit.ok
            and not self.crashes
            and not self.frozen
            and not self.canaries
            and not self.corpus_problems
        )


def hostile_run(
    cfg: HostileConfig, workdir: Path, log: Callable[[str], None] = lambda m: None
) -> HostileResult:
    """The hostile corpus (lab.hostile) through real ``tapd run`` and ``tapd trainer``
    processes on the broker, ``/healthz`` probed throughout, then the audit."""
    from daemon.config import Topics as TopicNames
    from daemon.config import TransportSettings
    from lab.hostile import (
        HostileAudit,
        HostileContext,
        audit_hostile,
        check_plan,
        plan_hostile,
    )
    from streams.factory import open_transport

    t0 = time.monotonic()
    state = workdir / "state"
    canaries = workdir / "canaries"
    canaries.mkdir(parents=True, exist_ok=True)
    broker = None
    bootstrap = None
    if cfg.transport == "kafka":
        from lab.localbroker import LocalBroker

        (workdir / "broker").mkdir(parents=True, exist_ok=True)
        broker = LocalBroker(partitions=2, workdir=workdir / "broker").start()
        bootstrap = broker.bootstrap
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_cfg = RunConfig(transport=cfg.transport, max_groups=cfg.max_groups, max_in_flight=2)
    env = service_env(run_cfg, state, port, bootstrap)
    ts = (
        TransportSettings(
            kind="kafka",
            bootstrap_servers=bootstrap,
            api_version=KAFKA09_API_VERSION,
            session_timeout_ms=6_000,
        )
        if bootstrap
        else TransportSettings(
            kind="embedded", embedded_path=state / "log.sqlite", embedded_partitions=2
        )
    )
    state.mkdir(parents=True, exist_ok=True)
    transport = open_transport(ts)
    names = TopicNames()
    topic_of = {
        "traces": names.traces,
        "lift": names.lift,
        "dlq": names.dlq,
        "dispatch": names.dispatch,
    }
    plan = plan_hostile(
        cfg.n_valid,
        cfg.n_mutations,
        cfg.seed,
        valid_trace=valid_trace,
        n_side=cfg.n_side,
        ctx=HostileContext(str(canaries.resolve()), port),
    )
    scorer = ServiceProcess(tapd_argv("run"), env, workdir / "scorer.log")
    trainer = ServiceProcess(tapd_argv("trainer"), env, workdir / "trainer.log")
    result = HostileResult(cfg, plan, HostileAudit())
    # The corpus's expectations against the schemas alone: a wrong expectation
    # is the corpus's fault, and must not read as tapd's.
    result.corpus_problems = check_plan(plan)

    def say(message: str) -> None:
        result.events.append(f"{time.monotonic() - t0:7.1f}s {message}")
        log(message)

    def supervise() -> None:
        for p in (scorer, trainer):
            if not p.alive():
                rc = p.proc.returncode if p.proc else None
                why = _last_error(p)
                result.crashes.append(f"{p.log_path.stem} exited (rc={rc}): {why}")
                say(f"{p.log_path.stem} exited (rc={rc}); restarting")
                p.start()

    def read_all() -> dict[str, list[Record]]:
        return {role: read_topic(transport, topic) for role, topic in topic_of.items()}

    try:
        scorer.start()
        trainer.start()
        _wait_ready(url, scorer)
        _wait_event(trainer, "trainer_started")
        n_traces = plan.count(role="traces")
        say(
            f"scorer and trainer started; {len(plan.items)} messages, {n_traces} on the traces topic"
        )
        with HealthProber(url, cfg.probe_every_s, scorer) as prober:
            producer = transport.producer()
            try:
                for i, h in enumerate(plan.items):
                    producer.send(topic_of[h.role], h.raw, key=h.key)
                    if i % 500 == 499:
                        producer.flush(120.0)
                        supervise()
                producer.flush(120.0)
            finally:
                producer.close()
            say("corpus sent")
            deadline = t0 + cfg.timeout_s
            settled_since: float | None = None
            while time.monotonic() < deadline:
                supervise()
                m = scrape(url + "/metrics")
                lag = m.get(f'tapd_consumer_lag_messages{{topic="{names.traces}"}}', -1.0)
                busy = m.get("tapd_cohorts_open", 1.0) + m.get("tapd_dispatches_in_flight", 1.0)
                read = m.get("tapd_traces_consumed_total", 0.0)
                if lag == 0 and busy == 0:
                    settled_since = settled_since or time.monotonic()
                    if time.monotonic() - settled_since > 8.0:
                        break
                else:
                    settled_since = None
                say(f"draining: lag={lag:.0f} open+in-flight={busy:.0f} read={read:.0f}")
                time.sleep(5.0)
            topics = read_all()
            result.audit = audit_hostile(
                plan,
                {r: topics[r] for r in ("traces", "lift", "dlq", "dispatch")},
                topics["dlq"],
                read_topic(transport, names.decisions),
            )
            say(f"audit: {result.audit.problems()}")
            result.health = prober.log
        scorer.kill(signal.SIGTERM)
        trainer.kill(signal.SIGTERM)
    finally:
        scorer.kill()
        trainer.kill()
        transport.close()
        if broker is not None:
            broker.stop()
    result.canaries = sum(1 for _ in canaries.iterdir())
    result.seconds = time.monotonic() - t0
    return result


def _utc(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%H:%M:%S.%f")[:-3]


def _last_error(proc: ServiceProcess) -> str:
    """The last error a role logged before it exited (for the report)."""
    for line in reversed(proc.logs().splitlines()[-200:]):
        if '"level": "error"' in line or "Traceback" in line or "tapd:" in line:
            try:
                obj = json.loads(line)
            except ValueError:
                return line[:300]
            return str(obj.get("text") or obj.get("event"))[:300]
    return "no error logged"


def hostile_report(r: HostileResult) -> list[str]:
    """The hostile-input section of docs/RELIABILITY.md."""
    a = r.audit
    c = r.config
    slow = r.health.slow(c.frozen_after_s)
    latencies = sorted(p[1] for p in r.health.probes if p[2])
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    kinds = Counter(h.kind for h in r.plan.items if h.role == "traces" and h.kind != "valid")
    side = Counter(h.role for h in r.plan.items if h.role != "traces")
    lines = [
        f"## hostile input: {a.mutations} mutations and {a.valid} valid traces on the "
        f"{c.transport} transport",
        "",
        f"{c.n_valid} valid traces, {c.n_mutations} schema-aware mutations of them on the "
        f"traces topic ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), and "
        f"{side['lift']} mutated lift results, {side['dispatch']} mutated dispatches (for "
        f"the trainer) and {side['dlq']} junk records on the dead-letter topic, through "
        f"real `tapd run` and `tapd trainer` processes; `/healthz` probed every "
        f"{c.probe_every_s:g} s throughout ({len(r.health.probes)} probes); {r.seconds:.0f} s. "
        "The corpus and the expected outcome of each message are built by "
        "`lab/hostile.py` (`plan_hostile`), independently of the service; the "
        "benign kind (odd in form only) counts as valid traces.",
        "",
        "| figure | count |",
        "|---|---:|",
        f"| crashed (a role exited) | {len(r.crashes)} |",
        f"| frozen (probes unanswered or slower than {c.frozen_after_s:g} s) | {len(slow)} |",
        f"| slowest `/healthz` answer | {max(latencies, default=0.0):.3f} s (p99 {p99:.3f} s) |",
        f"| silently dropped | {len(a.silently_dropped)} |",
        f"| valid traces | {a.valid} |",
        f"| valid traces in exactly one cohort | {a.valid_in_one_cohort} |",
        f"| valid traces dead-lettered in a cohort closed under min_groups | "
        f"{a.valid_dead_lettered_small_cohort} |",
        f"| valid traces lost | {len(a.valid_lost)} |",
        f"| valid traces in two fates | {len(a.valid_twice)} |",
        f"| innocent cohort-mates dead-lettered | {len(a.innocent)} |",
        f"| refused at decoding, dead letter naming the expected field | {a.refused_right_field} |",
        f"| refused with another stage or field than expected | {len(a.refused_wrong_field)} |",
        f"| hostile but valid messages: decided in a cohort | {a.fate_decided} |",
        f"| hostile but valid messages: dead-lettered (verifier, cohorting, ...) | "
        f"{a.fate_dead_lettered} |",
        f"| conflicting duplicates dead-lettered with both hashes | {a.conflicts_dead_lettered} |",
        f"| lift and dispatch mutations dead-lettered naming the field | {a.side_refused} |",
        f"| dead letters of dead letters | {len(a.re_dead_lettered)} |",
        f"| dead letters | {a.dead_letters} |",
        f"| dead letters byte-identical to their input | {a.byte_identical} |",
        f"| dead letters of oversize input (> {MAX_MESSAGE_BYTES} bytes) keeping its first "
        f"{MAX_MESSAGE_BYTES} bytes | {a.truncated_oversize} |",
        f"| dead letters neither | {len(a.not_identical)} |",
        f"| canary files written by sandboxed code | {r.canaries} |",
        f"| corpus expectations the schemas disagree with | {len(r.corpus_problems)} |",
        "",
        f"Host load (1-minute load average on {os.cpu_count()} CPUs, shared with other work) "
        f"during the probes: {min(r.health.load, default=0):.1f} to "
        f"{max(r.health.load, default=0):.1f}, median "
        f"{sorted(r.health.load)[len(r.health.load) // 2] if r.health.load else 0:.1f}.",
        "",
        "Dead letters by stage: "
        + ", ".join(f"{k} {v}" for k, v in sorted(a.by_stage.items()))
        + ".",
        "",
        f"Result: **{'PASS' if r.ok else 'FAIL'}**; problems: {a.problems()}"
        + (f"; crashes: {r.crashes}" if r.crashes else "")
        + (
            "; slow probes (UTC, seconds, answered): "
            + ", ".join(
                f"{_utc(r.health.wall.get(p[0], 0.0))} {p[1]:.2f} {p[2]}"
                for p in sorted(slow, key=lambda p: -p[1])[:5]
            )
            if slow
            else ""
        )
        + (f"; corpus: {r.corpus_problems[:3]}" if r.corpus_problems else ""),
        "",
    ]
    return lines


# --- the report -----------------------------------------------------------------------


def short_config(transport: str = "embedded") -> RunConfig:
    """The CI form: a few hundred traces, two scorer kills, one trainer kill."""
    return RunConfig(
        n_valid=400,
        scorer_kills=2,
        broker_restart=transport == "kafka",
        transport=transport,
        learnable_share=0.05,
        timeout_s=240.0,
    )


def load_config(short: bool = True, transport: str = "embedded") -> RunConfig:
    """A sustained rate, then a burst at 10x it, with no chaos: the scorer must
    pace itself by backpressure (one cohort in flight at a time, a trainer that
    is the bottleneck) and stay inside its memory bound."""
    return RunConfig(
        n_valid=2_000 if short else 10_000,
        scorer_kills=0,
        broker_restart=False,
        trainer_kill=False,
        transport=transport,
        learnable_share=0.3,
        max_in_flight=1,
        burst_factor=10.0,
        sustained_per_s=150.0,
        timeout_s=120.0 if short else 600.0,
    )


def report(
    results: Sequence[RunResult],
    fuzz: FuzzResult | None,
    command: str,
    hostile: HostileResult | None = None,
) -> str:
    """docs/RELIABILITY.md: what was run, the counts, and every kill point."""
    lines = [
        "# Reliability figures",
        "",
        f"Generated by `{command}`; do not edit by hand.",
        "",
        "Each run streams traces with known ground truth (valid, corrupted, resent",
        "copies, late timestamps) through real `tapd run` and `tapd trainer`",
        "processes, applies the chaos listed, then reads every topic back and",
        "accounts for each message (lab/reliability.py `audit`). The trainer",
        "runs cheap (one GRPO step, 2 generations, probe of 4, probe-and-revert);",
        "a dispatch's in-flight lease is 20 s. Both roles are supervised by the",
        "suite: a role that exits is restarted, and the restart is listed.",
        "",
    ]
    for r in results:
        c = r.config
        kind = "load" if c.burst_factor > 0 else "chaos"
        chaos = (
            f"{c.scorer_kills} scorer SIGKILLs, "
            f"{'one trainer SIGKILL, ' if c.trainer_kill else ''}"
            f"{'one broker restart' if c.broker_restart and c.transport == 'kafka' else 'no broker restart'}"
            if kind == "chaos"
            else f"{c.sustained_per_s:.0f} traces/s, then a burst at {c.burst_factor:.0f}x; "
            f"max in flight {c.max_in_flight}, memory bound {c.max_rss_mb:.0f} MiB"
        )
        lines += [
            f"## {kind}: {c.n_valid} valid traces on the {c.transport} transport",
            "",
            f"{chaos}. {len(r.plan.messages)} messages: {r.plan.n_bad} corrupted "
            f"({', '.join(f'{k} {v}' for k, v in sorted(r.plan.bad_kinds.items()))}), "
            f"{r.plan.n_duplicates} resent copies, {r.plan.n_out_of_order} out of order; "
            f"{r.seconds:.0f} s.",
            "",
            "| figure | count |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v if v is not None else '-'} |" for k, v in r.audit.figures().items()]
        lines += [
            "",
            f"Result: **{'PASS' if r.audit.ok else 'FAIL'}**; problems: {r.audit.problems()}",
            "",
        ]
        if r.kill_points:
            lines += ["Kill points:", ""] + [f"- {p}" for p in r.kill_points] + [""]
        restarts = [e.strip() for e in r.events if "restart" in e or "died" in e]
        if restarts:
            lines += ["Restarts and broker events:", ""] + [f"- {e}" for e in restarts] + [""]
        if r.samples:
            lags = [s["lag"] for s in r.samples if s["lag"] >= 0]
            paused = sum(1 for s in r.samples if s["paused"] == 1.0)
            lines += [
                f"Peak scorer RSS: {r.max_rss_bytes / 2**20:.0f} MiB (bound {c.max_rss_mb:.0f} MiB); "
                f"peak traces lag {max(lags, default=0):.0f} messages; consumption paused in "
                f"{paused} of {len(r.samples)} samples; drained to lag "
                f"{lags[-1] if lags else -1:.0f}.",
                "",
            ]
    if fuzz is not None:
        lines += [
            f"## fuzz: {fuzz.cases} generated traces through the validation path",
            "",
            "`schemas.decode` + `deadletter.route`; each bad message must be dead-lettered",
            "naming its field, with its bytes kept.",
            "",
            "| kind | cases |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in sorted(fuzz.kinds.items())]
        lines += [
            "",
            f"Dead-lettered with the right field: {fuzz.dead_lettered}; valid (extra fields) "
            f"accepted: {fuzz.accepted}; failures: {len(fuzz.failures)}"
            + (f" e.g. {fuzz.failures[:3]}" if fuzz.failures else ""),
            "",
        ]
    if hostile is not None:
        lines += hostile_report(hostile)
    return "\n".join(lines) + "\n"


HOSTILE_SECTION = "## hostile input:"


def with_hostile_section(report_text: str, hostile: HostileResult, command: str) -> str:
    """``report_text`` with its hostile-input section replaced by a new one
    (``tapd reliability --only hostile``: the other runs' figures are kept)."""
    lines = report_text.splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith(HOSTILE_SECTION)), len(lines))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = hostile_report(hostile)
    section[1:1] = ["", f"This section generated by `{command}`; do not edit by hand."]
    out = lines[:start] + section + lines[end:]
    return "\n".join(out).rstrip("\n") + "\n"


def run_hostile_only(
    short: bool, out: Path, workdir: Path, command: str, log: Callable[[str], None]
) -> bool:
    """``tapd reliability --only hostile``: the hostile-input run alone, its
    section of ``out`` replaced and the rest of the report kept as it was."""
    hcfg = hostile_config(short)
    log(f"hostile: {hcfg}")
    hostile_dir = workdir / f"hostile-{hcfg.transport}"
    shutil.rmtree(hostile_dir, ignore_errors=True)
    hostile = hostile_run(hcfg, hostile_dir, log)
    before = out.read_text() if out.exists() else report([], None, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(with_hostile_section(before, hostile, command))
    return hostile.ok


def run_suite(
    short: bool, out: Path, workdir: Path, command: str, log: Callable[[str], None]
) -> bool:
    """``tapd reliability``: chaos runs (embedded, then Kafka with a broker
    restart), a load run, the fuzz run, the hostile-input run, then the report."""
    chaos = (
        [short_config("embedded"), short_config("kafka")]
        if short
        else [RunConfig(transport="kafka")]
    )
    results = []
    for i, cfg in enumerate([*chaos, load_config(short)]):
        log(f"run {i}: {cfg}")
        rundir = workdir / f"run{i}-{cfg.transport}"
        shutil.rmtree(rundir, ignore_errors=True)  # an old run's log would fail the audit
        results.append(run(cfg, rundir, log))
    fuzz = fuzz_validation(10_000)
    log(f"fuzz: {fuzz.cases} cases, {len(fuzz.failures)} failures")
    hcfg = hostile_config(short)
    log(f"hostile: {hcfg}")
    hostile_dir = workdir / f"hostile-{hcfg.transport}"
    shutil.rmtree(hostile_dir, ignore_errors=True)
    hostile = hostile_run(hcfg, hostile_dir, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, fuzz, command, hostile))
    return all(r.audit.ok for r in results) and not fuzz.failures and hostile.ok


def hostile_config(short: bool) -> HostileConfig:
    """The full form on the Kafka broker; the CI form small, on the embedded log."""
    if short:
        return HostileConfig(
            n_valid=300, n_mutations=1_200, n_side=40, transport="embedded", timeout_s=600.0
        )
    return HostileConfig()
