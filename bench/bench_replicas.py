"""Scorer replicas: does a second replica double the drain rate of a slice-keyed topic?

    .venv/bin/python -m bench.bench_replicas [--traces 30000] [--slices 48] [--partitions 4]
        [--cpus-per-replica 0.5]

On the local Kafka 0.9 broker (``lab.localbroker``), the same slice-keyed
trace stream (keyed as ``tapd produce`` keys it; K=8 attempts per trace, so
no rollouts: the pipeline, not the policy) is drained twice, by one and then
by two ``tapd run`` processes (real deployment units, shadow mode), each time
from a topic of its own. The topic is filled first; the replicas start
together, and the measured window opens once every replica owns partitions
(the rebalance settled) and closes when the group has consumed the whole
stream. Figures: traces/s in the window, CPU-seconds per trace of the
replica processes in the window (``/proc``), and their ratios, printed and
written as JSON (``--json``).

Two pairs of drains run. In the first the replicas share this machine's
cores with the broker and the benchmark, as they come: on a machine with few
cores that measures the machine (two replicas plus the broker saturate two
cores). In the second each replica gets its own CPU allotment of
``--cpus-per-replica`` cores (a cgroup CFS quota, what a pod's
``resources.limits.cpu`` sets), so one and two replicas are units of the same
size with spare cores left to the broker: the design's scaling. The
allotment's figures are the ones the target is read from; both are printed.
Where cgroups cannot be written (no root, no delegated subtree), the second
pair is skipped and the reason printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import cpu_ms_per, keyed_traces, per_s
from bench.cpulimit import CpuLimit, unavailable

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Phase:
    replicas: int
    traces: int
    window_traces: int
    seconds: float
    cpu_seconds: float
    settle_seconds: float
    cpus_per_replica: float | None = None
    throttled_seconds: float = 0.0

    @property
    def per_s(self) -> float:
        return per_s(self.window_traces, self.seconds)

    @property
    def cpu_per_trace_ms(self) -> float:
        return cpu_ms_per(self.cpu_seconds, self.window_traces)


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drain(
    broker: object,
    n_replicas: int,
    traces: list[bytes],
    keys: list[bytes],
    workdir: Path,
    partitions: int,
    cpus_per_replica: float | None = None,
) -> Phase:
    from lab.localbroker import KAFKA09_API_VERSION, LocalBroker
    from streams.kafka import KafkaProducer, KafkaTransport, client_config
    from streams.settings import TransportSettings

    assert isinstance(broker, LocalBroker)
    run = f"bench{uuid.uuid4().hex[:6]}"
    topics = {
        "TRACES": f"{run}.traces",
        "CHANGELOG": f"{run}.state",
        "LIFT": f"{run}.lift",
        "POLICIES": f"{run}.policies",
        "DISPATCH": f"{run}.dispatch",
        "DLQ": f"{run}.dlq",
        "DECISIONS": f"{run}.decisions",
        "LABELS": f"{run}.labels",
    }
    compact = {"cleanup.policy": "compact"}
    broker.create_topics(
        {
            topics["TRACES"]: (partitions, {}),
            topics["CHANGELOG"]: (partitions, compact),
            topics["LIFT"]: (1, compact),
            topics["POLICIES"]: (1, compact),
        }
    )
    settings = TransportSettings(
        kind="kafka", bootstrap_servers=broker.bootstrap, api_version=KAFKA09_API_VERSION
    )
    producer = KafkaProducer(client_config(settings), KafkaTransport(settings).capabilities)
    for value, key in zip(traces, keys, strict=True):
        producer.send(topics["TRACES"], value, key=key)
    producer.flush(120.0)
    producer.close()

    env = {
        **os.environ,
        "TAPD_TRANSPORT__KIND": "kafka",
        "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": broker.bootstrap,
        "TAPD_TRANSPORT__API_VERSION": KAFKA09_API_VERSION,
        "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": "10000",
        "TAPD_SERVICE__GROUP": f"{run}-scorer",
        "TAPD_THRESHOLDS__SHADOW_MODE": "true",
        "TAPD_COHORTING__MAX_GROUPS": "8",
        "TAPD_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
        **{f"TAPD_TOPICS__{k}": v for k, v in topics.items()},
    }
    procs = []
    limits: list[CpuLimit] = []
    for i in range(n_replicas):
        port = free_port()
        log = (workdir / f"{run}-r{i}.log").open("wb")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "daemon.cli", "run"],
                    cwd=ROOT,
                    env={
                        **env,
                        "TAPD_STATE_DIR": str(workdir / run / f"r{i}"),
                        "TAPD_SERVICE__PORT": str(port),
                        "TAPD_SERVICE__REPLICA": f"r{i}",
                    },
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
                port,
            )
        )
        if cpus_per_replica is not None:
            # Joined right after the start: the interpreter's import phase is
            # outside the measured window anyway, and its later threads and
            # children follow it into the group.
            limits.append(CpuLimit(cpus_per_replica, f"tapd-bench-{run}-r{i}"))
            limits[-1].add(procs[-1][0].pid)
    t_start = time.monotonic()
    try:
        # The window opens when every replica owns partitions of the topic.
        while True:
            ms = [scrape(port) for _, port in procs]
            owned = [m.get("tapd_partitions_owned", 0.0) for m in ms]
            if all(o > 0 for o in owned) and sum(owned) == partitions:
                break
            for p, _ in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a replica exited with {p.returncode}")
            if time.monotonic() - t_start > 600:
                raise RuntimeError(f"replicas never settled: partitions owned {owned}")
            time.sleep(0.1)
        t0 = time.monotonic()
        c0 = sum(m.get("tapd_traces_consumed_total", 0.0) for m in ms)
        cpu0 = sum(cpu_seconds(p.pid) for p, _ in procs)
        thr0 = sum(lim.throttled_seconds() for lim in limits)
        while True:
            consumed = sum(scrape(port).get("tapd_traces_consumed_total", 0.0) for _, port in procs)
            if consumed >= len(traces):
                break
            if time.monotonic() - t0 > 1200:
                raise RuntimeError(f"not drained: {consumed} of {len(traces)}")
            time.sleep(0.1)
        t1 = time.monotonic()
        cpu1 = sum(cpu_seconds(p.pid) for p, _ in procs)
        thr1 = sum(lim.throttled_seconds() for lim in limits)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for lim in limits:
            lim.close()
    return Phase(
        n_replicas,
        len(traces),
        int(len(traces) - c0),
        t1 - t0,
        cpu1 - cpu0,
        t0 - t_start,
        cpus_per_replica,
        thr1 - thr0,
    )


def _phase_json(ph: Phase) -> dict[str, object]:
    return {**asdict(ph), "per_s": ph.per_s, "cpu_per_trace_ms": ph.cpu_per_trace_ms}


def _print_pair(title: str, one: Phase, two: Phase) -> None:
    print(title)
    for ph in (one, two):
        throttled = (
            f", held back by the quota {ph.throttled_seconds:.1f} s"
            if ph.cpus_per_replica is not None
            else ""
        )
        print(
            f"  {ph.replicas} replica{'s' if ph.replicas > 1 else ' '}  {ph.per_s:>8,.0f} traces/s  "
            f"{ph.cpu_per_trace_ms:6.3f} CPU-ms/trace  ({ph.window_traces:,} traces in the "
            f"{ph.seconds:.1f} s window, opened {ph.settle_seconds:.1f} s after start{throttled})"
        )
    print(
        f"  speed-up 2 vs 1 replica  {two.per_s / one.per_s:.2f}x   "
        f"CPU per trace 2 vs 1  {two.cpu_per_trace_ms / one.cpu_per_trace_ms:.2f}x"
    )


def main() -> None:
    from lab.localbroker import LocalBroker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=30_000)
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--partitions", type=int, default=4)
    # Half a core each: two replicas then use one of two cores, leaving the
    # other to the broker and the benchmark's scrapes, as separate nodes would.
    ap.add_argument(
        "--cpus-per-replica",
        type=float,
        default=0.5,
        help="each replica's CPU allotment in the second pair of drains (0: skip that pair)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    traces, keys = keyed_traces(args.traces, args.slices)
    why_not = unavailable() if args.cpus_per_replica > 0 else "--cpus-per-replica 0"
    limited: tuple[Phase, Phase] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="tapd-bench-replicas-"))
    try:
        (workdir / "broker").mkdir()
        with LocalBroker(partitions=args.partitions, workdir=workdir / "broker") as broker:
            one = drain(broker, 1, traces, keys, workdir, args.partitions)
            two = drain(broker, 2, traces, keys, workdir, args.partitions)
            if why_not is None:
                limited = (
                    drain(broker, 1, traces, keys, workdir, args.partitions, args.cpus_per_replica),
                    drain(broker, 2, traces, keys, workdir, args.partitions, args.cpus_per_replica),
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"{args.traces:,} traces (8 attempts each) over {args.slices} slices keyed by slice key, "
        f"{args.partitions} partitions, Kafka 0.9 local broker, {os.cpu_count()} CPU cores "
        f"(load average {load[0]:.1f} at the end)"
    )
    _print_pair("replicas sharing every core with the broker and each other:", one, two)
    if limited is not None:
        _print_pair(
            f"each replica with its own allotment of {args.cpus_per_replica:g} CPU "
            "(cgroup CFS quota, as a pod's CPU limit):",
            *limited,
        )
    else:
        print(f"per-replica CPU allotment not measured: {why_not}")
    # The target is read from the allotted pair when it ran: there the
    # replicas are equal units with cores to spare, as on separate nodes.
    a, b = limited if limited is not None else (one, two)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "traces": args.traces,
                    "slices": args.slices,
                    "partitions": args.partitions,
                    "cpu_cores": os.cpu_count(),
                    "load_average_end": load[0],
                    "phases": [_phase_json(ph) for ph in (one, two)],
                    "shared_speedup": two.per_s / one.per_s,
                    "shared_cpu_per_trace_ratio": two.cpu_per_trace_ms / one.cpu_per_trace_ms,
                    "cpus_per_replica": args.cpus_per_replica if limited is not None else None,
                    "allotted_phases": [_phase_json(ph) for ph in limited] if limited else [],
                    "allotment_unavailable": why_not,
                    "speedup": b.per_s / a.per_s,
                    "cpu_per_trace_ratio": b.cpu_per_trace_ms / a.cpu_per_trace_ms,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
