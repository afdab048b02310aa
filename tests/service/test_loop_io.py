"""The scorer loop's own I/O, in process on the embedded log.

* While traces flow, the lift, dead-letter and policy topics are polled at most
  every ``service.side_poll_interval_s``; an idle loop, and a loop that has just
  read a lift, polls them at once (a lift never waits behind a busy stream).
* The loop does not wait for the broker to acknowledge its state records, yet
  the outbox keeps the order recovery relies on: a state record is sent only
  once the decisions sent before it are flushed, and a traces offset is
  committed only once the state records sent before it are flushed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from bench.common import production_trace
from daemon.service.scorer import ScorerService
from lab.reliability import trace_key
from streams.embedded import EmbeddedTransport
from streams.schemas import encode
from streams.transport import Consumer, Producer, Record, TopicPartition

INTERVAL_S = 0.3


def _service(in_process: Callable[..., Any]) -> tuple[ScorerService, EmbeddedTransport]:
    # The in_process fixture (tests/service/conftest.py).
    got = in_process(side_poll_interval_s=INTERVAL_S, max_poll_records=20)
    return got.service, got.transport


def _produce(producer: Producer, topic: str, ids: range) -> None:
    for i in ids:
        raw = encode(production_trace(i, slice_id=i % 11, attempts=8, ts=time.time()))
        producer.send(topic, raw, key=trace_key(raw))
    producer.flush()


def _counted(consumer: Consumer, polls: list[float]) -> None:
    poll = consumer.poll

    def counting(timeout_s: float, max_records: int) -> list[Record]:
        polls.append(time.monotonic())
        return poll(timeout_s, max_records)

    consumer.poll = counting  # type: ignore[method-assign]


def test_side_topics_are_polled_at_most_every_interval_while_traces_flow(
    in_process: Callable[..., Any],
) -> None:
    service, transport = _service(in_process)
    topics = service.settings.topics
    producer = transport.producer()
    _produce(producer, topics.traces, range(2_000))
    service.start()
    try:
        assert service._lift is not None and service._dlq is not None
        lift_polls: list[float] = []
        dlq_polls: list[float] = []
        _counted(service._lift, lift_polls)
        _counted(service._dlq, dlq_polls)
        t0 = time.monotonic()
        busy_loops = 0
        while True:
            stats = service.iterate()
            if not stats.traces:
                break
            busy_loops += 1
        elapsed = time.monotonic() - t0
        # 2,000 traces at 20 a poll: 100 loops with traces; the side topics were
        # polled once on the first and then once per interval, not per loop.
        assert busy_loops >= 100
        busy = [t for t in lift_polls if t < t0 + elapsed]
        assert len(busy) <= 2 + elapsed / INTERVAL_S < busy_loops / 2
        assert len(dlq_polls) == len(lift_polls)
        # Idle: every loop polls them (and waits on them), interval or not.
        before = len(lift_polls)
        for _ in range(3):
            service.iterate()
        assert len(lift_polls) == before + 3
        # A lift that arrives while traces flow is learned within the interval.
        _produce(producer, topics.traces, range(2_000, 2_400))
        # Not a valid lift (it is dead-lettered): only when it is read is under test.
        producer.send(topics.lift, b'{"schema":"tapd.lift/1"}', key=b"c-unknown")
        producer.flush()
        learned_at = None
        t1 = time.monotonic()
        while time.monotonic() - t1 < 10 * INTERVAL_S:
            if service.iterate().lifts:
                learned_at = time.monotonic() - t1
                break
        assert learned_at is not None and learned_at <= INTERVAL_S + 0.5
    finally:
        producer.close()
        service.shutdown()


def test_the_outbox_order_holds_while_the_loop_does_not_wait_for_records(
    in_process: Callable[..., Any],
) -> None:
    service, transport = _service(in_process)
    topics = service.settings.topics
    producer = transport.producer()
    _produce(producer, topics.traces, range(3_000))
    service.start()
    events: list[tuple[str, str]] = []
    try:
        assert service._producer is not None and service._traces is not None
        out, traces = service._producer, service._traces
        send, flush, commit = out.send, out.flush, traces.commit

        def sending(
            topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
        ) -> None:
            events.append(("send", topic))
            send(topic, value, key=key, partition=partition)

        def flushing(timeout_s: float | None = None) -> None:
            flush(timeout_s)
            events.append(("flush", ""))

        def committing(offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
            events.append(("commit", ""))
            commit(offsets, wait=wait)

        out.send = sending  # type: ignore[method-assign]
        out.flush = flushing  # type: ignore[method-assign]
        traces.commit = committing  # type: ignore[method-assign]
        loops = 0
        while True:
            events.append(("loop", ""))
            if not (service.iterate().traces or service.scorer.has_work):
                break
            loops += 1
        events.append(("loop", ""))
        service.iterate()  # idle again: nothing left to send
    finally:
        producer.close()
        service.shutdown()
    sends = [t for kind, t in events if kind == "send"]
    assert loops >= 6 and sends.count(topics.decisions) >= 300
    assert sends.count(topics.changelog) >= 20
    # The loop does not wait for its state records: in each loop they are sent
    # after its decisions' flush and flushed only in a later one (the next
    # batch's, or the idle loop's that brings the pipeline to rest).
    loop_sends: list[str] = []
    for kind, topic in events:
        if kind == "loop":
            loop_sends = []
        elif kind == "send":
            # A batch's decisions are all sent before its state records.
            assert not (topic == topics.decisions and topics.changelog in loop_sends), (
                "a decision sent after its batch's state records"
            )
            loop_sends.append(topic)
        elif kind == "flush":
            assert topics.changelog not in loop_sends, "the loop waited for its state records"
    unflushed: set[str] = set()  # kinds of message sent since the last flush
    for kind, topic in events:
        if kind == "flush":
            unflushed.clear()
        elif kind == "send":
            if topic == topics.changelog:
                assert topics.decisions not in unflushed, "a state record overtook its decisions"
            unflushed.add(topic)
        elif kind == "commit":
            assert topics.changelog not in unflushed, "an offset committed before its record"
    assert unflushed == set()  # at rest, everything sent was flushed
    # Every decision reached the log, each once per cohort.
    tps = [
        TopicPartition(topics.decisions, p) for p in range(transport.partitions(topics.decisions))
    ]
    ends = transport.end_offsets(tps)
    decided = [r.key for tp in tps for r in transport.read(tp, 0, ends[tp])]
    assert len(decided) == sends.count(topics.decisions) == len(set(decided))
