"""The scorer's durable state: one SQLite file in the state dir.

What a crash must not lose is written in ONE transaction per poll batch:

* the scorer snapshot (open cohorts, cohorts waiting to be scored or
  dispatched, dispatches in flight, lift cohort ids already learned),
* the next offset to read per consumed partition,
* the outbox: every message the batch caused (dispatches, dead letters,
  decision records, labels), not yet known to be on the log.

The service then sends the outbox, flushes, deletes the sent rows and only
then commits the offsets to the broker. A crash before the transaction
re-reads the batch against the old snapshot; a crash after it re-sends the
outbox (same keys and cohort ids, so consumers drop the copies) and skips
records below the stored offsets. Nothing is lost, nothing is counted twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.transport import TopicPartition


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message the scorer owes the log."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Outboxed:
    seq: int
    message: OutMessage


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 0), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, part));
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, key BLOB, value BLOB NOT NULL);
"""


class StateStore:
    """Snapshot + offsets + outbox, committed together."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch survives power loss, not only a process kill.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def load_snapshot(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM snapshot WHERE id = 0").fetchone()
        return json.loads(row[0]) if row else None

    def offsets(self) -> dict[TopicPartition, int]:
        rows = self._db.execute("SELECT topic, part, next_offset FROM offsets").fetchall()
        return {TopicPartition(t, int(p)): int(o) for t, p, o in rows}

    def outbox(self) -> list[Outboxed]:
        rows = self._db.execute("SELECT seq, topic, key, value FROM outbox ORDER BY seq").fetchall()
        return [Outboxed(int(s), OutMessage(t, k, bytes(v))) for s, t, k, v in rows]

    def save(
        self,
        snapshot: Mapping[str, Any] | None,
        offsets: Mapping[TopicPartition, int],
        messages: Iterable[OutMessage],
    ) -> None:
        """One transaction: the new snapshot, the advanced offsets and the owed messages."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if snapshot is not None:
                body = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
                cur.execute("INSERT OR REPLACE INTO snapshot (id, body) VALUES (0, ?)", (body,))
            cur.executemany(
                "INSERT INTO offsets (topic, part, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (topic, part) DO UPDATE SET next_offset = "
                "max(next_offset, excluded.next_offset)",
                [(tp.topic, tp.partition, o) for tp, o in offsets.items()],
            )
            cur.executemany(
                "INSERT INTO outbox (topic, key, value) VALUES (?, ?, ?)",
                [(m.topic, m.key, m.value) for m in messages],
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def sent(self, up_to_seq: int) -> None:
        """Forget outbox rows once the producer has flushed them."""
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (up_to_seq,))

    def close(self) -> None:
        self._db.close()
