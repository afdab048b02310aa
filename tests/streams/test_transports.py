"""The transport contract, checked against real things: the embedded SQLite
log and two real Kafka-protocol brokers, Apache Kafka 0.9.0.1 (the 2015
protocol, durable) and tansu (the modern protocol), plus kcat, an independent
client, against both. Crash tests kill real subprocesses with SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import TransportSettings
from lab.localbroker import Endpoint, LocalBroker, kafka09_endpoint
from streams.deadletter import route
from streams.factory import open_transport
from streams.kafka import KafkaProducer, KafkaTransport, client_config
from streams.schemas import Dispatch, LiftResult, Trace, decode, encode
from streams.transport import Consumer, Record, TopicPartition, Transport, next_offsets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("kafka09", marks=pytest.mark.kafka),
        pytest.param("tansu", marks=pytest.mark.kafka),
    ]
)
def transport_settings(
    request: pytest.FixtureRequest, settings_for: Callable[[str], TransportSettings]
) -> TransportSettings:
    """The contract runs on the embedded log and on both real brokers."""
    return settings_for(request.param)


@pytest.fixture
def transport(transport_settings: TransportSettings) -> Iterator[Transport]:
    t = open_transport(transport_settings)
    yield t
    t.close()


def drain(consumer: Consumer, n: int, timeout_s: float = 30.0) -> list[Record]:
    """Poll until ``n`` records came (the first Kafka poll also joins the group)."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += consumer.poll(0.2, n - len(got))
    return got


def _traces(trace_dict: dict[str, Any], n: int, prefix: str = "tr") -> list[bytes]:
    return [json.dumps({**trace_dict, "trace_id": f"{prefix}-{i}"}).encode() for i in range(n)]


def test_both_transports_satisfy_the_protocol(transport: Transport) -> None:
    assert isinstance(transport, Transport)
    assert transport.ping()


def test_all_three_schemas_round_trip(
    transport: Transport,
    topic: str,
    trace_dict: dict[str, Any],
    dispatch_dict: dict[str, Any],
    lift_dict: dict[str, Any],
) -> None:
    sent = {
        f"{topic}.traces": decode(json.dumps(trace_dict), Trace),
        f"{topic}.dispatch": decode(json.dumps(dispatch_dict), Dispatch),
        f"{topic}.lift": decode(json.dumps(lift_dict), LiftResult),
    }
    producer = transport.producer()
    for t, msg in sent.items():
        producer.send(t, encode(msg), key=b"k1")
    producer.flush()
    producer.close()
    consumer = transport.consumer(list(sent), "round-trip")
    got = drain(consumer, 3)
    consumer.close()
    assert sorted(r.topic for r in got) == sorted(sent)
    for r in got:
        model = type(sent[r.topic])
        assert decode(r.value, model) == sent[r.topic]
        assert r.key == b"k1"
        assert r.timestamp_ms > 1_600_000_000_000


def test_order_offsets_and_keys(transport: Transport, topic: str) -> None:
    producer = transport.producer()
    for i in range(40):
        producer.send(topic, f"{i}".encode(), key=f"k{i % 4}".encode())
    producer.flush()
    consumer = transport.consumer([topic], "order")
    got = drain(consumer, 40)
    consumer.close()
    assert sorted(int(r.value) for r in got) == list(range(40))
    by_tp: dict[TopicPartition, list[Record]] = {}
    for r in got:
        by_tp.setdefault(r.tp, []).append(r)
    for records in by_tp.values():
        # offsets within a partition are dense and in send order
        assert [r.offset for r in records] == list(range(len(records)))
        assert [int(r.value) for r in records] == sorted(int(r.value) for r in records)
    # one key, one partition
    partition_of: dict[bytes | None, set[int]] = {}
    for r in got:
        partition_of.setdefault(r.key, set()).add(r.partition)
    assert all(len(ps) == 1 for ps in partition_of.values())


