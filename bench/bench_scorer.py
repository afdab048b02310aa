"""Scorer throughput: steady-state drains against three baselines, same run, both transports.

    .venv/bin/python -m bench.bench_scorer [--traces 50000] [--slices 48] [--partitions 4]
        [--rounds 3] [--json docs/performance.json]

For each transport (the local Kafka 0.9 broker of ``lab.localbroker``, and the
embedded SQLite log) a topic is filled with ``--traces`` production-like traces
(K=8 attempts each, so no rollouts run: the pipeline, not the policy), keyed by
slice key as ``tapd produce`` keys them. The same topic is then drained four
times, each by a fresh consumer group from the beginning:

* raw: records consumed and dropped. On Kafka a bare kafka-python
  ``KafkaConsumer`` (the scorer's connection settings, ``max_poll_records``
  500); on the embedded log the project's own transport consumer
  (``streams.factory.open_transport(...).consumer``), there being no other
  client of that file;
* raw + ``json.loads`` of every record value;
* raw + ``streams.schemas.decode(value, Trace)``, the cheapest validated decode
  of the same schema: the floor a scorer cannot beat;
* the scorer: one ``tapd run`` process (the deployment unit, shadow mode since
  no trainer answers), its rate read from its own ``/metrics``
  (``tapd_traces_consumed_total``).

No baseline commits offsets; the scorer does (durably, per batch), which is
part of what the ratios charge it.

The four drains are one round; ``--rounds`` rounds run one after another on
the same topic (each scorer with output topics of its own, so that it finds
no earlier scorer's state), and each ratio is the median over the rounds of
that round's ratio (the lower middle one of an even count), each round's baselines and scorer measured back to back:
on a shared 2-core machine one round's floor varied by a third between runs,
and a single round's ratio with it. Each round's ratio is printed; the tables
and the stage split are the median round's.

Every rate is a steady-state drain: group join excluded. A baseline's clock
starts when its first poll returns records (those records are not counted)
and stops when the last record arrives; the scorer's window opens once it
owns every partition and its consumed counter is read, and closes when that
counter reaches the topic's size. The excluded lead-in is printed as
``join s``: for a baseline, subscribe to first records; for the scorer,
process start (imports included) to owning its partitions. Figures:
traces/s, CPU-ms per trace of the consuming process, the ratios scorer/floor and scorer/raw, and whether the
targets are met (scorer >= 0.5x the floor on Kafka, >= 0.3x on the embedded
log). ``--json`` merges them into the file named (read-modify-write: keys
other benchmarks wrote there are kept). ``python -m bench.report`` runs this
at 50,000 traces, rewrites ``docs/performance.json`` and the page
``docs/PERFORMANCE.md`` that quotes this output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.bench_replicas import cpu_seconds, free_port, scrape
from bench.common import cpu_ms_per, keyed_traces, per_s
from streams.schemas import Trace, decode

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"kafka": 0.5, "embedded": 0.3}
POLL_RECORDS = 500
# How often the drain window reads the scorer's /metrics. Each scrape renders
# every metric family in the scorer's process, which is CPU charged to the
# scorer: at 20 scrapes a second that was an eighth of its CPU, a load no
# Prometheus puts on it (15 s is the default interval). So the window is read
# 4 times a second, and only when the drain is due to end (its rate so far
# says when) more often, every FINAL_SCRAPE_S at most: a window that closed up
# to 0.25 s late counted about 2 % of a 50,000-trace drain against the scorer.
SCRAPE_EVERY_S = 0.25
FINAL_SCRAPE_S = 0.02


@dataclass
class Drain:
    """One steady-state drain: ``traces`` records in ``seconds``, ``cpu_seconds`` of the consumer."""

    name: str
    traces: int
    seconds: float
    cpu_seconds: float
    join_seconds: float
    # The scorer's own account of the window's wall time, by stage
    # (tapd_processing_seconds_sum): seconds spent in each.
    stages: dict[str, float] | None = None

    @property
    def per_s(self) -> float:
        return per_s(self.traces, self.seconds)

    @property
    def cpu_ms_per_trace(self) -> float:
        return cpu_ms_per(self.cpu_seconds, self.traces)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_s": self.per_s, "cpu_ms_per_trace": self.cpu_ms_per_trace}


Work = Callable[[bytes], object]
BASELINES: list[tuple[str, Work | None]] = [
    ("raw", None),
    ("raw + json.loads", json.loads),
    ("raw + decode (floor)", lambda v: decode(v, Trace)),
]


def _drain(name: str, poll: Callable[[], list[bytes]], n: int, work: Work | None) -> Drain:
    """Poll until ``n`` records came; the clock runs from the first non-empty poll."""
    t_start = time.perf_counter()
    got = 0
    t0 = c0 = 0.0
    first = 0
    while got < n:
        values = poll()
        if not values:
            if time.perf_counter() - t_start > 600:
                raise RuntimeError(f"{name}: {got} of {n} records")
            continue
        if work is not None:
            for v in values:
                work(v)
        if got == 0:
            t0, c0, first = time.perf_counter(), time.process_time(), len(values)
        got += len(values)
    t1, c1 = time.perf_counter(), time.process_time()
    return Drain(name, got - first, t1 - t0, c1 - c0, t0 - t_start)


def kafka_baseline(settings: Any, topic: str, n: int, name: str, work: Work | None) -> Drain:
    from kafka import KafkaConsumer

    from streams.kafka import client_config

    c = KafkaConsumer(
        topic,
        **client_config(settings),
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=POLL_RECORDS,
    )

    def poll() -> list[bytes]:
        batches = c.poll(timeout_ms=1000, max_records=POLL_RECORDS)
        return [r.value for records in batches.values() for r in records]

    try:
        return _drain(name, poll, n, work)
    finally:
        c.close()


def transport_baseline(settings: Any, topic: str, n: int, name: str, work: Work | None) -> Drain:
    from streams.factory import open_transport

    transport = open_transport(settings, POLL_RECORDS)
    c = transport.consumer([topic], f"raw-{uuid.uuid4().hex[:8]}")

    def poll() -> list[bytes]:
        return [r.value for r in c.poll(1.0, POLL_RECORDS)]

    try:
        return _drain(name, poll, n, work)
    finally:
        c.close()
        transport.close()


def fill(settings: Any, topic: str, traces: list[bytes], keys: list[bytes]) -> None:
    from streams.factory import open_transport

    transport = open_transport(settings)
    producer = transport.producer()
    for i, (value, key) in enumerate(zip(traces, keys, strict=True)):
        producer.send(topic, value, key=key)
        if i % POLL_RECORDS == POLL_RECORDS - 1:
            producer.flush(120.0)
    producer.flush(120.0)
    producer.close()
    transport.close()


def scorer_drain(
    env_transport: dict[str, str],
    topics: dict[str, str],
    n: int,
    partitions: int,
    workdir: Path,
    *,
    extra_env: dict[str, str] | None = None,
    sample: Callable[[float, int], None] | None = None,
    cwd: Path = ROOT,
) -> Drain:
    """One ``tapd run`` process drains the topic; the window is read from its metrics.

    ``extra_env`` adds settings; ``sample(consumed, pid)`` is called at every
    scrape of the drain window (the memory benchmark reads RSS there); ``cwd``:
    the directory whose ``daemon`` package runs (first on the module path).
    """
    # Named after its own output topics: scorers of one traces topic (the
    # rounds) are each a group of their own, reading it from the beginning.
    run = topics["CHANGELOG"].split(".")[0]
    port = free_port()
    env = {
        **os.environ,
        **env_transport,
        "TAPD_SERVICE__GROUP": f"{run}-scorer",
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_STATE_DIR": str(workdir / f"{run}-state"),
        "TAPD_THRESHOLDS__SHADOW_MODE": "true",
        "TAPD_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
        **{f"TAPD_TOPICS__{k}": v for k, v in topics.items()},
        **(extra_env or {}),
    }
    with (workdir / f"{run}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    t_start = time.monotonic()
    try:
        while True:
            m = scrape(port)
            if m.get("tapd_partitions_owned", 0.0) == partitions:
                break
            if proc.poll() is not None:
                tail = (workdir / f"{run}.log").read_text()[-2000:]
                raise RuntimeError(f"tapd run exited with {proc.returncode}:\n{tail}")
            if time.monotonic() - t_start > 600:
                raise RuntimeError("tapd run never owned its partitions")
            time.sleep(0.05)
        t0 = time.monotonic()
        c0 = m.get("tapd_traces_consumed_total", 0.0)
        cpu0 = cpu_seconds(proc.pid)
        while True:
            consumed = scrape(port).get("tapd_traces_consumed_total", 0.0)
            if sample is not None:
                sample(consumed, proc.pid)
            if consumed >= n:
                break
            now = time.monotonic()
            if proc.poll() is not None or now - t0 > 3600:
                raise RuntimeError(f"scorer not drained: {consumed} of {n}")
            rate = (consumed - c0) / (now - t0) if consumed > c0 else 0.0
            due_in = (n - consumed) / rate if rate > 0 else SCRAPE_EVERY_S
            time.sleep(min(SCRAPE_EVERY_S, max(FINAL_SCRAPE_S, due_in)))
        t1 = time.monotonic()
        cpu1 = cpu_seconds(proc.pid)
        m1 = scrape(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Drain(
        "tapd run (scorer)",
        int(n - c0),
        t1 - t0,
        cpu1 - cpu0,
        t0 - t_start,
        stage_seconds(m1, m),
    )


STAGE_SUM = 'tapd_processing_seconds_sum{stage="'


def stage_seconds(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Seconds each stage took between two scrapes of the scorer's /metrics."""
    out = {}
    for name, value in after.items():
        if name.startswith(STAGE_SUM):
            stage = name[len(STAGE_SUM) :].split('"', 1)[0]
            out[stage] = value - before.get(name, 0.0)
    return out


