"""Cohorts by trace partition, and the state a replica hands over when a partition moves.

Traces are keyed by slice key, so every trace of a slice lands in one
partition of the traces topic, and the scorer replica that the consumer group
assigns that partition owns its cohorts. Two pieces make the ownership
explicit and movable:

* :class:`PartitionedCohorts` is the scorer's cohort builder: one
  :class:`~daemon.core.cohorting.CohortBuilder` per source partition (a cohort
  never mixes partitions), each with the next offset read from it (its
  position) and the token of the last state record written for it.
* :class:`PartitionState` is that record: the partition's open and queued
  (closed, not yet scored) cohorts as the *offsets* of their member traces,
  the position, and who wrote it. The scorer writes it to a compacted
  changelog topic, partition for partition (changelog partition ``p``
  describes traces partition ``p``, so its latest record is the last one of
  that partition), after the batch's decisions are on the log and before the
  traces offset is committed. A replica given the partition (a rebalance, a
  replaced pod with an empty disk) reads that one record and re-reads the
  member traces from the traces topic: nothing decided is decided again, and
  nothing held open is lost.

Everything here is a pure transformation of values: scorer snapshots (plain
JSON), records and state records; the service does the reading and writing.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import methodcaller
from typing import Any

from daemon.config import CohortingSettings
from daemon.core.cohorting import Closed, CohortBuilder, Event, TraceFrom, TraceRef, trace_inline
from daemon.core.journal import Journal
from streams.deadletter import Poison, content_digest, decode_record
from streams.schemas import Trace
from streams.transport import Record, TopicPartition

PARTS_SCHEMA = "tapd.partitioned-cohorts/1"
STATE_SCHEMA = "tapd.partition-state/1"


def part_key(tp: TopicPartition) -> str:
    """``tap.traces/3``: Kafka topic names cannot contain ``/``."""
    return f"{tp.topic}/{tp.partition}"


def part_of(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition("/")
    return TopicPartition(topic, int(partition))


@dataclass(frozen=True, slots=True)
class Token:
    """Who wrote a partition's state record: a replica's incarnation (one state
    directory's life) and a counter."""

    incarnation: str
    seq: int

    def to_json(self) -> list[Any]:
        return [self.incarnation, self.seq]

    @classmethod
    def from_json(cls, v: Any) -> Token | None:
        return None if v is None else cls(str(v[0]), int(v[1]))


@dataclass
class Part:
    """One partition's cohorts, where reading resumes, and the last state record.

    ``changed``: something happened to the partition's cohorts since its last
    state record that re-reading its traces from that record's position would
    not redo the same way (a cohort closed, evicted, rejected, scored; a trace
    dead-lettered). Until then, a newer record only moves the position and
    adds members to open cohorts, which a new owner rebuilds by re-reading.
    """

    builder: CohortBuilder
    position: int | None = None
    token: Token | None = None
    changed: bool = True


class PartitionedCohorts(CohortBuilder):
    """A cohort builder per source partition, behind the one builder interface.

    The scorer feeds it one partition at a time (:meth:`feeding`); clock ticks
    and policy versions reach every partition. The inherited state holds only
    the policy versions that every partition shares.

    Every partition's open traces share one ``max_open_bytes``: room is made
    by evicting the oldest open cohort of any partition (its events carry
    their own partition).
    """

    def __init__(self, settings: CohortingSettings, current_policy_version: str) -> None:
        super().__init__(settings, current_policy_version)
        self.parts: dict[TopicPartition, Part] = {}
        # Queued (closed, not yet scored) cohorts: id -> partition, and their
        # members, so that members readmitted to cohorting return to it.
        self.closed: dict[str, TopicPartition] = {}
        self.members: dict[str, list[str]] = {}
        self.current: TopicPartition | None = None
        # The partition whose builder is being fed, and the events of other
        # partitions' cohorts evicted meanwhile to make room for its trace.
        self._fed: TopicPartition | None = None
        self._elsewhere: list[Event] = []

    @property
    def versions(self) -> list[str]:
        """The policy versions every partition shares, oldest first."""
        return list(self._versions)

    # -- routing --------------------------------------------------------------

    @contextmanager
    def feeding(self, tp: TopicPartition) -> Iterator[Part]:
        """Route ``on_item`` to ``tp``'s builder while the block runs."""
        part = self.parts.get(tp)
        if part is None:
            part = self.attach(tp, Part(self._new_builder()))
        self.current = tp
        try:
            yield part
        finally:
            self.current = None

    def _new_builder(self) -> CohortBuilder:
        b = CohortBuilder(self.settings, self.policy_version)
        b.restore(fresh(self._versions, self._now)["cohorts"])
        return b

    def _sync(self, builder: CohortBuilder) -> CohortBuilder:
        # A part kept aside (or rebuilt) while lifts moved the policy on
        # catches up: every partition judges staleness by the same versions.
        builder._versions = list(self._versions)
        builder.room = self._room
        return builder

    def _feed(
        self, tp: TopicPartition, call: Callable[[CohortBuilder], list[Event]]
    ) -> list[Event]:
        """``call`` on ``tp``'s builder: its events, after those of other partitions'
        cohorts evicted to make room meanwhile."""
        self._fed = tp
        try:
            events = self._track(tp, call(self.parts[tp].builder))
        finally:
            self._fed = None
        if self._elsewhere:
            events, self._elsewhere = [*self._elsewhere, *events], []
        return events

    def _oldest(self) -> TopicPartition | None:
        """The partition whose oldest open cohort is the oldest of all (None: none open)."""
        best: tuple[float, TopicPartition] | None = None
        for tp, part in self.parts.items():
            ts = part.builder.oldest_opened()
            if ts is not None and (best is None or ts < best[0]):
                best = (ts, tp)
        return None if best is None else best[1]

    def _room(self, now: float, incoming: int) -> list[Event]:
        """Evict the oldest open cohorts of any partition until ``incoming`` more
        bytes fit in ``max_open_bytes``; the events of the partition being fed
        are returned (its builder reports them), the others' kept for :meth:`_feed`."""
        budget = self.settings.max_open_bytes
        mine: list[Event] = []
        while self.open_bytes + incoming > budget:
            tp = self._oldest()
            if tp is None:
                break
            events = self._track(tp, self.parts[tp].builder.evict_oldest(now, incoming))
            if tp == self._fed:
                mine += events
            else:
                self._elsewhere += events
        return mine

    def _track(self, tp: TopicPartition, events: list[Event]) -> list[Event]:
        if events:
            self.parts[tp].changed = True
        for e in events:
            if isinstance(e, Closed):
                self.closed[e.cohort.cohort_id] = tp
                self.members[e.cohort.cohort_id] = [t.trace_id for t in e.cohort.traces]
        return events

    def on_item(self, trace: Trace, now: float, digest: str | None = None) -> list[Event]:
        if self.current is None:
            raise RuntimeError("on_item outside feeding(tp): a trace needs its partition")
        self._now = now
        return self._feed(self.current, methodcaller("on_item", trace, now, digest))

    def readmit(self, traces: Iterable[Trace], now: float) -> list[Event]:
        """Members of a queued cohort back into cohorting: into their own partition."""
        self._now = now
        home = {tid: self.closed[cid] for cid, ids in self.members.items() for tid in ids}
        by_tp: dict[TopicPartition, list[Trace]] = {}
        for t in traces:
            # Every queued member is tracked; the first partition is a last resort.
            tp = home.get(t.trace_id) or self.current or next(iter(self.parts))
            by_tp.setdefault(tp, []).append(t)
        out: list[Event] = []
        for tp, ts in by_tp.items():
            out += self._feed(tp, methodcaller("readmit", ts, now))
        return out

    def holds(self, trace_id: str) -> bool:
        return any(p.builder.holds(trace_id) for p in self.parts.values())

    def on_tick(self, now: float) -> list[Event]:
        self._now = now
        out: list[Event] = []
        for tp, part in self.parts.items():
            out += self._track(tp, part.builder.on_tick(now))
        # Parts taken on (or a budget lowered) since: brought under the budget.
        out += self._room(now, 0) + self._elsewhere
        self._elsewhere = []
        return out

    def flush_all(self, now: float | None = None) -> list[Event]:
        out: list[Event] = []
        for tp, part in self.parts.items():
            out += self._track(tp, part.builder.flush_all(now))
        return out

    def set_policy_version(self, version: str) -> None:
        super().set_policy_version(version)
        for part in self.parts.values():
            part.builder.set_policy_version(version)

    @property
    def n_open(self) -> int:
        return sum(p.builder.n_open for p in self.parts.values())

    @property
    def n_open_traces(self) -> int:
        return sum(p.builder.n_open_traces for p in self.parts.values())

    @property
    def open_bytes(self) -> int:
        return sum(p.builder.open_bytes for p in self.parts.values())

    # -- ownership --------------------------------------------------------------

    def attach(self, tp: TopicPartition, part: Part) -> Part:
        self._sync(part.builder)
        self.parts[tp] = part
        self._share_dedup()
        return part

    def detach(self, tp: TopicPartition) -> Part | None:
        for cid in [c for c, p in self.closed.items() if p == tp]:
            self.forget(cid)
        part = self.parts.pop(tp, None)
        self._share_dedup()
        return part

    def _share_dedup(self) -> None:
        """Split ``dedup_window`` evenly between the partitions owned: the remembered
        ids of a replica are bounded as a whole (like ``max_open_bytes``), not per
        partition, where a replica owning many partitions would hold many windows."""
        if not self.parts:
            return
        share = math.ceil(self.settings.dedup_window / len(self.parts))
        for p in self.parts.values():
            p.builder.set_dedup_limit(share)

    def partition_of(self, cohort_id: str) -> TopicPartition | None:
        return self.closed.get(cohort_id)

    def forget(self, cohort_id: str) -> None:
        """The cohort was scored: it no longer belongs to its partition's state."""
        tp = self.closed.pop(cohort_id, None)
        self.members.pop(cohort_id, None)
        if tp is not None and tp in self.parts:
            self.parts[tp].changed = True

    # -- state ----------------------------------------------------------------

    def snapshot(
        self, trace_ref: TraceRef = trace_inline, *, journaled: bool = False
    ) -> dict[str, Any]:
        return {
            "schema": PARTS_SCHEMA,
            "versions": list(self._versions),
            "now": self._now,
            "parts": {
                part_key(tp): {
                    "cohorts": p.builder.snapshot(trace_ref, journaled=journaled),
                    "position": p.position,
                    "token": None if p.token is None else p.token.to_json(),
                }
                for tp, p in self.parts.items()
            },
            "closed": {
                cid: [part_key(tp), self.members.get(cid, [])] for cid, tp in self.closed.items()
            },
        }

    def journals(self, path: tuple[str, ...] = ()) -> dict[str, Journal]:
        out: dict[str, Journal] = {}
        for tp, p in self.parts.items():
            out.update(p.builder.journals((*path, "parts", part_key(tp), "cohorts")))
        return out

    def restore(self, snapshot: dict[str, Any], trace_from: TraceFrom | None = None) -> None:
        if snapshot.get("schema") != PARTS_SCHEMA:
            raise ValueError(f"schema: expected {PARTS_SCHEMA!r}, got {snapshot.get('schema')!r}")
        self._versions = [str(v) for v in snapshot["versions"]] or self._versions
        self._now = float(snapshot.get("now", 0.0))
        self.parts = {}
        for key, body in snapshot["parts"].items():
            b = CohortBuilder(self.settings, self.policy_version)
            b.restore(body["cohorts"], trace_from)
            self._sync(b)
            pos = body.get("position")
            self.parts[part_of(key)] = Part(
                b, None if pos is None else int(pos), Token.from_json(body.get("token"))
            )
        self._share_dedup()
        self.closed, self.members = {}, {}
        for cid, v in snapshot.get("closed", {}).items():
            key, ids = (v, []) if isinstance(v, str) else (v[0], v[1])
            self.closed[cid] = part_of(key)
            self.members[cid] = [str(x) for x in ids]


# --- the state record a partition's owner writes ------------------------------------


@dataclass(frozen=True)
class PartitionState:
    """A partition's open and queued cohorts as member offsets, and its position."""

    topic: str
    partition: int
    position: int
    token: Token
    replica: str
    ts: float
    now: float
    open: tuple[Mapping[str, Any], ...] = ()  # slice_key, opened_ts, offsets, reprobe
    pending: tuple[Mapping[str, Any], ...] = ()  # cohort fields + offsets
    missing: int = 0  # members whose offset was unknown (never expected; counted)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def held(self) -> list[int]:
        """Offsets of the traces this partition still holds undecided."""
        out = [int(o) for g in self.open for o in g["offsets"]]
        out += [int(o) for c in self.pending for o in c["offsets"]]
        return sorted(out)

    @property
    def commit_offset(self) -> int:
        """What the group may commit: never past a trace still held undecided."""
        return min([*self.held(), self.position])

    def content(self) -> str:
        """The state without who wrote it when (nor the clock it last saw): equal
        content, no new record."""
        body = {
            k: v for k, v in self.to_json().items() if k not in ("token", "ts", "replica", "now")
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "topic": self.topic,
            "partition": self.partition,
            "position": self.position,
            "token": self.token.to_json(),
            "replica": self.replica,
            "ts": self.ts,
            "now": self.now,
            "open": [dict(g) for g in self.open],
            "pending": [dict(c) for c in self.pending],
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PartitionState:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("schema") != STATE_SCHEMA:
            raise ValueError(f"schema: expected {STATE_SCHEMA!r}")
        token = Token.from_json(d["token"])
        assert token is not None
        return cls(
            topic=str(d["topic"]),
            partition=int(d["partition"]),
            position=int(d["position"]),
            token=token,
            replica=str(d.get("replica", "")),
            ts=float(d.get("ts", 0.0)),
            now=float(d.get("now", 0.0)),
            open=tuple(d.get("open", ())),
            pending=tuple(d.get("pending", ())),
        )


class _Offsets:
    """Offsets in ``tp`` of trace references; one without an offset there is
    counted in ``missing`` (never expected), not kept."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.missing = 0

    def __call__(self, refs: Iterable[Any]) -> list[int]:
        out = []
        for ref in refs:
            o = _offset(ref, self.tp)
            if o is None:
                self.missing += 1
            else:
                out.append(o)
        return out


def _offset(ref: Any, tp: TopicPartition) -> int | None:
    """The offset a snapshot's trace reference names in ``tp`` (``[topic, partition,
    offset, original]``, as the scorer holds every trace it read)."""
    if (
        isinstance(ref, list)
        and len(ref) >= 3
        and ref[0] == tp.topic
        and int(ref[1]) == tp.partition
    ):
        return int(ref[2])
    return None


def _closed_key(v: Any) -> str:
    return v if isinstance(v, str) else str(v[0])


def describe(
    scorer_snapshot: Mapping[str, Any],
    tp: TopicPartition,
    position: int,
    token: Token,
    replica: str,
    ts: float,
) -> PartitionState:
    """``tp``'s state record, from a scorer snapshot (as :meth:`Scorer.snapshot` gives it)."""
    parts = scorer_snapshot["cohorts"]
    key = part_key(tp)
    cohorts = parts["parts"][key]["cohorts"]
    offsets = _Offsets(tp)

    open_groups = tuple(
        {
            "slice_key": g["slice_key"],
            "opened_ts": g["opened_ts"],
            "offsets": offsets(g["traces"]),
            "reprobe": list(g["reprobe"]),
        }
        for g in cohorts["open"]
    )
    pending = _pending(scorer_snapshot, tp, offsets)
    return PartitionState(
        tp.topic,
        tp.partition,
        position,
        token,
        replica,
        ts,
        float(cohorts.get("now", 0.0)),
        open_groups,
        pending,
        offsets.missing,
    )


