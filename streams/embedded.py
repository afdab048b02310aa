"""The embedded transport: Kafka's semantics in one SQLite file, no broker.

Topics have a fixed number of partitions (set by whoever creates the topic
first), each an append-only log of offsets 0, 1, 2, ...; consumer groups
store next offsets to read. The guarantees are the Kafka transport's:

* ``send`` only buffers; ``flush`` appends the buffer in one transaction,
  so nothing is durable before flush and everything is after it (WAL,
  ``synchronous=FULL``: a SIGKILL or power cut loses no flushed record).
* ``commit`` stores next offsets per group; a restarted consumer resumes
  there, so records read but not committed are read again.
* Several processes can share the file (the scorer produces, the trainer
  consumes): transactions are short and wait on ``busy_timeout``.

A group has one member: two consumers of one group in two processes would
both read every record (there is no rebalancing here).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from streams.durable import connect_durable
from streams.settings import TransportSettings
from streams.transport import (
    AssignHook,
    Consumer,
    Producer,
    Record,
    RevokeHook,
    TopicPartition,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    topic TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
"""

BUSY_TIMEOUT_S = 30.0
# A producer that is never flushed still holds bounded memory: past this many
# buffered records it flushes on its own (earlier durability is harmless).
MAX_BUFFERED = 10_000
_POLL_SLEEP_S = (0.005, 0.05)  # first and longest sleep while waiting for records


def _connect(path: Path) -> sqlite3.Connection:
    # Several processes share the file: writers queue on the busy timeout.
    conn = connect_durable(path, busy_timeout_s=BUSY_TIMEOUT_S)
    conn.executescript(_SCHEMA)
    return conn


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; IMMEDIATE takes the write lock up front so
    that two writers queue on busy_timeout instead of deadlocking."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _ensure_topic(conn: sqlite3.Connection, topic: str, partitions: int) -> int:
    """The topic's partition count, creating the topic when it is new."""
    row = conn.execute("SELECT partitions FROM topics WHERE topic = ?", (topic,)).fetchone()
    if row is not None:
        return int(row[0])
    conn.execute(
        "INSERT OR IGNORE INTO topics (topic, partitions) VALUES (?, ?)", (topic, partitions)
    )
    row = conn.execute("SELECT partitions FROM topics WHERE topic = ?", (topic,)).fetchone()
    return int(row[0])


def _end_offset(conn: sqlite3.Connection, tp: TopicPartition) -> int:
    row = conn.execute(
        "SELECT MAX(offset) FROM log WHERE topic = ? AND partition = ?", (tp.topic, tp.partition)
    ).fetchone()
    return 0 if row[0] is None else int(row[0]) + 1


class EmbeddedProducer:
    def __init__(self, path: Path, partitions: int) -> None:
        self._conn = _connect(path)
        self._partitions = partitions
        self._buffer: list[tuple[str, bytes | None, bytes, int, int | None]] = []
        self._round_robin = 0

    def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"value must be bytes, got {type(value).__name__}")
        self._buffer.append((topic, key, bytes(value), int(time.time() * 1000), partition))
        if len(self._buffer) >= MAX_BUFFERED:
            self.flush()

    def _partition(self, key: bytes | None, n: int, explicit: int | None = None) -> int:
        if explicit is not None:
            if not 0 <= explicit < n:
                raise ValueError(f"partition: {explicit} is not one of the topic's {n}")
            return explicit
        # The same key always lands in the same partition (per-key order),
        # like Kafka's default partitioner; keyless records spread evenly.
        if key is not None:
            return zlib.crc32(key) % n
        self._round_robin += 1
        return self._round_robin % n

    def flush(self, timeout_s: float | None = None) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            with _write(self._conn) as conn:
                ends: dict[TopicPartition, int] = {}
                counts: dict[str, int] = {}
                for topic, key, value, ts, explicit in batch:
                    if topic not in counts:
                        counts[topic] = _ensure_topic(conn, topic, self._partitions)
                    tp = TopicPartition(topic, self._partition(key, counts[topic], explicit))
                    if tp not in ends:
                        ends[tp] = _end_offset(conn, tp)
                    conn.execute(
                        "INSERT INTO log (topic, partition, offset, key, value, ts_ms)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (topic, tp.partition, ends[tp], key, value, ts),
                    )
                    ends[tp] += 1
        except BaseException:
            # Not durable: keep the records so that a retried flush sends them.
            self._buffer = batch + self._buffer
            raise

    def close(self) -> None:
        self._conn.close()