def print_stages(scorer: Drain, floor: Drain, raw: Drain, target: float) -> dict[str, float]:
    """Where the scorer's wall time per trace goes, against what the target allows.

    Stages are the scorer's own timers (``tapd_processing_seconds``); ``other``
    is the window's wall time no stage covers (the loop, metrics, logging, the
    state record's encoding). The floor's decode is its per-trace time beyond
    the raw drain's; the budget is the wall time per trace at ``target`` x the
    floor's rate.
    """
    assert scorer.stages is not None
    us = {k: v / scorer.traces * 1e6 for k, v in scorer.stages.items() if v > 0}
    us["other"] = max(scorer.seconds / scorer.traces * 1e6 - sum(us.values()), 0.0)
    total = scorer.seconds / scorer.traces * 1e6
    floor_decode = (floor.seconds / floor.traces - raw.seconds / raw.traces) * 1e6
    budget = 1e6 / (target * floor.per_s)
    print(f"  where the scorer's wall time per trace goes ({total:.1f} us/trace in all):")
    for k, v in sorted(us.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<12}{v:>8.1f} us  {v / total:>6.1%}")
    print(
        f"    the floor's decode alone: {floor_decode:.1f} us/trace; "
        f"{target}x the floor allows {budget:.1f} us/trace in all"
    )
    return us


