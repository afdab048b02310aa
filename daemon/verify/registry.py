"""The verifier registry: ``get_verifier(name, args)(completion, reference) -> reward``.

A verifier maps a completion and the task's reference answer to a reward in
[0, 1]. It never raises on a completion (a malformed answer is simply wrong);
it raises :class:`VerifierError` (a ``ValueError`` with ``field`` and
``reason``) for what the *task* got wrong: an unknown verifier name, bad
arguments, or a reference it cannot use.

The product registers the honest verifiers (exact, numeric, mcq, regex,
code). More come from installed packages through the ``tapd.verifiers``
entry-point group: each entry names a module that calls :func:`register` on
import (the lab's deliberately gameable control verifiers arrive this way).
Adding a verifier is therefore one module plus one entry-point line.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from daemon.verify.code import (
    ExpectedValues,
    Suite,
    SuiteError,
    Verdict,
    extract_code,
    inert,
    judge,
    parse_tests,
)
from daemon.verify.errors import (
    BadReference,
    SandboxUnavailable,
    UnknownVerifier,
    VerifierArgsError,
    VerifierError,
)
from daemon.verify.sandbox import SandboxLimits, isolation
from daemon.verify.settings import configure, current

__all__ = [
    "Args",
    "BadReference",
    "CodeVerifier",
    "ProbeBudget",
    "ProbeSkipped",
    "SandboxUnavailable",
    "UnknownVerifier",
    "Verifier",
    "VerifierArgsError",
    "VerifierError",
    "configure",
    "extract_code",
    "get_verifier",
    "known_verifiers",
    "parse_number",
    "probe_verifier",
    "register",
]

Verifier = Callable[[str, str], float]
Args = Mapping[str, Any]
Factory = Callable[[Args], Verifier]

_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a verifier factory ``(args) -> Verifier`` under ``name``."""

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"verifier: {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


_plugins_loaded = False


