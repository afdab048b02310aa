"""Scorer throughput end to end on the real broker, against raw kafka-python, same run.

    .venv/bin/python -m bench.bench_scorer [--traces 4000] [--slices 50]

Both read the same topic of the local Kafka 0.9 broker (``lab.localbroker``)
from the beginning in a fresh consumer group. Baseline: a bare kafka-python
``KafkaConsumer`` that only iterates the records. Scorer: ``tapd run``'s
service loop (``ScorerService`` + ``build_scorer``: decode and validate,
cohort, featurize, predict, decide, persist the snapshot and outbox, commit),
in shadow mode, because no trainer answers. The traces carry their K=8
attempts, so no rollouts run: this measures the pipeline, not the policy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import Rate, production_trace
from streams.schemas import encode


def produce(bootstrap: str, topic: str, n: int, slices: int) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, api_version=(0, 9), linger_ms=5)
    for i in range(n):
        t = production_trace(i, slice_id=i % slices, attempts=8, ts=time.time())
        p.send(topic, encode(t), key=t.trace_id.encode())
    p.flush()
    p.close()


def raw_consume(bootstrap: str, topic: str, n: int) -> Rate:
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        api_version=(0, 9),
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=500,
    )
    t0 = time.perf_counter()
    got = 0
    while got < n:
        for records in c.poll(timeout_ms=1000).values():
            got += len(records)
    c.commit()
    seconds = time.perf_counter() - t0
    c.close()
    return Rate(got, seconds)


def scorer_consume(bootstrap: str, topic: str, n: int, state: Path) -> tuple[Rate, int]:
    from daemon.config import TapdSettings, Thresholds, Topics, TransportSettings
    from daemon.core.pipeline import Scorer
    from daemon.runtime.metrics import ScorerMetrics
    from daemon.runtime.thresholds import ThresholdsHolder
    from daemon.service.scorer import ScorerService, build_scorer
    from streams.kafka import KafkaTransport

    settings = TapdSettings(
        state_dir=state,
        # the 0.9 test broker never answers ApiVersions: name its version
        transport=TransportSettings(kind="kafka", bootstrap_servers=bootstrap, api_version="0.9"),
        topics=Topics(
            traces=topic, lift=f"{topic}.lift", dispatch=f"{topic}.dispatch", dlq=f"{topic}.dlq"
        ),
        thresholds=Thresholds(shadow_mode=True),
    )
    metrics = ScorerMetrics()
    holder = ThresholdsHolder(settings.thresholds)
    scorer = build_scorer(settings, lambda: holder.current)
    transport = KafkaTransport(settings.transport)
    scored = 0

    def count(fx: object) -> None:
        nonlocal scored
        scored += len(getattr(fx, "decisions", ()))

    service = ScorerService(
        settings, transport, scorer, metrics, holder, on_batch=count, background_refits=False
    )
    service.start()
    flushed = False

    def done(s: Scorer) -> bool:
        nonlocal flushed
        if not flushed and metrics.traces_consumed._value.get() >= n:
            flushed = True
            service._persist_and_send([], [], s.flush(time.time()))
        return flushed and not s.pending

    t0 = time.perf_counter()
    service.run(until=done)
    seconds = time.perf_counter() - t0
    transport.close()
    return Rate(int(metrics.traces_consumed._value.get()), seconds), scored


def main() -> None:
    from daemon.runtime.logging import configure_logging
    from lab.localbroker import LocalBroker

    configure_logging("warning")  # a log line per cohort would be measured too
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=4_000)
    ap.add_argument("--slices", type=int, default=50, help="distinct capability slices")
    args = ap.parse_args()
    topic = f"bench.traces.{uuid.uuid4().hex[:6]}"
    with (
        LocalBroker(partitions=2) as broker,
        tempfile.TemporaryDirectory(prefix="tapd-bench-") as d,
    ):
        produce(broker.bootstrap, topic, args.traces, args.slices)
        raw = raw_consume(broker.bootstrap, topic, args.traces)
        rate, scored = scorer_consume(broker.bootstrap, topic, args.traces, Path(d))
    print(
        f"{args.traces:,} traces (8 attempts each) over {args.slices} slices, Kafka 0.9 local broker"
    )
    print(f"raw kafka-python consume   {raw.per_s:>10,.0f} traces/s")
    print(
        f"tapd scorer end to end     {rate.per_s:>10,.0f} traces/s  "
        f"({scored} cohorts scored, {scored / rate.seconds:,.1f} cohorts/s)   "
        f"ratio {rate.per_s / raw.per_s:.3f}"
    )


if __name__ == "__main__":
    main()
