"""The task battery that tapd generates itself: short arithmetic and digit tasks.

Every task family is a (subject, difficulty) pair with a generator; a family is
deterministic for a seed. Prompts and answers are short strings over a small
character set (``37+45=`` -> ``82``) so that the built-in tiny policy can learn
them on a CPU in seconds.

Each family has a *tier* for the built-in tiny policy (:data:`TIERS`): ``easy``
families are what its pre-training taught well, ``frontier`` ones it saw only a
little (sampled attempts disagree), ``hard`` ones it never saw. The control
cohorts of the seeds (easy, frontier, hard, mixed, scrambled, weak-verifier)
are drawn by tier.

Held-out probe. The space of prompts is partitioned by a hash of the prompt
text: a prompt whose hash falls in the probe bucket (1 in
:data:`PROBE_MODULUS`) is only ever produced by :func:`probe_set`, and every
other generator (``make_tasks`` with ``split="train"``, hence every control
cohort) rejects it. Disjointness therefore holds for any seeds, not just for
the seeds used so far.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streams.probes import ProbeItem, write_probe_file
from streams.schemas import Attempt, Trace

Split = Literal["train", "probe", "any"]
Tier = Literal["easy", "frontier", "hard"]
Variant = Literal["easy", "frontier", "hard", "mixed", "scrambled", "weak_verifier"]

PROBE_MODULUS = 8
MAX_TASK_CHARS = 24  # prompt + answer, so that the tiny model's context stays short


@dataclass(frozen=True)
class Task:
    prompt: str
    reference: str
    subject: str
    tags: Mapping[str, str]
    verifier: str
    verifier_args: Mapping[str, Any] = field(default_factory=dict)
    difficulty: str = ""


# A generator draws one (prompt, reference, operation) from an rng.
Generator = Callable[[random.Random], tuple[str, str, str]]


def _ndigit(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


def _carries(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def _borrows(a: int, b: int) -> bool:
    while a or b:
        if a % 10 < b % 10:
            return True
        a, b = a // 10, b // 10
    return False


def _add(n: int, carry: bool | None) -> Generator:
    def gen(rng: random.Random) -> tuple[str, str, str]:
        while True:
            a, b = _ndigit(rng, n), _ndigit(rng, n)
            c = _carries(a, b)
            if carry is None or c == carry:
                return f"{a}+{b}=", str(a + b), "add_carry" if c else "add_nocarry"

    return gen


def _sub(n: int, borrow: bool | None) -> Generator:
    def gen(rng: random.Random) -> tuple[str, str, str]:
        while True:
            a, b = _ndigit(rng, n), _ndigit(rng, n)
            a, b = max(a, b), min(a, b)  # non-negative results only
            c = _borrows(a, b)
            if borrow is None or c == borrow:
                return f"{a}-{b}=", str(a - b), "sub_borrow" if c else "sub_noborrow"

    return gen


def _mul(n: int, m: int) -> Generator:
    def gen(rng: random.Random) -> tuple[str, str, str]:
        a = _ndigit(rng, n)
        b = _ndigit(rng, m) if m > 1 else rng.randint(2 if n > 1 else 0, 9)
        return f"{a}*{b}=", str(a * b), f"mul_{n}x{m}"

    return gen


def _compare(n: int) -> Generator:
    def gen(rng: random.Random) -> tuple[str, str, str]:
        a = _ndigit(rng, n)
        # Equal pairs and shared leading digits are what makes comparing hard.
        r = rng.random()
        if r < 0.15:
            b = a
        elif r < 0.5 and n > 1:
            b = int(str(a)[:-1] + str(rng.randint(0, 9)))
        else:
            b = _ndigit(rng, n)
        rel = "<" if a < b else ">" if a > b else "="
        return f"{a}?{b}=", rel, "compare"

    return gen


def _digits(n: int) -> Generator:
    def gen(rng: random.Random) -> tuple[str, str, str]:
        s = "".join(str(rng.randint(0, 9)) for _ in range(n))
        if rng.random() < 0.5:
            return f"rev{s}=", s[::-1], "reverse"
        return f"sum{s}=", str(sum(int(c) for c in s)), "digit_sum"

    return gen


@dataclass(frozen=True)
class Family:
    subject: str
    difficulty: str
    generate: Generator
    task_type: str
    output_constraint: str
    background: str
    tier: Tier


_FAMILIES: tuple[Family, ...] = (
    Family("add", "1d", _add(1, None), "arithmetic", "integer", "1-digit", "easy"),
    Family("add", "2d_nocarry", _add(2, False), "arithmetic", "integer", "2-digit", "frontier"),
    Family("add", "2d_carry", _add(2, True), "arithmetic", "integer", "2-digit", "frontier"),
    Family("add", "3d", _add(3, None), "arithmetic", "integer", "3-digit", "hard"),
    Family("sub", "1d", _sub(1, None), "arithmetic", "integer", "1-digit", "easy"),
    Family("sub", "2d_noborrow", _sub(2, False), "arithmetic", "integer", "2-digit", "frontier"),
    Family("sub", "2d_borrow", _sub(2, True), "arithmetic", "integer", "2-digit", "frontier"),
    Family("sub", "3d", _sub(3, None), "arithmetic", "integer", "3-digit", "hard"),
    Family("mul", "1d", _mul(1, 1), "arithmetic", "integer", "1-digit", "easy"),
    Family("mul", "2x1", _mul(2, 1), "arithmetic", "integer", "2-digit", "frontier"),
    Family("mul", "3x3", _mul(3, 3), "arithmetic", "integer", "3-digit", "hard"),
    Family("compare", "1d", _compare(1), "comparison", "relation_symbol", "1-digit", "easy"),
    Family("compare", "3d", _compare(3), "comparison", "relation_symbol", "3-digit", "frontier"),
    Family("compare", "6d", _compare(6), "comparison", "relation_symbol", "6-digit", "hard"),
    Family("digits", "2d", _digits(2), "digit_manipulation", "digit_string", "2-digit", "easy"),
    Family("digits", "4d", _digits(4), "digit_manipulation", "digit_string", "4-digit", "frontier"),
    Family("digits", "7d", _digits(7), "digit_manipulation", "digit_string", "7-digit", "hard"),
)
FAMILIES: Mapping[tuple[str, str], Family] = {(f.subject, f.difficulty): f for f in _FAMILIES}
SUBJECTS: tuple[str, ...] = tuple(dict.fromkeys(f.subject for f in _FAMILIES))
TIERS: Mapping[tuple[str, str], Tier] = {k: f.tier for k, f in FAMILIES.items()}


def difficulties(subject: str) -> tuple[str, ...]:
    _check_subject(subject)
    return tuple(f.difficulty for f in _FAMILIES if f.subject == subject)


def tier_difficulty(subject: str, tier: Tier) -> str:
    """The difficulty of ``subject`` that sits in ``tier`` for the tiny policy.

    Where several families share a tier, the hardest (listed last) stands for it.
    """
    _check_subject(subject)
    found = [f.difficulty for f in _FAMILIES if f.subject == subject and f.tier == tier]
    if not found:
        raise ValueError(f"subject: {subject!r} has no {tier} family")
    return found[-1]


def _check_subject(subject: str) -> None:
    if subject not in SUBJECTS:
        raise ValueError(f"subject: unknown subject {subject!r} (known: {', '.join(SUBJECTS)})")


def _family(subject: str, difficulty: str) -> Family:
    _check_subject(subject)
    fam = FAMILIES.get((subject, difficulty))
    if fam is None:
        raise ValueError(
            f"difficulty: unknown difficulty {difficulty!r} for {subject} "
            f"(known: {', '.join(difficulties(subject))})"
        )
    return fam


def in_probe_partition(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out probe partition (see module doc)."""
    h = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % PROBE_MODULUS == 0


