"""The closed loop across deployment boundaries: scorer replicas, scale events, rolling restarts.

    plan ──► traces topic (keyed by slice) ──► N × tapd run ──► tapd trainer
                 scale N → N-1 (one state dir deleted) → N, rolling restart of all
    audit ◄── every topic + each replica's label store, metrics and logs

On a real broker (``lab.localbroker``, topics created as a deployment
creates them: one partition for the lift, policy and label topics, a
compacted changelog with one partition per traces partition), N scorer
replicas and a continual trainer close the loop on a stream with known
ground truth (:func:`lab.reliability.plan_stream`). Mid-stream one replica is
stopped and its state directory deleted (a replaced pod), then it returns
empty; then every replica is restarted in turn. The audit then checks, from
the topics: nothing lost, every trace in exactly one cohort (or dead letter),
every cohort decided and dispatched once; from the replicas: every lift
learned by every replica's predictor (the same label count and model version
on all), every in-flight slot freed by its lift (none by lease), and rollouts
sampled from the trainer's newest kept version or the one before it.

The pure parts (:func:`check_replicas`) take what was read; :func:`run`
drives processes, and :func:`report` writes the section of
``docs/RELIABILITY.md`` that ``tapd reliability --replicas`` owns.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lab.localbroker import KAFKA09_API_VERSION
from lab.reliability import (
    Audit,
    ServiceProcess,
    StreamPlan,
    Topics,
    audit,
    free_port,
    label_log_ids,
    plan_stream,
    read_topic,
    scrape,
    tapd_argv,
)
from streams.transport import Transport

BEGIN = "<!-- replicas:begin (tapd reliability --replicas) -->"
END = "<!-- replicas:end -->"


@dataclass(frozen=True)
class ReplicaConfig:
    n_valid: int = 5_000
    slices: int = 24
    learnable_slices: int = 6
    learnable_share: float = 0.04
    replicas: int = 3
    partitions: int = 6
    max_groups: int = 8
    max_in_flight: int = 2
    chunks: int = 8
    seed: int = 0
    timeout_s: float = 2400.0

    @property
    def short(self) -> bool:
        return self.n_valid < 5_000


def short_config() -> ReplicaConfig:
    """The form ``make test`` runs: two replicas, a thousand traces."""
    return ReplicaConfig(
        n_valid=1_000,
        slices=8,
        learnable_slices=2,
        learnable_share=0.05,
        replicas=2,
        partitions=4,
        chunks=6,
        timeout_s=600.0,
    )


@dataclass
class ReplicaFigures:
    """What one replica holds at the end (scraped, then read from its state store)."""

    name: str
    labels: int
    label_log: list[str]
    model_version: float
    in_flight: float
    partitions: float
    rollout_policy_version: float
    handoffs: dict[str, float]
    starts: int


@dataclass
class ReplicaChecks:
    """The replica-side audit; every list empty and every flag true passes."""

    lifts: int = 0
    labels_per_replica: dict[str, int] = field(default_factory=dict)
    model_versions: dict[str, float] = field(default_factory=dict)
    missing_labels: dict[str, list[str]] = field(default_factory=dict)
    labels_twice: dict[str, list[str]] = field(default_factory=dict)
    label_order_differs: list[str] = field(default_factory=list)
    dispatched: int = 0
    slots_freed_by_lift: int = 0
    slots_gone_with_deleted_state: int = 0
    slots_never_freed: list[str] = field(default_factory=list)
    slots_freed_twice: list[str] = field(default_factory=list)
    lease_expiries: int = 0
    free_delay_s: list[float] = field(default_factory=list)
    in_flight_at_end: dict[str, float] = field(default_factory=dict)
    rollouts: int = 0
    rollout_lag_versions: Counter[int] = field(default_factory=Counter)
    latest_kept_version: int = 0

    @property
    def max_rollout_lag(self) -> int:
        return max(self.rollout_lag_versions, default=0)

    @property
    def ok(self) -> bool:
        same = (
            len(set(self.labels_per_replica.values())) == 1
            and len(set(self.model_versions.values())) == 1
        )
        return (
            same
            and all(n == self.lifts for n in self.labels_per_replica.values())
            and not any(self.missing_labels.values())
            and not any(self.labels_twice.values())
            and not self.label_order_differs
            and not self.slots_never_freed
            and not self.slots_freed_twice
            and self.lease_expiries == 0
            and not any(self.in_flight_at_end.values())
            and self.max_rollout_lag <= 1
        )

    def problems(self) -> str:
        out = []
        if len(set(self.labels_per_replica.values())) > 1:
            out.append(f"label counts differ {self.labels_per_replica}")
        if len(set(self.model_versions.values())) > 1:
            out.append(f"model versions differ {self.model_versions}")
        for name, ids in self.missing_labels.items():
            if ids:
                out.append(f"{name} misses {len(ids)} labels e.g. {ids[:3]}")
        for name, ids in self.labels_twice.items():
            if ids:
                out.append(f"{name} learned {len(ids)} labels twice e.g. {ids[:3]}")
        if self.label_order_differs:
            out.append(f"label order differs on {self.label_order_differs}")
        if self.slots_never_freed:
            out.append(f"slots never freed {self.slots_never_freed[:3]}")
        if self.slots_freed_twice:
            out.append(f"slots freed twice {self.slots_freed_twice[:3]}")
        if self.lease_expiries:
            out.append(f"{self.lease_expiries} lease expiries")
        if any(self.in_flight_at_end.values()):
            out.append(f"in flight at the end {self.in_flight_at_end}")
        if self.max_rollout_lag > 1:
            out.append(f"rollout lag {dict(self.rollout_lag_versions)}")
        return "; ".join(out) or "none"


def _ts(event: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _version(name: Any) -> int:
    s = str(name or "")
    return int(s[1:]) if len(s) > 1 and s[0] == "v" and s[1:].isdigit() else 0


def check_replicas(
    lift_ids: Sequence[str],
    replicas: Sequence[ReplicaFigures],
    scorer_events: Mapping[str, Sequence[Mapping[str, Any]]],
    trainer_events: Sequence[Mapping[str, Any]],
    deleted: Mapping[str, float],
) -> ReplicaChecks:
    """The replica-side audit from what was read.

    ``lift_ids``: distinct cohort ids on the lift topic in topic order;
    ``scorer_events``: each replica's JSON log events (all incarnations);
    ``trainer_events``: the trainer's; ``deleted``: replica name -> when its
    state directory was deleted (its dispatches in flight went with it).
    """
    c = ReplicaChecks(lifts=len(lift_ids))
    order = list(lift_ids)
    for r in replicas:
        c.labels_per_replica[r.name] = len(r.label_log)
        c.model_versions[r.name] = r.model_version
        counts = Counter(r.label_log)
        c.missing_labels[r.name] = sorted(set(lift_ids) - set(counts))
        c.labels_twice[r.name] = sorted(k for k, n in counts.items() if n > 1)
        if [x for x in r.label_log if x in set(order)] != order:
            c.label_order_differs.append(r.name)
        c.in_flight_at_end[r.name] = r.in_flight
    # Who dispatched what, when; when each lift came out; who freed what.
    lift_out = {
        str(e["cohort_id"]): _ts(e)
        for e in trainer_events
        if e.get("event") == "cohort_trained" and e.get("cohort_id")
    }
    dispatcher: dict[str, tuple[str, float]] = {}
    freed: dict[str, list[tuple[str, float]]] = defaultdict(list)
    starts: dict[str, list[float]] = defaultdict(list)
    for name, events in scorer_events.items():
        for e in events:
            ev = e.get("event")
            if ev == "cohort_scored" and e.get("dispatched"):
                dispatcher.setdefault(str(e["cohort_id"]), (name, _ts(e)))
            elif ev == "slot_freed":
                freed[str(e["cohort_id"])].append((name, _ts(e)))
            elif ev == "dispatch_released" and e.get("cause") == "expired":
                c.lease_expiries += 1
            elif ev == "predictor_restored":  # a start, before the lift topic is read
                starts[name].append(_ts(e))
    c.dispatched = len(dispatcher)
    for cid, (name, t_dispatch) in dispatcher.items():
        mine = [t for who, t in freed.get(cid, []) if who == name]
        if len(mine) > 1:
            c.slots_freed_twice.append(cid)
        if mine:
            c.slots_freed_by_lift += 1
            t_lift = lift_out.get(cid, t_dispatch)
            # From the lift's publication, or from the replica's return when
            # it was down then (a rolling restart): the first poll it had.
            back = [s for s in starts[name] if s <= mine[0]]
            c.free_delay_s.append(max(0.0, mine[0] - max(t_lift, max(back, default=0.0))))
        elif name in deleted and t_dispatch < deleted[name]:
            c.slots_gone_with_deleted_state += 1
        elif cid in lift_out:
            c.slots_never_freed.append(cid)
    # Rollouts: the version sampled from vs the trainer's newest kept version then.
    announced = sorted(
        (_ts(e), _version(e.get("policy_version")))
        for e in trainer_events
        if e.get("event") == "policy_announced"
    )
    c.latest_kept_version = max((v for _, v in announced), default=0)
    for events in scorer_events.values():
        for e in events:
            if e.get("event") != "rollout_sampled":
                continue
            t = _ts(e)
            newest = max((v for ts, v in announced if ts <= t), default=0)
            c.rollouts += 1
            c.rollout_lag_versions[max(0, newest - _version(e.get("policy_version")))] += 1
    return c


# --- the shell: processes, topics --------------------------------------------------


@dataclass
class ReplicaRun:
    config: ReplicaConfig
    plan: StreamPlan
    audit: Audit
    checks: ReplicaChecks
    replicas: list[ReplicaFigures]
    seconds: float
    events: list[str] = field(default_factory=list)


def slice_keyed(messages: Iterable[bytes]) -> list[tuple[bytes | None, bytes]]:
    """Each message with its producer key: the slice key of a trace (the producer
    contract, as ``tapd produce`` keys), none for what is not a trace."""
    from daemon.config import CohortingSettings
    from daemon.core.cohorting import slice_key_of, validate_slice_key
    from streams.schemas import SchemaError, Trace, decode

    fields = validate_slice_key(CohortingSettings().slice_key)
    out: list[tuple[bytes | None, bytes]] = []
    for raw in messages:
        try:
            out.append((slice_key_of(decode(raw, Trace), fields).encode(), raw))
        except SchemaError:
            out.append((None, raw))
    return out


def produce_keyed(transport: Transport, topic: str, messages: Sequence[bytes]) -> None:
    producer = transport.producer()
    try:
        for i, (key, raw) in enumerate(slice_keyed(messages)):
            producer.send(topic, raw, key=key)
            if i % 500 == 499:
                producer.flush(60.0)
        producer.flush(60.0)
    finally:
        producer.close()


def _env(cfg: ReplicaConfig, root: Path, bootstrap: str) -> dict[str, str]:
    from lab.tiny_policy import lab_policy_env

    return {
        **lab_policy_env(root, probe_size=4),
        "TAPD_LOG_LEVEL": "info",
        "TAPD_TRANSPORT__KIND": "kafka",
        "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": bootstrap,
        "TAPD_TRANSPORT__API_VERSION": KAFKA09_API_VERSION,  # it never answers ApiVersions
        # The scorers leave the group on SIGTERM (an immediate rebalance); the
        # session only bounds how long a crashed member holds its partitions.
        "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": "10000",
        "TAPD_SERVICE__GRACE_PERIOD_S": "20",
        "TAPD_COHORTING__MAX_GROUPS": str(cfg.max_groups),
        "TAPD_COHORTING__MAX_AGE_S": "4",
        "TAPD_COHORTING__MIN_GROUPS": "2",
        "TAPD_COHORTING__MAX_OPEN": "64",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "0",
        # The learnable slices' prompts share the lab tasks' one template.
        "TAPD_THRESHOLDS__REDUNDANCY_CEILING": "0.95",
        "TAPD_THRESHOLDS__MAX_IN_FLIGHT": str(cfg.max_in_flight),
        # Long: every slot must be freed by its lift, never by the lease.
        "TAPD_THRESHOLDS__DISPATCH_TIMEOUT_S": "3600",
        # A continual trainer: kept versions are announced and rolled out.
        "TAPD_TRAINER__MODE": "continual",
        "TAPD_TRAINER__ROLLBACK_NLL_WORSENING": "100",
        "TAPD_POLICY__STORE_PATH": str(root / "policies"),
        "TAPD_POLICY__KEEP_VERSIONS": "4",
        "TAPD_GRPO__STEPS": "1",
        "TAPD_GRPO__NUM_GENERATIONS": "2",
        "TAPD_GRPO__MAX_COMPLETION_LENGTH": "4",
        "TAPD_GRPO__MAX_PROMPTS_PER_STEP": "4",
        "TAPD_PREDICTOR__LGBM_AFTER": "10",
        "TAPD_PREDICTOR__REFIT_EVERY_LABELS": "5",
        "TAPD_TRAINER__METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _topics(partitions: int) -> dict[str, tuple[int, dict[str, str]]]:
    """As k8s/base/kafkatopics.yaml declares them (partition counts, compaction)."""
    compact = {"cleanup.policy": "compact"}
    return {
        "tap.traces": (partitions, {}),
        "tap.scorer-state": (partitions, compact),
        "tap.lift": (1, compact),
        "tap.policies": (1, compact),
        "tap.labels": (1, compact),
        "tap.dispatch": (1, {}),
        "tap.decisions": (1, {}),
        "tap.dlq": (1, {}),
    }


class Replica:
    """One scorer replica: its port, its state directory, its processes' logs."""

    def __init__(self, name: str, root: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.state = root / name / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ServiceProcess(
            tapd_argv("run"),
            {
                **env,
                "TAPD_STATE_DIR": str(self.state),
                "TAPD_SERVICE__PORT": str(self.port),
                "TAPD_SERVICE__REPLICA": name,
            },
            root / name / "scorer.log",
        )

    def start(self, timeout_s: float = 240.0) -> None:
        self.proc.start()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.proc.logs()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2.0) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s")

    def stop(self) -> int | None:
        return self.proc.kill(signal.SIGTERM, wait_s=60.0)

    def metrics(self) -> dict[str, float]:
        return scrape(self.url + "/metrics")