def test_commit_committed_lag_and_resume(transport: Transport, topic: str) -> None:
    producer = transport.producer()
    for i in range(10):
        producer.send(topic, f"m{i}".encode())
    producer.flush()
    consumer = transport.consumer([topic], "lagging")
    got = drain(consumer, 10)
    assert len(got) == 10
    assert sum(consumer.lag().values()) == 0  # all read, nothing committed: lag by position
    # done: the first record of each partition
    first = [next(r for r in got if r.tp == tp) for tp in {r.tp for r in got}]
    offsets = next_offsets(first)
    consumer.commit(offsets)
    for tp, nxt in offsets.items():
        assert consumer.committed(tp) == nxt
    rest = 10 - len(first)
    assert sum(consumer.lag().values()) == rest  # by the committed offsets now
    consumer.close()
    # a new consumer of the group resumes after the committed offsets
    again = transport.consumer([topic], "lagging")
    redelivered = drain(again, rest)
    assert sorted(r.value for r in redelivered) == sorted(r.value for r in got if r not in first)
    again.commit(next_offsets(redelivered))
    assert sum(again.lag().values()) == 0
    again.close()


def test_a_commit_without_waiting_lands_and_a_new_member_resumes_after_it(
    transport: Transport, topic: str
) -> None:
    producer = transport.producer()
    for i in range(6):
        producer.send(topic, f"m{i}".encode())
    producer.flush()
    consumer = transport.consumer([topic], "async-commit")
    got = drain(consumer, 6)
    offsets = next_offsets(got)
    consumer.commit(offsets, wait=False)
    # It lands without another commit: the client completes it on its own
    # (Kafka: the network thread; its callback runs in a later poll).
    deadline = time.monotonic() + 10
    while any(consumer.committed(tp) != o for tp, o in offsets.items()):
        assert time.monotonic() < deadline, "the commit never landed"
        consumer.poll(0.05, 10)
    consumer.close()
    again = transport.consumer([topic], "async-commit")
    producer.send(topic, b"after")
    producer.flush()
    assert [r.value for r in drain(again, 1)] == [b"after"]
    again.close()


def test_pause_and_resume(transport: Transport, topic: str) -> None:
    producer = transport.producer()
    producer.send(topic, b"before")
    producer.flush()
    consumer = transport.consumer([topic], "pausing")
    assert [r.value for r in drain(consumer, 1)] == [b"before"]
    consumer.pause()
    assert consumer.paused()
    producer.send(topic, b"while paused")
    producer.flush()
    assert consumer.poll(1.0, 10) == []
    consumer.resume()
    assert not consumer.paused()
    assert [r.value for r in drain(consumer, 1)] == [b"while paused"]
    consumer.close()
    producer.close()


def test_new_group_from_the_end(transport: Transport, topic: str) -> None:
    producer = transport.producer()
    producer.send(topic, b"old")
    producer.flush()
    consumer = transport.consumer([topic], "tail", from_beginning=False)
    # Poll until the group join completed (seconds on Kafka: about half the
    # session timeout on tansu): only then is the start position fixed.
    deadline = time.monotonic() + 30
    while not consumer.lag() and time.monotonic() < deadline:
        assert consumer.poll(0.2, 10) == []
    producer.send(topic, b"new")
    producer.flush()
    assert [r.value for r in drain(consumer, 1)] == [b"new"]
    consumer.close()


# --- kcat, an independent client, against the real broker --------------------


def test_traces_produced_by_kcat_are_consumed_and_validated(
    broker: Endpoint,
    kcat: str,
    kcat_env: dict[str, str],
    topic: str,
    trace_dict: dict[str, Any],
) -> None:
    lines = _traces(trace_dict, 25, prefix="kcat")
    subprocess.run(
        [kcat, "-b", broker.bootstrap, *broker.kcat_args, "-P", "-t", topic],
        input=b"\n".join(lines) + b"\n",
        env=kcat_env,
        check=True,
        timeout=30,
    )
    transport = open_transport(broker.settings())
    consumer = transport.consumer([topic], "kcat-reader")
    got = drain(consumer, 25)
    consumer.close()
    transport.close()
    oks, errs = route(got, Trace)
    assert errs == []
    assert sorted(m.trace_id for _, m in oks) == sorted(f"kcat-{i}" for i in range(25))


def test_tapd_producer_output_is_read_by_kcat(
    broker: Endpoint,
    kcat: str,
    kcat_env: dict[str, str],
    topic: str,
    trace_dict: dict[str, Any],
) -> None:
    transport = open_transport(broker.settings())
    producer = transport.producer()
    for line in _traces(trace_dict, 5, prefix="tapd"):
        producer.send(topic, line, key=b"k")
    producer.flush()
    producer.close()
    transport.close()
    out = subprocess.run(
        [
            kcat,
            "-b",
            broker.bootstrap,
            *broker.kcat_args,
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%k %o %s\\n",
        ],
        capture_output=True,
        env=kcat_env,
        check=True,
        timeout=30,
    ).stdout
    rows = [line.split(b" ", 2) for line in out.splitlines() if line]
    # one key, one partition, dense offsets in send order, seen by another client
    assert [(k, int(o)) for k, o, _ in rows] == [(b"k", i) for i in range(5)]
    assert [decode(v, Trace).trace_id for _, _, v in rows] == [f"tapd-{i}" for i in range(5)]