def _pending(
    scorer_snapshot: Mapping[str, Any],
    tp: TopicPartition,
    offsets: Callable[[Iterable[Any]], list[int]],
) -> tuple[dict[str, Any], ...]:
    """``tp``'s queued cohorts in a state record: their fields and member offsets."""
    key = part_key(tp)
    mine = {
        cid
        for cid, v in scorer_snapshot["cohorts"].get("closed", {}).items()
        if _closed_key(v) == key
    }
    return tuple(
        {
            **{k: v for k, v in c.items() if k != "traces"},
            "offsets": offsets(c["traces"]),
        }
        for c in scorer_snapshot.get("pending", ())
        if c["cohort_id"] in mine
    )


def _json(v: Any, sort_keys: bool = False) -> str:
    return json.dumps(v, separators=(",", ":"), allow_nan=False, sort_keys=sort_keys)


def _object(fields: Mapping[str, str]) -> str:
    """A JSON object from its fields' encoded values, keys sorted (as ``sort_keys``)."""
    return "{" + ",".join(f"{_json(k)}:{fields[k]}" for k in sorted(fields)) + "}"


@dataclass(frozen=True)
class StateRecord:
    """A partition's state record as its owner writes it: the :class:`PartitionState`
    that :func:`describe` gives, with its open cohorts already encoded, one
    fragment per cohort, each encoded once while the cohort stays unchanged
    (:func:`record`). ``content()`` is the text :meth:`PartitionState.content`
    gives for the same state; ``encode()`` decodes to that state."""

    topic: str
    partition: int
    position: int
    token: Token
    replica: str
    ts: float
    now: float
    open_fragments: tuple[str, ...]
    pending: tuple[Mapping[str, Any], ...]
    lowest_open: int | None  # the lowest offset an open cohort holds
    missing: int = 0

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def commit_offset(self) -> int:
        """What the group may commit: never past a trace still held undecided."""
        held = [int(o) for c in self.pending for o in c["offsets"]]
        if self.lowest_open is not None:
            held.append(self.lowest_open)
        return min([*held, self.position])

    @functools.cached_property
    def _fields(self) -> dict[str, str]:
        # Encoded once for both content() and encode(): the open cohorts are most of it.
        return {
            "schema": _json(STATE_SCHEMA),
            "topic": _json(self.topic),
            "partition": _json(self.partition),
            "position": _json(self.position),
            "open": "[" + ",".join(self.open_fragments) + "]",
            "pending": _json([dict(c) for c in self.pending], sort_keys=True),
        }

    @functools.cached_property
    def _content(self) -> str:
        return _object(self._fields)

    def content(self) -> str:
        return self._content

    def encode(self) -> bytes:
        fields = {
            **self._fields,
            "token": _json(self.token.to_json()),
            "replica": _json(self.replica),
            "ts": _json(self.ts),
            "now": _json(self.now),
        }
        return _object(fields).encode()


