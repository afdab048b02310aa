"""The real-model battery: reasoning-gym task families as capability slices.

A slice is a (family, difficulty) pair: a reasoning-gym generator with a
difficulty setting (:data:`CANDIDATES`). Its verifier is the family's own
scorer through tapd's product verifier ``reasoning_gym``
(:mod:`daemon.verify.reasoning_gym`), full credit only
(``partial_credit: false``); numeric families use the lenient
``last_number`` extraction, because SmolLM2 answers in prose ("3 + 5 = 8").

Held-out target probes reuse the arithmetic battery's partition
(:func:`lab.tasks.in_probe_partition`): a question whose hash falls in the
probe bucket is only ever produced with ``split="probe"``, every training
cohort rejects it, so probe and cohorts are disjoint for any seeds.

Which slices are easy, frontier and no-foothold for SmolLM2-135M-Instruct is
measured, not assumed: ``tapd build-policy --model smollm2 --competence``
samples every candidate slice (temperature 1, chat template) and prints
the pass rates; :data:`TIERS` records the choice made from that
measurement (docs/REAL_MODEL.md).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.tasks import Task, in_probe_partition
from streams.probes import ProbeItem, write_probe_file

VERIFIER = "reasoning_gym"


@dataclass(frozen=True)
class RGSlice:
    family: str
    difficulty: str
    config: Mapping[str, Any] = field(default_factory=dict)
    extract: str = "last_number"

    @property
    def target(self) -> str:
        return f"{self.family}/{self.difficulty}"


def _s(family: str, difficulty: str, extract: str = "last_number", **config: Any) -> RGSlice:
    return RGSlice(family, difficulty, config, extract)


# Candidate slices, cheapest prompts first. Difficulty names say what varies.
CANDIDATES: tuple[RGSlice, ...] = (
    _s("basic_arithmetic", "add_1d", min_terms=2, max_terms=2, min_digits=1, max_digits=1,
       operators=("+",), allow_parentheses=False, allow_negation=False),
    _s("basic_arithmetic", "addsub_2d", min_terms=2, max_terms=2, min_digits=2, max_digits=2,
       operators=("+", "-"), allow_parentheses=False, allow_negation=False),
    _s("basic_arithmetic", "mixed_3t", min_terms=3, max_terms=3, min_digits=1, max_digits=2,
       operators=("+", "-", "*"), allow_parentheses=False, allow_negation=False),
    _s("products", "1x1", min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    _s("products", "2x2", min_terms=2, max_terms=2, min_digits=2, max_digits=2),
    _s("chain_sum", "2t_1d", min_terms=2, max_terms=2, min_digits=1, max_digits=1),
    _s("chain_sum", "4t_2d", min_terms=4, max_terms=4, min_digits=2, max_digits=2),
    _s("gcd", "small", min_value=2, max_value=20),
    _s("gcd", "large", min_value=100, max_value=1000),
    _s("letter_counting", "short", min_words=1, max_words=3),
    _s("letter_counting", "long", min_words=8, max_words=12),
    _s("leg_counting", "few", min_animals=1, max_animals=2, min_instances=1, max_instances=3),
    _s("leg_counting", "many", min_animals=4, max_animals=6, min_instances=3, max_instances=15),
    _s("simple_equations", "2t", min_terms=2, max_terms=2, min_value=1, max_value=10,
       operators=("+", "-"), operators_weights=[0.5, 0.5]),
    _s("spell_backward", "short", extract="whole", min_word_len=3, max_word_len=4),
    _s("spell_backward", "long", extract="whole", min_word_len=8, max_word_len=10),
)  # fmt: skip
BY_TARGET: dict[str, RGSlice] = {s.target: s for s in CANDIDATES}


def get_slice(target: str) -> RGSlice:
    if target not in BY_TARGET:
        raise ValueError(f"slice: unknown {target!r} (known: {', '.join(BY_TARGET)})")
    return BY_TARGET[target]


def _dataset(sl: RGSlice, size: int, seed: int) -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise RuntimeError(
            "the real-model battery needs reasoning-gym: pip install 'tapd[reasoning-gym]'"
        ) from None
    return reasoning_gym.create_dataset(sl.family, size=size, seed=seed, **dict(sl.config))


def make_tasks(sl: RGSlice, n: int, seed: int, split: str = "train") -> list[Task]:
    """``n`` tasks of slice ``sl`` from one side of the probe partition (repeats allowed)."""
    tasks: list[Task] = []
    chunk = 0
    while len(tasks) < n:
        # Chunks of a seeded dataset, so that filtering by partition terminates.
        base = random.Random(f"tapd.rg|{sl.target}|{seed}|{split}|{chunk}").randrange(2**31)
        ds = _dataset(sl, max(2 * n, 16), base)
        for i in range(len(ds)):
            e = ds[i]
            q = str(e["question"])
            if split != "any" and in_probe_partition(q) != (split == "probe"):
                continue
            # Reward only the exact answer: reasoning-gym's partial credit pays
            # a padded number ("109" for "10"), which the reward-trust gate refuses.
            args: dict[str, Any] = {
                "task": sl.family,
                "extract": sl.extract,
                "partial_credit": False,
            }
            tasks.append(
                Task(
                    prompt=q,
                    reference=str(e["answer"]),
                    # The slice is the capability a cohort and its probe
                    # target share: the product resolves a cohort's target
                    # from its subject (streams.probes.cohort_target).
                    subject=sl.target,
                    tags={"task_type": sl.family, "operation": sl.difficulty},
                    verifier=VERIFIER,
                    verifier_args=args,
                    difficulty=sl.difficulty,
                )
            )
            if len(tasks) == n:
                break
        chunk += 1
        if chunk > 50:
            raise RuntimeError(f"{sl.target}: too few distinct questions for {n} {split} tasks")
    return tasks


def probe_items(slices: Sequence[RGSlice], per_slice: int, seed: int = 0) -> list[ProbeItem]:
    """Held-out target probes: ``per_slice`` distinct questions of every slice."""
    items: list[ProbeItem] = []
    for sl in slices:
        seen: set[str] = set()
        for t in make_tasks(sl, per_slice * 4, seed, split="probe"):
            if t.prompt in seen:
                continue
            seen.add(t.prompt)
            items.append(
                ProbeItem(
                    target=sl.target,
                    prompt=t.prompt,
                    reference=t.reference,
                    verifier=t.verifier,
                    verifier_args=dict(t.verifier_args),
                )
            )
            if len(seen) == per_slice:
                break
    return items


def write_probe(path: Path, slices: Sequence[RGSlice], per_slice: int, seed: int = 0) -> Path:
    return write_probe_file(path, probe_items(slices, per_slice, seed))


def answer_probe(
    path: Path, policy: Path, attempts: int = 16, seed: int = 0, max_new_tokens: int = 64
) -> Path:
    """The probe file at ``path`` with each item's answer in ``policy``'s own words.

    What ``tapd probe answers`` does, for a lab run that has no settings file.
    """
    from daemon.policy.answers import own_answers
    from daemon.policy.hf import HFRolloutEngine
    from daemon.policy.store import load_policy
    from streams.probes import read_probe_file

    model, tok = load_policy(policy)
    engine = HFRolloutEngine(model, tok)
    items, _ = own_answers(
        read_probe_file(path), engine, attempts, seed, max_new_tokens=max_new_tokens
    )
    return write_probe_file(path, items)


@dataclass(frozen=True)
class PassRate:
    target: str
    prompts: int
    samples: int
    pass_rate: float  # mean reward over prompts x samples
    prompts_any_right: float  # share of prompts with at least one right sample
    prompts_disagree: float  # share of prompts whose samples disagree (GRPO signal)
    mean_tokens: float


def measure(
    engine: Any,
    slices: Sequence[RGSlice],
    prompts: int = 12,
    samples: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[PassRate]:
    """Sampled pass rates of the policy behind ``engine`` on each slice (training partition)."""
    from daemon.policy.rollout import fill_attempts
    from lab.tasks import to_trace

    out: list[PassRate] = []
    for sl in slices:
        tasks = make_tasks(sl, prompts, seed)
        traces = [to_trace(t, policy_version="v0", key=i) for i, t in enumerate(tasks)]
        filled = fill_attempts(
            traces, engine, samples, seed=seed, max_new_tokens=max_new_tokens,
            temperature=temperature,
        )  # fmt: skip
        if filled.rejected:
            raise RuntimeError(f"{sl.target}: {filled.rejected[0].reason}")
        rewards = [[a.reward for a in t.attempts] for t in filled.traces]
        flat = [r for g in rewards for r in g]
        out.append(
            PassRate(
                target=sl.target,
                prompts=len(rewards),
                samples=samples,
                pass_rate=sum(flat) / len(flat),
                prompts_any_right=sum(max(g) >= 0.5 for g in rewards) / len(rewards),
                prompts_disagree=sum(min(g) != max(g) for g in rewards) / len(rewards),
                mean_tokens=sum(a.n_tokens for t in filled.traces for a in t.attempts) / len(flat),
            )
        )
    return out


# SmolLM2-135M-Instruct's tier per slice, chosen from its measured sampled
# pass rates (temperature 1, chat template, 8 prompts x 8 samples, 32 tokens;
# docs/REAL_MODEL.md, docs/real/smollm2_pass_rates_*.json). No slice is
# known at temperature 1 (the best is 0.28): the "frontier" slices are its
# best (0.17-0.28, most prompts' samples disagree), "thin" ones have a
# foothold on some prompts (0.08-0.09), "hard" ones almost none (0.02).
# The figures are those with full credit only and a standalone number
# (pass_rates_3); the first choice, under partial credit, was the same.
TIERS: dict[str, str] = {
    "products/1x1": "frontier",  # 0.281, 8/8 prompts disagree
    "basic_arithmetic/add_1d": "frontier",  # 0.172, 6/8
    "chain_sum/2t_1d": "frontier",  # 0.172, 7/8
    "gcd/small": "thin",  # 0.078, 3/8
    "letter_counting/short": "thin",  # 0.094, 4/8
    "basic_arithmetic/addsub_2d": "hard",  # 0.016, 1/8
}


def tier_slices(tier: str) -> list[RGSlice]:
    return [get_slice(t) for t, v in TIERS.items() if v == tier]


def control_cohort(variant: str, n: int, seed: int) -> list[Task]:
    """A control cohort over the real battery (the variants of :func:`lab.tasks.control_cohort`).

    No slice is "easy" for SmolLM2 at temperature 1: an easy cohort is drawn
    from its best (frontier) slices.
    """
    rng = random.Random(f"tapd.rg.control|{variant}|{seed}")
    if variant in ("easy", "frontier", "hard"):
        pool = tier_slices(variant) or tier_slices("frontier")
        return make_tasks(rng.choice(pool), n, seed)
    if variant == "mixed":
        a, b = rng.choice(tier_slices("frontier")), rng.choice(tier_slices("hard"))
        return [t for pair in zip(make_tasks(a, n, seed), make_tasks(b, n, seed), strict=True)
                for t in pair][:n]  # fmt: skip
    base = make_tasks(rng.choice(tier_slices("frontier")), n, seed)
    if variant == "scrambled":
        return [Task(t.prompt, t.reference, t.subject, t.tags, "scrambled", {"seed": seed},
                     t.difficulty) for t in base]  # fmt: skip
    if variant == "weak_verifier":
        # Containment: a verbose answer that mentions the number anywhere passes.
        return [Task(t.prompt, t.reference, t.subject, t.tags, "contains", {}, t.difficulty)
                for t in base]  # fmt: skip
    raise ValueError(f"variant: unknown control cohort {variant!r}")