# --- capabilities: modern features where the broker has them -----------------


def test_idempotent_producer_where_the_broker_supports_it(broker: Endpoint, topic: str) -> None:
    transport = KafkaTransport(broker.settings())
    modern = broker.name == "tansu"
    assert transport.capabilities.idempotent_producer is modern
    assert transport.capabilities.record_headers is modern
    producer = transport.producer()
    assert isinstance(producer, KafkaProducer)
    assert producer.idempotent is modern
    for i in range(20):
        producer.send(topic, b"%d" % i, key=b"one")
    producer.flush()
    producer.close()
    consumer = transport.consumer([topic], "idem")
    got = drain(consumer, 20)
    got += consumer.poll(0.5, 100)  # a retried batch would show up twice
    consumer.close()
    transport.close()
    assert [r.value for r in got] == [b"%d" % i for i in range(20)]


def test_lag_comes_from_the_fetch_high_watermark(broker: Endpoint, topic: str) -> None:
    """Records sent in batches (tansu 0.6 answers ListOffsets(latest) with the
    last batch's base offset + 1 then): lag counts every unread record."""
    transport = open_transport(broker.settings(session_timeout_ms=6_000))
    producer = transport.producer()
    for i in range(30):
        producer.send(topic, b"%d" % i, key=b"k%d" % (i % 3))
    producer.flush()  # one flush: a few large batches
    consumer = transport.consumer([topic], "watermark")
    got = drain(consumer, 12)
    assert len(got) == 12
    assert sum(consumer.lag().values()) == 30 - 12  # unread, by position
    consumer.commit(next_offsets(got))
    rest = drain(consumer, 18)
    assert sum(consumer.lag().values()) == 18  # read but uncommitted, by the commit
    consumer.commit(next_offsets(rest))
    assert sum(consumer.lag().values()) == 0
    consumer.close()
    producer.close()
    transport.close()


# --- crashes: real subprocesses, SIGKILL -------------------------------------

_CONSUMER = r"""
import os, sys, time
from daemon.config import load_settings
from streams.factory import open_transport
from streams.transport import next_offsets

topic, group, n, mode, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
consumer = open_transport(load_settings().transport).consumer([topic], group)
got = []
deadline = time.monotonic() + 60
while len(got) < n and time.monotonic() < deadline:
    got += consumer.poll(0.2, n - len(got))
# the work: its effect made durable before any commit
with open(out, "wb") as f:
    f.write(b"\n".join(r.value for r in got))
    f.flush()
    os.fsync(f.fileno())
if mode == "commit":
    consumer.commit(next_offsets(got))
print("DONE", flush=True)
time.sleep(600)  # killed here
"""

_PRODUCER = r"""
import sys, time
from daemon.config import load_settings
from streams.factory import open_transport

topic, n_flushed, n_unflushed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
producer = open_transport(load_settings().transport).producer()
for i in range(n_flushed):
    producer.send(topic, b"flushed-%d" % i)
producer.flush()
for i in range(n_unflushed):
    producer.send(topic, b"buffered-%d" % i)
print("DONE", flush=True)
time.sleep(600)  # killed here
"""


def _run_until_done_then_kill(code: str, args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else b""
        if line.strip() != b"DONE":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"worker failed: {err.decode(errors='replace')[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_sigkill_before_commit_redelivers_after_commit_does_not(
    transport: Transport, transport_env: dict[str, str], topic: str, tmp_path: Path
) -> None:
    producer = transport.producer()
    first = [f"first-{i}".encode() for i in range(8)]
    for v in first:
        producer.send(topic, v)
    producer.flush()
    out = tmp_path / "processed"
    args = [topic, "crashy", "8", "no-commit", str(out)]

    # processed, killed before commit: everything comes again
    _run_until_done_then_kill(_CONSUMER, args, transport_env)
    assert sorted(out.read_bytes().split(b"\n")) == sorted(first)
    out.unlink()
    args[3] = "commit"
    _run_until_done_then_kill(_CONSUMER, args, transport_env)
    assert sorted(out.read_bytes().split(b"\n")) == sorted(first)

    # processed, committed, killed: nothing comes again, only what is new
    later = [f"later-{i}".encode() for i in range(3)]
    for v in later:
        producer.send(topic, v)
    producer.flush()
    args[2] = "3"
    _run_until_done_then_kill(_CONSUMER, args, transport_env)
    assert sorted(out.read_bytes().split(b"\n")) == sorted(later)