def _load_plugins() -> None:
    """Import every module named in the ``tapd.verifiers`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="tapd.verifiers"):
        try:
            ep.load()
        except Exception:  # a broken plugin must not take the service down
            continue


def known_verifiers() -> tuple[str, ...]:
    _load_plugins()
    return tuple(sorted(_REGISTRY))


def get_verifier(name: str, args: Args | None = None) -> Verifier:
    factory = _REGISTRY.get(name)
    if factory is None:
        _load_plugins()
        factory = _REGISTRY.get(name)
    if factory is None:
        raise UnknownVerifier(name, known_verifiers())
    if args is not None and not isinstance(args, Mapping):
        raise VerifierArgsError("verifier_args", f"must be a mapping, got {type(args).__name__}")
    return factory(dict(args or {}))


def _allow(name: str, args: Args, allowed: set[str]) -> None:
    extra = sorted(set(args) - allowed)
    if extra:
        known = ", ".join(sorted(allowed)) or "none"
        raise VerifierArgsError(
            f"verifier_args.{extra[0]}", f"{name} takes no argument {extra[0]!r} (known: {known})"
        )


def _number_arg(name: str, args: Args, key: str, default: float) -> float:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise VerifierArgsError(
            f"verifier_args.{key}", f"{name}: must be a finite number >= 0, got {v!r}"
        )
    return float(v)


def _capped(name: str, args: Args, key: str, default: float, low: float, cap: float) -> float:
    """A number argument from a trace, within [low, cap]; the cap comes from settings."""
    v = _number_arg(name, args, key, default)
    if v < low or v > cap:
        raise VerifierArgsError(
            f"verifier_args.{key}",
            f"{name}: must be within {low:g}..{cap:g} (cap: verify.max_{key}), got {v:g}",
        )
    return v


@register("exact")
def _exact(args: Args) -> Verifier:
    _allow("exact", args, set())

    def verify(completion: str, reference: str) -> float:
        return float(completion.strip() == reference.strip())

    return verify


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str, *, extract_last: bool = False) -> float | None:
    """The completion as a number: all of it, or with ``extract_last`` its last number.

    Strict by default: a lenient "last number anywhere" rule rewards
    ``"82x"`` for ``82``, so GRPO never learns to stop, and the policy drifts
    while its training reward looks fine. Extraction is for chat models that
    answer in prose ("the answer is 82").
    """
    s = text.strip().replace(",", "")
    if _NUMBER.fullmatch(s):
        return float(s)
    if not extract_last:
        return None
    found = _NUMBER.findall(s)
    return float(found[-1]) if found else None


@register("numeric")
def _numeric(args: Args) -> Verifier:
    _allow("numeric", args, {"tolerance", "rel_tolerance", "extract"})
    tol = _number_arg("numeric", args, "tolerance", 0.0)
    rel = _number_arg("numeric", args, "rel_tolerance", 0.0)
    extract = args.get("extract", "whole")
    if extract not in ("whole", "last"):
        raise VerifierArgsError(
            "verifier_args.extract", f"numeric: must be 'whole' or 'last', got {extract!r}"
        )

    def verify(completion: str, reference: str) -> float:
        ref = parse_number(reference)
        if ref is None:
            raise BadReference("numeric", f"{reference!r} is not a number")
        got = parse_number(completion, extract_last=extract == "last")
        if got is None:
            return 0.0
        return float(abs(got - ref) <= max(tol, rel * abs(ref)))

    return verify


@register("mcq")
def _mcq(args: Args) -> Verifier:
    _allow("mcq", args, {"options"})
    options = args.get("options", "ABCD")
    if (
        not isinstance(options, str)
        or not options
        or not all(c.isalpha() and c.isupper() for c in options)
    ):
        raise VerifierArgsError(
            "verifier_args.options", f"mcq: must be capital letters, got {options!r}"
        )
    letters = re.compile(rf"(?<![A-Za-z])([{options}])(?![A-Za-z])")

    def choice(completion: str) -> str | None:
        s = completion.strip().strip("()[].:").strip()
        if len(s) == 1 and s.upper() in options:
            return s.upper()
        named = set(letters.findall(completion))
        # An answer that names several options hedges: it is not a choice.
        return named.pop() if len(named) == 1 else None

    def verify(completion: str, reference: str) -> float:
        ref = reference.strip().upper()
        if len(ref) != 1 or ref not in options:
            raise BadReference("mcq", f"{reference!r} is not one of the options {options}")
        return float(choice(completion) == ref)

    return verify


def _re2_options() -> Any:
    import re2

    o = re2.Options()
    o.log_errors = False
    o.max_mem = 8 << 20  # bounds the compiled automaton; bigger patterns are refused
    return o


@functools.lru_cache(maxsize=256)
def _re2(pattern: str) -> Any:
    import re2

    return re2.compile(pattern, _re2_options())


@register("regex")
def _regex(args: Args) -> Verifier:
    """Full match of the stripped completion; ``{ref}`` stands for the escaped reference.

    Patterns run on RE2, whose matching time is linear in the input: a
    trace-supplied ``(a+)+$`` cannot freeze the scorer. Its syntax has no
    backreferences or lookaround; such patterns are refused with the reason.
    """
    import re2

    s = current()
    _allow("regex", args, {"pattern"})
    pattern = args.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise VerifierArgsError("verifier_args.pattern", "regex: a non-empty pattern is required")
    if len(pattern) > s.max_pattern_chars:
        raise VerifierArgsError(
            "verifier_args.pattern",
            f"regex: {len(pattern)} characters, over the cap of {s.max_pattern_chars} "
            "(verify.max_pattern_chars)",
        )
    try:
        _re2(pattern.replace("{ref}", ""))
    except re2.error as e:
        raise VerifierArgsError(
            "verifier_args.pattern", f"regex: not accepted by the linear-time engine (RE2): {e}"
        ) from None

    def verify(completion: str, reference: str) -> float:
        subject = completion.strip()
        if len(subject) > s.max_subject_chars:
            return 0.0
        try:
            rx = _re2(pattern.replace("{ref}", re2.escape(reference.strip())))
        except re2.error as e:
            raise BadReference("regex", f"the pattern with this reference fails: {e}") from None
        return float(rx.fullmatch(subject) is not None)

    return verify


class ProbeSkipped(Exception):
    """A reward-trust probe not run: the cohort's sandbox budget is spent."""


class ProbeBudget:
    """Sandbox runs one reward-trust computation may spend (``verify.probe_max_runs``)."""

    def __init__(self, runs: int | None = None) -> None:
        self.left = current().probe_max_runs if runs is None else runs
        self._lock = threading.Lock()

    def spend(self) -> None:
        with self._lock:
            if self.left <= 0:
                raise ProbeSkipped
            self.left -= 1


