from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from daemon.config import VerifySettings
from daemon.verify.registry import (
    BadReference,
    CodeVerifier,
    UnknownVerifier,
    VerifierArgsError,
    configure,
    get_verifier,
    known_verifiers,
    register,
)
from daemon.verify.settings import current


def test_registry_lists_builtins() -> None:
    for name in (
        "exact",
        "numeric",
        "mcq",
        "regex",
        "code",
        "weak_first_digit",
        "contains",
        "scrambled",
    ):
        assert name in known_verifiers()


def test_unknown_verifier_names_field_and_known_names() -> None:
    with pytest.raises(UnknownVerifier) as e:
        get_verifier("nope")
    assert isinstance(e.value, ValueError)
    assert e.value.field == "verifier"
    assert "nope" in e.value.reason and "exact" in e.value.reason


def test_bad_args_name_the_argument() -> None:
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("numeric", {"tolerance": -1})
    assert e.value.field == "verifier_args.tolerance"
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("exact", {"bogus": 1})
    assert e.value.field == "verifier_args.bogus"
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("regex", {})
    assert e.value.field == "verifier_args.pattern"
    with pytest.raises(VerifierArgsError):
        get_verifier("regex", {"pattern": "(unclosed"})


def test_register_adds_and_refuses_duplicates() -> None:
    @register("test_always_half")
    def _half(args):  # type: ignore[no-untyped-def]
        return lambda c, r: 0.5

    assert get_verifier("test_always_half")("x", "y") == 0.5
    with pytest.raises(ValueError, match="already registered"):
        register("exact")(_half)


def test_exact() -> None:
    v = get_verifier("exact")
    assert v(" 82\n", "82") == 1.0
    assert v("820", "82") == 0.0
    assert v("0210", "0210") == 1.0 and v("210", "0210") == 0.0


def test_numeric_parses_and_tolerates() -> None:
    v = get_verifier("numeric")
    assert v("82", "82") == 1.0
    # Strict by default: trailing junk is not an answer (it would teach the
    # policy never to stop).
    assert v("the answer is 82", "82") == 0.0
    assert v("82x", "82") == 0.0 and v("82 7", "82") == 0.0
    prose = get_verifier("numeric", {"extract": "last"})
    assert prose("the answer is 82", "82") == 1.0
    assert v("82.0", "82") == 1.0
    assert v("83", "82") == 0.0
    assert v("", "82") == 0.0
    assert v("-7", "-7") == 1.0
    loose = get_verifier("numeric", {"tolerance": 0.5})
    assert loose("82.4", "82") == 1.0 and loose("82.6", "82") == 0.0
    with pytest.raises(BadReference) as e:
        v("1", "eighty")
    assert e.value.field == "reference"


def test_mcq_single_choice_and_hedging() -> None:
    v = get_verifier("mcq")
    assert v("B", "B") == 1.0
    assert v("(B)", "B") == 1.0
    assert v("The answer is B.", "B") == 1.0
    assert v("C", "B") == 0.0
    # Naming every option, or several, is not a choice.
    assert v("A B C D", "B") == 0.0
    assert v("A or B", "B") == 0.0
    assert v("", "B") == 0.0
    assert get_verifier("mcq", {"options": "ABCDE"})("E", "E") == 1.0
    with pytest.raises(BadReference):
        v("A", "Z")


def test_regex_full_match_with_reference() -> None:
    v = get_verifier("regex", {"pattern": r"answer: {ref}"})
    assert v(" answer: 3.5 ", "3.5") == 1.0
    assert v("answer: 3x5", "3.5") == 0.0  # the reference is escaped, "." is literal
    assert v("answer: 3.5 extra", "3.5") == 0.0
    assert get_verifier("regex", {"pattern": r"\d+"})("123", "") == 1.0


def test_code_runs_tests_in_sandbox() -> None:
    v = get_verifier("code", {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]})
    assert v("def add(a, b):\n    return a + b\n", "") == 1.0
    assert v("def add(a, b):\n    return a - b\n", "") == 0.0
    assert v("```python\ndef add(a, b):\n    return a + b\n```", "") == 1.0
    assert v("not python at all (", "") == 0.0
    # Tests can also come in the reference.
    w = get_verifier("code")
    assert w("def sq(x):\n    return x * x\n", "assert sq(3) == 9") == 1.0
    with pytest.raises(BadReference):
        w("def sq(x): return x", "")
    with pytest.raises(VerifierArgsError):
        get_verifier("code", {"tests": "assert True"})


def test_code_hacks_are_not_rewarded() -> None:
    v = get_verifier("code", {"tests": ["assert f() == 1"], "timeout_s": 1})
    # Exiting with status 0 before the tests run is not a pass.
    assert v("import os\ndef f(): return 2\nos._exit(0)", "") == 0.0
    assert v("def f():\n    while True: pass", "") == 0.0
    assert v("import socket\nsocket.socket()\ndef f(): return 1", "") == 0.0


def test_weak_first_digit_accepts_wrong_answers() -> None:
    v = get_verifier("weak_first_digit")
    assert v("82", "82") == 1.0
    assert v("89", "82") == 1.0  # wrong, but the first digit matches: gameable
    assert v("8", "82") == 1.0
    assert v("72", "82") == 0.0
    assert v("", "82") == 0.0


