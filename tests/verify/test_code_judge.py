"""How the code verifier splits tests into parent-side checks and sandbox holes, and judges."""

from __future__ import annotations

import ast
import time

import pytest

from daemon.verify.code import SuiteError, extract_code, inert, parse_tests
from daemon.verify.harness import _Budget, plain
from daemon.verify.registry import CodeVerifier


def _parse(text: str) -> tuple[tuple[str, ...], frozenset[int], list[str]]:
    s = parse_tests(text, max_tests=64, max_chars=20_000)
    return s.holes, s.candidate_side, [ast.unparse(c) for c in s.checks]


def test_only_the_candidates_expressions_go_to_the_sandbox() -> None:
    holes, cand, checks = _parse(
        "import math\n"
        "assert add(2, 3) == 5\n"
        "assert abs(area(2.0) - 12.566) < 1e-3, 'message'\n"
        "assert math.isclose(area(1), math.pi)\n"
        "assert sorted(uniq([3, 1, 3])) == [1, 3]\n"
        "assert add(1, 1) == sum(range(3)) - 1\n"
    )
    assert holes == (
        "add(2, 3)",
        "area(2.0)",
        "area(1)",
        "uniq([3, 1, 3])",
        "add(1, 1)",
        "sum(range(3)) - 1",
    )
    # The expected values (5, 12.566, [1, 3]) never reach the sandbox: they
    # stay in the parent's checks. "sum(range(3)) - 1" uses no candidate name:
    # it runs in a sandbox of its own, without the candidate's code.
    assert cand == frozenset({0, 1, 2, 3, 4})
    assert checks[0] == "__tapd_hole_0 == 5"
    assert checks[1] == "abs(__tapd_hole_1 - 12.566) < 0.001"
    assert checks[3] == "sorted(__tapd_hole_3) == [1, 3]"


def test_tests_that_cannot_be_judged_safely_are_refused() -> None:
    for text, why in [
        ("x = 5\nassert f() == x", "only assert statements and imports"),
        ("def helper():\n    return 1\nassert f() == helper()", "only assert"),
        ("from os import *\nassert f()", "import *"),
        ("assert 1 + 1 == 2", "no assertion uses the candidate's code"),
        ("print('hi')", "only assert"),
        ("", "no assert statements"),
        ("assert f(", "do not parse"),
        ("assert " + "(" * 300 + "f()" + ")" * 300, "parse"),
        ("assert " + " + ".join(["f()"] * 60), "nest deeper"),
    ]:
        with pytest.raises(SuiteError, match=why):
            parse_tests(text, max_tests=64, max_chars=20_000)
    with pytest.raises(SuiteError, match="over the cap of 2"):
        parse_tests("assert f() == 1\n" * 3, max_tests=2, max_chars=20_000)
    with pytest.raises(SuiteError, match="characters"):
        parse_tests("assert f() == 1\n" * 100, max_tests=200, max_chars=100)


def test_plain_values_only_exact_builtin_types() -> None:
    b = _Budget(10_000)
    assert plain([1, (2,), {3}, frozenset(), {"a": b"x"}, None, True, 1.5, float("inf")], b) == (
        "[1, (2,), {3}, set(), {'a': b'x'}, None, True, 1.5, 1e999]"
    )

    class Liar(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    for bad in (Liar(3), float("nan"), object(), iter([1]), [Liar(1)], {"k": object()}):
        with pytest.raises((TypeError, ValueError)):
            plain(bad, _Budget(10_000))
    with pytest.raises(ValueError, match="too large"):
        plain("x" * 100, _Budget(50))
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="deeply"):
        plain(deep, _Budget(10_000))


def test_checks_follow_python_semantics_on_plain_values() -> None:
    v = CodeVerifier(
        {
            "tests": [
                "assert f(4) == 2",  # 2.0 == 2, as in Python
                "assert g() == (1, 2)",  # a list is not a tuple
                "assert h() == {'b': 2, 'a': 1}",  # dict order does not matter
                "assert not k()",
                "assert k() is None",
                "assert 3 in g()",
            ],
            "timeout_s": 1.0,
        }
    )
    right = "def f(x):\n    return x / 2\ndef g():\n    return (1, 2)\ndef h():\n    return {'a': 1, 'b': 2}\ndef k():\n    return None\n"
    assert v(right, "") == 0.0  # 3 in (1, 2) is false
    verdict = v.verdict(right, "")
    assert (verdict.passed, verdict.total) == (5, 6)
    listy = right.replace("return (1, 2)", "return [1, 2]")
    assert v.verdict(listy, "").passed == 4


def test_the_parent_refuses_expensive_arithmetic_from_tests() -> None:
    # Tests come from traces: their arithmetic runs in the parent, so it is bounded.
    v = CodeVerifier(
        {
            "tests": [
                "assert round(f(), -1000000000) == 0",
                "assert f() ** 100000 > 0",
                "assert [f()] * 10**9 != []",
            ],
            "timeout_s": 1.0,
        }
    )
    t0 = time.monotonic()
    verdict = v.verdict("def f():\n    return 7\n", "")
    assert (verdict.passed, verdict.total) == (0, 3)
    assert time.monotonic() - t0 < 5.0


def test_the_reference_can_hold_the_tests() -> None:
    v = CodeVerifier({"timeout_s": 1.0})
    assert v("def sq(x):\n    return x * x\n", "assert sq(3) == 9") == 1.0
    assert v("def sq(x):\n    return x + x\n", "assert sq(3) == 9") == 0.0


def test_known_bad_answers_need_no_sandbox_run() -> None:
    for text in (
        "",
        "B",
        "not 82",
        "82 or 93",
        "zq82qz",
        "A B C D E",
        "def (",
        "assert g() == 8",
        "while True:\n    pass",
        "x[0].y",
    ):
        assert inert(text), text
    for text in (
        "def f(): pass",
        "import os",
        "f = 1",
        "print(1)",
        "(lambda: 0)()",
        "exec('def f(): return 1')",
        "globals()",
        "[f for f in range(3)]",
        "(f := 1)",
        "x.y = 1",
        "str.join('', 'a')",
    ):
        assert not inert(text), text
    v = CodeVerifier({"tests": ["assert add(1, 2) == 3"], "timeout_s": 1.0})
    verdict = v.verdict("A B C D E", "")
    assert verdict.reward == 0.0 and verdict.run is None


def test_extract_code_takes_the_first_python_fence() -> None:
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("plain code") == "plain code"
    assert extract_code("```json\n{}\n```") == "```json\n{}\n```"
    assert extract_code("```py\nunclosed") == "unclosed"
    # Linear, whatever the input: no regex backtracking on fences.
    assert extract_code("```\n" * 50_000).startswith("")
