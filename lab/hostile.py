"""The hostile-input corpus and its audit: what an adversary sends, and what must become of it.

Schema-aware mutations of valid traces (and of valid lift results and
dispatches, for the other topics a role decodes), each with what tapd must do
with it, decided by how it was built, never by asking tapd:

* ``decode``: refused at decoding; the dead letter names ``field``;
* ``fate``: valid as a message but hostile (verifier arguments, regexes,
  code, junk in ignored fields): exactly one fate, a cohort or a dead letter;
* ``valid``: an ordinary trace, or one only odd in form (extra fields,
  integers for floats, whitespace): counted with the valid traces, which must
  all end in exactly one cohort, and must not be dead-lettered for a
  cohort-mate's sake;
* ``conflict``: a trace id already used by a valid trace, with other content:
  a dead letter of its own (stage ``cohorting``, field ``trace_id``);
* ``ignored``: junk on the dead-letter topic, which the scorer reads but
  never dead-letters again.

Everything here is pure and seeded: :func:`plan_hostile` builds the corpus,
:func:`audit_hostile` accounts for each message from what the topics hold.
``lab.reliability`` drives real processes on the real broker with it.
"""

from __future__ import annotations

import base64
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.core.features import FEATURE_NAMES, FEATURE_SCHEMA
from streams.schemas import (
    MAX_ATTEMPTS,
    MAX_ID_CHARS,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_TAGS,
    MAX_TEXT_CHARS,
    MAX_TOKENS_PER_ATTEMPT,
    DeadLetter,
    SchemaError,
    decode,
)
from streams.transport import Record

Expect = Literal["decode", "fate", "valid", "conflict", "ignored"]
Role = Literal["traces", "lift", "dlq", "dispatch"]

HUGE_DIGITS = 5_000  # over Python's 4,300-digit int-to-string limit


@dataclass(frozen=True)
class Hostile:
    """One message of the corpus and what must become of it."""

    kind: str
    role: Role  # the topic it goes to
    raw: bytes
    expect: Expect
    field: str | None = None  # the dead letter's field, for ``decode``
    trace_id: str | None = None  # for ``valid``, ``fate`` and ``conflict``
    key: bytes | None = None


@dataclass(frozen=True)
class HostilePlan:
    items: tuple[Hostile, ...]  # in send order

    def count(self, expect: Expect | None = None, role: Role | None = None) -> int:
        return sum(
            1
            for h in self.items
            if (expect is None or h.expect == expect) and (role is None or h.role == role)
        )

    @property
    def kinds(self) -> Counter[str]:
        return Counter(h.kind for h in self.items if h.expect != "valid" or h.kind != "valid")


def _dumps(obj: Any, **kw: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True, **kw).encode()


def _copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


# --- paths into a message ------------------------------------------------------------

Path = tuple[str | int, ...]


