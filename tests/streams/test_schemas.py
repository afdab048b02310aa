"""Every rejection names the field and the reason; good messages round-trip."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from streams.schemas import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_TEXT_CHARS,
    Dispatch,
    LiftResult,
    SchemaError,
    Trace,
    decode,
    decode_any,
    encode,
)


def _raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _reject(raw: bytes | str, model: type[Any] = Trace) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(raw, model)
    return info.value


@pytest.mark.parametrize(
    ("fixture", "model"),
    [("trace_dict", Trace), ("dispatch_dict", Dispatch), ("lift_dict", LiftResult)],
)
def test_each_schema_round_trips(
    request: pytest.FixtureRequest, fixture: str, model: type[Any]
) -> None:
    obj = request.getfixturevalue(fixture)
    msg = decode(_raw(obj), model)
    again = decode(encode(msg), model)
    assert again == msg
    assert decode_any(encode(msg)) == msg
    assert json.loads(encode(msg))["schema"] == obj["schema"]


def test_missing_field_is_named(trace_dict: dict[str, Any]) -> None:
    del trace_dict["subject"]
    e = _reject(_raw(trace_dict))
    assert e.field == "subject"
    assert "required" in e.reason.lower()


def test_missing_nested_field_has_its_path(trace_dict: dict[str, Any]) -> None:
    del trace_dict["attempts"][1]["stats"]["prob_mean"]
    e = _reject(_raw(trace_dict))
    assert e.field == "attempts[1].stats.prob_mean"


def test_missing_schema_is_named(trace_dict: dict[str, Any]) -> None:
    del trace_dict["schema"]
    e = _reject(_raw(trace_dict))
    assert (e.field, e.reason) == ("schema", "missing: every message names its schema")


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("ts",), "yesterday", "ts"),
        (("attempts",), "many", "attempts"),
        (("attempts", 0, "n_tokens"), "five", "attempts[0].n_tokens"),
        (("tags",), ["a", "b"], "tags"),
        (("prompt",), 42, "prompt"),
    ],
)
def test_wrong_type_is_named(
    trace_dict: dict[str, Any], path: tuple[Any, ...], value: Any, field: str
) -> None:
    target: Any = trace_dict
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    e = _reject(_raw(trace_dict))
    assert e.field == field
    assert e.reason  # pydantic's "Input should be a valid ..." message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nonfinite_reward_is_named(trace_dict: dict[str, Any], literal: str) -> None:
    trace_dict["attempts"][0]["reward"] = 0.5
    raw = _raw(trace_dict).replace(b'"reward": 0.5', f'"reward": {literal}'.encode())
    e = _reject(raw)
    assert e.field == "attempts[0].reward"
    assert "finite" in e.reason


def test_nan_in_free_form_args_is_named(trace_dict: dict[str, Any]) -> None:
    trace_dict["verifier_args"] = {"tolerance": 0.25}
    raw = _raw(trace_dict).replace(b"0.25", b"NaN")
    e = _reject(raw)
    assert e.field == "verifier_args.tolerance"
    assert "finite" in e.reason


def test_unknown_version_is_rejected(trace_dict: dict[str, Any]) -> None:
    trace_dict["schema"] = "tapd.trace/2"
    e = _reject(_raw(trace_dict))
    assert e.field == "schema"
    assert "unknown version '2'" in e.reason


def test_other_schema_is_rejected(dispatch_dict: dict[str, Any]) -> None:
    e = _reject(_raw(dispatch_dict), Trace)
    assert e.field == "schema"
    assert "expected tapd.trace/1" in e.reason


def test_unknown_schema_family(trace_dict: dict[str, Any]) -> None:
    trace_dict["schema"] = "acme.event/1"
    with pytest.raises(SchemaError) as info:
        decode_any(_raw(trace_dict))
    assert info.value.field == "schema"
    assert "unknown schema 'acme.event/1'" in info.value.reason


def test_oversize_message_is_rejected_before_parsing(trace_dict: dict[str, Any]) -> None:
    trace_dict["reference"] = "x" * MAX_MESSAGE_BYTES
    e = _reject(_raw(trace_dict))
    assert e.field == "$"
    assert f"over the {MAX_MESSAGE_BYTES}-byte limit" in e.reason


def test_oversize_field_is_named(trace_dict: dict[str, Any]) -> None:
    trace_dict["prompt"] = "y" * (MAX_TEXT_CHARS + 1)
    e = _reject(_raw(trace_dict))
    assert e.field == "prompt"
    assert str(MAX_TEXT_CHARS) in e.reason


def test_too_deep_nesting_is_rejected(trace_dict: dict[str, Any]) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = {"d": deep}
    trace_dict["verifier_args"] = {"deep": deep}
    e = _reject(_raw(trace_dict))
    assert e.field == "$"
    assert f"nested deeper than {MAX_JSON_DEPTH}" in e.reason


def test_pathological_nesting_does_not_crash() -> None:
    e = _reject(b"[" * 100_000 + b"]" * 100_000)
    assert e.field == "$"


def test_invalid_utf8_names_the_byte(trace_dict: dict[str, Any]) -> None:
    raw = _raw(trace_dict)
    at = raw.index(b"What")
    e = _reject(raw[:at] + b"\xff\xfe" + raw[at:])
    assert e.field == "$"
    assert f"not valid UTF-8 at byte {at}" in e.reason


def test_bad_json_and_non_objects(trace_dict: dict[str, Any]) -> None:
    assert "not valid JSON" in _reject(_raw(trace_dict)[:-3]).reason
    assert _reject(b"[1, 2]").reason == "expected a JSON object, got list"


def test_extra_fields_are_tolerated(trace_dict: dict[str, Any]) -> None:
    plain = decode(_raw(trace_dict), Trace)
    extended = copy.deepcopy(trace_dict)
    extended["added_by_a_newer_producer"] = {"x": 1}
    extended["attempts"][0]["latency_ms"] = 120
    assert decode(_raw(extended), Trace) == plain


def test_constraint_violation_is_named(lift_dict: dict[str, Any]) -> None:
    lift_dict["plasticity"]["dormant_fraction"] = 1.5
    e = _reject(_raw(lift_dict), LiftResult)
    assert e.field == "plasticity.dormant_fraction"
    assert "less than or equal to 1" in e.reason


def test_several_errors_are_counted(trace_dict: dict[str, Any]) -> None:
    del trace_dict["subject"]
    del trace_dict["verifier"]
    e = _reject(_raw(trace_dict))
    assert "(and 1 more error)" in e.reason