def _verifier_for(operation: str) -> str:
    # Reversed digit strings keep leading zeros ("rev0120=" -> "0210"), so
    # they must match exactly; everything else is a number or a symbol.
    return "exact" if operation in ("reverse", "compare") else "numeric"


def _iter_tasks(subject: str, difficulty: str, seed: int, split: Split) -> Iterator[Task]:
    fam = _family(subject, difficulty)
    rng = random.Random(f"tapd.tasks|{subject}|{difficulty}|{seed}|{split}")
    while True:
        prompt, reference, operation = fam.generate(rng)
        if split != "any" and in_probe_partition(prompt) != (split == "probe"):
            continue
        tags = {
            "task_type": fam.task_type,
            "operation": operation,
            "output_constraint": fam.output_constraint,
            "background": fam.background,
        }
        yield Task(
            prompt=prompt,
            reference=reference,
            subject=subject,
            tags=tags,
            verifier=_verifier_for(operation),
            verifier_args={},
            difficulty=difficulty,
        )


def make_tasks(
    subject: str, difficulty: str, n: int, seed: int, split: Split = "train"
) -> list[Task]:
    """``n`` tasks of one family, the same for the same arguments.

    Tasks may repeat when the family's space is small (``1d`` families).
    """
    _family(subject, difficulty)
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    return list(itertools.islice(_iter_tasks(subject, difficulty, seed, split), n))