def path_str(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "$"


def _leaves(obj: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every value's path (containers too), depth first."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _set(obj: Any, path: Path, value: Any) -> Any:
    out = _copy(obj)
    target = out
    for p in path[:-1]:
        target = target.setdefault(p, {}) if isinstance(p, str) else target[p]
    target[path[-1]] = value
    return out


def _with_literal(obj: Any, path: Path, literal: bytes) -> bytes:
    """``obj`` encoded with a raw JSON literal (a huge integer, NaN) at ``path``."""
    marker = "__hostile_literal__"
    return _dumps(_set(obj, path, marker)).replace(f'"{marker}"'.encode(), literal, 1)


def _nullable_fields() -> frozenset[str]:
    """Names of the message fields whose declared type admits null (from the
    schemas' declarations, not from decoding): null is a type error elsewhere."""
    import types
    import typing

    from pydantic import BaseModel

    import streams.schemas as schemas

    out: set[str] = set()
    for model in vars(schemas).values():
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, f in model.model_fields.items():
                ann = f.annotation
                if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(
                    None
                ) in typing.get_args(ann):
                    out.update({name, f.alias or name})
    return frozenset(out)


_NULLABLE = _nullable_fields()


def _wrong_values(value: Any, name: str | int) -> list[Any]:
    """JSON values of another type than ``value`` that no schema coerces."""
    null = [] if name in _NULLABLE else [None]
    if isinstance(value, bool):
        return [1, "true", 0.5, [], {}, *null]
    if isinstance(value, int | float):
        # Booleans and numeric strings are not numbers (issue 13, item 14).
        return [True, False, str(value), "abc", [], {"v": value}, *null]
    if isinstance(value, str):
        return [1, 2.5, True, [value], {"v": value}, *null]
    if isinstance(value, list):
        return ["x", 3, {"0": 1}, True, *null]
    if isinstance(value, dict):
        return ["x", 3, [1, 2], True, *null]
    return ["x"]


# --- valid messages ---------------------------------------------------------------


def valid_lift(cohort_id: str) -> dict[str, Any]:
    return {
        "schema": "tapd.lift/1",
        "cohort_id": cohort_id,
        "ts": 1_700_000_100.0,
        "trainer_id": "hostile",
        "mode": "probe_revert",
        "feature_schema": FEATURE_SCHEMA,
        "features": dict.fromkeys(FEATURE_NAMES, 0.25),
        "model_version": "heuristic-0",
        "predicted_lift": 0.01,
        "selection": "exploit",
        "nll_before": 2.0,
        "nll_after": 1.9,
        "nll_lift": 0.1,
        "acc_before": 0.2,
        "acc_after": 0.3,
        "acc_lift": 0.1,
        "train_reward_before": 0.4,
        "train_reward_after": 0.5,
        "policy_version_before": "v0",
        "policy_version_after": "v0",
        "steps": 1,
        "duration_s": 0.5,
        "plasticity": {
            "dormant_fraction": 0.1,
            "effective_rank": 3.0,
            "weight_norm": 1.0,
            "grad_norm": 0.1,
            "policy_entropy": 1.0,
            "probe_nll": 1.9,
        },
    }


def valid_dispatch(cohort_id: str, trace: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema": "tapd.dispatch/1",
        "cohort_id": cohort_id,
        "slice_key": json.dumps({"subject": trace["subject"]}),
        "subject": trace["subject"],
        "ts": 1_700_000_100.0,
        "policy_version": "v0",
        "model_version": "heuristic-0",
        "feature_schema": FEATURE_SCHEMA,
        "features": dict.fromkeys(FEATURE_NAMES, 0.25),
        "predicted_lift": 0.01,
        "uncertainty": 0.1,
        "selection": "exploit",
        "items": [
            {
                "trace_id": trace["trace_id"],
                "prompt": trace["prompt"],
                "reference": trace["reference"],
                "verifier": trace["verifier"],
            }
        ],
    }


# --- mutations that decoding must refuse, with the field -----------------------------

Mutation = Callable[[dict[str, Any], random.Random], tuple[bytes, str]]


def _typed_paths(base: Mapping[str, Any]) -> list[Path]:
    return [p for p, _ in _leaves(base) if p and p != ("schema",)]


def type_confusion(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    path = rng.choice(_typed_paths(base))
    value = _leaves_get(base, path)
    bad = rng.choice(_wrong_values(value, path[-1]))
    return _dumps(_set(base, path, bad)), path_str(path)


def _leaves_get(obj: Any, path: Path) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _number_paths(base: Mapping[str, Any]) -> list[Path]:
    return [
        p for p, v in _leaves(base) if p and isinstance(v, int | float) and not isinstance(v, bool)
    ]


def huge_number(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    """A 5,000-digit integer (the crash-loop poison), a float that overflows, or a
    value past a field's bound; in a typed field, an ignored one or the arguments."""
    where = rng.random()
    digits = b"9" * (HUGE_DIGITS + rng.randrange(2_000))
    if where < 0.3:  # an ignored extra field, at the top or inside an attempt
        if rng.random() < 0.5 or not base.get("attempts"):
            path: Path = (f"x{rng.randrange(1000)}",)
        else:
            path = ("attempts", rng.randrange(len(base["attempts"])), "latency_ms")
        return _with_literal(base, path, rng.choice([digits, b"-" + digits])), path_str(path)
    if where < 0.45 and "trace_id" in base:  # the verifier's arguments
        path = ("verifier_args", rng.choice(["tolerance", "n", "seed"]))
        literal = rng.choice([digits, b"1" + b"0" * 25, b"1e400", b"-1e999"])
        return _with_literal(base, path, literal), path_str(path)
    path = rng.choice(_number_paths(base))
    # Always out of range: too many digits, or a float that overflows to infinity;
    # or past the field's own bound where it has one.
    choices = [digits, b"1e400", b"-1e400"]
    name = path[-1]
    if name == "ts":
        choices.append(b"1e308")
    elif name == "reward":
        choices.append(b"1e7")
    elif name in ("n_tokens", "steps"):
        choices = [digits, b"-1", b"1e400"]
    elif len(path) >= 2 and path[-2] == "token_logprobs":
        choices += [b"-1e308", b"0.5"]
    literal = rng.choice(choices)
    return _with_literal(base, path, literal), path_str(path)


def huge_string(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    text_fields: list[Path] = [("prompt",), ("reference",)]
    text_fields += [("attempts", i, "completion") for i in range(len(base.get("attempts", [])))]
    id_fields: list[Path] = [("trace_id",), ("subject",), ("verifier",), ("tags", "task_type")]
    if rng.random() < 0.7:
        path = rng.choice(text_fields)
        n = MAX_TEXT_CHARS + 1 + rng.randrange(1_500)
    else:
        path = rng.choice(id_fields)
        n = MAX_ID_CHARS + 1 + rng.randrange(5_000)
    return _dumps(_set(base, path, rng.choice("xé€") * n)), path_str(path)


def huge_array(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    what = rng.randrange(3)
    if what == 0:
        reps = MAX_ATTEMPTS // len(base["attempts"]) + 1
        return _dumps({**base, "attempts": base["attempts"] * reps}), "attempts"
    if what == 1:
        tags = {f"t{i}": "v" for i in range(MAX_TAGS + 1 + rng.randrange(50))}
        return _dumps({**base, "tags": tags}), "tags"
    i = rng.randrange(len(base["attempts"]))
    n = MAX_TOKENS_PER_ATTEMPT + 1
    attempts = _copy(base["attempts"])
    attempts[i].update(n_tokens=MAX_TOKENS_PER_ATTEMPT, token_logprobs=[-0.5] * n)
    return _dumps({**base, "attempts": attempts}), f"attempts[{i}].token_logprobs"


def huge_message(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    pad = "z" * (MAX_MESSAGE_BYTES + rng.randrange(1, 20_000))
    return _dumps({**base, "padding": pad}), "$"


def deep_nesting(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    depth = rng.choice([MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH + 5, 200, 1_000, 3_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    nest = opener * depth + b"1" + closer * depth
    where = rng.choice(["extra", "verifier_args", "tags"])
    if where == "extra" or "trace_id" not in base:
        return _with_literal(base, ("nested",), nest), "$"
    return _with_literal(base, (where, "k"), nest), "$"


def invalid_utf8(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    raw = _dumps(base)
    junk = rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"])
    i = rng.randrange(1, len(raw) - 1)
    return raw[:i] + junk + raw[i:], "$"


def not_json(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    raw = _dumps(base)
    what = rng.randrange(4)
    if what == 0:
        return raw[: rng.randrange(0, len(raw) - 1)], "$"
    if what == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))).replace(
            b"{", b"("
        ), "$"
    if what == 2:
        return rng.choice([b"[]", b"null", b"42", b'"trace"', b"", b"true", b"[{}]"]), "$"
    return raw + rng.choice([b"}", b"x", b",{}", b"]"]), "$"


def lone_surrogate(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    if "prompt" in base:
        path: Path = ("prompt",)
    else:
        path = ("cohort_id",)
    return _with_literal(base, path, b'"a\\udc80b"' if rng.random() < 0.5 else b'"\\ud800"'), "$"


def wrong_schema(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    family = str(base["schema"]).partition("/")[0]
    bad = rng.choice([f"{family}/2", f"{family}/0", "tapd.other/1", "", 1, None, True])
    return _dumps({**base, "schema": bad}), "schema"


_REQUIRED_TRACE = ("trace_id", "ts", "subject", "prompt", "reference", "verifier", "policy_version")


def missing_field(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    if "trace_id" in base and rng.random() < 0.3 and base["attempts"]:
        i = rng.randrange(len(base["attempts"]))
        name = rng.choice(["completion", "reward", "n_tokens"])
        attempts = _copy(base["attempts"])
        del attempts[i][name]
        return _dumps({**base, "attempts": attempts}), f"attempts[{i}].{name}"
    required = _REQUIRED_TRACE if "trace_id" in base else ("cohort_id", "ts", "features")
    name = rng.choice([n for n in (*required, "schema") if n in base])
    d = _copy(base)
    del d[name]
    return _dumps(d), name


def nonfinite(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    literal = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
    if "trace_id" in base and rng.random() < 0.2:
        path: Path = ("verifier_args", "x")
    else:
        path = rng.choice(_number_paths(base))
    return _with_literal(base, path, literal), path_str(path)


def bad_time(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    # 0 (the "unset" value) is refused for a trace's event time only.
    zero = [b"0", b"0.0"] if "trace_id" in base else []
    literal = rng.choice([*zero, b"1e308", b"1700000000000", b"-1"])
    return _with_literal(base, ("ts",), literal), "ts"


def token_mismatch(base: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    """n_tokens against token_logprobs, entropies the wrong length, entropies out of range."""
    i = rng.randrange(len(base["attempts"]))
    attempts = _copy(base["attempts"])
    a = attempts[i]
    n = len(a["token_logprobs"])
    what = rng.randrange(3)
    if what == 0:
        a["n_tokens"] = n + rng.choice([1, 2, 100])
        where = f"attempts[{i}].token_logprobs"
    elif what == 1:
        a["token_entropies"] = [0.5] * (n + 1)
        where = f"attempts[{i}]"
    else:
        j = rng.randrange(n)
        a["token_entropies"] = [0.5] * n
        a["token_entropies"][j] = rng.choice([-0.1, 1e308, -1e308])
        where = f"attempts[{i}].token_entropies[{j}]"
    return _dumps({**base, "attempts": attempts}), where


# --- mutations that are valid messages (hostile content, or only odd in form) -------


def hostile_arguments(base: dict[str, Any], rng: random.Random, ctx: HostileContext) -> bytes:
    """Verifier arguments an adversary picks: unknown, over the caps, of the wrong type."""
    d = _copy(base)
    choice = rng.randrange(8)
    if choice == 0:  # same slice as valid traces: their cohort-mate
        d["verifier_args"] = {rng.choice(["strip", "timeout_s", "__class__"]): 1}
    elif choice == 1:
        d.update(verifier="numeric", verifier_args={"tolerance": rng.choice([-1, 1e300, "x"])})
    elif choice == 2:
        d.update(
            verifier="code",
            verifier_args={"tests": ["assert True"], "timeout_s": 100000},
            reference="assert True",
        )
    elif choice == 3:
        d.update(verifier="code", verifier_args={"tests": ["assert True"], "memory_mb": 10**9})
    elif choice == 4:
        d.update(verifier="code", verifier_args={"tests": ["assert 1"] * 20_000})
    elif choice == 5:
        d.update(verifier=rng.choice(["no_such_verifier", "__import__", "../../etc/passwd"]))
    elif choice == 6:
        d.update(verifier="regex", verifier_args={"pattern": rng.choice([5, "", ["a"]])})
    else:
        d.update(verifier="mcq", verifier_args={"options": "A" * 10_000})
    return _dumps(d)


_REDOS = (
    "(a+)+$",
    "(a|aa)+$",
    "(a|a?)+$",
    "(.*a){25}",
    "^(\\w+\\s?)*$",
    "(x+x+)+y",
    "((a+)+)+b",
)


def hostile_regex(base: dict[str, Any], rng: random.Random, ctx: HostileContext) -> bytes:
    """Catastrophic backtracking on a backtracking engine, patterns that do not
    compile, huge patterns, features a linear-time engine lacks."""
    d = _copy(base)
    what = rng.randrange(4)
    if what == 0:
        pattern = rng.choice(_REDOS)
        d["prompt"] = "a" * rng.choice([16, 24, 28, 32]) + "!"
        d["reference"] = "a" * 3
    elif what == 1:
        pattern = rng.choice(["((", "[", "(?P<x", "*a", "a{99999999999}", "\\"])
    elif what == 2:
        pattern = "(a|b)" * rng.choice([2_000, 6_000])
    else:
        pattern = rng.choice(["(a)\\1", "(?=a)a", "(?<=a)b", "{ref}|(?:(?:a*)*)*b"])
        d["prompt"] = "a" * 30 + "c"
    d.update(verifier="regex", verifier_args={"pattern": pattern})
    return _dumps(d)


def hostile_code(base: dict[str, Any], rng: random.Random, ctx: HostileContext) -> bytes:
    """Code completions (and prompts: reward-trust probing runs a prompt as code)
    that try to escape, stall or game the grader. Harmless to the host if
    they succeed: canary files in the run's own folder, a connection to the
    scorer's own port, a signal 0."""
    canary = f"{ctx.canary_dir}/canary-{rng.randrange(10**9)}"
    payloads = [
        "while True:\n    pass",
        "import time\ntime.sleep(120)",
        "import os\nprint(os.environ.get('TAPD_SERVICE__ADMIN_TOKEN'))",
        f"open({canary!r}, 'w').write('escaped')",
        f"import socket\nsocket.create_connection(('127.0.0.1', {ctx.health_port}), 1).close()\n"
        f"open({canary!r}, 'w').write('net')",
        "import os\nos.kill(os.getppid(), 0)",
        "x = bytearray(600 * 2**20)",
        "print('x' * 10**8)",
        "import sys\nsys.exit(0)",
        "class Eq:\n    def __eq__(self, o):\n        return True\nsolve = lambda: Eq()",
        "import os\nos.write(3, b'completed')\nos._exit(0)",
        "import sys\nsys.excepthook = lambda *a: None\nraise SystemExit(0)",
    ]
    code = rng.choice(payloads)
    d = _copy(base)
    fenced = f"```python\n{code}\n```"
    d.update(
        verifier="code",
        verifier_args={"tests": ["assert solve() == 42"]},
        prompt=fenced,
        reference="def solve():\n    return 42",
    )
    for a in d["attempts"]:
        a["completion"] = fenced
    return _dumps(d)


def junk_extras(base: dict[str, Any], rng: random.Random, ctx: HostileContext) -> bytes:
    """Ignored fields holding what typed fields refuse (NaN, 25-digit integers,
    deep-ish nesting within the limit): the trace is valid, the junk dropped."""
    d = _copy(base)
    d[f"x{rng.randrange(100)}"] = "__junk__"
    junk = rng.choice([b"NaN", b"-Infinity", b"1" + b"0" * 25, b"[" * 20 + b"]" * 20, b'"\\u0000"'])
    return _dumps(d).replace(b'"__junk__"', junk, 1)


def benign(base: dict[str, Any], rng: random.Random) -> bytes:
    """Valid and ordinary in content, odd in form: extra fields, integers for
    floats, whitespace, key order, escapes. Must be treated as any valid trace."""
    d = _copy(base)
    what = rng.randrange(4)
    if what == 0:
        d["added_by_a_newer_producer"] = {"kept": [1, 2, {"deep": True}]}
        d["attempts"][0]["latency_ms"] = 120
        return _dumps(d)
    if what == 1:
        for a in d["attempts"]:
            a["reward"] = int(a["reward"])
        return _dumps(d)
    if what == 2:
        items = list(d.items())
        rng.shuffle(items)
        return json.dumps(dict(items), indent=rng.choice([None, 1, 4])).encode()
    return json.dumps(d, ensure_ascii=True).encode()


# --- the plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class HostileContext:
    canary_dir: str = "."
    health_port: int = 0


_DECODE: dict[str, tuple[Mutation, float]] = {
    "type_confusion": (type_confusion, 0.30),
    "huge_number": (huge_number, 0.15),
    "huge_string": (huge_string, 0.015),
    "huge_array": (huge_array, 0.01),
    "huge_message": (huge_message, 0.001),
    "deep_nesting": (deep_nesting, 0.07),
    "invalid_utf8": (invalid_utf8, 0.07),
    "not_json": (not_json, 0.05),
    "lone_surrogate": (lone_surrogate, 0.01),
    "wrong_schema": (wrong_schema, 0.03),
    "missing_field": (missing_field, 0.04),
    "nonfinite": (nonfinite, 0.04),
    "bad_time": (bad_time, 0.02),
    "token_mismatch": (token_mismatch, 0.03),
}
_FATE: dict[str, tuple[Callable[[dict[str, Any], random.Random, HostileContext], bytes], float]] = {
    "hostile_arguments": (hostile_arguments, 0.04),
    "hostile_regex": (hostile_regex, 0.02),
    "hostile_code": (hostile_code, 0.003),
    "junk_extras": (junk_extras, 0.015),
}
_CONFLICT_WEIGHT = 0.05
_BENIGN_WEIGHT = 0.025
# Side topics: mutations per topic, of a valid lift, of a valid dispatch, and junk.
_SIDE_DECODE = (
    "type_confusion",
    "huge_number",
    "deep_nesting",
    "invalid_utf8",
    "not_json",
    "lone_surrogate",
    "wrong_schema",
    "missing_field",
    "nonfinite",
    "bad_time",
)


def plan_hostile(
    n_valid: int,
    n_mutations: int,
    seed: int = 0,
    *,
    valid_trace: Callable[..., dict[str, Any]],
    n_side: int = 300,
    slices: int = 8,
    learnable_share: float = 0.02,
    ctx: HostileContext | None = None,
    ts0: float = 1_700_000_000.0,
) -> HostilePlan:
    """``n_valid`` valid traces and ``n_mutations`` mutations of them, in a seeded order;
    plus ``n_side`` mutations each of a lift result (lift topic), of a dispatch
    (dispatch topic, for the trainer) and junk (dead-letter topic)."""
    ctx = ctx or HostileContext()
    rng = random.Random(seed)
    valid: list[dict[str, Any]] = []
    for i in range(n_valid):
        slice_no = rng.randrange(slices)
        learnable = rng.random() < learnable_share
        valid.append(
            valid_trace(f"hv{seed}-{i:06d}", slice_no, rng, k=4, learnable=learnable, ts=ts0 + i)
        )
    items: list[Hostile] = [
        Hostile("valid", "traces", _dumps(d), "valid", trace_id=d["trace_id"]) for d in valid
    ]
    conflicts: list[Hostile] = []
    names = [*_DECODE, *_FATE, "conflict", "benign"]
    weights = [w for _, w in _DECODE.values()] + [w for _, w in _FATE.values()]
    weights += [_CONFLICT_WEIGHT, _BENIGN_WEIGHT]
    for j in range(n_mutations):
        kind = rng.choices(names, weights)[0]
        base = rng.choice(valid)
        tid = f"hx{seed}-{j:06d}"
        mutant = {**base, "trace_id": tid}
        if kind in _DECODE:
            raw, fld = _DECODE[kind][0](mutant, rng)
            items.append(Hostile(kind, "traces", raw, "decode", field=fld))
        elif kind in _FATE:
            raw = _FATE[kind][0](mutant, rng, ctx)
            items.append(Hostile(kind, "traces", raw, "fate", trace_id=tid))
        elif kind == "benign":
            items.append(Hostile(kind, "traces", benign(mutant, rng), "valid", trace_id=tid))
        else:
            other = _copy(base)
            other["reference"] = str(other["reference"]) + rng.choice(["0", " ", "x"])
            raw = _dumps(other)
            conflicts.append(Hostile(kind, "traces", raw, "conflict", trace_id=base["trace_id"]))
    rng.shuffle(items)
    # A conflicting copy goes after the copy it conflicts with, to the same
    # partition (the same key), so that it is the one refused.
    where = {h.trace_id: i for i, h in enumerate(items) if h.expect == "valid"}
    for c in sorted(conflicts, key=lambda c: -where[c.trace_id]):
        at = rng.randrange(where[c.trace_id] + 1, len(items) + 1)
        items.insert(at, c)
        where = {h.trace_id: i for i, h in enumerate(items) if h.expect == "valid"}
    items = [
        Hostile(
            h.kind, h.role, h.raw, h.expect, h.field, h.trace_id, (h.trace_id or f"k{i}").encode()
        )
        for i, h in enumerate(items)
    ]
    items += _side(rng, valid, n_side, seed)
    return HostilePlan(tuple(items))


def _side(rng: random.Random, valid: list[dict[str, Any]], n: int, seed: int) -> list[Hostile]:
    out: list[Hostile] = []
    for j in range(n):
        kind = rng.choice(_SIDE_DECODE)
        lift = valid_lift(f"hl{seed}-{j:05d}")
        raw, fld = _DECODE[kind][0](lift, rng)
        out.append(Hostile(kind, "lift", raw, "decode", field=fld, key=f"hl{j}".encode()))
        d = valid_dispatch(f"hd{seed}-{j:05d}", rng.choice(valid))
        raw, fld = _DECODE[kind][0](d, rng)
        out.append(Hostile(kind, "dispatch", raw, "decode", field=fld, key=f"hd{j}".encode()))
        junk, _ = _DECODE[rng.choice(_SIDE_DECODE)][0](
            {
                "schema": "tapd.dlq/1",
                "ts": 1.7e9,
                "stage": "decode",
                "field": "$",
                "reason": "r",
                "source_topic": "tap.dispatch",
                "partition": 0,
                "offset": j,
                "original_b64": base64.b64encode(b"{}").decode(),
            },
            rng,
        )
        out.append(Hostile("junk", "dlq", junk, "ignored", key=f"hq{j}".encode()))
    return out


def check_plan(plan: HostilePlan) -> list[str]:
    """The corpus against the schemas alone (no service): every ``decode`` item is
    refused naming its field, every other trace decodes. Empty when all hold."""
    from streams.schemas import Dispatch, LiftResult, Trace

    model: dict[str, Any] = {"traces": Trace, "lift": LiftResult, "dispatch": Dispatch}
    problems: list[str] = []
    for h in plan.items:
        if h.role == "dlq":
            continue
        try:
            decode(h.raw, model[h.role])
        except SchemaError as e:
            if h.expect != "decode":
                problems.append(f"{h.kind}: a valid message was refused: {e}")
            elif e.field != h.field:
                problems.append(
                    f"{h.role} {h.kind}: field {e.field!r}, expected {h.field!r}: {e.reason}"
                )
            continue
        if h.expect == "decode":
            problems.append(f"{h.role} {h.kind} ({h.field}): accepted")
    return problems


# --- the audit ---------------------------------------------------------------------


@dataclass
class HostileAudit:
    """What became of the corpus; a clean run has every failure list empty."""

    valid: int = 0
    mutations: int = 0
    valid_in_one_cohort: int = 0
    valid_dead_lettered_small_cohort: int = 0  # a cohort closed under min_groups: not hostile
    refused_right_field: int = 0
    refused_wrong_field: list[str] = field(default_factory=list)
    fate_decided: int = 0
    fate_dead_lettered: int = 0
    conflicts_dead_lettered: int = 0
    side_refused: int = 0
    dead_letters: int = 0
    byte_identical: int = 0
    truncated_oversize: int = 0  # originals over the message limit keep their first bytes
    by_stage: Counter[str] = field(default_factory=Counter)
    valid_lost: list[str] = field(default_factory=list)
    valid_twice: list[str] = field(default_factory=list)
    innocent: list[str] = field(default_factory=list)  # valid traces dead-lettered for others
    silently_dropped: list[str] = field(default_factory=list)
    not_identical: list[str] = field(default_factory=list)
    re_dead_lettered: list[str] = field(default_factory=list)  # dead letters of dead letters

    @property
    def ok(self) -> bool:
        return not (
            self.valid_lost
            or self.valid_twice
            or self.innocent
            or self.silently_dropped
            or self.not_identical
            or self.refused_wrong_field
            or self.re_dead_lettered
        )

    def problems(self, limit: int = 3) -> str:
        parts = []
        for name in (
            "valid_lost",
            "valid_twice",
            "innocent",
            "silently_dropped",
            "not_identical",
            "refused_wrong_field",
            "re_dead_lettered",
        ):
            items = getattr(self, name)
            if items:
                parts.append(f"{name}={len(items)} e.g. {sorted(items)[:limit]}")
        return "; ".join(parts) or "none"


def _origin(topic: str, partition: int, offset: int) -> tuple[str, int, int]:
    return topic, partition, offset


def audit_hostile(
    plan: HostilePlan,
    records: Mapping[Role, Sequence[Record]],
    dlq: Sequence[Record],
    decisions: Sequence[Record],
) -> HostileAudit:
    """Account for every message of ``plan`` from the topics.

    ``records`` are the plan's topics as read back (to know where each message
    landed: a dead letter cites that origin); ``dlq`` and ``decisions`` are
    the service's outputs.
    """
    a = HostileAudit()
    by_raw: dict[tuple[Role, bytes], list[Hostile]] = defaultdict(list)
    for h in plan.items:
        by_raw[(h.role, h.raw)].append(h)
    a.valid = sum(1 for h in plan.items if h.expect == "valid")
    a.mutations = len(plan.items) - a.valid

    letters: dict[tuple[str, int, int], list[DeadLetter]] = defaultdict(list)
    for r in dlq:
        try:
            letter = decode(r.value, DeadLetter)
        except SchemaError:
            continue  # the junk the plan itself put on the dead-letter topic
        letters[_origin(letter.source_topic, letter.partition, letter.offset)].append(letter)
    members: dict[str, set[str]] = defaultdict(set)  # trace id -> cohort ids (copies once)
    for r in decisions:
        try:
            rec = json.loads(r.value)
            for tid in rec.get("trace_ids", ()):
                members[tid].add(str(rec.get("cohort_id")))
        except (ValueError, AttributeError):
            continue

    for role, recs in records.items():
        seen: Counter[bytes] = Counter()
        for r in recs:
            copies = by_raw.get((role, r.value))
            if not copies:
                continue  # not ours (a topic shared with another run) or a resend
            h = copies[min(seen[r.value], len(copies) - 1)]
            seen[r.value] += 1
            got = letters.get(_origin(r.topic, r.partition, r.offset), [])
            for letter in got:
                a.dead_letters += 1
                a.by_stage[letter.stage] += 1
                kept = base64.b64decode(letter.original_b64)
                if kept == r.value:
                    a.byte_identical += 1
                elif len(r.value) > MAX_MESSAGE_BYTES and r.value.startswith(kept):
                    a.truncated_oversize += 1
                else:
                    a.not_identical.append(f"{role}/{r.partition}/{r.offset}")
            label = f"{role} {h.kind} {r.partition}/{r.offset}"
            if h.expect == "ignored":
                if got:
                    a.re_dead_lettered.append(label)
                continue
            if h.expect == "valid":
                assert h.trace_id is not None
                n_member = len(members.get(h.trace_id, ()))
                if n_member + len(got) == 0:
                    a.valid_lost.append(h.trace_id)
                elif n_member + len(got) > 1:
                    a.valid_twice.append(h.trace_id)
                elif n_member:
                    a.valid_in_one_cohort += 1
                elif "min_groups" in got[0].reason and got[0].stage == "cohorting":
                    a.valid_dead_lettered_small_cohort += 1
                else:
                    a.innocent.append(f"{h.trace_id} ({got[0].stage}: {got[0].reason[:80]})")
                continue
            if not got:
                decided = h.expect == "fate" and h.trace_id and members.get(h.trace_id)
                if decided:
                    a.fate_decided += 1
                else:
                    a.silently_dropped.append(label)
                continue
            if h.expect == "fate":
                a.fate_dead_lettered += 1
                if h.trace_id and members.get(h.trace_id):
                    a.valid_twice.append(h.trace_id)
            elif h.expect == "conflict":
                if (got[0].stage, got[0].field) == ("cohorting", "trace_id"):
                    a.conflicts_dead_lettered += 1
                else:
                    a.refused_wrong_field.append(f"{label}: {got[0].stage} {got[0].field}")
            elif h.expect == "decode":
                want_stage = "lift" if role == "lift" else "decode"
                if (got[0].stage, got[0].field) == (want_stage, h.field):
                    if role == "traces":
                        a.refused_right_field += 1
                    else:
                        a.side_refused += 1
                else:
                    a.refused_wrong_field.append(
                        f"{label}: {got[0].stage} {got[0].field!r}, expected {want_stage} {h.field!r}"
                    )
        missing = sum(1 for (rl, _), hs in by_raw.items() if rl == role for _ in hs) - sum(
            seen.values()
        )
        if missing > 0:
            a.silently_dropped.append(f"{missing} planned {role} messages not on the topic")
    return a
