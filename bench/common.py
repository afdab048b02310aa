"""Shared helpers of the benchmarks: resident memory, timers, realistic traces."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from streams.schemas import TRACE_SCHEMA, Attempt, Trace

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size (``/proc``), or the peak where ``/proc`` is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Rate:
    items: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def timed(fn: Callable[[], int]) -> Rate:
    t0 = time.perf_counter()
    n = fn()
    return Rate(n, time.perf_counter() - t0)


def percentiles(samples_s: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    q = statistics.quantiles(samples_s, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def production_trace(
    i: int, *, slice_id: int = 0, attempts: int = 1, ts: float = 1_700_000_000.0
) -> Trace:
    """A trace shaped like production traffic: one attempt with per-token log-probs."""
    a, b = 10 + i % 89, 10 + (i * 7) % 89
    tokens = 3
    return Trace.model_validate(
        {
            "schema": TRACE_SCHEMA,
            "trace_id": f"tr-{i}",
            "ts": ts,
            "subject": "add",
            "tags": {"task_type": "arithmetic", "operation": f"op{slice_id}"},
            "prompt": f"{a}+{b}=",
            "reference": str(a + b),
            "verifier": "numeric",
            "policy_version": "v0",
            "attempts": [
                Attempt(
                    completion=str(a + b + k),
                    reward=float(k == 0),
                    n_tokens=tokens,
                    token_logprobs=[-0.1, -0.5, -0.05],
                    token_entropies=[0.3, 0.9, 0.1],
                )
                for k in range(attempts)
            ],
        }
    )


def per_s(n: int, seconds: float) -> float:
    """Records per second of a timed window (NaN for an empty window)."""
    return n / seconds if seconds > 0 else float("nan")


def cpu_ms_per(cpu_seconds: float, n: int) -> float:
    """CPU milliseconds per record of a timed window."""
    return 1e3 * cpu_seconds / max(n, 1)


def cpu_times() -> tuple[int, int]:
    """(all ticks, stolen ticks) of this machine's CPUs so far, from /proc/stat.

    Stolen time is time a virtual machine's CPUs were ready to run but the
    host ran something else: on a shared host it makes a latency tail that
    no code change can remove, so the latency figures print it beside them.
    (0, 0) where the kernel does not say (not Linux).
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0, 0
    ticks = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice: guest
    # time is already counted in user, so it is left out of the total.
    return sum(ticks[:8]), ticks[7] if len(ticks) > 7 else 0


def steal_share(start: tuple[int, int], end: tuple[int, int]) -> float:
    """The share of CPU time stolen by the host between two :func:`cpu_times` readings."""
    total = end[0] - start[0]
    return (end[1] - start[1]) / total if total > 0 else 0.0


def keyed_traces(n: int, slices: int) -> tuple[list[bytes], list[bytes]]:
    """``n`` encoded 8-attempt production traces over ``slices`` slices, each with
    the key ``tapd produce`` sends it with (its slice key)."""
    from daemon.config import CohortingSettings
    from daemon.core.cohorting import slice_key_of, validate_slice_key
    from streams.schemas import encode

    fields = validate_slice_key(CohortingSettings().slice_key)
    now = time.time()
    batch = [production_trace(i, slice_id=i % slices, attempts=8, ts=now) for i in range(n)]
    return [encode(t) for t in batch], [slice_key_of(t, fields).encode() for t in batch]
