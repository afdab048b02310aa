"""One transport interface, two implementations (Kafka, embedded SQLite log).

The contract, shared by both and checked by the same tests:

* ``Producer.send`` queues a record; ``Producer.flush`` returns only once every
  queued record is durable (Kafka: acknowledged by all in-sync replicas;
  embedded: committed to the SQLite file). Nothing is durable before flush.
* ``Consumer.poll`` returns records after the group's committed position
  (or after the last polled record, within one consumer's life).
* ``Consumer.commit`` stores *next offsets to read* per partition. A consumer
  commits only after the effects of the records it read are durable, so a
  crash between processing and commit redelivers (at-least-once); idempotency
  keys (trace id, cohort id) make the redelivery harmless.
* ``pause``/``resume`` stop and restart fetching without leaving the group.
* A group with no committed offset starts at the beginning of each partition
  (``from_beginning=True``, the default: no trace is skipped) or at its end.
* ``on_revoked`` is called with the partitions a rebalance takes away, before
  they go: the owner commits what it has finished there (Kafka only; the
  embedded log has one member per group and never rebalances).
* ``on_assigned`` is called, inside ``poll``, with the partitions a consumer
  is given (the embedded log: every partition, on the first poll), before any
  of their records is returned; ``seek`` there sets where each one resumes
  (Kafka's pattern for state kept outside the group's offsets).
* ``Producer.send(..., partition=p)`` writes to partition ``p`` explicitly
  (a changelog aligned with the partitions of the topic it describes);
  ``Transport.read`` reads one partition's range outside any group, and
  ``Transport.end_offsets`` / ``partitions`` describe a topic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A record owed to the log: to be sent, flushed and only then forgotten."""

    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None  # explicit destination; None: by key


@runtime_checkable
class Producer(Protocol):
    def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None: ...

    def flush(self, timeout_s: float | None = None) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Consumer(Protocol):
    def poll(self, timeout_s: float, max_records: int) -> list[Record]: ...

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        """Commit the group's next offsets. ``wait=False``: the commit may
        complete after the call returns (no broker round trip waited for), and
        a failure is logged, not raised; for callers that keep the offsets
        elsewhere, to whom a lost commit only means re-reading a little."""
        ...

    def committed(self, tp: TopicPartition) -> int | None: ...

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next (an assigned partition only)."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def paused(self) -> bool: ...

    def lag(self) -> dict[TopicPartition, int]: ...

    def close(self) -> None: ...


RevokeHook = Callable[[list[TopicPartition]], None]
AssignHook = Callable[[list[TopicPartition]], None]


@runtime_checkable
class Transport(Protocol):
    """Factory for producers and group consumers over one log."""

    def producer(self) -> Producer: ...

    def consumer(
        self,
        topics: Sequence[str],
        group: str,
        *,
        from_beginning: bool = True,
        on_revoked: RevokeHook | None = None,
        on_assigned: AssignHook | None = None,
    ) -> Consumer: ...

    def partitions(self, topic: str) -> int:
        """The topic's partition count (where the log auto-creates topics, this creates it)."""
        ...

    def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to be written, per partition."""
        ...

    def read(self, tp: TopicPartition, start: int, end: int) -> list[Record]:
        """The records of ``tp`` with ``start <= offset < end``, outside any group
        (offsets that compaction removed are simply absent)."""
        ...

    def ping(self) -> bool:
        """True when the log is reachable (readiness)."""
        ...

    def close(self) -> None: ...


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """The offsets to commit after ``records`` are done: last offset + 1 per partition."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        nxt = r.offset + 1
        if out.get(r.tp, -1) < nxt:
            out[r.tp] = nxt
    return out