class CodeVerifier:
    """``code``: runs the completion against assert tests in the sandbox.

    Arguments (each checked against ``TapdSettings.verify``): ``tests`` (a
    list of assert/import lines; without it the reference holds them),
    ``timeout_s`` (CPU seconds per run) and ``memory_mb``.
    """

    def __init__(self, args: Args, limits: SandboxLimits | None = None) -> None:
        s = current()
        _allow("code", args, {"tests", "timeout_s", "memory_mb"})
        tests = args.get("tests")
        if tests is not None and (
            not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests)
        ):
            raise VerifierArgsError(
                "verifier_args.tests", "code: must be a non-empty list of strings"
            )
        self.timeout_s = _capped(
            "code", args, "timeout_s", s.default_timeout_s, 0.05, s.max_timeout_s
        )
        memory = _capped("code", args, "memory_mb", s.default_memory_mb, 64, s.max_memory_mb)
        self.limits = limits or SandboxLimits.from_settings(
            s, timeout_s=self.timeout_s, memory_mb=int(memory)
        )
        self.max_code_chars = s.max_code_chars
        self._max = (s.max_tests, s.max_test_chars)
        self._fixed: tuple[Suite, ExpectedValues] | None = None
        self._by_reference: dict[str, tuple[Suite, ExpectedValues]] = {}
        if tests is not None:
            try:
                self._fixed = self._suite("\n".join(tests))
            except SuiteError as e:
                raise VerifierArgsError("verifier_args.tests", f"code: {e}") from None
        isolation(s)  # refuse here, naming the setting, if this host cannot isolate code

    def _suite(self, text: str) -> tuple[Suite, ExpectedValues]:
        suite = parse_tests(text, max_tests=self._max[0], max_chars=self._max[1])
        return suite, ExpectedValues(suite, self.limits)

    def suite_for(self, reference: str) -> tuple[Suite, ExpectedValues]:
        if self._fixed is not None:
            return self._fixed
        if reference not in self._by_reference:
            if "assert" not in reference:
                raise BadReference("code", "no tests: give verifier_args.tests or assert lines")
            try:
                parsed = self._suite(reference)
            except SuiteError as e:
                raise BadReference("code", str(e)) from None
            if len(self._by_reference) >= 64:
                self._by_reference.pop(next(iter(self._by_reference)))
            self._by_reference[reference] = parsed
        return self._by_reference[reference]

    def verdict(self, completion: str, reference: str) -> Verdict:
        suite, expected = self.suite_for(reference)
        code = extract_code(completion)
        if len(code) > self.max_code_chars:
            return Verdict(0, len(suite.checks), "code over verify.max_code_chars", None)
        try:
            return judge(code, suite, expected, self.limits)
        except SuiteError as e:
            field = "verifier_args.tests" if self._fixed is not None else "reference"
            if field == "reference":
                raise BadReference("code", str(e)) from None
            raise VerifierArgsError(field, f"code: {e}") from None

    def __call__(self, completion: str, reference: str) -> float:
        return self.verdict(completion, reference).reward

    def for_probe(self, budget: ProbeBudget) -> Verifier:
        """This verifier with the probe's time limit, spending ``budget`` per sandbox run."""
        s = current()
        probe = CodeVerifier.__new__(CodeVerifier)
        probe.__dict__.update(self.__dict__)
        probe.limits = SandboxLimits.from_settings(
            s,
            timeout_s=min(self.timeout_s, s.probe_timeout_s),
            memory_mb=self.limits.memory_mb,
        )
        probe._by_reference = {}
        if self._fixed is not None:
            probe._fixed = (self._fixed[0], ExpectedValues(self._fixed[0], probe.limits))

        def verify(completion: str, reference: str) -> float:
            _, expected = probe.suite_for(reference)
            code = extract_code(completion)
            if inert(code) or len(code) > self.max_code_chars:
                return 0.0
            if not expected.known:
                budget.spend()  # the tests' own run
            budget.spend()
            return probe(completion, reference)

        return verify


@register("code")
def _code(args: Args) -> Verifier:
    return CodeVerifier(args)


def probe_verifier(name: str, args: Args | None, budget: ProbeBudget) -> Verifier:
    """The verifier as reward-trust probing should run it: sandboxed code runs are
    capped in time (``verify.probe_timeout_s``) and number (``budget``);
    past the budget a probe raises :class:`ProbeSkipped`."""
    verifier = get_verifier(name, args)
    if isinstance(verifier, CodeVerifier):
        return verifier.for_probe(budget)
    return verifier