class EmbeddedConsumer:
    def __init__(
        self,
        path: Path,
        topics: Sequence[str],
        group: str,
        partitions: int,
        from_beginning: bool,
        on_assigned: AssignHook | None = None,
    ) -> None:
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        self._conn = _connect(path)
        self._topics = list(dict.fromkeys(topics))
        self._group = group
        self._partitions = partitions
        self._from_beginning = from_beginning
        self._positions: dict[TopicPartition, int] = {}
        self._paused = False
        self._next_tp = 0  # round-robin start, so no partition starves
        self._on_assigned = on_assigned

    def _assign(self) -> None:
        """Take every partition of every topic (creating topics, as Kafka's
        auto-create does), starting at the group's committed offsets."""
        missing = [t for t in self._topics if not any(tp.topic == t for tp in self._positions)]
        if not missing:
            return
        new: list[TopicPartition] = []
        with _write(self._conn) as conn:
            for topic in missing:
                for p in range(_ensure_topic(conn, topic, self._partitions)):
                    tp = TopicPartition(topic, p)
                    new.append(tp)
                    committed = self._committed(conn, tp)
                    if committed is not None:
                        self._positions[tp] = committed
                    else:
                        self._positions[tp] = 0 if self._from_beginning else _end_offset(conn, tp)
        if self._on_assigned is not None and new:
            self._on_assigned(new)

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        sleep = _POLL_SLEEP_S[0]
        while True:
            if not self._paused:
                self._assign()
                out = self._fetch(max_records)
                if out:
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            time.sleep(min(sleep, left))
            sleep = min(sleep * 2, _POLL_SLEEP_S[1])

    def _fetch(self, max_records: int) -> list[Record]:
        tps = sorted(self._positions, key=lambda t: (t.topic, t.partition))
        start = self._next_tp % len(tps)
        self._next_tp += 1
        out: list[Record] = []
        for tp in tps[start:] + tps[:start]:
            want = max_records - len(out)
            if want <= 0:
                break
            rows = self._conn.execute(
                "SELECT offset, key, value, ts_ms FROM log"
                " WHERE topic = ? AND partition = ? AND offset >= ? ORDER BY offset LIMIT ?",
                (tp.topic, tp.partition, self._positions[tp], want),
            ).fetchall()
            for offset, key, value, ts in rows:
                out.append(Record(tp.topic, tp.partition, int(offset), key, bytes(value), int(ts)))
            if rows:
                self._positions[tp] = int(rows[-1][0]) + 1
        return out

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        # A local write, done at once either way (``wait`` asks for no round trip).
        if not offsets:
            return
        with _write(self._conn) as conn:
            conn.executemany(
                "INSERT INTO group_offsets (grp, topic, partition, next_offset) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (grp, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(self._group, tp.topic, tp.partition, int(o)) for tp, o in offsets.items()],
            )

    def _committed(self, conn: sqlite3.Connection, tp: TopicPartition) -> int | None:
        row = conn.execute(
            "SELECT next_offset FROM group_offsets WHERE grp = ? AND topic = ? AND partition = ?",
            (self._group, tp.topic, tp.partition),
        ).fetchone()
        return None if row is None else int(row[0])

    def committed(self, tp: TopicPartition) -> int | None:
        return self._committed(self._conn, tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._positions:
            raise ValueError(f"seek: {tp} is not assigned to this consumer")
        if offset < 0:
            raise ValueError(f"seek: offset must be >= 0, got {offset}")
        self._positions[tp] = int(offset)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def paused(self) -> bool:
        return self._paused

    def lag(self) -> dict[TopicPartition, int]:
        """Records not yet committed by the group (or not yet read, before
        its first commit), per assigned partition."""
        self._assign()
        out: dict[TopicPartition, int] = {}
        for tp, position in self._positions.items():
            committed = self.committed(tp)
            done = committed if committed is not None else position
            out[tp] = max(_end_offset(self._conn, tp) - done, 0)
        return out

    def close(self) -> None:
        self._conn.close()


class EmbeddedTransport:
    """Producers and consumers over one SQLite file (see the module docstring)."""

    @classmethod
    def from_settings(
        cls, settings: TransportSettings, max_poll_records: int = 500
    ) -> EmbeddedTransport:
        return cls(settings.embedded_path, settings.embedded_partitions)

    def __init__(self, path: Path | str, partitions: int = 1) -> None:
        self.path = Path(path)
        self.partitions_default = partitions
        self._reader: sqlite3.Connection | None = None
        # Create the file and switch it to WAL once, up front.
        _connect(self.path).close()

    def producer(self) -> Producer:
        return EmbeddedProducer(self.path, self.partitions_default)

    def consumer(
        self,
        topics: Sequence[str],
        group: str,
        *,
        from_beginning: bool = True,
        on_revoked: RevokeHook | None = None,
        on_assigned: AssignHook | None = None,
    ) -> Consumer:
        return EmbeddedConsumer(
            self.path, topics, group, self.partitions_default, from_beginning, on_assigned
        )

    def _conn(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = _connect(self.path)
        return self._reader

    def partitions(self, topic: str) -> int:
        with _write(self._conn()) as conn:
            return _ensure_topic(conn, topic, self.partitions_default)

    def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        conn = self._conn()
        return {tp: _end_offset(conn, tp) for tp in tps}

    def read(self, tp: TopicPartition, start: int, end: int) -> list[Record]:
        rows = (
            self._conn()
            .execute(
                "SELECT offset, key, value, ts_ms FROM log WHERE topic = ? AND partition = ?"
                " AND offset >= ? AND offset < ? ORDER BY offset",
                (tp.topic, tp.partition, max(0, start), end),
            )
            .fetchall()
        )
        return [Record(tp.topic, tp.partition, int(o), k, bytes(v), int(t)) for o, k, v, t in rows]

    def ping(self) -> bool:
        try:
            conn = sqlite3.connect(self.path, timeout=1.0)
            try:
                conn.execute("SELECT COUNT(*) FROM topics").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        # Producers and consumers own their connections; this one only reads.
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __repr__(self) -> str:
        return f"EmbeddedTransport(path={str(self.path)!r}, partitions={self.partitions_default})"
