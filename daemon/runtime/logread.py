"""Read a topic by position, outside any consumer group: the inspection CLI's reader.

``tapd consume --partition/--offset/--last``, ``tapd dlq`` and ``tapd explain``
read like ``kcat -C -p P -o O -e``: assigned partitions, explicit offsets, up
to the end offsets seen when the read starts, nothing committed. The
transports' :class:`~streams.transport.Consumer` contract is group-based, so
this module reads each log directly: the embedded SQLite file read-only (a
missing file is an empty log, never created), Kafka through a group-less
kafka-python consumer with the transport's own client configuration.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.settings import TransportSettings
from streams.transport import Record


class NoSuchTopic(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Extent:
    """A partition's first and next offset (``end`` = last offset + 1)."""

    begin: int
    end: int


def _embedded(path: Path) -> sqlite3.Connection | None:
    if not Path(path).exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)


def extents(settings: TransportSettings, topic: str) -> dict[int, Extent]:
    """Every partition of ``topic`` with its offsets; empty when the topic does not exist."""
    if settings.kind == "embedded":
        db = _embedded(settings.embedded_path)
        if db is None:
            return {}
        try:
            row = db.execute("SELECT partitions FROM topics WHERE topic = ?", (topic,)).fetchone()
            if row is None:
                return {}
            out = {p: Extent(0, 0) for p in range(int(row[0]))}
            for p, lo, hi in db.execute(
                "SELECT partition, MIN(offset), MAX(offset) FROM log WHERE topic = ? "
                "GROUP BY partition",
                (topic,),
            ):
                out[int(p)] = Extent(int(lo), int(hi) + 1)
            return out
        except sqlite3.OperationalError:
            return {}
        finally:
            db.close()
    with _KafkaReader(settings) as reader:
        return reader.extents(topic)


def read(
    settings: TransportSettings,
    topic: str,
    *,
    partitions: Sequence[int] | None = None,
    offset: int | None = None,
    last: int | None = None,
    limit: int | None = None,
    timeout_s: float = 10.0,
) -> Iterator[Record]:
    """Records of ``topic``, partition by partition, in offset order.

    ``offset``: start there (each selected partition); ``last``: only the last
    ``last`` records of each; neither: from the beginning. Stops at the end
    offsets seen at the start, after ``limit`` records in all, or when Kafka
    returns nothing for ``timeout_s``.
    """
    ext = extents(settings, topic)
    if not ext:
        raise NoSuchTopic(f"topic {topic!r} does not exist (or has no partitions)")
    chosen = sorted(ext) if partitions is None else list(partitions)
    for p in chosen:
        if p not in ext:
            raise NoSuchTopic(f"topic {topic!r} has no partition {p} (it has {sorted(ext)})")
    starts: dict[int, int] = {}
    for p in chosen:
        e = ext[p]
        if last is not None:
            starts[p] = max(e.begin, e.end - last)
        elif offset is not None:
            starts[p] = max(e.begin, offset)
        else:
            starts[p] = e.begin
    remaining = limit
    if settings.kind == "embedded":
        for p in chosen:
            for rec in _embedded_range(settings.embedded_path, topic, p, starts[p], ext[p].end):
                if remaining is not None and remaining <= 0:
                    return
                yield rec
                if remaining is not None:
                    remaining -= 1
        return
    with _KafkaReader(settings) as reader:
        for p in chosen:
            for rec in reader.range(topic, p, starts[p], ext[p].end, timeout_s):
                if remaining is not None and remaining <= 0:
                    return
                yield rec
                if remaining is not None:
                    remaining -= 1


def _embedded_range(
    path: Path, topic: str, partition: int, start: int, end: int
) -> Iterator[Record]:
    db = _embedded(path)
    if db is None:
        return
    try:
        pos = start
        while pos < end:
            rows = db.execute(
                "SELECT offset, key, value, ts_ms FROM log WHERE topic = ? AND partition = ? "
                "AND offset >= ? AND offset < ? ORDER BY offset LIMIT 1000",
                (topic, partition, pos, end),
            ).fetchall()
            if not rows:
                return
            for off, key, value, ts in rows:
                yield Record(
                    topic,
                    partition,
                    int(off),
                    None if key is None else bytes(key),
                    bytes(value),
                    int(ts),
                )
            pos = int(rows[-1][0]) + 1
    finally:
        db.close()


class _KafkaReader:
    """A group-less kafka-python consumer: assign, seek, read to a given end."""

    def __init__(self, settings: TransportSettings) -> None:
        from kafka import KafkaConsumer

        from streams.kafka import client_config

        cfg: dict[str, Any] = dict(client_config(settings))
        self._c = KafkaConsumer(
            **cfg,
            group_id=None,
            enable_auto_commit=False,
            consumer_timeout_ms=1000,
            # A multi-partition fetch may exceed kafka-python's 1 MB default.
            fetch_max_bytes=52_428_800,
        )

    def __enter__(self) -> _KafkaReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._c.close(autocommit=False)

    def extents(self, topic: str) -> dict[int, Extent]:
        from kafka import TopicPartition as KTP

        parts = self._c.partitions_for_topic(topic)
        if not parts:
            return {}
        tps = [KTP(topic, p) for p in sorted(parts)]
        self._c.assign(tps)
        out: dict[int, Extent] = {}
        # seek + position rather than ListOffsets: works on every broker version.
        self._c.seek_to_beginning(*tps)
        begins = {tp.partition: int(self._c.position(tp)) for tp in tps}
        self._c.seek_to_end(*tps)
        for tp in tps:
            out[tp.partition] = Extent(begins[tp.partition], int(self._c.position(tp)))
        return out

    def range(
        self, topic: str, partition: int, start: int, end: int, timeout_s: float
    ) -> Iterator[Record]:
        from kafka import TopicPartition as KTP

        if start >= end:
            return
        tp = KTP(topic, partition)
        self._c.assign([tp])
        self._c.seek(tp, start)
        idle_since = time.monotonic()
        pos = start
        while pos < end:
            batch = self._c.poll(timeout_ms=500, max_records=500)
            got = batch.get(tp, [])
            if not got:
                if time.monotonic() - idle_since > timeout_s:
                    return
                continue
            idle_since = time.monotonic()
            for r in got:
                if r.offset >= end:
                    return
                ts = r.timestamp if r.timestamp is not None and r.timestamp >= 0 else 0
                yield Record(topic, partition, r.offset, r.key, r.value or b"", int(ts))
                pos = r.offset + 1
