"""The scorer's durable state: one SQLite file in the state dir.

What a crash must not lose is written in ONE transaction per poll batch:

* the scorer snapshot (open cohorts, cohorts waiting to be scored or
  dispatched, dispatches in flight, lift cohort ids already learned); its
  id windows (trace ids decided, lift cohort ids learned: up to hundreds of
  thousands) and its open cohorts (up to tens of thousands) are journaled,
  one row per id or cohort, and a batch writes the rows it changed, so that
  a batch's transaction costs what the batch did, not what the windows and
  the open cohorts hold,
* the next offset to read per consumed partition,
* the outbox: every message the batch caused (dispatches, dead letters,
  decision records, labels), not yet known to be on the log;
* the labels the predictor learned in the batch (the label history the
  predictor is rebuilt from: its latest model snapshot plus every label
  stored after that snapshot's sequence number).

The service then sends the outbox, flushes, deletes the sent rows and only
then commits the offsets to the broker. A crash before the transaction
re-reads the batch against the old snapshot; a crash after it re-sends the
outbox (same keys and cohort ids, so consumers drop the copies) and skips
records below the stored offsets. Nothing is lost, nothing is counted twice.

The file is a cache of what the log holds, not the only copy: everything in
it can be rebuilt from Kafka (docs/ARCHITECTURE.md, "State: owners and
rebuild"). Its *incarnation* (a random id made with the file) names this
state's life: the scorer's own consumer groups for the lift, dead-letter and
policy topics carry it, so a replica whose disk is new reads those topics
from their beginning and rebuilds every label. An outbox row remembers which
traces partition it belongs to (``owner``), so that rows of a partition that
another replica has taken over meanwhile are dropped, not sent twice.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.core.journal import Journal, Rows, fill, stored
from daemon.core.pipeline import Label
from streams.durable import connect_durable
from streams.transport import OutMessage, TopicPartition


@dataclass(frozen=True, slots=True)
class Outboxed:
    seq: int
    message: OutMessage
    owner: str | None = None  # the traces partition ("topic/partition") it belongs to


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 0), body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, part));
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, key BLOB, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, cohort_id TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, section TEXT NOT NULL, key TEXT NOT NULL, value TEXT,
    UNIQUE (section, key));
"""
# Columns added after the first release: a file from before gets them on open.
_OUTBOX_COLUMNS = {"dest_part": "INTEGER", "owner": "TEXT"}