def run_topics() -> dict[str, str]:
    run = f"bench{uuid.uuid4().hex[:6]}"
    names = ("TRACES", "CHANGELOG", "LIFT", "POLICIES", "DISPATCH", "DLQ", "DECISIONS", "LABELS")
    return {k: f"{run}.{k.lower()}" for k in names}


def _scorer_topics(traces_topic: str) -> dict[str, str]:
    """A scorer's topics: the shared traces topic, every other one its own."""
    return {**run_topics(), "TRACES": traces_topic}


def bench_kafka(
    traces: list[bytes], keys: list[bytes], partitions: int, workdir: Path, rounds: int
) -> list[list[Drain]]:
    from lab.localbroker import KAFKA09_API_VERSION, LocalBroker
    from streams.settings import TransportSettings

    (workdir / "broker").mkdir()
    with LocalBroker(partitions=partitions, workdir=workdir / "broker") as broker:
        traces_topic = run_topics()["TRACES"]
        broker.create_topics({traces_topic: (partitions, {})})
        settings = TransportSettings(
            kind="kafka", bootstrap_servers=broker.bootstrap, api_version=KAFKA09_API_VERSION
        )
        fill(settings, traces_topic, traces, keys)
        env = {
            "TAPD_TRANSPORT__KIND": "kafka",
            "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": broker.bootstrap,
            "TAPD_TRANSPORT__API_VERSION": KAFKA09_API_VERSION,
            "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": "10000",
        }
        out = []
        for r in range(rounds):
            drains = [
                kafka_baseline(settings, traces_topic, len(traces), name, work)
                for name, work in BASELINES
            ]
            topics = _scorer_topics(traces_topic)
            compact = {"cleanup.policy": "compact"}
            broker.create_topics(
                {
                    topics["CHANGELOG"]: (partitions, compact),
                    topics["LIFT"]: (1, compact),
                    topics["POLICIES"]: (1, compact),
                }
            )
            (workdir / f"round{r}").mkdir()
            drains.append(scorer_drain(env, topics, len(traces), partitions, workdir / f"round{r}"))
            out.append(drains)
    return out


