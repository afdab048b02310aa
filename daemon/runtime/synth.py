"""Synthetic traces for trying tapd on a broker (``tapd generate``).

Arithmetic prompts in a few capability slices (one per operation), each
trace carrying ``k`` attempts with rewards and per-token log-probs, so the
scorer can cohort, featurize, predict and decide without sampling a policy.
The slices differ in how often the "policy" is right, so their cohorts get
different recommendations (known, learnable, no foothold). Deterministic for
a seed. Not a benchmark: the lab's task battery is (``tapd eval``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

# (operation, symbol, mean pass rate of the simulated policy)
SLICES: tuple[tuple[str, str, float], ...] = (
    ("add", "+", 0.95),
    ("sub", "-", 0.5),
    ("mul", "*", 0.3),
    ("mod", "%", 0.02),
)


def _answer(op: str, a: int, b: int) -> int:
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    return a % b


def synthetic_traces(
    n: int,
    *,
    k: int = 8,
    slices: int = len(SLICES),
    seed: int = 0,
    policy_version: str = "v0",
    tenant: str = "synthetic",
    ts: float | None = None,
) -> Iterator[dict[str, Any]]:
    """``n`` trace dicts (schema ``tapd.trace/1``) spread over the first ``slices`` slices."""
    if not 1 <= slices <= len(SLICES):
        raise ValueError(f"slices: must be within 1..{len(SLICES)}, got {slices}")
    if not 1 <= k <= 64:
        raise ValueError(f"k: must be within 1..64, got {k}")
    rng = random.Random(seed)
    now = time.time() if ts is None else ts
    for i in range(n):
        op, sym, mean = SLICES[i % slices]
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        ref = str(_answer(op, a, b))
        # Each prompt's own difficulty scatters around its slice's mean.
        p = min(1.0, max(0.0, rng.gauss(mean, 0.1)))
        attempts = []
        for _ in range(k):
            right = rng.random() < p
            completion = ref if right else str(int(ref) + rng.choice((-2, -1, 1, 2, 10)))
            base = -0.15 if right else -1.2
            logprobs = [min(0.0, round(rng.gauss(base, 0.1), 4)) for _ in completion]
            attempts.append(
                {
                    "completion": completion,
                    "reward": 1.0 if right else 0.0,
                    "n_tokens": len(logprobs),
                    "token_logprobs": logprobs,
                }
            )
        yield {
            "schema": "tapd.trace/1",
            "trace_id": f"syn-{seed}-{i:08d}",
            "ts": round(now + i * 0.001, 3),
            "tenant": tenant,
            "source": "tapd.generate",
            "subject": "arithmetic",
            "tags": {"task_type": "synthetic", "operation": op},
            "prompt": f"What is {a} {sym} {b}? Answer with the number only.",
            "reference": ref,
            "verifier": "numeric",
            "verifier_args": {},
            "policy_version": policy_version,
            "attempts": attempts,
        }