def journal_rows(db: sqlite3.Connection) -> dict[str, Rows]:
    """The journaled windows' rows, by section, each in its window's order."""
    out: dict[str, Rows] = {}
    try:
        rows = db.execute("SELECT section, key, value FROM journal ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # a file from before the journal (read-only readers)
        return out
    for name, key, value in rows:
        out.setdefault(str(name), []).append((str(key), None if value is None else str(value)))
    return out


class StateStore:
    """Snapshot + offsets + outbox, committed together."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect_durable(path)
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        for name, kind in _OUTBOX_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('incarnation', ?)",
            (uuid.uuid4().hex[:12],),
        )
        # The journaled windows as last written by this store, by section: their
        # next save writes the rows changed since (the same objects), or all
        # of a window it does not know.
        self._journaled: dict[str, Journal] = {}

    @property
    def incarnation(self) -> str:
        """This state's life: made with the file, gone with it."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
        return str(row[0])

    def load_snapshot(self) -> dict[str, Any] | None:
        """The last snapshot saved, its journaled windows filled in again."""
        row = self._db.execute("SELECT body FROM snapshot WHERE id = 0").fetchone()
        return None if row is None else fill(json.loads(row[0]), journal_rows(self._db))

    def offsets(self) -> dict[TopicPartition, int]:
        rows = self._db.execute("SELECT topic, part, next_offset FROM offsets").fetchall()
        return {TopicPartition(t, int(p)): int(o) for t, p, o in rows}

    def outbox(self) -> list[Outboxed]:
        rows = self._db.execute(
            "SELECT seq, topic, key, value, dest_part, owner FROM outbox ORDER BY seq"
        ).fetchall()
        return [
            Outboxed(int(s), OutMessage(t, k, bytes(v), None if d is None else int(d)), o)
            for s, t, k, v, d, o in rows
        ]

    def drop_owned(self, owners: Iterable[str]) -> int:
        """Forget the owed rows of partitions this replica no longer owns."""
        keys = list(owners)
        if not keys:
            return 0
        cur = self._db.executemany("DELETE FROM outbox WHERE owner = ?", [(k,) for k in keys])
        return int(cur.rowcount)

    def labels_since(self, seq: int) -> Iterator[tuple[int, Label]]:
        """Stored labels with a sequence number above ``seq``, oldest first."""
        rows = self._db.execute(
            "SELECT seq, body FROM labels WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()
        for s, body in rows:
            yield int(s), Label.from_json(json.loads(body))

    def label_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM labels").fetchone()[0])

    def save(
        self,
        snapshot: Mapping[str, Any] | None,
        offsets: Mapping[TopicPartition, int],
        messages: Iterable[OutMessage],
        labels: Sequence[Label] = (),
        owners: Sequence[str | None] | None = None,
        journals: Mapping[str, Journal] | None = None,
    ) -> int:
        """One transaction: the new snapshot, the advanced offsets, the owed messages
        (``owners``: the traces partition each belongs to) and the learned labels;
        returns the sequence number of the last stored label.

        ``journals``: the windows a journaled snapshot left empty, by section
        (:meth:`daemon.core.pipeline.Scorer.journals`). Of a window written
        before, only the rows changed since are written; a new window (a
        restore, a partition taken over) is written whole, once. A snapshot
        without journals replaces every journaled window.
        """
        messages = list(messages)
        tags = list(owners) if owners is not None else [None] * len(messages)
        if len(tags) != len(messages):
            raise ValueError(f"owners: {len(tags)} for {len(messages)} messages")
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            # A label already stored (a redelivered lift) keeps its first sequence number.
            cur.executemany(
                "INSERT OR IGNORE INTO labels (cohort_id, body) VALUES (?, ?)",
                [(lb.cohort_id, json.dumps(lb.to_json(), separators=(",", ":"))) for lb in labels],
            )
            if snapshot is not None:
                body = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
                cur.execute("INSERT OR REPLACE INTO snapshot (id, body) VALUES (0, ?)", (body,))
                self._write_journals(cur, journals or {})
            cur.executemany(
                "INSERT INTO offsets (topic, part, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (topic, part) DO UPDATE SET next_offset = "
                "max(next_offset, excluded.next_offset)",
                [(tp.topic, tp.partition, o) for tp, o in offsets.items()],
            )
            cur.executemany(
                "INSERT INTO outbox (topic, key, value, dest_part, owner) VALUES (?, ?, ?, ?, ?)",
                [
                    (m.topic, m.key, m.value, m.partition, o)
                    for m, o in zip(messages, tags, strict=True)
                ],
            )
            seq = cur.execute("SELECT MAX(seq) FROM labels").fetchone()[0]
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            # What the file holds is unknown to the journals now: write them whole next time.
            self._journaled = {}
            raise
        if snapshot is not None:
            self._journaled = dict(journals or {})
            for j in self._journaled.values():
                j.drained()
        return int(seq or 0)

    def _write_journals(self, cur: sqlite3.Cursor, journals: Mapping[str, Journal]) -> None:
        gone = [(name,) for name in self._journaled if name not in journals]
        if not self._journaled:
            # Rows no window of this process wrote (a previous life's, a restore's).
            cur.execute("DELETE FROM journal")
        cur.executemany("DELETE FROM journal WHERE section = ?", gone)
        deleted: list[tuple[str, str]] = []
        inserted: list[tuple[str, str, str | None]] = []
        updated: list[tuple[str | None, str, str]] = []
        for name, j in journals.items():
            if self._journaled.get(name) is not j or j.overflowed:
                cur.execute("DELETE FROM journal WHERE section = ?", (name,))
                cur.executemany(
                    "INSERT INTO journal (section, key, value) VALUES (?, ?, ?)",
                    [(name, k, stored(v)) for k, v in j.items()],
                )
                continue
            for key, moved in j.changes.items():
                if key not in j:
                    deleted.append((name, key))
                elif moved:
                    # Deleted and inserted again: its row goes to the end of the order.
                    deleted.append((name, key))
                    inserted.append((name, key, stored(j[key])))
                else:
                    updated.append((stored(j[key]), name, key))
        cur.executemany("DELETE FROM journal WHERE section = ? AND key = ?", deleted)
        cur.executemany("INSERT INTO journal (section, key, value) VALUES (?, ?, ?)", inserted)
        cur.executemany("UPDATE journal SET value = ? WHERE section = ? AND key = ?", updated)

    def sent(self, up_to_seq: int) -> None:
        """Forget outbox rows once the producer has flushed them."""
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (up_to_seq,))

    def close(self) -> None:
        self._db.close()
