"""Run the benchmarks and write ``docs/PERFORMANCE.md`` from their printed output.

    .venv/bin/python -m bench.report [--out docs/PERFORMANCE.md] [--memory-traces 1000000]

Each benchmark runs as its own process (a clean heap for the memory figures);
the page quotes each command and its output verbatim.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INTRO = {
    "bench.bench_scorer": "Scorer throughput: steady-state drains (group join excluded) of a "
    "slice-keyed traces topic by one `tapd run` process (decode, validate, cohort, featurize, "
    "predict, decide, persist, commit), on the real local Kafka broker and on the embedded log, "
    "against three baselines drained from the same topic in the same run: raw consumption, raw "
    "+ `json.loads`, raw + the validated decode of the same schema (the floor). The target: the "
    "scorer at >= 0.5x the floor on Kafka, >= 0.3x on the embedded log. Below each transport's "
    "table, the scorer's own per-stage timers (`tapd_processing_seconds`, read from its "
    "`/metrics` over the same window) split its wall time per trace, against the floor's decode "
    "and the time per trace the target allows: `cohorting` includes each trace's prepared "
    "features part, `dispatch` the sends of decisions and state records, `other` what no stage "
    "covers. Three rounds of the four drains run back to back; each ratio is the median of the "
    "rounds' ratios (each round's is printed), the tables and the split are the median round's. "
    "The figures are also in `docs/performance.json`.",
    "bench.bench_compiled": "What compiling the scorer's Python buys, short of rewriting it: the "
    "modules of its per-trace path (features, similarity, cohorting, events, partitions, dead "
    "letters) compiled from their unchanged source by mypyc, and the same embedded-log drain as "
    "above run by an interpreted and a compiled `tapd run`, alternating, against the floor of "
    "each round. Nothing compiled ships; the figures are also in `docs/performance.json`.",
    "bench.bench_embedded": "Embedded transport (one SQLite file, Kafka semantics) against raw "
    "SQLite inserts and reads with the same durability (WAL, synchronous=FULL).",
    "bench.bench_memory": "Resident memory of the cohort builder with 10k open cohorts, and "
    "across a long trace stream (flat = bounded).",
    "bench.bench_service": "The scorer's other costs, each against a baseline of the same run: "
    "per-cohort latency at close (featurize + predict) at G = 8, 64, 256 against decoding the "
    "cohort (prompts of one arithmetic form, as a capability slice's often are, and at G = 64 "
    "also prompts each of its own template, which target_similarity's per-template memo cannot "
    "help), the traces prepared when cohorted as the scorer's are (that per-trace share is "
    "printed beside it, with the CPU time the host stole meanwhile); "
    "CPU per trace with 10k against 1k open slices (medians of five alternated drains of 40k traces); RSS of `tapd run` over a long 8-attempt "
    "stream; scoring p99 while LightGBM refits on 100k labels; start-up RSS with rollouts off. "
    "Targets: p99 <= 5 ms at G = 64, 10k/1k within 20 %, second-half RSS growth <= 5 %, refit "
    "p99 increase <= 20 %, start-up <= 200 MiB. The figures are also in `docs/performance.json`.",
    "bench.bench_predictor": "Per-cohort scoring latency (p50/p99) and LightGBM refit time on "
    "10k labels (the predictor's own benchmark).",
    "bench.bench_features": "Featurization cost per cohort (the features' own benchmark).",
    "bench.bench_replicas": "Drain rate of a slice-keyed traces topic by one and by two "
    "`tapd run` replicas on the real local Kafka broker, and CPU-seconds per trace of the "
    "replica processes (the target: two at >= 1.6x the rate of one, CPU per trace no more "
    "than 10% above one's). Two pairs of drains: replicas sharing this machine's cores with the "
    "broker and each other (on 2 cores that measures the machine), then each replica with its own "
    "CPU allotment (a cgroup quota, as a pod's CPU limit), which the target is read from.",
}


def run(module: str, args: list[str]) -> tuple[str, str, float]:
    cmd = [sys.executable, "-m", module, *args]
    shown = " ".join([".venv/bin/python", "-m", module, *args])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    out = proc.stdout.strip() or "(no output)"
    if proc.returncode != 0:
        out += f"\n(exit {proc.returncode})\n" + proc.stderr.strip()[-2000:]
    # Paths relative to the repository: the page names no machine's directories.
    out = out.replace(f"{ROOT}/", "")
    return shown, out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    ap.add_argument("--memory-traces", type=int, default=1_000_000)
    # Steady-state drains: long enough that join and tail effects are noise.
    ap.add_argument("--scorer-traces", type=int, default=50_000)
    ap.add_argument("--embedded-records", type=int, default=50_000)
    # The two-replica window opens only after the rebalance settles (~7-9 s,
    # in which one replica drains alone at ~4k traces/s): 120k traces keep
    # that window >= 15 s (40k left 4 s once the scorer got faster).
    ap.add_argument("--replica-traces", type=int, default=120_000)
    args = ap.parse_args()
    plan: list[tuple[str, list[str]]] = [
        (
            "bench.bench_scorer",
            ["--traces", str(args.scorer_traces), "--json", "docs/performance.json"],
        ),
        ("bench.bench_compiled", ["--json", "docs/performance.json"]),
        ("bench.bench_service", ["--json", "docs/performance.json"]),
        ("bench.bench_embedded", ["--records", str(args.embedded_records)]),
        ("bench.bench_memory", ["--traces", str(args.memory_traces)]),
        (
            "bench.bench_replicas",
            ["--traces", str(args.replica_traces), "--json", "docs/bench_replicas.json"],
        ),
    ]
    # The predictor's and the features' own benchmarks: per-cohort scoring
    # latency and the LightGBM refit on 10k labels.
    for extra in ("bench_predictor", "bench_features"):
        if (ROOT / "bench" / f"{extra}.py").exists():
            plan.append((f"bench.{extra}", []))
    lines = [
        "# Performance",
        "",
        f"Generated by `.venv/bin/python -m bench.report` on {dt.date.today().isoformat()}, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other work while it ran), "
        f"Python {platform.python_version()}. Every figure is a ratio to a baseline measured in "
        "the same run, so machine speed cancels out; absolute rates are for scale only.",
        "",
    ]
    for module, a in plan:
        shown, out, seconds = run(module, a)
        print(f"{shown}: {seconds:.0f} s", file=sys.stderr)
        lines += [
            f"## {module.split('.')[-1]}",
            "",
            INTRO.get(module, ""),
            "",
            "```",
            f"$ {shown}",
            out,
            "```",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
