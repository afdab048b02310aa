"""Bad records become dead letters (data, not exceptions) that keep the input."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streams.deadletter import MAX_ORIGINAL_BYTES, dead_letter, original, route
from streams.schemas import (
    MAX_DEAD_LETTER_BYTES,
    MAX_MESSAGE_BYTES,
    DeadLetter,
    SchemaError,
    Trace,
    decode,
    encode,
)
from streams.transport import Record


def _rec(value: bytes, offset: int, partition: int = 0) -> Record:
    return Record("tap.traces", partition, offset, None, value, 1_700_000_000_000)


def test_dead_letter_keeps_origin_reason_and_bytes() -> None:
    raw = b'{"schema": "tapd.trace/1", \xff}'
    letter = dead_letter(
        raw,
        topic="tap.traces",
        partition=1,
        offset=42,
        stage="decode",
        error=SchemaError("$", "not valid UTF-8 at byte 27"),
        ts=5.0,
    )
    assert (letter.source_topic, letter.partition, letter.offset) == ("tap.traces", 1, 42)
    assert (letter.stage, letter.field, letter.reason) == (
        "decode",
        "$",
        "not valid UTF-8 at byte 27",
    )
    assert original(letter) == raw
    # the letter is itself a valid message of its own schema
    assert decode(encode(letter), DeadLetter) == letter


def test_explicit_field_and_reason() -> None:
    letter = dead_letter(
        b"{}",
        topic="t",
        partition=0,
        offset=0,
        stage="cohorting",
        field="cohort",
        reason="closed by age with 1 of 2 prompt groups",
    )
    assert letter.field == "cohort"
    with pytest.raises(ValueError, match="needs an error"):
        dead_letter(b"{}", topic="t", partition=0, offset=0, stage="x")


def test_oversize_original_is_truncated_and_the_letter_still_fits() -> None:
    raw = b"z" * 1_000_012  # the largest message the 0.9 broker accepts
    letter = dead_letter(
        raw,
        topic="tap.traces",
        partition=0,
        offset=7,
        stage="decode",
        error=SchemaError("$", "message is too big"),
    )
    assert original(letter) == raw[:MAX_ORIGINAL_BYTES]
    assert f"first {MAX_ORIGINAL_BYTES} of {len(raw)} bytes" in letter.reason
    assert len(encode(letter)) <= MAX_DEAD_LETTER_BYTES
    # ...and any message tapd could accept is kept whole.
    largest = b"y" * MAX_MESSAGE_BYTES
    whole = dead_letter(
        largest,
        topic="t",
        partition=0,
        offset=0,
        stage="s",
        field="f" * 5000,
        reason="\u0001" * 9000,
    )
    assert original(whole) == largest
    assert len(encode(whole)) <= MAX_DEAD_LETTER_BYTES
    assert decode(encode(whole), DeadLetter) == whole


def test_long_reasons_are_clipped_not_rejected() -> None:
    letter = dead_letter(
        b"x", topic="t" * 500, partition=0, offset=0, stage="s", field="f" * 5000, reason="r" * 9000
    )
    assert len(letter.field) == 1024 and len(letter.reason) == 4096
    assert len(letter.source_topic) == 128
    decode(encode(letter), DeadLetter)


def test_route_splits_oks_and_errs_in_order(trace_dict: dict[str, Any]) -> None:
    good = json.dumps(trace_dict).encode()
    no_prompt = dict(trace_dict)
    del no_prompt["prompt"]
    records = [
        _rec(good, 0),
        _rec(b"not json", 1),
        _rec(json.dumps(no_prompt).encode(), 2),
        _rec(good.replace(b"tr-0001", b"tr-0002"), 3),
    ]
    oks, errs = route(records, Trace, stage="decode")
    assert [r.offset for r, _ in oks] == [0, 3]
    assert [m.trace_id for _, m in oks] == ["tr-0001", "tr-0002"]
    assert [(e.offset, e.field) for e in errs] == [(1, "$"), (2, "prompt")]
    assert all(e.stage == "decode" and e.source_topic == "tap.traces" for e in errs)
    assert original(errs[1]) == records[2].value


def test_route_of_nothing() -> None:
    assert route([], Trace) == ([], [])