def _interleave(groups: Sequence[Sequence[Task]]) -> list[Task]:
    out: list[Task] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _with_verifier(tasks: Iterable[Task], verifier: str, args: Mapping[str, Any]) -> list[Task]:
    return [
        Task(t.prompt, t.reference, t.subject, t.tags, verifier, dict(args), t.difficulty)
        for t in tasks
    ]


def weak_verifier_for(task: Task) -> str:
    """The gameable verifier for a task: first digit for numbers, containment otherwise."""
    return "weak_first_digit" if task.reference[:1].isdigit() else "contains"


def tier_families(subject: str, tier: Tier) -> tuple[str, ...]:
    """Every difficulty of ``subject`` in ``tier``, easiest first."""
    _check_subject(subject)
    return tuple(f.difficulty for f in _FAMILIES if f.subject == subject and f.tier == tier)


def _pick_family(subject: str, tier: Tier, seed: int, variant: str) -> str:
    """One of the subject's families in ``tier``, drawn by the seed.

    Where a subject has several frontier families (add: without and with a
    carry), cohorts of the same variant differ in how far the policy has
    learnt them: frontier-ness varies within a cell, not only between cells.
    """
    fams = tier_families(subject, tier)
    if not fams:
        raise ValueError(f"subject: {subject!r} has no {tier} family")
    return random.Random(f"tapd.control.family|{variant}|{subject}|{seed}").choice(fams)


def control_cohort(variant: Variant, n: int, seed: int, subject: str | None = None) -> list[Task]:
    """A control cohort of the seeds, from the training partition.

    ``subject=None`` picks one subject from the seed, so that a cohort stays a
    single capability slice. Easy, frontier and hard cohorts draw one of the
    subject's families of that tier; scrambled and weak-verifier cohorts are
    frontier tasks with a broken verifier.
    """
    if subject is None:
        subject = random.Random(f"tapd.control|{variant}|{seed}").choice(SUBJECTS)
    _check_subject(subject)
    if variant in ("easy", "frontier", "hard"):
        tier: Tier = variant
        return make_tasks(subject, _pick_family(subject, tier, seed, variant), n, seed)
    if variant == "mixed":
        sizes = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
        tiers: tuple[Tier, ...] = ("easy", "frontier", "hard")
        groups = [
            make_tasks(subject, _pick_family(subject, t, seed, variant), k, seed)
            for t, k in zip(tiers, sizes, strict=True)
        ]
        return _interleave(groups)
    if variant == "scrambled":
        fam = _pick_family(subject, "frontier", seed, variant)
        return _with_verifier(make_tasks(subject, fam, n, seed), "scrambled", {"seed": seed})
    if variant == "weak_verifier":
        tasks = make_tasks(subject, _pick_family(subject, "frontier", seed, variant), n, seed)
        return [_with_verifier([t], weak_verifier_for(t), {})[0] for t in tasks]
    raise ValueError(
        f"variant: unknown control cohort {variant!r} "
        "(known: easy, frontier, hard, mixed, scrambled, weak_verifier)"
    )