def _all_learned(replicas: Sequence[Replica], n_lifts: int) -> bool:
    for r in replicas:
        m = r.metrics()
        if m.get("tapd_predictor_labels", -1) != n_lifts:
            return False
        if m.get("tapd_dispatches_in_flight", 1) != 0:
            return False
    return True


def run(
    cfg: ReplicaConfig, workdir: Path, log: Callable[[str], None] = lambda m: None
) -> ReplicaRun:
    from daemon.config import Topics as TopicNames
    from lab.localbroker import LocalBroker
    from streams.factory import open_transport
    from streams.settings import TransportSettings

    t0 = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    events: list[str] = []

    def say(message: str) -> None:
        events.append(f"{time.monotonic() - t0:7.1f}s {message}")
        log(message)

    plan = plan_stream(
        cfg.n_valid,
        cfg.seed,
        slices=cfg.slices,
        learnable_slices=cfg.learnable_slices,
        learnable_share=cfg.learnable_share,
        disorder_share=0.05,
        learnable_tasks=("add", "2d_nocarry"),
    )
    (workdir / "broker").mkdir()
    broker = LocalBroker(partitions=cfg.partitions, workdir=workdir / "broker").start()
    names = TopicNames()
    transport = open_transport(
        TransportSettings(
            kind="kafka",
            bootstrap_servers=broker.bootstrap,
            api_version=KAFKA09_API_VERSION,
            session_timeout_ms=6_000,
        )
    )
    env = _env(cfg, workdir, broker.bootstrap)
    replicas = [Replica(f"r{i}", workdir, env) for i in range(cfg.replicas)]
    # On the 0.9 broker the session also bounds the time between polls, and a
    # continual cohort (probe, GRPO step, probe) can take longer than 10 s here.
    trainer = ServiceProcess(
        tapd_argv("trainer"),
        {
            **env,
            "TAPD_STATE_DIR": str(workdir / "trainer"),
            "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": "25000",
        },
        workdir / "trainer.log",
    )
    deleted: dict[str, float] = {}
    try:
        broker.create_topics(_topics(cfg.partitions))
        trainer.start()
        for r in replicas:
            r.start()
        say(f"{cfg.replicas} scorer replicas and the trainer up; {len(plan.messages)} messages")
        size = math.ceil(len(plan.messages) / cfg.chunks)
        last = replicas[-1]
        for c in range(cfg.chunks):
            produce_keyed(transport, names.traces, plan.messages[c * size : (c + 1) * size])
            time.sleep(2.0)
            if c == 1:
                rc = last.stop()
                shutil.rmtree(last.state)
                deleted[last.name] = time.time()
                say(
                    f"scale {cfg.replicas} -> {cfg.replicas - 1}: {last.name} stopped (rc={rc}), state deleted"
                )
            elif c == 2:
                last.start()
                say(
                    f"scale {cfg.replicas - 1} -> {cfg.replicas}: {last.name} back on an empty disk"
                )
            elif c == 3:
                for r in replicas:
                    rc = r.stop()
                    r.start()
                    say(f"rolling restart: {r.name} (rc={rc})")
        say("stream sent; draining")
        deadline = t0 + cfg.timeout_s
        while True:
            a = audit(plan, _read(transport, names), names.traces, names.dispatch)
            n_lifts = a.lifts
            settled = a.ok and _all_learned(replicas, n_lifts)
            say(
                f"audit: lost={a.lost} duplicated={a.duplicated} cohorts={a.cohorts} "
                f"dispatched={a.dispatched} lifts={a.lifts} settled={settled}"
                + (f" ({a.problems()})" if a.duplicated else "")
            )
            if settled or time.monotonic() > deadline:
                break
            for p in (trainer, *(r.proc for r in replicas)):
                if not p.alive():
                    say(f"{p.log_path.parent.name}/{p.log_path.stem} died; restarting")
                    p.start()
            time.sleep(5.0)
        figures = []
        for r in replicas:
            m = r.metrics()
            figures.append(
                ReplicaFigures(
                    name=r.name,
                    labels=int(m.get("tapd_predictor_labels", -1)),
                    label_log=[],
                    model_version=m.get("tapd_predictor_model_version", -1),
                    in_flight=m.get("tapd_dispatches_in_flight", -1),
                    partitions=m.get("tapd_partitions_owned", -1),
                    rollout_policy_version=m.get("tapd_rollout_policy_version", -1),
                    handoffs={
                        how: m.get(f'tapd_partition_handoffs_total{{how="{how}"}}', 0.0)
                        for how in ("kept", "rebuilt", "fresh")
                    },
                    starts=r.proc.starts,
                )
            )
        for r in replicas:
            r.stop()
        trainer.kill(signal.SIGTERM)
        for r, f in zip(replicas, figures, strict=True):
            f.label_log = label_log_ids(r.state / "scorer-state.sqlite")
        topics = _read(transport, names)
        result_audit = audit(plan, topics, names.traces, names.dispatch)
        lift_ids = list(dict.fromkeys(json.loads(r.value)["cohort_id"] for r in topics.lift))
        checks = check_replicas(
            lift_ids,
            figures,
            {r.name: r.proc.events_all() for r in replicas},
            trainer.events_all(),
            deleted,
        )
    finally:
        for r in replicas:
            r.proc.kill()
        trainer.kill()
        transport.close()
        broker.stop()
    return ReplicaRun(cfg, plan, result_audit, checks, figures, time.monotonic() - t0, events)


