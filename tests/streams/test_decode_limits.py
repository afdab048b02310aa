"""The attacks of issue 13 on the decode path, replayed: each is a SchemaError
naming its field (or ``$``), never another exception, and through the one
poison-message mechanism a dead letter that keeps the input byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from streams.deadletter import (
    INTERNAL,
    Poison,
    dead_letter_key,
    decode_or_dead_letter,
    decode_record,
    file_source,
    original,
    route,
)
from streams.schemas import (
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    DeadLetter,
    Dispatch,
    LiftResult,
    SchemaError,
    Trace,
    decode,
    decode_any,
    dispatch_item_bytes,
    encode,
)
from streams.transport import Record

HUGE = "9" * 5_000  # over Python's 4,300-digit int-to-string limit


def _reject(raw: bytes, model: Any = Trace) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(raw, model)
    return info.value


def _with(obj: dict[str, Any], path: tuple[Any, ...], literal: str) -> bytes:
    """``obj`` as JSON with the value at ``path`` replaced by a raw JSON literal."""
    marker = "__LITERAL__"
    target: Any = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return json.dumps(obj).replace(f'"{marker}"', literal).encode()


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("extra_ignored_field",), "extra_ignored_field"),
        (("verifier_args", "n"), "verifier_args.n"),
        (("attempts", 0, "n_tokens"), "attempts[0].n_tokens"),
        (("attempts", 0, "reward"), "attempts[0].reward"),
        (("ts",), "ts"),
    ],
)
def test_a_4301_digit_integer_anywhere_is_a_schema_error_naming_the_field(
    trace_dict: dict[str, Any], path: tuple[Any, ...], field: str
) -> None:
    raw = _with(trace_dict, path, HUGE)
    e = _reject(raw)
    assert e.field == field
    assert "5000 digits" in e.reason
    # ... and for whichever schema a CLI line names.
    with pytest.raises(SchemaError) as info:
        decode_any(raw)
    assert info.value.field == field


@pytest.mark.parametrize("model", [Trace, Dispatch, LiftResult, DeadLetter])
def test_the_huge_integer_in_each_schema_is_a_dead_letter_not_a_crash(
    model: Any,
    trace_dict: dict[str, Any],
    dispatch_dict: dict[str, Any],
    lift_dict: dict[str, Any],
) -> None:
    base = {Trace: trace_dict, Dispatch: dispatch_dict, LiftResult: lift_dict}.get(
        model, {"schema": "tapd.dlq/1"}
    )
    raw = _with(dict(base), ("ignored",), HUGE)
    out = decode_record(Record("t", 1, 9, None, raw, 0), model, "decode", 5.0)
    assert isinstance(out, Poison)
    assert (out.stage, out.field) == ("decode", "ignored")
    assert original(out.letter) == raw
    assert dead_letter_key(out.letter) == b"t/1/9"


def test_integers_in_verifier_args_are_bounded(trace_dict: dict[str, Any]) -> None:
    trace_dict["verifier_args"] = {"tolerance": 10**MAX_INT_DIGITS}
    e = _reject(json.dumps(trace_dict).encode())
    assert e.field == "verifier_args.tolerance"
    trace_dict["verifier_args"] = {"nested": [1, {"deep": -(10**MAX_INT_DIGITS)}]}
    assert _reject(json.dumps(trace_dict).encode()).field == "verifier_args.nested[1].deep"
    trace_dict["verifier_args"] = {"ok": 10**MAX_INT_DIGITS - 1}
    assert decode(json.dumps(trace_dict).encode(), Trace).verifier_args["ok"] > 0


@pytest.mark.parametrize(
    ("path", "literal", "field"),
    [
        (("attempts", 0, "reward"), "true", "attempts[0].reward"),
        (("attempts", 0, "reward"), '"1.0"', "attempts[0].reward"),
        (("attempts", 0, "n_tokens"), '"123"', "attempts[0].n_tokens"),
        (("attempts", 0, "n_tokens"), "1.0", "attempts[0].n_tokens"),
        (("attempts", 0, "n_tokens"), "false", "attempts[0].n_tokens"),
        (("ts",), "true", "ts"),
        (("ts",), '"1700000000"', "ts"),
        (("attempts", 0, "token_logprobs", 0), '"-0.1"', "attempts[0].token_logprobs[0]"),
    ],
)
def test_booleans_and_numeric_strings_are_not_numbers(
    trace_dict: dict[str, Any], path: tuple[Any, ...], literal: str, field: str
) -> None:
    e = _reject(_with(trace_dict, path, literal))
    assert e.field == field
    assert "valid" in e.reason


def test_integers_are_numbers(trace_dict: dict[str, Any]) -> None:
    raw = _with(trace_dict, ("attempts", 0, "reward"), "1")
    assert decode(raw, Trace).attempts[0].reward == 1.0


@pytest.mark.parametrize(
    ("literal", "field"),
    [("0", "ts"), ("0.0", "ts"), ("1e308", "ts"), ("1700000000000", "ts"), ("-5", "ts")],
)
def test_timestamps_of_zero_or_far_future_are_refused(
    trace_dict: dict[str, Any], literal: str, field: str
) -> None:
    assert _reject(_with(trace_dict, ("ts",), literal)).field == field


def test_n_tokens_must_match_token_logprobs(trace_dict: dict[str, Any]) -> None:
    trace_dict["attempts"][0]["n_tokens"] = 7
    e = _reject(json.dumps(trace_dict).encode())
    assert e.field == "attempts[0].token_logprobs"
    assert "n_tokens is 7" in e.reason


@pytest.mark.parametrize(
    ("key", "values", "field"),
    [
        ("token_logprobs", [-1e308], "attempts[0].token_logprobs[0]"),
        ("token_logprobs", [-0.5, 0.5], "attempts[0].token_logprobs[1]"),
        ("token_entropies", [1e308], "attempts[0].token_entropies[0]"),
        ("token_entropies", [-0.1], "attempts[0].token_entropies[0]"),
    ],
)
def test_values_that_would_make_a_feature_non_finite_are_refused_at_decode(
    trace_dict: dict[str, Any], key: str, values: list[float], field: str
) -> None:
    a = trace_dict["attempts"][0]
    a["token_logprobs"] = [-0.1] * len(values)
    a["n_tokens"] = len(values)
    a[key] = values
    if key == "token_entropies":
        a["token_entropies"] = values
    assert _reject(json.dumps(trace_dict).encode()).field == field


def test_token_stats_are_bounded_too(trace_dict: dict[str, Any]) -> None:
    trace_dict["attempts"][1]["stats"]["logprob_mean"] = -1e308
    assert _reject(json.dumps(trace_dict).encode()).field == "attempts[1].stats.logprob_mean"
    trace_dict["attempts"][1]["stats"]["logprob_mean"] = -1.0
    trace_dict["attempts"][1]["stats"]["entropy_mean"] = 1e308
    assert _reject(json.dumps(trace_dict).encode()).field == "attempts[1].stats.entropy_mean"


@pytest.mark.parametrize("where", ["extra", "verifier_args", "tags"])
def test_deep_nesting_anywhere_is_refused_before_parsing(
    trace_dict: dict[str, Any], where: str
) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    if where == "extra":
        trace_dict["ignored"] = deep
    else:
        trace_dict[where] = {"k": deep}
    e = _reject(json.dumps(trace_dict).encode())
    assert e.field == "$" and f"deeper than {MAX_JSON_DEPTH}" in e.reason


def test_brackets_inside_strings_do_not_count_as_nesting(trace_dict: dict[str, Any]) -> None:
    trace_dict["prompt"] = "[[[[{{{{" * 40 + '\\" ]]]" "'
    trace_dict["reference"] = "}" * 100
    t = decode(json.dumps(trace_dict).encode(), Trace)
    assert t.prompt.startswith("[[[[")


def test_exactly_the_depth_limit_is_accepted(trace_dict: dict[str, Any]) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH - 3):  # the root object and verifier_args dict are 2 levels
        deep = [deep]
    trace_dict["verifier_args"] = {"k": deep}
    decode(json.dumps(trace_dict).encode(), Trace)
    trace_dict["verifier_args"] = {"k": [deep, [[deep]]]}
    assert _reject(json.dumps(trace_dict).encode()).field == "$"


def test_lone_surrogates_are_refused(trace_dict: dict[str, Any]) -> None:
    # json.loads accepted these, and re-encoding the trace then raised.
    raw = json.dumps(trace_dict).encode().replace(b"What", b"\\ud800What")
    assert _reject(raw).field == "$"


def test_nan_in_free_form_arguments_is_named(trace_dict: dict[str, Any]) -> None:
    raw = _with(trace_dict, ("verifier_args", "list"), "[1, [NaN]]")
    e = _reject(raw)
    assert (e.field, "finite" in e.reason) == ("verifier_args.list[1][0]", True)


def test_an_unforeseen_failure_is_an_internal_dead_letter(
    monkeypatch: pytest.MonkeyPatch, trace_dict: dict[str, Any]
) -> None:
    import streams.deadletter as dl

    def broken(raw: bytes, model: Any) -> Any:
        raise RuntimeError("a bug in decoding")

    monkeypatch.setattr(dl, "decode", broken)
    raw = json.dumps(trace_dict).encode()
    out = decode_or_dead_letter(raw, Trace, topic="t", partition=0, offset=3, stage="lift")
    assert isinstance(out, Poison)
    assert (out.stage, out.field) == (INTERNAL, "$")
    assert "lift failed unexpectedly" in out.reason and "a bug in decoding" in out.reason
    assert original(out.letter) == raw
    oks, errs = route([Record("t", 0, 0, None, raw, 0)], Trace)
    assert not oks and errs[0].stage == INTERNAL


def test_route_of_dead_letters_tells_decoded_letters_from_refused_ones() -> None:
    from streams.deadletter import dead_letter

    letter = dead_letter(
        b"x", topic="t", partition=0, offset=0, stage="decode", field="$", reason="r"
    )
    oks, errs = route(
        [Record("d", 0, 0, None, encode(letter), 0), Record("d", 0, 1, None, b"junk", 0)],
        DeadLetter,
    )
    assert [m for _, m in oks] == [letter]
    assert [e.offset for e in errs] == [1]


def test_a_dead_letter_is_always_buildable() -> None:
    from streams.deadletter import dead_letter

    for ts in (float("nan"), -1.0, 1e308):
        letter = dead_letter(
            b"x", topic="", partition=-1, offset=-1, stage="", field="", reason="", ts=ts
        )
        assert decode(encode(letter), DeadLetter) == letter


def test_file_sources_are_unique_per_file_and_stable_per_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "sub" / "a.jsonl"
    b.parent.mkdir()
    a.write_text("{}\n")
    b.write_text("{}\n")
    assert file_source(a) == file_source(a)
    assert file_source(a) != file_source(b)  # same name, another file
    before = file_source(a)
    a.write_text("{}\n{}\n")
    assert file_source(a) != before  # changed content: another source
    assert file_source("-") != file_source("-")  # each read of stdin
    assert file_source(a).startswith("file:a.jsonl@")
    assert len(file_source(tmp_path / ("x" * 300))) <= 128
    raw = b"not json"
    la = decode_or_dead_letter(raw, None, topic=file_source(a), partition=-1, offset=1)
    lb = decode_or_dead_letter(raw, None, topic=file_source(b), partition=-1, offset=1)
    assert isinstance(la, Poison) and isinstance(lb, Poison)
    assert dead_letter_key(la.letter) != dead_letter_key(lb.letter)


def test_dispatch_item_bytes_is_exact(
    dispatch_dict: dict[str, Any], trace_dict: dict[str, Any]
) -> None:
    trace_dict["prompt"] = 'Quotes " and \\ and \u00e9 and \U0001f600 and \x01'
    trace_dict["verifier_args"] = {"pattern": "a+\\d", "n": 3, "x": [1.5, None, True]}
    t = decode(json.dumps(trace_dict).encode(), Trace)
    one = dict(dispatch_dict)
    item = {
        "trace_id": t.trace_id,
        "prompt": t.prompt,
        "reference": t.reference,
        "verifier": t.verifier,
        "verifier_args": t.verifier_args,
    }
    with_one = len(encode(decode(json.dumps({**one, "items": [item]}).encode(), Dispatch)))
    with_two = len(encode(decode(json.dumps({**one, "items": [item, item]}).encode(), Dispatch)))
    assert with_two - with_one == dispatch_item_bytes(t)


def test_a_message_at_the_size_limit_decodes_and_its_dead_letter_keeps_it_whole(
    trace_dict: dict[str, Any],
) -> None:
    body = json.dumps(trace_dict).encode()
    trace_dict["ignored"] = "p" * (MAX_MESSAGE_BYTES - len(body) - len(b', "ignored": ""'))
    raw = json.dumps(trace_dict).encode()
    assert len(raw) == MAX_MESSAGE_BYTES
    decode(raw, Trace)
    trace_dict["prompt"] = ""  # now refused: its dead letter carries all 700,000 bytes
    raw = json.dumps(trace_dict).encode()
    out = decode_record(Record("t", 0, 0, None, raw, 0), Trace)
    assert isinstance(out, Poison) and out.field == "prompt"
    assert original(out.letter) == raw
    assert decode(encode(out.letter), DeadLetter) == out.letter