# Held-out probe items per family in the target probe (>= 48: a target's lift
# of a few hundredths of a nat must stand out of the item sampling noise).
PROBE_PER_FAMILY = 48


def target_probe(
    per_family: int = PROBE_PER_FAMILY, seed: int = 0, subjects: Sequence[str] = SUBJECTS
) -> list[Task]:
    """The held-out probe per target: ``per_family`` items of every family of each subject.

    A subject is a target (capability slice); its easy, frontier and hard
    families are all in it, so that the trainer can tell the items the
    policy has a foothold on (the target's lift) from those it has none on
    (collateral). Items repeat only in families with fewer held-out prompts.
    """
    for s in subjects:
        _check_subject(s)
    out: list[Task] = []
    for f in _FAMILIES:
        if f.subject not in subjects:
            continue
        # Distinct prompts while the family's held-out space has them; a
        # small family (1-digit sums) cycles through the few it has.
        distinct: dict[str, Task] = {}
        for t in itertools.islice(
            _iter_tasks(f.subject, f.difficulty, seed, "probe"), 20 * per_family
        ):
            distinct.setdefault(t.prompt, t)
            if len(distinct) == per_family:
                break
        items = list(distinct.values())
        out.extend(items[i % len(items)] for i in range(per_family))
    return out


def probe_set(n: int, seed: int, subjects: Sequence[str] = SUBJECTS) -> list[Task]:
    """The held-out probe: ``n`` tasks round-robin over every family of ``subjects``."""
    fams = [f for f in _FAMILIES if f.subject in subjects]
    for s in subjects:
        _check_subject(s)
    if not fams:
        raise ValueError("subjects: empty")
    sizes = [n // len(fams) + (1 if i < n % len(fams) else 0) for i in range(len(fams))]
    groups = [
        make_tasks(f.subject, f.difficulty, k, seed, split="probe")
        for f, k in zip(fams, sizes, strict=True)
    ]
    return _interleave(groups)


def trace_id(task: Task, policy_version: str, key: str | int = "") -> str:
    """Deterministic trace id; ``key`` tells apart repeats of the same task."""
    payload = json.dumps(
        [
            task.subject,
            task.difficulty,
            task.prompt,
            task.reference,
            task.verifier,
            dict(task.verifier_args),
            policy_version,
            str(key),
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    return "tr-" + hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


def to_trace(
    task: Task,
    *,
    policy_version: str,
    attempts: Sequence[Attempt] = (),
    key: str | int = "",
    # A fixed, plausible event time: the wire refuses 0 (the "unset" value).
    ts: float = 1_700_000_000.0,
    tenant: str = "default",
    source: str = "tapd.tasks",
) -> Trace:
    tags = dict(task.tags)
    if task.difficulty:
        tags["difficulty"] = task.difficulty
    return Trace(
        schema="tapd.trace/1",
        trace_id=trace_id(task, policy_version, key),
        ts=ts,
        tenant=tenant,
        source=source,
        subject=task.subject,
        tags=tags,
        prompt=task.prompt,
        reference=task.reference,
        verifier=task.verifier,
        verifier_args=dict(task.verifier_args),
        policy_version=policy_version,
        attempts=list(attempts),
    )


def probe_items(tasks: Sequence[Task]) -> list[ProbeItem]:
    """Probe-file items for ``tasks``; the target is the task's subject."""
    return [
        ProbeItem(
            target=t.subject,
            prompt=t.prompt,
            reference=t.reference,
            verifier=t.verifier,
            verifier_args=dict(t.verifier_args),
        )
        for t in tasks
    ]


def write_probe(path: Path, n: int, seed: int = 0) -> Path:
    """The arithmetic probe (:func:`probe_set`, ``n`` items) as a probe file."""
    return write_probe_file(path, probe_items(probe_set(n, seed)))


def write_target_probe(path: Path, per_family: int = PROBE_PER_FAMILY, seed: int = 0) -> Path:
    """The per-target probe (:func:`target_probe`) as a probe file."""
    return write_probe_file(path, probe_items(target_probe(per_family, seed)))
