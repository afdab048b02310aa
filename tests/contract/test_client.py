"""The trainer contract client (daemon.contract) on a real log: the embedded
SQLite transport, and the same flow on both real Kafka brokers.

What a custom training loop relies on: a job is committed only once it is
answered, a redelivered cohort never reaches the loop twice (the ledger
answers it), and bad input becomes a dead letter the scorer understands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import TransportSettings
from daemon.contract import Measurement, TrainerClient
from lab.localbroker import Endpoint
from streams.deadletter import original
from streams.factory import open_transport
from streams.schemas import DeadLetter, Dispatch, LiftResult, decode
from streams.transport import Record, Transport

TOPICS = {"dispatch_topic": "d", "lift_topic": "l", "dlq_topic": "q"}


def _read(transport: Transport, topic: str, n: int, timeout_s: float = 20.0) -> list[Record]:
    consumer = transport.consumer([topic], f"reader-{time.monotonic_ns()}")
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += consumer.poll(0.2, 100)
    got += consumer.poll(0.3, 100)  # nothing beyond n
    consumer.close()
    return got


def _send(transport: Transport, topic: str, *values: bytes) -> None:
    p = transport.producer()
    for v in values:
        p.send(topic, v)
    p.flush()
    p.close()


def _client(transport: Transport, tmp_path: Path, **kw: Any) -> TrainerClient:
    return TrainerClient(
        transport, ledger_path=tmp_path / "ledger.sqlite", trainer_id="loop-0", **TOPICS, **kw
    )


def _measurement() -> Measurement:
    return Measurement(
        nll_before=2.0,
        nll_after=1.75,
        acc_before=0.25,
        acc_after=0.5,
        policy_version_before="v0",
        policy_version_after="v1",
        steps=3,
        train_reward_before=0.25,
        train_reward_after=0.625,
    )


def _next(client: TrainerClient, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.next(0.2)
        if job is not None:
            return job
    return None


@pytest.fixture
def embedded(tmp_path: Path) -> Transport:
    return open_transport(TransportSettings(kind="embedded", embedded_path=tmp_path / "log.sqlite"))


def test_report_publishes_the_lift_then_commits(
    embedded: Transport, tmp_path: Path, dispatch_dict: dict[str, Any]
) -> None:
    _send(embedded, "d", json.dumps(dispatch_dict).encode())
    client = _client(embedded, tmp_path)
    job = _next(client)
    assert job is not None and job.cohort_id == "c-9f2e"
    with pytest.raises(RuntimeError, match="still in hand"):
        client.next(0.1)
    result = client.report(job, _measurement())
    client.close()

    (rec,) = _read(embedded, "l", 1)
    lift = decode(rec.value, LiftResult)
    assert lift == result and rec.key == b"c-9f2e"
    # measured figures, and the dispatch's own echoed so the scorer can learn
    assert lift.nll_lift == pytest.approx(0.25) and lift.acc_lift == pytest.approx(0.25)
    assert lift.features == dispatch_dict["features"]
    assert lift.model_version == "river-12" and lift.selection == "exploit"
    assert lift.predicted_lift == 0.07 and lift.trainer_id == "loop-0"
    assert lift.plasticity is None  # optional for a custom trainer
    # committed: the group has nothing left
    again = _client(embedded, tmp_path / "other")
    assert _next(again, timeout_s=1.0) is None
    again.close()


def test_an_unanswered_job_is_redelivered(
    embedded: Transport, tmp_path: Path, dispatch_dict: dict[str, Any]
) -> None:
    _send(embedded, "d", json.dumps(dispatch_dict).encode())
    first = _client(embedded, tmp_path)
    assert _next(first) is not None
    first.close()  # the loop died mid-cohort: nothing reported
    second = _client(embedded, tmp_path)
    job = _next(second)
    assert job is not None and job.cohort_id == "c-9f2e"
    second.report(job, _measurement())
    second.close()
    assert len(_read(embedded, "l", 1)) == 1


def test_a_redelivered_cohort_is_answered_from_the_ledger(
    embedded: Transport, tmp_path: Path, dispatch_dict: dict[str, Any]
) -> None:
    raw = json.dumps(dispatch_dict).encode()
    _send(embedded, "d", raw)
    client = _client(embedded, tmp_path)
    result = client.report(_next(client), _measurement())
    client.close()
    # The scorer replays the dispatch (same cohort id); a restarted loop with
    # the same ledger must not train on it again.
    _send(embedded, "d", raw)
    restarted = _client(embedded, tmp_path)
    assert _next(restarted, timeout_s=2.0) is None
    assert restarted.duplicates == 1
    restarted.close()
    lifts = [decode(r.value, LiftResult) for r in _read(embedded, "l", 2)]
    assert lifts == [result, result]  # the same answer, republished


def test_bad_dispatches_and_rejections_become_dead_letters(
    embedded: Transport, tmp_path: Path, dispatch_dict: dict[str, Any]
) -> None:
    bad = b'{"schema": "tapd.dispatch/1", "cohort_id": "x"}'
    good = json.dumps(dispatch_dict).encode()
    _send(embedded, "d", bad, good)
    client = _client(embedded, tmp_path)
    job = _next(client)  # the bad one is answered on the way
    assert job is not None
    client.reject(job, "items[0].prompt", "longer than the policy's context")
    client.close()
    letters = [decode(r.value, DeadLetter) for r in _read(embedded, "q", 2)]
    assert [(x.stage, x.source_topic) for x in letters] == [("decode", "d"), ("lift", "d")]
    assert letters[1].field == "items[0].prompt"
    # the scorer finds the cohort id in the original bytes and frees the slot
    assert decode(original(letters[1]), Dispatch).cohort_id == "c-9f2e"
    assert _read(embedded, "l", 0, timeout_s=0.5) == []


def test_the_client_works_on_both_real_brokers(
    broker: Endpoint, tmp_path: Path, topic: str, dispatch_dict: dict[str, Any]
) -> None:
    transport = open_transport(broker.settings(session_timeout_ms=6_000))
    topics = {"dispatch_topic": f"{topic}.d", "lift_topic": f"{topic}.l", "dlq_topic": f"{topic}.q"}
    _send(transport, topics["dispatch_topic"], json.dumps(dispatch_dict).encode())
    client = TrainerClient(
        transport,
        ledger_path=tmp_path / "ledger.sqlite",
        trainer_id="loop-0",
        group=f"g-{topic}",
        **topics,
    )
    job = _next(client, timeout_s=30.0)
    assert job is not None
    result = client.report(job, _measurement())
    client.close()
    (rec,) = _read(transport, topics["lift_topic"], 1, timeout_s=30.0)
    assert decode(rec.value, LiftResult) == result
    transport.close()