def embedded_log(
    traces: list[bytes], keys: list[bytes], partitions: int, workdir: Path
) -> tuple[Any, dict[str, str], str]:
    """A new embedded log in ``workdir`` with a traces topic filled: its transport
    settings, the environment that points a ``tapd run`` at it, and the topic."""
    from streams.settings import TransportSettings

    path = workdir / "log.sqlite"
    settings = TransportSettings(
        kind="embedded", embedded_path=path, embedded_partitions=partitions
    )
    traces_topic = run_topics()["TRACES"]
    fill(settings, traces_topic, traces, keys)
    env = {
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(path),
        "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": str(partitions),
    }
    return settings, env, traces_topic


def bench_embedded(
    traces: list[bytes], keys: list[bytes], partitions: int, workdir: Path, rounds: int
) -> list[list[Drain]]:
    settings, env, traces_topic = embedded_log(traces, keys, partitions, workdir)
    out = []
    for r in range(rounds):
        drains = [
            transport_baseline(settings, traces_topic, len(traces), name, work)
            for name, work in BASELINES
        ]
        (workdir / f"round{r}").mkdir()
        topics = _scorer_topics(traces_topic)
        drains.append(scorer_drain(env, topics, len(traces), partitions, workdir / f"round{r}"))
        out.append(drains)
    return out