def record(
    cohorts: PartitionedCohorts,
    scorer_snapshot: Mapping[str, Any],
    trace_ref: TraceRef,
    tp: TopicPartition,
    position: int,
    token: Token,
    replica: str,
    ts: float,
) -> StateRecord:
    """``tp``'s state record (what :func:`describe` gives), its open cohorts read
    from the builder, not the snapshot (a journaled snapshot leaves them out):
    each cohort's fragment is kept in its ``memo`` until it changes, so that the
    work per batch follows the cohorts that changed. ``trace_ref``: how the
    snapshot holds a trace (the offset comes from it); ``scorer_snapshot``
    gives the queued cohorts."""
    offsets = _Offsets(tp)

    builder = cohorts.parts[tp].builder
    groups = list(builder.open_cohorts())
    # Comprehensions, not a loop: this runs over every open cohort per batch.
    for g in [g for g in groups if g.memo is None or g.memo[0] != tp]:
        before = offsets.missing
        held = offsets([trace_ref(t) for t in g.traces])
        body = {
            "slice_key": g.slice_key,
            "opened_ts": g.opened_ts,
            "offsets": held,
            "reprobe": sorted(g.reprobe),
        }
        g.memo = (
            tp,
            _json(body, sort_keys=True),
            min(held, default=None),
            offsets.missing - before,
        )
    memos = [g.memo for g in groups]
    lowest = min([m[2] for m in memos if m[2] is not None], default=None)
    fragments = tuple([m[1] for m in memos])
    before = offsets.missing
    pending = _pending(scorer_snapshot, tp, offsets)
    # A cohort's own count comes from its memo: unchanged cohorts were not read again.
    missing = sum([m[3] for m in memos]) + offsets.missing - before
    return StateRecord(
        tp.topic,
        tp.partition,
        position,
        token,
        replica,
        ts,
        builder._now,
        fragments,
        pending,
        lowest,
        missing,
    )


