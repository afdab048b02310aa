"""Resident memory of the cohort builder: 10k open cohorts, and a long stream (no growth).

    .venv/bin/python -m bench.bench_memory                    # 200k-trace stream
    .venv/bin/python -m bench.bench_memory --traces 1000000   # the published 1M figure

Baseline (same run): the process's RSS after imports, before any trace. The
open-cohort figure is also given per held trace and as a ratio to the trace's
own JSON size; the stream figure as RSS at each checkpoint over RSS at the
first one (1.00 = flat).
"""

from __future__ import annotations

import argparse
import gc

from bench.common import mib, production_trace, rss_bytes
from daemon.config import CohortingSettings
from daemon.core.cohorting import Closed, CohortBuilder
from streams.schemas import encode


def open_cohorts(n_open: int, per_cohort: int, baseline: int) -> None:
    settings = CohortingSettings(max_open=n_open, max_groups=per_cohort + 1, max_age_s=1e9)
    builder = CohortBuilder(settings, "v0")
    i = 0
    for k in range(per_cohort):
        for s in range(n_open):
            events = builder.on_item(production_trace(i, slice_id=s), now=float(k))
            assert not events, f"trace {i}: unexpected {events[0]!r}"
            i += 1
    gc.collect()
    held = rss_bytes()
    trace_json = len(encode(production_trace(0)))
    per_trace = (held - baseline) / i
    print(f"open cohorts: {builder.n_open} holding {builder.n_open_traces} traces")
    print(f"  RSS {mib(held)} (baseline {mib(baseline)}, +{mib(held - baseline)})")
    print(
        f"  {per_trace:,.0f} B per held trace = {per_trace / trace_json:.1f}x its "
        f"{trace_json} B JSON encoding"
    )
    del builder
    gc.collect()


def stream(n_traces: int, n_slices: int, checkpoints: int) -> None:
    builder = CohortBuilder(CohortingSettings(max_age_s=1e9), "v0")
    every = max(1, n_traces // checkpoints)
    closed = 0
    first: int | None = None
    marks: list[int] = []
    print(f"stream: {n_traces:,} traces over {n_slices:,} slices (cohorts close at 8 groups)")
    for i in range(n_traces):
        for ev in builder.on_item(production_trace(i, slice_id=i % n_slices), now=i * 1e-3):
            closed += isinstance(ev, Closed)
        if (i + 1) % every == 0:
            gc.collect()
            rss = rss_bytes()
            first = first or rss
            marks.append(rss)
            print(
                f"  {i + 1:>9,} traces  RSS {mib(rss):>10}  x{rss / first:.2f} of first  "
                f"open {builder.n_open:,}  closed {closed:,}"
            )
    if len(marks) >= 2:
        mid = marks[len(marks) // 2 - 1]
        print(f"  growth over the second half of the stream: x{marks[-1] / mid:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--open", type=int, default=10_000, help="open cohorts to hold")
    ap.add_argument("--per-cohort", type=int, default=4, help="traces in each open cohort")
    ap.add_argument("--traces", type=int, default=200_000, help="traces in the stream")
    ap.add_argument("--slices", type=int, default=1_000, help="distinct slice keys in the stream")
    ap.add_argument("--checkpoints", type=int, default=10)
    args = ap.parse_args()
    gc.collect()
    baseline = rss_bytes()
    print(f"baseline RSS after imports: {mib(baseline)}")
    open_cohorts(args.open, args.per_cohort, baseline)
    stream(args.traces, args.slices, args.checkpoints)


if __name__ == "__main__":
    main()