def median_round(rounds: list[list[Drain]]) -> list[Drain]:
    """The round whose scorer/floor ratio is the median (the lower middle one of an even count)."""
    ranked = sorted(rounds, key=lambda ds: ds[3].per_s / ds[2].per_s)
    return ranked[(len(ranked) - 1) // 2]


def figures(kind: str, rounds: list[list[Drain]]) -> dict[str, Any]:
    """The median round's rates, and each ratio's median over the rounds (each
    round's ratio also listed, in the order run)."""
    raw, raw_json, floor, scorer = median_round(rounds)
    vs_floor = [ds[3].per_s / ds[2].per_s for ds in rounds]
    vs_raw = [ds[3].per_s / ds[0].per_s for ds in rounds]
    return {
        f"raw_{kind}_per_s": raw.per_s,
        f"raw_json_{kind}_per_s": raw_json.per_s,
        f"floor_{kind}_per_s": floor.per_s,
        f"scorer_{kind}_per_s": scorer.per_s,
        f"scorer_vs_floor_{kind}": statistics.median_low(vs_floor),
        f"scorer_vs_floor_{kind}_rounds": vs_floor,
        f"scorer_vs_raw_{kind}": statistics.median_low(vs_raw),
        f"scorer_vs_floor_{kind}_target": TARGETS[kind],
        f"scorer_vs_floor_{kind}_met": statistics.median_low(vs_floor) >= TARGETS[kind],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=50_000)
    ap.add_argument("--slices", type=int, default=48, help="distinct capability slices")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four drains")
    ap.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    args = ap.parse_args()
    traces, keys = keyed_traces(args.traces, args.slices)
    workdir = Path(tempfile.mkdtemp(prefix="tapd-bench-scorer-"))
    try:
        (workdir / "kafka").mkdir()
        (workdir / "embedded").mkdir()
        results = {
            "kafka": bench_kafka(traces, keys, args.partitions, workdir / "kafka", args.rounds),
            "embedded": bench_embedded(
                traces, keys, args.partitions, workdir / "embedded", args.rounds
            ),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"{args.traces:,} traces (8 attempts each, {sum(map(len, traces)) / len(traces):,.0f} "
        f"bytes) over {args.slices} slices keyed by slice key, {args.partitions} partitions, "
        f"{os.cpu_count()} CPU cores (load average {load[0]:.1f} at the end); "
        f"steady-state drains, group join excluded; {args.rounds} rounds of the four drains, "
        "each ratio the median of the rounds' ratios, the tables the median round's"
    )
    out: dict[str, Any] = {}
    labels = {"kafka": "Kafka 0.9 local broker", "embedded": "embedded SQLite log"}
    for kind, rounds in results.items():
        drains = median_round(rounds)
        raw, floor, scorer = drains[0], drains[2], drains[3]
        print(f"\n{labels[kind]}")
        print(f"  {'':<24}{'traces/s':>10}  {'CPU-ms/trace':>12}  {'join s':>7}  x floor")
        for d in drains:
            print(
                f"  {d.name:<24}{d.per_s:>10,.0f}  {d.cpu_ms_per_trace:>12.3f}  "
                f"{d.join_seconds:>7.1f}  {d.per_s / floor.per_s:>6.3f}"
            )
        fig = figures(kind, rounds)
        verdict = "met" if fig[f"scorer_vs_floor_{kind}_met"] else "NOT met"
        each = ", ".join(
            f"{ds[3].per_s / ds[2].per_s:.3f} ({ds[3].per_s:,.0f}/{ds[2].per_s:,.0f})"
            for ds in rounds
        )
        print(f"  scorer / floor by round (scorer/floor traces/s): {each}")
        print(
            f"  scorer / floor {fig[f'scorer_vs_floor_{kind}']:.3f}, the median of "
            f"{len(rounds)} (target >= {TARGETS[kind]}: {verdict})   "
            f"scorer / raw {fig[f'scorer_vs_raw_{kind}']:.3f}"
        )
        fig[f"scorer_stage_us_per_trace_{kind}"] = print_stages(scorer, floor, raw, TARGETS[kind])
        out.update(fig)
    if args.json is not None:
        data: dict[str, Any] = {}
        if args.json.exists():
            data = json.loads(args.json.read_text())
        data.update(out)
        data["bench_scorer"] = {
            "traces": args.traces,
            "slices": args.slices,
            "partitions": args.partitions,
            "cpu_cores": os.cpu_count(),
            "load_average_end": load[0],
            "rounds": args.rounds,
            "drains": {
                kind: [[d.as_json() for d in ds] for ds in rounds]
                for kind, rounds in results.items()
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
