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

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from streams.rejection import Rejection

Verifier = Callable[[str, str], float]
Args = Mapping[str, Any]
Factory = Callable[[Args], Verifier]

_REGISTRY: dict[str, Factory] = {}


class VerifierError(Rejection):
    """A verifier that cannot be built or cannot judge a reference."""


class UnknownVerifier(VerifierError):
    def __init__(self, name: str) -> None:
        super().__init__(
            "verifier", f"unknown verifier {name!r} (known: {', '.join(known_verifiers())})"
        )


class VerifierArgsError(VerifierError):
    pass


class BadReference(VerifierError):
    def __init__(self, verifier: str, reason: str) -> None:
        super().__init__("reference", f"{verifier}: {reason}")


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
        raise UnknownVerifier(name)
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


@register("regex")
def _regex(args: Args) -> Verifier:
    _allow("regex", args, {"pattern"})
    pattern = args.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise VerifierArgsError("verifier_args.pattern", "regex: a non-empty pattern is required")
    try:
        re.compile(pattern.replace("{ref}", ""))
    except re.error as e:
        raise VerifierArgsError("verifier_args.pattern", f"regex: does not compile: {e}") from None

    def verify(completion: str, reference: str) -> float:
        rx = re.compile(pattern.replace("{ref}", re.escape(reference.strip())))
        return float(rx.fullmatch(completion.strip()) is not None)

    return verify


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a completion, from its first markdown fence if it has one."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


@register("code")
def _code(args: Args) -> Verifier:
    from daemon.verify.sandbox import SandboxLimits, run_python

    _allow("code", args, {"tests", "timeout_s", "memory_mb"})
    tests = args.get("tests")
    if tests is not None and (
        not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests)
    ):
        raise VerifierArgsError("verifier_args.tests", "code: must be a non-empty list of strings")
    timeout = _number_arg("code", args, "timeout_s", 2.0)
    memory_mb = int(_number_arg("code", args, "memory_mb", 256))
    if memory_mb < 64:
        raise VerifierArgsError("verifier_args.memory_mb", "code: the interpreter needs >= 64")
    limits = SandboxLimits(cpu_s=timeout, wall_s=timeout * 2 + 1, memory_mb=memory_mb)

    def verify(completion: str, reference: str) -> float:
        suite = "\n".join(tests) if tests is not None else reference
        if "assert" not in suite:
            raise BadReference("code", "no tests: give verifier_args.tests or assert lines")
        program = extract_code(completion) + "\n\n" + suite + "\n"
        return float(run_python(program, limits).ok)

    return verify


# Product verifiers that live in their own module (optional dependencies import on use).
from daemon.verify import reasoning_gym as _reasoning_gym  # noqa: E402, F401
