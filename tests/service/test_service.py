"""``tapd run`` as a real process on the embedded log: crashes, backpressure, shutdown.

The trainer's side is played by a small responder that answers every
dispatch message (duplicates included) with a lift result, so that the
scorer's idempotency is what keeps labels from being counted twice.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import Topics, TransportSettings
from daemon.runtime.partitions import PartitionState
from daemon.runtime.state import StateStore
from lab import tasks
from lab.localbroker import KCAT_ARGS
from lab.reliability import trace_key
from streams.factory import open_transport
from streams.schemas import LIFT_SCHEMA, Attempt, Dispatch, LiftResult, decode, encode
from streams.transport import TopicPartition

REPO = Path(__file__).resolve().parents[2]
K = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_traces(n_cohorts: int, seed: int = 0) -> list[bytes]:
    """Valid traces (K attempts each, so no rollouts are needed) in slices of 4, plus bad ones."""
    families = [("add", "2d_carry"), ("sub", "2d_borrow"), ("mul", "2x1"), ("digits", "4d")]
    out: list[bytes] = []
    for c in range(n_cohorts):
        subject, difficulty = families[c % len(families)]
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed * 100 + c)):
            passes = (i + c) % (K + 1)
            attempts = [
                Attempt(
                    completion=task.reference if j < passes else "0",
                    reward=1.0 if j < passes else 0.0,
                    n_tokens=3,
                    token_logprobs=[-0.4, -0.9, -0.2],
                )
                for j in range(K)
            ]
            tr = tasks.to_trace(task, policy_version="v0", attempts=attempts, key=f"{c}:{i}")
            out.append(encode(tr))
        if c % 3 == 1:
            out.append(b'{"schema":"tapd.trace/1","trace_id":"broken"}')
        if c % 4 == 2:
            out.append(b"\xff not utf-8")
    return out


class Log:
    """One test's topics on one transport, produced to and read back independently."""

    def __init__(self, settings: TransportSettings, kcat: str | None = None) -> None:
        self.settings = settings
        self.transport = open_transport(settings)
        self.kcat = kcat
        run = uuid.uuid4().hex[:8]
        self.topics = Topics(**{k: f"t{run}.{k}" for k in Topics.model_fields})

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            "TAPD_TRANSPORT__KIND": s.kind,
            "TAPD_TRANSPORT__EMBEDDED_PATH": str(s.embedded_path),
            "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": str(s.embedded_partitions),
            "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": s.bootstrap_servers,
            "TAPD_TRANSPORT__API_VERSION": s.api_version,
            "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": str(s.session_timeout_ms),
            "TAPD_SERVICE__GROUP": f"scorer-{self.topics.traces}",
            **{f"TAPD_TOPICS__{k.upper()}": v for k, v in self.topics.model_dump().items()},
        }

    def produce(self, values: list[bytes]) -> None:
        p = self.transport.producer()
        for v in values:
            # keyed by slice key, as the producer contract asks
            p.send(self.topics.traces, v, key=trace_key(v))
        p.flush()
        p.close()

    def read(self, topic: str) -> list[tuple[bytes | None, bytes]]:
        if self.settings.kind == "kafka":
            assert self.kcat is not None
            res = subprocess.run(
                [
                    self.kcat,
                    *KCAT_ARGS,
                    "-b",
                    self.settings.bootstrap_servers,
                    "-C",
                    "-t",
                    topic,
                    "-o",
                    "beginning",
                    "-e",
                    "-q",
                    "-f",
                    "%k\x1f%s\x1e",
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
            out = []
            for item in res.stdout.split(b"\x1e"):
                if item:
                    key, _, value = item.partition(b"\x1f")
                    out.append((key or None, value))
            return out
        consumer = self.transport.consumer([topic], f"audit-{time.time_ns()}")
        got: list[tuple[bytes | None, bytes]] = []
        try:
            while batch := consumer.poll(0.0, 1000):
                got += [(r.key, r.value) for r in batch]
        finally:
            consumer.close()
        return got


class Responder:
    """Answers every dispatch message with a lift result (the trainer's contract)."""

    def __init__(self, log: Log, repeat_every: int = 3) -> None:
        self.transport = log.transport
        self.topics = log.topics
        self.repeat_every = repeat_every
        self.stop = threading.Event()
        self.answered: Counter[str] = Counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        consumer = self.transport.consumer(
            [self.topics.dispatch], f"trainer-{self.topics.dispatch}"
        )
        producer = self.transport.producer()
        try:
            while not self.stop.is_set():
                records = consumer.poll(0.1, 10)
                for rec in records:
                    d = decode(rec.value, Dispatch)
                    self.answered[d.cohort_id] += 1
                    value = lift_for(d)
                    copies = 2 if len(self.answered) % self.repeat_every == 0 else 1
                    for _ in range(copies):  # a replayed lift result
                        producer.send(self.topics.lift, value, key=d.cohort_id.encode())
                producer.flush()
                if records:
                    consumer.commit({r.tp: r.offset + 1 for r in records})
        finally:
            consumer.close()
            producer.close()

    def __enter__(self) -> Responder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def lift_for(d: Dispatch) -> bytes:
    lift = round(0.6 * d.features["adv_std"] - 0.1, 6)
    return encode(
        LiftResult.model_validate(
            {
                "schema": LIFT_SCHEMA,
                "cohort_id": d.cohort_id,
                "ts": time.time(),
                "trainer_id": "responder",
                "mode": "probe_revert",
                "feature_schema": d.feature_schema,
                "features": d.features,
                "model_version": d.model_version,
                "predicted_lift": d.predicted_lift,
                "selection": d.selection,
                "nll_before": 2.0,
                "nll_after": 2.0 - lift,
                "nll_lift": lift,
                "acc_before": 0.2,
                "acc_after": 0.2,
                "acc_lift": 0.0,
                "train_reward_before": 0.4,
                "train_reward_after": 0.5,
                "policy_version_before": "v0",
                "policy_version_after": "v0",
                "steps": 1,
                "duration_s": 0.1,
                "plasticity": {
                    "dormant_fraction": 0.0,
                    "effective_rank": 1.0,
                    "weight_norm": 1.0,
                    "grad_norm": 0.1,
                    "policy_entropy": 1.0,
                    "probe_nll": 2.0 - lift,
                },
            }
        )
    )


class Scorer:
    """``tapd run`` in a subprocess."""

    def __init__(self, tmp: Path, log: Log) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.env = {
            **os.environ,
            **log.env(),
            "TAPD_STATE_DIR": str(tmp / "state"),
            "TAPD_COHORTING__MAX_GROUPS": "4",
            "TAPD_COHORTING__MIN_GROUPS": "2",
            "TAPD_GRPO__NUM_GENERATIONS": str(K),
            "TAPD_COHORTING__MAX_AGE_S": "3",
            "TAPD_THRESHOLDS__MAX_IN_FLIGHT": "2",
            "TAPD_THRESHOLDS__MIN_PREDICTED_LIFT": "-10",
            "TAPD_THRESHOLDS__REDUNDANCY_CEILING": "0.95",
            "TAPD_SERVICE__PORT": str(self.port),
            "TAPD_SERVICE__POLL_TIMEOUT_S": "0.1",
            "TAPD_SERVICE__MAX_POLL_RECORDS": "3",
            "TAPD_SERVICE__GRACE_PERIOD_S": "10",
            "OMP_NUM_THREADS": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Scorer:
        self.starts += 1
        log = (self.tmp / f"scorer-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_for(lambda: self.ready(), 60, "readiness")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"scorer exited with {self.proc.returncode}: {self.logs()}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")[-3000:] for p in self.tmp.glob("scorer-*.log"))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> float:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        assert rc == 0, self.logs()
        return time.monotonic() - t0

    @staticmethod
    def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def log(transport_settings: TransportSettings, request: pytest.FixtureRequest) -> Iterator[Log]:
    kcat = request.getfixturevalue("kcat") if transport_settings.kind == "kafka" else None
    lg = Log(transport_settings, kcat)
    yield lg
    lg.transport.close()


@pytest.fixture
def scorer(tmp_path: Path, log: Log) -> Iterator[Scorer]:
    s = Scorer(tmp_path, log)
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def audit(log: Log, valid: set[str]) -> dict[str, Any]:
    """Every valid trace's fate, from the topics alone."""
    cohorts: dict[str, set[str]] = {}
    for _, v in log.read(log.topics.decisions):
        d = json.loads(v)
        cohorts.setdefault(d["cohort_id"], set(d["trace_ids"]))
    dead: dict[bytes | None, str] = {}
    for key, v in log.read(log.topics.dlq):
        letter = json.loads(v)
        try:
            dead[key] = json.loads(base64.b64decode(letter["original_b64"]))["trace_id"]
        except Exception:
            dead[key] = "<undecodable>"
    fates: Counter[str] = Counter()
    for members in cohorts.values():
        fates.update(members)
    fates.update(t for t in dead.values() if t in valid)
    dispatched: dict[str, set[str]] = {}
    for _, v in log.read(log.topics.dispatch):
        d = decode(v, Dispatch)
        dispatched.setdefault(d.cohort_id, {i.trace_id for i in d.items})
    return {"fates": fates, "cohorts": cohorts, "dead": dead, "dispatched": dispatched}


def complete(log: Log, valid: set[str]) -> bool:
    fates = audit(log, valid)["fates"]
    return all(fates[t] >= 1 for t in valid)


def test_sigkill_at_any_point_loses_and_duplicates_nothing(
    scorer: Scorer, log: Log, tmp_path: Path
) -> None:
    raw = make_traces(12)
    valid = {json.loads(r)["trace_id"] for r in raw if b"broken" not in r and r.startswith(b"{")}
    n_bad = len(raw) - len(valid)
    log.produce(raw[: len(raw) // 2])
    with Responder(log):
        scorer.start()
        time.sleep(0.3)
        scorer.kill()  # early: mid-batch, open cohorts in the snapshot
        scorer.start()
        # The waits below are bounds, not expectations: each restart after a
        # SIGKILL first waits out the killed member's session on a real broker.
        scorer.wait_for(lambda: len(log.read(log.topics.dispatch)) >= 1, 120, "a dispatch")
        scorer.kill()  # with dispatches in flight
        log.produce(raw[len(raw) // 2 :])
        scorer.start()
        scorer.wait_for(lambda: len(log.read(log.topics.labels)) >= 2, 120, "labels")
        scorer.kill()  # after labels were learned
        scorer.start()
        scorer.wait_for(lambda: complete(log, valid), 180, "every trace accounted for")
        scorer.wait_for(
            lambda: scorer.metrics().get("tapd_dispatches_in_flight") == 0,
            30,
            "in-flight dispatches to return",
        )
        m = scorer.metrics()
        assert scorer.terminate() < 10  # SIGTERM: out within the grace period

    a = audit(log, valid)
    assert {t: n for t, n in a["fates"].items() if n != 1} == {}, "a trace met two fates"
    assert set(a["fates"]) == valid
    # Distinct cohorts never share a trace; every dispatched cohort was decided once.
    seen: Counter[str] = Counter()
    for members in a["cohorts"].values():
        seen.update(members)
    assert max(seen.values()) == 1
    assert set(a["dispatched"]) <= set(a["cohorts"])
    # The bad records are in the DLQ (keyed by their origin, so replays collapse).
    undecodable = [k for k, t in a["dead"].items() if t not in valid]
    assert len(undecodable) == n_bad
    # Each label once: in the scorer's label store and in its metric.
    store = StateStore(tmp_path / "state" / "scorer-state.sqlite")
    ids = [lb.cohort_id for _, lb in store.labels_since(0)]
    store.close()
    assert len(ids) == len(set(ids)) == len(a["dispatched"])
    assert m["tapd_predictor_labels"] == len(ids)
    # The JSON logs carry the ids that tie a line to its trace, cohort and model.
    events = [
        json.loads(line)
        for p in tmp_path.glob("scorer-*.log")
        for line in p.read_text().splitlines()
        if line.startswith("{")
    ]
    scored = [e for e in events if e["event"] == "cohort_scored"]
    assert scored and all({"cohort_id", "model_version"} <= set(e) for e in scored)
    assert any(e["event"] == "trace_rejected" and e["stage"] == "decode" for e in events)
    assert any(e["event"] == "lift_learned" and "cohort_id" in e for e in events)


@pytest.mark.parametrize("transport_settings", ["embedded"], indirect=True)
def test_backpressure_pauses_at_the_cap_and_resumes(
    scorer: Scorer, log: Log, tmp_path: Path
) -> None:
    raw = make_traces(16)
    valid = {json.loads(r)["trace_id"] for r in raw if b"broken" not in r and r.startswith(b"{")}
    log.produce(raw)
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("max_in_flight: 2\nexploration_share: 1.0\nredundancy_ceiling: 0.95\n")
    scorer.env["TAPD_SERVICE__THRESHOLDS_FILE"] = str(thresholds)  # every cohort dispatched
    scorer.start()
    scorer.wait_for(lambda: scorer.metrics().get("tapd_consumption_paused") == 1, 30, "a pause")
    first = scorer.metrics()
    time.sleep(2.0)
    held = scorer.metrics()
    assert held["tapd_dispatches_in_flight"] == 2  # the cap, not more
    assert held["tapd_traces_consumed_total"] == first["tapd_traces_consumed_total"]
    assert held["tapd_traces_consumed_total"] < len(raw)  # the rest waits on the log
    assert held["tapd_cohorts_open"] <= 2
    assert len({d for _, d in log.read(log.topics.dispatch)}) == 2

    # SIGHUP reloads the thresholds file: one more slot, one more dispatch. The
    # mtime is kept, so that the file watcher cannot be the one that reloads:
    # the new content gets the old mtime before it is renamed into place, since
    # a write followed by utime leaves a window in which the watcher sees the
    # write's mtime and reloads first.
    st = thresholds.stat()
    staged = tmp_path / "thresholds.yaml.new"
    staged.write_text("max_in_flight: 3\nexploration_share: 1.0\nredundancy_ceiling: 0.95\n")
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(staged, thresholds)
    assert scorer.proc is not None
    scorer.proc.send_signal(signal.SIGHUP)
    scorer.wait_for(
        lambda: scorer.metrics().get("tapd_dispatches_in_flight") == 3, 30, "the reloaded cap"
    )
    m = scorer.metrics()
    assert m['tapd_threshold{name="max_in_flight"}'] == 3
    assert m['tapd_threshold_changes_total{source="signal"}'] == 1

    with Responder(log):
        scorer.wait_for(lambda: complete(log, valid), 90, "the stream to complete")
    assert scorer.metrics()["tapd_traces_consumed_total"] == len(raw)
    assert scorer.terminate() < 10


@pytest.mark.parametrize("transport_settings", ["embedded"], indirect=True)
def test_a_replaced_pod_rebuilds_from_an_older_state_record_and_loses_nothing(
    scorer: Scorer, log: Log, tmp_path: Path
) -> None:
    """Batches that only add traces to open cohorts write no state record within
    ``service.state_record_interval_s``. A pod killed then and replaced with an
    empty disk is rebuilt from the older record: the traces after its position
    are read again, and every trace still meets exactly one fate."""
    raw = [r for r in make_traces(12) if b"broken" not in r and r.startswith(b"{")]
    valid = {json.loads(r)["trace_id"] for r in raw}
    first = raw[: len(raw) // 2]
    log.produce(first)
    # First life: no cohort can close (size or age), so no batch changes
    # anything but open cohorts; only each partition's first batch is recorded.
    scorer.env.update(
        {
            "TAPD_COHORTING__MAX_GROUPS": "64",
            "TAPD_COHORTING__MAX_AGE_S": "3600",
            "TAPD_SERVICE__STATE_RECORD_INTERVAL_S": "300",
        }
    )
    scorer.start()
    scorer.wait_for(
        lambda: scorer.metrics().get("tapd_traces_consumed_total") == len(first), 60, "the traces"
    )
    records = [PartitionState.decode(v) for _, v in log.read(log.topics.changelog)]
    tps = [TopicPartition(log.topics.traces, p) for p in range(2)]
    ends = log.transport.end_offsets(tps)
    latest = {(st.topic, st.partition): st for st in records}
    stale = {
        tp.partition: (latest[(tp.topic, tp.partition)].position, ends[tp])
        for tp in tps
        if latest[(tp.topic, tp.partition)].position < ends[tp]
    }
    batches = len(first) / 3  # max_poll_records
    assert len(records) == 2 < batches, "an append-only batch wrote a state record"
    assert stale, "every partition's record is at its end: nothing to re-read"
    m = scorer.metrics()
    assert m['tapd_partition_state_records_total{cause="changed"}'] == 2  # each first one
    assert m['tapd_partition_state_records_total{cause="interval"}'] == 0
    assert m["tapd_partition_state_record_bytes_total"] == sum(
        len(v) for _, v in log.read(log.topics.changelog)
    )
    scorer.kill()  # no hand-back

    # The replacement: an empty disk, cohorts that close by age.
    scorer.env.update(
        {
            "TAPD_STATE_DIR": str(tmp_path / "state-new"),
            "TAPD_COHORTING__MAX_AGE_S": "2",
            "TAPD_SERVICE__STATE_RECORD_INTERVAL_S": "1",
        }
    )
    log.produce(raw[len(raw) // 2 :])
    with Responder(log):
        scorer.start()
        scorer.wait_for(lambda: complete(log, valid), 120, "every trace accounted for")
        assert scorer.terminate() < 10

    a = audit(log, valid)
    assert {t: n for t, n in a["fates"].items() if n != 1} == {}, "a trace met two fates"
    assert set(a["fates"]) == valid
    events = [
        json.loads(line)
        for line in (tmp_path / "scorer-2.log").read_text().splitlines()
        if line.startswith("{")
    ]
    rebuilt = {e["partition"]: e for e in events if e["event"] == "partition_rebuilt"}
    for p, (position, _) in stale.items():
        assert rebuilt[p]["position"] == position


@pytest.mark.parametrize("transport_settings", ["embedded"], indirect=True)
def test_a_quiet_stream_still_gets_its_state_record_within_the_interval(
    scorer: Scorer, log: Log
) -> None:
    """Traces that only join open cohorts are recorded (and committed) within
    ``service.state_record_interval_s`` even when no more traces arrive."""
    raw = [r for r in make_traces(6) if b"broken" not in r and r.startswith(b"{")]
    scorer.env.update(
        {
            "TAPD_COHORTING__MAX_GROUPS": "64",
            "TAPD_COHORTING__MAX_AGE_S": "3600",
            "TAPD_SERVICE__STATE_RECORD_INTERVAL_S": "1",
        }
    )
    log.produce(raw)
    scorer.start()
    tps = [TopicPartition(log.topics.traces, p) for p in range(2)]
    ends = log.transport.end_offsets(tps)

    def recorded() -> dict[int, int]:
        records = [PartitionState.decode(v) for _, v in log.read(log.topics.changelog)]
        return {st.partition: st.position for st in records}

    scorer.wait_for(
        lambda: recorded() == {tp.partition: ends[tp] for tp in tps}, 20, "records at the end"
    )
    m = scorer.metrics()
    assert m["tapd_traces_consumed_total"] == len(raw)
    assert m["tapd_cohorts_open"] > 0  # nothing closed: only the interval wrote them
    assert m['tapd_partition_state_records_total{cause="interval"}'] >= 1
    # The loop's own steps are timed beside the pipeline's (a slow broker
    # shows as poll or commit, a slow disk as persist). The loop runs on while
    # this scrapes, so a batch may be between its persist and its commit.
    count = 'tapd_processing_seconds_count{{stage="{}"}}'.format
    assert m[count("poll")] >= 1 and m[count("persist")] >= 1
    assert m[count("persist")] - 1 <= m[count("commit")] <= m[count("persist")]
    assert m[count("decode")] >= 1 and m[count("cohorting")] >= 1
    assert m[count("features")] == 0  # nothing closed
    assert scorer.terminate() < 10
