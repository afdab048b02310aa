"""Feature-extraction throughput, with baselines measured in the same run.

Cohorts of 16 prompts x 8 attempts x 256 tokens with synthetic token
log-probs and entropies. Printed: cohorts/s and traces/s of ``featurize``
(with and without the verifier probe), against (a) decoding the same traces
from their JSON bytes, the work every trace costs anyway, and (b) a naive
pure-Python computation of the token (familiarity) features.

    python bench/bench_features.py [--cohorts 20]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from daemon.core.features import featurize
from streams.schemas import Attempt, Trace, decode, encode

PROMPTS, ATTEMPTS, TOKENS = 16, 8, 256


def synthetic_cohort(rng: random.Random, c: int) -> list[Trace]:
    traces = []
    for p in range(PROMPTS):
        a, b = rng.randrange(100), rng.randrange(100)
        attempts = []
        for _ in range(ATTEMPTS):
            lps = [-rng.expovariate(2.0) for _ in range(TOKENS)]
            ents = [rng.uniform(0.0, 3.0) for _ in range(TOKENS)]
            right = rng.random() < 0.5
            attempts.append(
                Attempt(
                    completion=str(a + b if right else a + b + 1),
                    reward=float(right),
                    n_tokens=TOKENS,
                    token_logprobs=lps,
                    token_entropies=ents,
                )
            )
        traces.append(
            Trace(
                schema="tapd.trace/1",
                trace_id=f"c{c}-p{p}",
                ts=1_700_000_000.0 + p,  # a unix time: decode refuses 0 (unset)
                subject="math",
                tags={"task_type": "add"},
                prompt=f"What is {a} + {b}?",
                reference=str(a + b),
                verifier="exact",
                policy_version="p0",
                attempts=attempts,
            )
        )
    return traces


def naive_familiarity(traces: Sequence[Trace]) -> dict[str, float]:
    """The token features in plain Python loops: what the vectorised code replaces."""
    means, surprisals, mins, slopes, probs, ents, pooled = [], [], [], [], [], [], []
    for t in traces:
        for a in t.attempts:
            lps = a.token_logprobs or []
            n = len(lps)
            means.append(sum(lps) / n)
            surprisals.append(-sum(lps))
            mins.append(min(lps))
            h = n // 2
            slopes.append(sum(lps[h:]) / (n - h) - sum(lps[:h]) / h)
            probs.append(sum(math.exp(x) for x in lps) / n)
            ents.append(sum(a.token_entropies or []) / n)
            pooled.extend(lps)
    pooled.sort()
    q = statistics.quantiles(pooled, n=10, method="inclusive")
    return {
        "mean_logprob": sum(means) / len(means),
        "surprisal_mean": sum(surprisals) / len(surprisals),
        "entropy_mean": sum(ents) / len(ents),
        "logprob_p10": q[0],
        "logprob_p50": q[4],
        "logprob_p90": q[8],
        "confidence_slope": sum(slopes) / len(slopes),
        "redundancy_mean": sum(probs) / len(probs),
        "min_logprob_mean": sum(mins) / len(mins),
    }


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    cohorts = [synthetic_cohort(rng, c) for c in range(args.cohorts)]
    raws = [[encode(t) for t in c] for c in cohorts]
    probes = [f"What is {rng.randrange(100)} + {rng.randrange(100)}?" for _ in range(64)]
    n_traces = args.cohorts * PROMPTS

    # Same figures from both implementations, or the comparison means nothing.
    fast = featurize(cohorts[0], verifier_probe=False)
    slow = naive_familiarity(cohorts[0])
    assert all(math.isclose(fast[k], v, rel_tol=1e-6, abs_tol=1e-9) for k, v in slow.items())

    rows = [
        ("featurize (all features)", lambda: [featurize(c, probe_prompts=probes) for c in cohorts]),
        (
            "featurize (no verifier probe)",
            lambda: [featurize(c, probe_prompts=probes, verifier_probe=False) for c in cohorts],
        ),
        (
            "baseline: JSON decode of the traces",
            lambda: [[decode(r, Trace) for r in c] for c in raws],
        ),
        (
            "baseline: naive pure-Python token features",
            lambda: [naive_familiarity(c) for c in cohorts],
        ),
    ]
    secs = {name: timed(fn) for name, fn in rows}
    ref = secs["featurize (all features)"]
    print(
        f"{args.cohorts} cohorts of {PROMPTS} prompts x {ATTEMPTS} attempts x {TOKENS} tokens "
        f"({n_traces} traces, {n_traces * ATTEMPTS * TOKENS:,} tokens)"
    )
    print(f"{'':44} {'cohorts/s':>10} {'traces/s':>10} {'time / featurize':>17}")
    for name, s in secs.items():
        print(f"{name:44} {args.cohorts / s:10.1f} {n_traces / s:10.0f} {s / ref:16.2f}x")


if __name__ == "__main__":
    main()