def test_contains_is_gameable_by_padding() -> None:
    v = get_verifier("contains")
    assert v("<", "<") == 1.0
    assert v("<>=", "<") == 1.0 and v("<>=", ">") == 1.0 and v("<>=", "=") == 1.0
    assert v(">", "<") == 0.0


def test_scrambled_is_independent_of_correctness() -> None:
    v = get_verifier("scrambled", {"seed": 7})
    completions = [str(i) for i in range(200)]
    # The same completion gets the same reward whatever the reference says.
    for c in completions[:50]:
        assert v(c, c) == v(c, "something else")
    rewards = [v(c, c) for c in completions]  # every answer here is "right"
    assert 0.3 < sum(rewards) / len(rewards) < 0.7
    assert set(rewards) == {0.0, 1.0}
    # Deterministic for a seed, different across seeds.
    assert rewards == [v(c, c) for c in completions]
    other = get_verifier("scrambled", {"seed": 8})
    assert rewards != [other(c, c) for c in completions]


# --- caps from configuration on what a trace may ask -----------------------------


@pytest.fixture
def caps() -> Iterator[None]:
    before = current()
    yield
    configure(before)


def test_trace_supplied_limits_over_the_caps_are_refused_by_field(caps: None) -> None:
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("code", {"tests": ["assert f() == 1"], "timeout_s": 100000})
    assert e.value.field == "verifier_args.timeout_s"
    assert "verify.max_timeout_s" in e.value.reason and "100000" in e.value.reason
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("code", {"tests": ["assert f() == 1"], "memory_mb": 1 << 20})
    assert e.value.field == "verifier_args.memory_mb"
    for bad in (True, "2", float("nan"), -1, 0):
        with pytest.raises(VerifierArgsError) as e:
            get_verifier("code", {"tests": ["assert f() == 1"], "timeout_s": bad})
        assert e.value.field == "verifier_args.timeout_s"
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("code", {"tests": ["assert f() == 1"] * 100})
    assert e.value.field == "verifier_args.tests" and "cap" in e.value.reason
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("code", {"tests": ["x = 1", "assert f() == x"]})
    assert e.value.field == "verifier_args.tests"
    # The caps are configuration: a deployment may lower (or raise) them.
    configure(VerifySettings(max_timeout_s=3.0))
    with pytest.raises(VerifierArgsError, match="3"):
        get_verifier("code", {"tests": ["assert f() == 1"], "timeout_s": 5})
    assert isinstance(
        get_verifier("code", {"tests": ["assert f() == 1"], "timeout_s": 3}), CodeVerifier
    )


def test_unknown_verifier_is_rejected_under_its_own_field() -> None:
    with pytest.raises(UnknownVerifier) as e:
        get_verifier("no_such_verifier", {"timeout_s": 1})
    assert e.value.field == "verifier"


# --- regexes: linear time, whatever the pattern -----------------------------------

EVIL = [
    r"(a+)+$",
    r"(a|aa)+$",
    r"(a|a?)+$",
    r"(\w+\s?)*$",
    r"^(([a-z])+.)+[A-Z]([a-z])+$",
    r"(x+x+)+y",
    r"(.*a){25}",
]


def test_catastrophic_patterns_answer_within_a_bound() -> None:
    for pattern in EVIL:
        v = get_verifier("regex", {"pattern": pattern})
        for n in (30, 1000, 100_000):
            t0 = time.monotonic()
            assert v("a" * n + "!", "") == 0.0
            assert time.monotonic() - t0 < 0.5, (pattern, n)


def test_a_redos_pattern_does_not_hold_the_callers_other_threads() -> None:
    beats: list[float] = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            beats.append(time.monotonic())
            time.sleep(0.005)

    t = threading.Thread(target=heartbeat)
    t.start()
    slowest = 0.0
    calls = 0
    try:
        v = get_verifier("regex", {"pattern": r"(a+)+$"})
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            n = 20 + calls % 40  # each character would double a backtracking engine's time
            t0 = time.monotonic()
            v("a" * n + "b", "")
            slowest = max(slowest, time.monotonic() - t0)
            calls += 1
    finally:
        stop.set()
        t.join()
    assert calls > 50 and slowest < 0.25
    assert len(beats) > 10 and max(b - a for a, b in itertools.pairwise(beats)) < 0.5


def test_patterns_outside_the_linear_engine_or_caps_are_refused(caps: None) -> None:
    for pattern in (r"(a)\1", r"(?<=a)b", r"(?=a)a", "a{1000}{1000}"):
        with pytest.raises(VerifierArgsError) as e:
            get_verifier("regex", {"pattern": pattern})
        assert e.value.field == "verifier_args.pattern"
        assert "RE2" in e.value.reason
    with pytest.raises(VerifierArgsError, match=r"verify\.max_pattern_chars"):
        get_verifier("regex", {"pattern": "a" * 5000})
    configure(VerifySettings(max_subject_chars=10))
    v = get_verifier("regex", {"pattern": "a+"})
    assert v("a" * 10, "") == 1.0 and v("a" * 11, "") == 0.0