@dataclass
class Detached:
    """A partition's share of a scorer snapshot: its builder part and queued cohorts."""

    part: dict[str, Any]
    pending: list[dict[str, Any]] = field(default_factory=list)
    closed: dict[str, Any] = field(default_factory=dict)  # cohort id -> [key, member ids]


def split(snapshot: dict[str, Any], tp: TopicPartition) -> tuple[dict[str, Any], Detached | None]:
    """``snapshot`` without ``tp``'s state, and that state (``None`` if it held none)."""
    key = part_key(tp)
    parts = snapshot["cohorts"]
    if key not in parts["parts"]:
        return snapshot, None
    closed_all = parts.get("closed", {})
    closed = {c: v for c, v in closed_all.items() if _closed_key(v) == key}
    out = {
        **snapshot,
        "cohorts": {
            **parts,
            "parts": {k: v for k, v in parts["parts"].items() if k != key},
            "closed": {c: v for c, v in closed_all.items() if c not in closed},
        },
        "pending": [c for c in snapshot.get("pending", ()) if c["cohort_id"] not in closed],
    }
    taken = Detached(
        part=parts["parts"][key],
        pending=[c for c in snapshot.get("pending", ()) if c["cohort_id"] in closed],
        closed=closed,
    )
    return out, taken


def join(snapshot: dict[str, Any], tp: TopicPartition, taken: Detached) -> dict[str, Any]:
    """``snapshot`` with ``tp``'s state put back (replacing any it had)."""
    base, _ = split(snapshot, tp)
    parts = base["cohorts"]
    return {
        **base,
        "cohorts": {
            **parts,
            "parts": {**parts["parts"], part_key(tp): taken.part},
            "closed": {**parts.get("closed", {}), **taken.closed},
        },
        "pending": [*base.get("pending", ()), *taken.pending],
    }