def test_sigkill_keeps_every_flushed_record(
    transport: Transport,
    transport_settings: TransportSettings,
    transport_env: dict[str, str],
    topic: str,
) -> None:
    _run_until_done_then_kill(_PRODUCER, [topic, "50", "20"], transport_env)
    consumer = transport.consumer([topic], "after-crash")
    got = drain(consumer, 50)
    got += consumer.poll(0.5, 100)  # anything beyond the flushed 50
    consumer.close()
    values = {r.value for r in got}
    assert {b"flushed-%d" % i for i in range(50)} <= values
    if transport_settings.kind == "embedded":
        # nothing is durable before flush: the buffer died with the process
        assert not any(v.startswith(b"buffered") for v in values)


def test_embedded_processes_share_one_file(tmp_path: Path, topic: str) -> None:
    """Two producer processes and this consumer on one SQLite file at once."""
    env = {
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp_path / "shared.sqlite"),
        "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": "2",
    }
    code = r"""
import sys
from daemon.config import load_settings
from streams.factory import open_transport
topic, name = sys.argv[1], sys.argv[2]
producer = open_transport(load_settings().transport).producer()
for i in range(300):
    producer.send(topic, f"{name}-{i}".encode())
    if i % 10 == 9:
        producer.flush()
producer.flush()
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", code, topic, name], env={**os.environ, **env})
        for name in ("a", "b")
    ]
    transport = open_transport(
        TransportSettings(
            **{
                "kind": "embedded",
                "embedded_path": tmp_path / "shared.sqlite",
                "embedded_partitions": 2,
            }
        )
    )
    consumer = transport.consumer([topic], "reader")
    got = drain(consumer, 600, timeout_s=60)
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert sorted(r.value for r in got) == sorted(
        f"{n}-{i}".encode() for n in ("a", "b") for i in range(300)
    )
    for p in (0, 1):
        offsets = [r.offset for r in got if r.partition == p]
        assert offsets == list(range(len(offsets)))


# --- the broker itself ----------------------------------------------------------


@pytest.mark.kafka
def test_broker_restart_loses_no_flushed_record() -> None:
    """A hard broker kill and restart (same port, same data): the clients
    reconnect and every flushed record is still there."""
    with LocalBroker(partitions=2) as broker:
        settings = kafka09_endpoint(broker.bootstrap).settings(session_timeout_ms=6_000)
        transport = open_transport(settings)
        producer = transport.producer()
        for i in range(20):
            producer.send("bounce", b"a%d" % i)
        producer.flush()
        broker.restart(hard=True)
        for i in range(20):
            producer.send("bounce", b"b%d" % i)
        producer.flush(timeout_s=60)
        deadline = time.monotonic() + 15
        while not transport.ping() and time.monotonic() < deadline:
            pass  # readiness comes back once the probe reconnects
        assert transport.ping()
        consumer = transport.consumer(["bounce"], "bouncer")
        got = drain(consumer, 40, timeout_s=60)
        consumer.close()
        producer.close()
        transport.close()
    assert sorted(r.value for r in got) == sorted(
        [b"a%d" % i for i in range(20)] + [b"b%d" % i for i in range(20)]
    )


def test_ping_is_false_without_a_broker() -> None:
    from lab.localbroker import free_port

    transport = KafkaTransport(
        TransportSettings(kind="kafka", bootstrap_servers=f"127.0.0.1:{free_port()}")
    )
    assert transport.ping(timeout_s=0.5) is False


# --- security settings reach the client, the password never shows -----------

SECRET = "hunter2-s3cr3t"


def _secure(tmp_path: Path, bootstrap: str = "127.0.0.1:9093") -> TransportSettings:
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a CA")
    return TransportSettings.model_validate(
        {
            "kind": "kafka",
            "bootstrap_servers": f"{bootstrap}, 127.0.0.2:9093",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "tapd",
            "sasl_plain_password": SECRET,
            "ssl_cafile": str(ca),
            "ssl_check_hostname": False,
            "client_id": "tapd-scorer-0",
        }
    )


def test_security_settings_reach_the_client(tmp_path: Path) -> None:
    cfg = client_config(_secure(tmp_path))
    assert cfg["bootstrap_servers"] == ["127.0.0.1:9093", "127.0.0.2:9093"]
    assert cfg["security_protocol"] == "SASL_SSL"
    assert cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_username"] == "tapd"
    assert cfg["sasl_plain_password"] == SECRET  # what kafka-python needs
    assert cfg["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert cfg["ssl_check_hostname"] is False
    assert cfg["client_id"] == "tapd-scorer-0"
    # every key is one kafka-python's clients accept
    from kafka import KafkaConsumer, KafkaProducer

    assert set(cfg) <= set(KafkaProducer.DEFAULT_CONFIG) & set(KafkaConsumer.DEFAULT_CONFIG)
    plain = client_config(TransportSettings(kind="kafka"))
    assert "sasl_plain_password" not in plain and "ssl_cafile" not in plain


def test_password_never_shows_in_repr_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lab.localbroker import free_port

    settings = _secure(tmp_path, bootstrap=f"127.0.0.1:{free_port()}")
    transport = KafkaTransport(settings)
    for text in (repr(client_config(settings)), str(client_config(settings)), repr(transport)):
        assert SECRET not in text
        assert "sasl_plain_password" in text  # masked, not dropped
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()
    with caplog.at_level(logging.DEBUG):
        transport.ping(timeout_s=0.5)  # connection attempts log at debug level
        transport.close()
    assert caplog.records  # the clients did log
    assert SECRET not in caplog.text


def test_a_topic_created_after_the_group_joined_is_consumed(broker: Endpoint, topic: str) -> None:
    """One group over two topics, the second created later (as the lift topic
    is, on the trainer's first publish): its records arrive within seconds,
    not at the default 5-minute metadata refresh."""
    transport = open_transport(broker.settings())
    early, late = f"{topic}.early", f"{topic}.late"
    try:
        producer = transport.producer()
        producer.send(early, b"first")
        producer.flush()
        consumer = transport.consumer([early, late], f"g-{topic}")
        assert [r.value for r in drain(consumer, 1)] == [b"first"]
        producer.send(late, b"second")
        producer.flush()
        got = drain(consumer, 1, timeout_s=30.0)
        assert [(r.topic, r.value) for r in got] == [(late, b"second")]
        consumer.close()
        producer.close()
    finally:
        transport.close()


# --- partition-aligned changelogs: explicit partitions, reads, assignment hooks --


def test_explicit_partition_read_and_end_offsets(transport: Transport, topic: str) -> None:
    n = transport.partitions(topic)  # auto-created with the broker's default count
    assert n >= 2 and transport.partitions(topic) == n
    producer = transport.producer()
    for i in range(6):
        producer.send(topic, f"p1-{i}".encode(), key=b"any key", partition=1)
    producer.send(topic, b"p0-0", partition=0)
    producer.flush()
    producer.close()
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    assert transport.end_offsets([p0, p1]) == {p0: 1, p1: 6}
    # A range outside any group; the last record alone is one read.
    assert [r.value for r in transport.read(p1, 2, 5)] == [b"p1-2", b"p1-3", b"p1-4"]
    assert [(r.offset, r.value) for r in transport.read(p1, 5, 6)] == [(5, b"p1-5")]
    assert transport.read(p0, 1, 1) == []


def test_on_assigned_is_told_before_records_and_seek_sets_the_start(
    transport: Transport, topic: str
) -> None:
    producer = transport.producer()
    for i in range(8):
        producer.send(topic, f"m{i}".encode(), partition=0)
    producer.flush()
    producer.close()
    told: list[list[TopicPartition]] = []
    consumer: Consumer | None = None

    def assigned(tps: list[TopicPartition]) -> None:
        told.append(sorted(tps, key=lambda t: t.partition))
        assert consumer is not None
        consumer.seek(TopicPartition(topic, 0), 5)

    consumer = transport.consumer([topic], "seeking", on_assigned=assigned)
    got = drain(consumer, 3)
    # Every partition of the topic, once (brokers auto-create 2 or 4).
    assert told == [[TopicPartition(topic, p) for p in range(transport.partitions(topic))]]
    assert [r.value for r in got] == [b"m5", b"m6", b"m7"]
    with pytest.raises(ValueError):
        consumer.seek(TopicPartition(topic + ".other", 0), 0)
    consumer.close()
