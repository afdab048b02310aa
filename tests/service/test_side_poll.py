"""While traces flow, the lift, dead-letter and policy topics are polled at most every
``service.side_poll_interval_s``; an idle loop, and a loop that has just read a
lift, polls them at once (a lift is never left waiting behind a busy stream)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import production_trace
from daemon.config import TapdSettings
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.thresholds import ThresholdsHolder
from daemon.service.scorer import PolicyRollout, ScorerService, build_scorer
from lab.reliability import trace_key
from streams.embedded import EmbeddedTransport
from streams.schemas import encode
from streams.transport import Consumer, Record

INTERVAL_S = 0.3


def _service(tmp_path: Path) -> tuple[ScorerService, EmbeddedTransport]:
    settings = TapdSettings(state_dir=tmp_path)
    settings = settings.model_copy(
        update={
            "transport": settings.transport.model_copy(
                update={"kind": "embedded", "embedded_path": tmp_path / "log.sqlite"}
            ),
            "thresholds": settings.thresholds.replace(shadow_mode=True),
            "service": settings.service.model_copy(
                update={"side_poll_interval_s": INTERVAL_S, "max_poll_records": 20}
            ),
        }
    )
    transport = EmbeddedTransport(tmp_path / "log.sqlite")
    holder = ThresholdsHolder(settings.thresholds)
    rollout = PolicyRollout(settings)
    service = ScorerService(
        settings,
        transport,
        build_scorer(settings, lambda: holder.current, rollout),
        ScorerMetrics(),
        holder,
        rollout=rollout,
        background_refits=False,
    )
    return service, transport


def _counted(consumer: Consumer, polls: list[float]) -> None:
    poll = consumer.poll

    def counting(timeout_s: float, max_records: int) -> list[Record]:
        polls.append(time.monotonic())
        return poll(timeout_s, max_records)

    consumer.poll = counting  # type: ignore[method-assign]


def test_side_topics_are_polled_at_most_every_interval_while_traces_flow(
    tmp_path: Path,
) -> None:
    service, transport = _service(tmp_path)
    topics = service.settings.topics
    producer = transport.producer()
    for i in range(2_000):
        raw = encode(production_trace(i, slice_id=i % 7, attempts=8, ts=time.time()))
        producer.send(topics.traces, raw, key=trace_key(raw))
    producer.flush()
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
        for i in range(2_000, 2_400):
            raw = encode(production_trace(i, slice_id=i % 7, attempts=8, ts=time.time()))
            producer.send(topics.traces, raw, key=trace_key(raw))
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