def _read(transport: Transport, names: Any) -> Topics:
    return Topics(
        traces=read_topic(transport, names.traces),
        dlq=read_topic(transport, names.dlq),
        decisions=read_topic(transport, names.decisions),
        dispatch=read_topic(transport, names.dispatch),
        lift=read_topic(transport, names.lift),
        labels=read_topic(transport, names.labels),
    )


# --- the report -----------------------------------------------------------------------


def report(r: ReplicaRun, command: str) -> str:
    """The replicas section of docs/RELIABILITY.md (between its markers)."""
    c, a, cfg = r.checks, r.audit, r.config
    delays = sorted(c.free_delay_s)
    p50 = delays[len(delays) // 2] if delays else float("nan")
    lines = [
        BEGIN,
        f"## replicas: {cfg.replicas} scorers and a continual trainer, {cfg.n_valid} valid traces",
        "",
        f"Generated by `{command}`. On the local Kafka 0.9 broker, topics created as",
        f"k8s/base/kafkatopics.yaml declares them ({cfg.partitions} traces partitions, a compacted",
        "changelog with as many, one partition for the lift, policy and label topics),",
        f"traces keyed by slice key over {cfg.slices} slices. Mid-stream: scale",
        f"{cfg.replicas} → {cfg.replicas - 1} with the stopped replica's state directory deleted,",
        f"back to {cfg.replicas} on an empty disk, then a rolling restart of every replica.",
        f"{len(r.plan.messages)} messages ({r.plan.n_bad} corrupted, {r.plan.n_duplicates} resent",
        f"copies, {r.plan.n_out_of_order} out of order); {r.seconds:.0f} s.",
        "",
        "| figure | count |",
        "|---|---:|",
    ]
    # Each replica's label store is audited below, against every lift.
    figures = {k: v for k, v in a.figures().items() if k != "labels in the predictor's label log"}
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    lines += [
        f"| lifts learned by each replica | {', '.join(f'{k} {v}' for k, v in c.labels_per_replica.items())} |",
        f"| predictor model version on each replica | {', '.join(f'{k} v{v:.0f}' for k, v in c.model_versions.items())} |",
        f"| dispatches (by their replica) | {c.dispatched} |",
        f"| in-flight slots freed by their lift | {c.slots_freed_by_lift} |",
        f"| in-flight slots gone with the deleted state directory | {c.slots_gone_with_deleted_state} |",
        f"| slots never freed / freed twice / freed by lease expiry | {len(c.slots_never_freed)} / {len(c.slots_freed_twice)} / {c.lease_expiries} |",
        f"| lift published → slot freed, median / max (s) | {p50:.2f} / {max(delays, default=float('nan')):.2f} |",
        f"| rollouts sampled | {c.rollouts} |",
        f"| rollout version behind the newest kept version: 0 / 1 / more | {c.rollout_lag_versions.get(0, 0)} / {c.rollout_lag_versions.get(1, 0)} / {sum(n for k, n in c.rollout_lag_versions.items() if k > 1)} |",
        f"| newest kept policy version | v{c.latest_kept_version} |",
        "",
        "Partitions taken on by each replica over the run (kept: its own state; rebuilt:",
        "from the changelog; fresh: no state anywhere):",
        "",
    ]
    lines += [
        f"- {f.name}: {', '.join(f'{k} {v:.0f}' for k, v in f.handoffs.items())} "
        f"(last incarnation's counts; {f.starts} starts)"
        for f in r.replicas
    ]
    ok = a.ok and c.ok
    lines += [
        "",
        f"Result: **{'PASS' if ok else 'FAIL'}**; topics: {a.problems()}; replicas: {c.problems()}",
        "",
        "Events:",
        "",
    ]
    lines += [f"- {e.strip()}" for e in r.events if "audit:" not in e]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the replicas section of ``path``, keeping the rest."""
    text = path.read_text() if path.exists() else "# Reliability figures\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text if text.endswith("\n") else text + "\n")


def keep_section(previous: str, path: Path) -> None:
    """Put the replicas section of ``previous`` (a report's old text) into ``path``."""
    if BEGIN in previous and END in previous:
        start = previous.index(BEGIN)
        write_section(path, previous[start : previous.index(END, start) + len(END)] + "\n")


def run_suite(
    short: bool, out: Path, workdir: Path, command: str, log: Callable[[str], None]
) -> bool:
    cfg = short_config() if short else ReplicaConfig()
    result = run(cfg, workdir / "replicas", log)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_section(out, report(result, command))
    return result.audit.ok and result.checks.ok
