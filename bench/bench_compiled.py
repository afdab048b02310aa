"""What compiling the scorer's Python buys: one drain, interpreted and compiled, same run.

    .venv/bin/python -m bench.bench_compiled [--traces 30000] [--rounds 3]
        [--json docs/performance.json]

``bench_scorer`` splits the scorer's time per trace by stage: no stage is
most of it, and the per-trace path (cohorting, each trace's prepared part,
featurizing, the journals) is already batched numpy where it is numeric. So
the cheapest remedy short of rewriting that path in a compiled language is to
compile the same source: this benchmark measures it. The modules of
``COMPILED`` (the per-trace path that mypyc compiles unchanged) are compiled
to C extensions by mypyc (part of mypy, a dev dependency) in a copy of the
``daemon`` and ``streams`` packages, and the same steady-state drain of the
embedded log that ``bench_scorer`` runs is done by a ``tapd run`` of each
tree. Rounds alternate the floor (raw read + the validated decode), the
interpreted scorer and the compiled one on the same topic, each scorer with
output topics of its own. Printed: each drain's CPU-ms per trace and rate,
each scorer's ratio to its round's floor, and the compiled scorer's CPU per
trace over the interpreted one's (medians over the rounds). ``--json``
merges ``compiled_vs_interpreted_cpu_embedded`` and
``scorer_vs_floor_embedded_compiled`` into the file named.

Nothing compiled ships: the product runs interpreted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_scorer import (
    BASELINES,
    ROOT,
    Drain,
    _scorer_topics,
    embedded_log,
    scorer_drain,
    transport_baseline,
)
from bench.common import keyed_traces

# The per-trace path, each module compiled from its unchanged source. Not
# compiled: the pipeline (a `continue` inside try/finally, which mypyc does not
# implement), the schemas (pydantic models), the modules whose analysis
# pulls in the ML libraries (predictor, decision, state: minutes each), and the
# journals (compiled, the scorer died of a segmentation fault at its first
# state record).
COMPILED = (
    "daemon/core/features.py",
    "daemon/core/similarity.py",
    "daemon/core/cohorting.py",
    "daemon/core/events.py",
    "daemon/runtime/partitions.py",
    "streams/deadletter.py",
)


def compiled_tree(into: Path) -> Path:
    """A copy of the packages with ``COMPILED`` built as extensions beside their sources."""
    for pkg in ("daemon", "streams"):
        shutil.copytree(
            ROOT / pkg, into / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    shutil.copy2(ROOT / "pyproject.toml", into / "pyproject.toml")
    got = subprocess.run(
        [sys.executable, "-m", "mypyc", *COMPILED],
        cwd=into,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if got.returncode != 0:
        raise RuntimeError(f"mypyc failed ({got.returncode}):\n{got.stdout[-2000:]}{got.stderr}")
    # The extension, not the source, is what the scorer imports from that tree.
    for path in COMPILED:
        module = path.removesuffix(".py").replace("/", ".")
        where = subprocess.run(
            [sys.executable, "-c", f"import {module} as m; print(m.__file__)"],
            cwd=into,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.endswith(".so") or not where.startswith(str(into)):
            raise RuntimeError(f"{module} imports from {where}, not a compiled extension")
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=30_000)
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        import mypyc  # noqa: F401
    except ImportError:
        sys.exit("mypyc is not installed (it comes with mypy: `make setup-test`)")
    traces, keys = keyed_traces(args.traces, args.slices)
    work = Path(tempfile.mkdtemp(prefix="tapd-bench-compiled-"))
    try:
        t0 = time.perf_counter()
        tree = compiled_tree(work / "compiled")
        build_s = time.perf_counter() - t0
        settings, env, topic = embedded_log(traces, keys, args.partitions, work)
        floor_work = dict(BASELINES)["raw + decode (floor)"]
        rounds: list[tuple[Drain, Drain, Drain]] = []
        for r in range(args.rounds):
            floor = transport_baseline(settings, topic, len(traces), "floor", floor_work)
            drains: dict[str, Drain] = {}
            # Which tree drains first alternates, so that neither always
            # meets the page cache or the machine's other load first.
            order = [("interpreted", ROOT), ("compiled", tree)]
            for name, cwd in order if r % 2 == 0 else order[::-1]:
                d = work / f"r{r}-{name}"
                d.mkdir()
                drains[name] = scorer_drain(
                    env, _scorer_topics(topic), len(traces), args.partitions, d, cwd=cwd
                )
                drains[name].name = name
            rounds.append((floor, drains["interpreted"], drains["compiled"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"{args.traces:,} traces (8 attempts each) over {args.slices} slices, embedded SQLite "
        f"log, {args.partitions} partitions, {os.cpu_count()} CPU cores (load average "
        f"{load[0]:.1f} at the end); {len(COMPILED)} modules compiled by mypyc in "
        f"{build_s:.0f} s: {', '.join(COMPILED)}"
    )
    print(f"\n  {'round':<7}{'drain':<22}{'traces/s':>10}  {'CPU-ms/trace':>12}  x floor")
    for r, (floor, interp, comp) in enumerate(rounds):
        for d in (floor, interp, comp):
            label = "floor" if d is floor else f"scorer, {d.name}"
            print(
                f"  {r:<7}{label:<22}{d.per_s:>10,.0f}  {d.cpu_ms_per_trace:>12.3f}  "
                f"{d.per_s / floor.per_s:>6.3f}"
            )
    cpu = [c.cpu_ms_per_trace / i.cpu_ms_per_trace for _, i, c in rounds]
    vs_floor_i = [i.per_s / f.per_s for f, i, _ in rounds]
    vs_floor_c = [c.per_s / f.per_s for f, _, c in rounds]
    med = statistics.median_low
    print(
        f"\n  compiled / interpreted CPU per trace: {med(cpu):.3f}, the median of "
        + ", ".join(f"{x:.3f}" for x in cpu)
    )
    print(
        f"  scorer / floor: interpreted {med(vs_floor_i):.3f}, compiled {med(vs_floor_c):.3f} "
        "(medians; the target on the embedded log is >= 0.3)"
    )
    if args.json is not None:
        data: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
        data["compiled_vs_interpreted_cpu_embedded"] = med(cpu)
        data["scorer_vs_floor_embedded_compiled"] = med(vs_floor_c)
        data["bench_compiled"] = {
            "traces": args.traces,
            "modules": list(COMPILED),
            "build_seconds": build_s,
            "rounds": [[d.as_json() for d in rd] for rd in rounds],
            "compiled_vs_interpreted_cpu_rounds": cpu,
            "scorer_vs_floor_interpreted_rounds": vs_floor_i,
            "scorer_vs_floor_compiled_rounds": vs_floor_c,
        }
        args.json.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