def rebuild(
    state: PartitionState,
    records: Sequence[Record],
    versions: Sequence[str],
    dedup_window: int,
) -> tuple[Detached, list[int]]:
    """``state``'s partition rebuilt from the traces topic: its open and queued cohorts
    (member traces re-read by offset, held as their original bytes) and the
    duplicate filter (the traces decided before ``state.position``, newest
    ``dedup_window`` of them, with the digests that tell a redelivery from a
    reused id).

    ``records`` are the partition's records from at least the oldest held
    offset up to ``state.position``. Returns the partition's share of a scorer
    snapshot and the held offsets that were not found (lost: never expected).
    """
    tp = state.tp
    by_offset = {r.offset: r for r in records if r.tp == tp}
    decoded: dict[int, Trace] = {}

    def trace_at(o: int) -> Trace | None:
        if o not in decoded:
            rec = by_offset.get(o)
            got = None if rec is None else decode_record(rec, Trace, "decode", 0.0)
            if got is None or isinstance(got, Poison):
                return None
            decoded[o] = got
        return decoded[o]

    missing = [o for o in state.held() if trace_at(o) is None]

    def ref(o: int) -> list[Any]:
        return [tp.topic, tp.partition, o, by_offset[o].value.decode("utf-8")]

    def present(offsets: Iterable[Any]) -> list[int]:
        return [int(o) for o in offsets if int(o) in decoded]

    # The filter holds every trace read before the position except the
    # members of open cohorts (the builder knows those as open): a queued
    # cohort's members were decided into it at its close, like the others.
    open_offsets = {int(o) for g in state.open for o in g["offsets"]}
    open_ids = {decoded[o].trace_id for o in open_offsets if o in decoded}
    decided: dict[str, str] = {}
    for o in sorted(by_offset):
        if o >= state.position or o in open_offsets:
            continue
        t = trace_at(o)
        if t is None or t.trace_id in open_ids:
            continue  # dead-lettered at decode: never in the filter
        decided.pop(t.trace_id, None)  # newest last, at its latest position
        decided[t.trace_id] = content_digest(by_offset[o].value)
    kept = list(decided.items())[-dedup_window:] if dedup_window > 0 else []
    builder = {
        "schema": "tapd.cohorting/1",
        "versions": list(versions),
        "now": state.now,
        "open": [
            {
                "slice_key": g["slice_key"],
                "opened_ts": g["opened_ts"],
                "traces": [ref(o) for o in present(g["offsets"])],
                "digests": [content_digest(by_offset[o].value) for o in present(g["offsets"])],
                "reprobe": list(g.get("reprobe", ())),
            }
            for g in state.open
            if present(g["offsets"])
        ],
        "decided": dict(kept),
    }
    pending = []
    closed: dict[str, Any] = {}
    key = part_key(tp)
    for c in state.pending:
        members = present(c["offsets"])
        if not members:
            continue
        body = {k: v for k, v in c.items() if k != "offsets"}
        body["traces"] = [ref(o) for o in members]
        pending.append(body)
        closed[str(c["cohort_id"])] = [key, [decoded[o].trace_id for o in members]]
    part = {"cohorts": builder, "position": state.position, "token": state.token.to_json()}
    return Detached(part, pending, closed), missing


def fresh(versions: Sequence[str], now: float = 0.0) -> dict[str, Any]:
    """A partition part with no history (no state record anywhere)."""
    return {
        "cohorts": {
            "schema": "tapd.cohorting/1",
            "versions": list(versions),
            "now": now,
            "open": [],
            "decided": {},
        },
        "position": None,
        "token": None,
    }


def migrate(snapshot: dict[str, Any], positions: Mapping[TopicPartition, int]) -> dict[str, Any]:
    """A scorer snapshot from before partitioned cohorts (one builder for every
    partition, origins beside it), split by where each member was read;
    ``positions``: the stored next offsets of the traces partitions."""
    cohorts = snapshot["cohorts"]
    if cohorts.get("schema") == PARTS_SCHEMA:
        return snapshot
    origins = snapshot.get("origins", {})

    def tp_of(refs: Iterable[Any]) -> TopicPartition | None:
        for ref in refs:
            if isinstance(ref, list) and len(ref) >= 3:
                return TopicPartition(str(ref[0]), int(ref[1]))
            o = origins.get(str(ref.get("trace_id"))) if isinstance(ref, dict) else None
            if o is not None:
                return TopicPartition(str(o[0]), int(o[1]))
        return None

    def trace_id(ref: Any) -> str:
        if isinstance(ref, dict):
            return str(ref.get("trace_id"))
        return str(json.loads(ref[3]).get("trace_id"))

    versions, now = cohorts["versions"], cohorts.get("now", 0.0)
    parts: dict[TopicPartition, dict[str, Any]] = {
        tp: fresh(versions, now) | {"position": pos} for tp, pos in positions.items()
    }
    for g in cohorts["open"]:
        tp = tp_of(g["traces"])
        if tp is not None:
            parts.setdefault(tp, fresh(versions, now))["cohorts"]["open"].append(g)
    for part in parts.values():
        part["cohorts"]["decided"] = cohorts.get("decided", {})
    closed = {}
    for c in snapshot.get("pending", ()):
        tp = tp_of(c["traces"])
        if tp is not None:
            closed[str(c["cohort_id"])] = [part_key(tp), [trace_id(r) for r in c["traces"]]]
    return {
        **snapshot,
        "cohorts": {
            "schema": PARTS_SCHEMA,
            "versions": list(versions),
            "now": now,
            "parts": {part_key(tp): p for tp, p in parts.items()},
            "closed": closed,
        },
    }
