"""Cohorting: traces -> cohorts, as a pure, snapshot-able stateful operator.

The builder has the shape of a Bytewax stateful operator: it is driven by
items (``on_item``) and clock ticks (``on_tick``), returns events as data
instead of raising or doing I/O, and its whole state round-trips through
``snapshot()`` / ``restore()`` as plain JSON, so the scorer can persist it
next to its committed offsets.

Every trace handed to ``on_item`` meets exactly one fate, reported by exactly
one of: membership of a ``Closed`` cohort, a ``Rejected`` event (for the
dead-letter topic, with the field and reason), a ``Duplicate`` event (a copy
of a trace already seen, with the same content), or a ``Conflict`` event (the
same trace id with different content: the caller dead-letters this copy with
both contents' digests; the first copy keeps its place). ``Stale`` events are
notices on top of that (for metrics): a re-probed stale trace still ends in a
cohort, a dropped one also gets its ``Rejected``. A trace handed back with
``readmit`` (its cohort lost members and fell under ``min_groups``) is open
again and meets its fate the same way.

Slice key
    ``CohortingSettings.slice_key`` names trace fields (``subject``,
    ``verifier``, ``tenant``, ...) or tags (``tags.<name>``). A missing tag
    counts as the empty string rather than a rejection: production traffic is
    often only partly tagged, and untagged traces still form a (coarser)
    slice of their own instead of being lost. A slice key longer than a
    dispatch can carry (``MAX_SLICE_KEY_CHARS``) is refused per trace.

Deduplication guarantee
    A trace id is reported ``Duplicate`` if its first copy is still in an
    open cohort (remembered exactly) or was closed or rejected within the
    last ``dedup_window`` decided ids (a bounded FIFO). Older redeliveries are
    beyond this operator; exactly-once across restarts is the scorer's job
    (it persists this snapshot with its offsets), and a replayed cohort keeps
    its deterministic id, so a replayed dispatch is recognisable downstream.

Policy versions
    The builder keeps the last ``max_policy_lag + 1`` versions it was told
    about (``set_policy_version``). A trace whose version is among them is
    fresh; any other (older, or unknown to this replica) is stale and is
    re-probed or dropped per ``stale_policy``. At close, members that have
    become stale since they arrived are listed in ``Cohort.reprobe_ids`` too.

Dispatch bound
    A cohort is bounded by construction to what one dispatch message can
    carry: the builder adds up each member's dispatch item size
    (:func:`streams.schemas.dispatch_item_bytes`, exact) and closes a cohort
    (cause ``"size"``) before a trace would take it over the budget; that
    trace opens the next cohort of its slice. A trace whose item alone is
    over the budget is rejected.

Memory bound
    At most ``max_open`` open cohorts of at most ``max_groups`` traces each,
    holding at most ``max_open_bytes`` (:func:`held_bytes`, an estimate of
    what an open trace takes in a scorer's memory), plus ``dedup_window``
    remembered ids (all partitions together in the scorer: each owned
    partition remembers its share). Opening a cohort beyond ``max_open``, or admitting a
    trace that takes the open traces over ``max_open_bytes``, evicts the
    oldest open cohort (again, until under): it closes early (cause
    ``"evicted"``) if it has ``min_groups`` traces, else its traces are
    rejected with a reason; nothing is dropped silently. A trace alone over
    ``max_open_bytes`` is rejected.

Journaled state
    A journaled snapshot (the scorer's, written with every poll batch) leaves
    the open cohorts out as well as the decided ids: each open cohort is a
    row of :meth:`CohortBuilder.journals`, rewritten when it changes, so that
    a batch's write costs what the batch changed, not what is open.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.config import CohortingSettings
from daemon.core.journal import Journal, Journaled, Window, section
from streams.schemas import (
    DISPATCH_ENVELOPE_BYTES,
    MAX_MESSAGE_BYTES,
    SchemaError,
    Trace,
    decode,
    dispatch_item_bytes,
)

SNAPSHOT_SCHEMA = "tapd.cohorting/1"
STAGE = "cohorting"
# The dispatch schema's slice_key limit.
MAX_SLICE_KEY_CHARS = 1024

CloseCause = Literal["size", "age", "evicted", "flush"]
StaleAction = Literal["reprobe", "drop"]

_TRACE_FIELDS = frozenset(
    {"subject", "tenant", "source", "verifier", "policy_version", "reference", "prompt"}
)


@dataclass(frozen=True)
class Cohort:
    cohort_id: str
    slice_key: str
    subject: str
    traces: tuple[Trace, ...]
    opened_ts: float
    closed_ts: float
    cause: CloseCause
    # Members whose attempts came from a stale policy: the rollout engine
    # re-samples them from the current one before features are computed.
    reprobe_ids: frozenset[str] = frozenset()
    policy_version: str = ""

    @property
    def n_groups(self) -> int:
        return len(self.traces)


@dataclass(frozen=True)
class Closed:
    cohort: Cohort
    cause: CloseCause


@dataclass(frozen=True)
class Rejected:
    trace: Trace
    stage: str
    field: str
    reason: str


@dataclass(frozen=True)
class Duplicate:
    trace_id: str


@dataclass(frozen=True)
class Conflict:
    """A trace id seen before with different content (``digest`` vs ``first_digest``)."""

    trace: Trace
    first_digest: str
    digest: str

    @property
    def reason(self) -> str:
        return (
            f"conflicting duplicate: trace id {self.trace.trace_id!r} was first accepted "
            f"with content {self.first_digest}; this copy is {self.digest}. The first "
            "copy is kept; this one is not used"
        )


@dataclass(frozen=True)
class Stale:
    trace: Trace
    action: StaleAction


Event = Closed | Rejected | Duplicate | Conflict | Stale


def cohort_id(slice_key: str, trace_ids: Iterable[str]) -> str:
    """Deterministic id of a cohort: the same members and slice give the same id.

    Sorted and de-duplicated, so arrival order and redelivery do not matter;
    JSON-encoded, so no choice of separator can make two member lists collide.
    """
    payload = json.dumps([slice_key, sorted(set(trace_ids))], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def validate_slice_key(fields: Iterable[str]) -> tuple[str, ...]:
    """The slice-key field names, or ``ValueError`` naming the one that is not usable."""
    out = tuple(fields)
    if not out:
        raise ValueError("cohorting.slice_key: must name at least one field")
    if len(set(out)) != len(out):
        raise ValueError(f"cohorting.slice_key: a field is named twice in {list(out)}")
    for name in out:
        if name.startswith("tags."):
            if not name[5:]:
                raise ValueError(f"cohorting.slice_key: {name!r} names no tag")
        elif name not in _TRACE_FIELDS:
            raise ValueError(
                f"cohorting.slice_key: unknown field {name!r} "
                f"(use one of {sorted(_TRACE_FIELDS)} or tags.<name>)"
            )
    return out


def slice_values(trace: Trace, fields: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(
        trace.tags.get(name[5:], "") if name.startswith("tags.") else str(getattr(trace, name))
        for name in fields
    )


@functools.lru_cache(maxsize=16_384)
def format_slice_key(fields: tuple[str, ...], values: tuple[str, ...]) -> str:
    """The slice key as a string: a compact JSON object, readable and unambiguous.

    Remembered: every trace of a slice formats the same key (the scorer checks
    each trace's record key against it). As many as the open cohorts a
    partition holds by default (``max_open``), so that a stream of that many
    slices does not format one per trace; a few MiB at most.
    """
    return json.dumps(
        dict(zip(fields, values, strict=True)), separators=(",", ":"), ensure_ascii=False
    )


def slice_key_of(trace: Trace, fields: tuple[str, ...]) -> str:
    return format_slice_key(fields, slice_values(trace, fields))


# What :func:`held_bytes` counts, calibrated on measured allocations (a decoded
# trace and its original message, tests/core/test_cohorting.py): the trace's
# fixed part, each attempt's, and each token value (a float in a list, and its
# text in the original).
HELD_TRACE_BYTES = 1_500
HELD_ATTEMPT_BYTES = 800
HELD_TOKEN_VALUE_BYTES = 32
# And what the features' per-trace part (daemon.core.features.prepare, made
# when the trace is cohorted) adds: its fixed part (the object and six small
# arrays); the prompt twice (normalised, masked) and its distinct n-grams'
# 8-byte codes, of which a natural text has about one per character over its
# first few hundred and one per four beyond; per attempt its reward,
# advantage and token count, its mean entropy and its five token statistics
# (float64); each log-prob again as a float64.
HELD_PREPARED_BYTES = 1_350
HELD_PREPARED_GRAM_BYTES = 8
HELD_PREPARED_GRAMS_DENSE = 500
HELD_PREPARED_GROUP_BYTES = 24
HELD_PREPARED_ATTEMPT_BYTES = 8
HELD_PREPARED_ROW_BYTES = 40
HELD_PREPARED_VALUE_BYTES = 8


def held_bytes(trace: Trace, item_bytes: int | None = None) -> int:
    """An estimate of the memory an open trace holds in a scorer: its decoded
    form, its original message and its prepared features part, from its sizes
    alone (cheap, and the same on every replica and after a restore, so the
    open-state budget evicts the same cohorts wherever it runs).
    ``item_bytes``: its dispatch item size, if known (the prompt, reference
    and verifier arguments)."""
    n = HELD_TRACE_BYTES + (dispatch_item_bytes(trace) if item_bytes is None else item_bytes)
    chars = len(trace.prompt)
    dense = min(chars, HELD_PREPARED_GRAMS_DENSE)
    grams = dense + (chars - dense) // 4
    n += HELD_PREPARED_BYTES + 2 * chars + HELD_PREPARED_GRAM_BYTES * grams
    for a in trace.attempts:
        n += HELD_ATTEMPT_BYTES + HELD_PREPARED_GROUP_BYTES + len(a.completion)
        if a.token_logprobs or a.stats is not None:
            n += HELD_PREPARED_ROW_BYTES
        if a.token_logprobs:
            n += (HELD_TOKEN_VALUE_BYTES + HELD_PREPARED_VALUE_BYTES) * len(a.token_logprobs)
        if a.token_entropies:
            n += HELD_PREPARED_ATTEMPT_BYTES + HELD_TOKEN_VALUE_BYTES * len(a.token_entropies)
    return n


def partition_key(raw: bytes, fields: tuple[str, ...]) -> bytes | None:
    """The key a producer of traces sends ``raw`` with: its slice key, so that
    every trace of a slice, and every resent copy of a trace, lands in the one
    partition whose scorer replica cohorts and deduplicates it. A message that
    is not a trace has no slice key (``None``: unkeyed; it is dead-lettered
    wherever it lands)."""
    try:
        return slice_key_of(decode(raw, Trace), fields).encode()
    except SchemaError:
        return None


@dataclass(eq=False)
class _Open:
    slice_key: str
    opened_ts: float
    traces: list[Trace] = field(default_factory=list)
    reprobe: set[str] = field(default_factory=set)
    item_bytes: int = 0  # the members' dispatch items, encoded
    held_bytes: int = 0  # the members' held_bytes
    # What a caller derives from this cohort (the scorer's state record
    # fragment): reset to None whenever the cohort changes, so that work per
    # poll batch follows the cohorts that changed, not the ones open.
    memo: Any = None


class _Row:
    """An open cohort as its journaled row: rendered when the store writes it."""

    __slots__ = ("builder", "group")

    def __init__(self, builder: CohortBuilder, group: _Open) -> None:
        self.builder = builder
        self.group = group

    def stored(self) -> str:
        return self.builder._row_text(self.group)


# How a snapshot holds a trace, and how a restore gets it back (None: the
# caller could not restore it and has accounted for it).
TraceRef = Callable[[Trace], Any]
TraceFrom = Callable[[Any], "Trace | None"]


def trace_inline(trace: Trace) -> Any:
    """The default :data:`TraceRef`: the trace itself, as JSON (no log to refer to)."""
    return trace.model_dump(mode="json", by_alias=True)


class CohortBuilder:
    """Groups traces into capability-slice cohorts; see the module docstring."""

    @property
    def slice_fields(self) -> tuple[str, ...]:
        """The trace fields (``tags.<name>`` for a tag) that make the slice key."""
        return self._fields

    def __init__(
        self,
        settings: CohortingSettings,
        current_policy_version: str,
        max_dispatch_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.settings = settings
        self._fields = validate_slice_key(settings.slice_key)
        # What the items of one dispatch may add up to.
        self.item_budget = max_dispatch_bytes - DISPATCH_ENVELOPE_BYTES
        # Keyed by the slice values (the JSON string is only built once per
        # cohort). Insertion order is opening order: the front is the oldest
        # cohort, which is both the next to age out and the one evicted first.
        self._open: OrderedDict[tuple[str, ...], _Open] = OrderedDict()
        # Trace id -> content digest (None: not given), for open traces
        # (exact) and decided ones (a bounded FIFO).
        self._open_ids: dict[str, str | None] = {}
        self._decided = Window()
        # How many decided ids this builder remembers: the whole dedup_window,
        # or its share when a caller splits the window between several
        # builders (the scorer's partitions; see set_dedup_limit).
        self.dedup_limit = settings.dedup_window
        # The open cohorts as journaled rows, by slice key, in opening order;
        # rendered with the trace_ref of the journaled snapshot they complete.
        self._rows: Journaled[str, _Row] = Journaled()
        self._row_ref: TraceRef = trace_inline
        self._open_bytes = 0
        # Who makes room under max_open_bytes for ``incoming`` bytes: this
        # builder over its own cohorts (None), or a caller holding several
        # builders that share the budget (the scorer's partitions).
        self.room: Callable[[float, int], list[Event]] | None = None
        self._versions: list[str] = [current_policy_version]
        self._now = 0.0

    # -- policy versions ---------------------------------------------------

    @property
    def policy_version(self) -> str:
        return self._versions[-1]

    def set_policy_version(self, version: str) -> None:
        if version == self._versions[-1]:
            return
        if version in self._versions:  # a rollback makes an older version current again
            self._versions.remove(version)
        self._versions.append(version)
        del self._versions[: -(self.settings.max_policy_lag + 1)]

    def is_stale(self, trace: Trace) -> bool:
        return trace.policy_version not in self._versions

    # -- the operator ------------------------------------------------------

    @property
    def n_open(self) -> int:
        return len(self._open)

    @property
    def n_open_traces(self) -> int:
        return len(self._open_ids)

    @property
    def open_bytes(self) -> int:
        """What the open traces hold (:func:`held_bytes`), the budget's measure."""
        return self._open_bytes

    def open_cohorts(self) -> Iterable[_Open]:
        """The open cohorts, oldest first (read only; ``memo`` is the caller's)."""
        return self._open.values()

    def oldest_opened(self) -> float | None:
        """When the oldest open cohort opened (None: none open)."""
        for group in self._open.values():
            return group.opened_ts
        return None

    def holds(self, trace_id: str) -> bool:
        """True while the trace is in an open cohort."""
        return trace_id in self._open_ids

    def on_item(self, trace: Trace, now: float, digest: str | None = None) -> list[Event]:
        """Add one trace; ``digest`` (of its message bytes) tells a redelivered copy
        (same digest: ``Duplicate``) from a different trace reusing an id (``Conflict``)."""
        self._now = now
        tid = trace.trace_id
        if tid in self._open_ids or tid in self._decided:
            first = self._open_ids[tid] if tid in self._open_ids else self._decided[tid]
            if digest is not None and first is not None and digest != first:
                return [Conflict(trace, first, digest)]
            return [Duplicate(tid)]
        events: list[Event] = []
        reprobe = False
        if self.is_stale(trace):
            action: StaleAction = self.settings.stale_policy
            events.append(Stale(trace, action))
            if action == "drop":
                events.append(
                    self._reject(
                        trace,
                        "policy_version",
                        f"stale: {trace.policy_version!r} is more than "
                        f"{self.settings.max_policy_lag} version(s) behind the current "
                        f"{self.policy_version!r}",
                    )
                )
                return events
            reprobe = True
        events.extend(self._admit(trace, now, digest, reprobe))
        return events

    def readmit(self, traces: Iterable[Trace], now: float) -> list[Event]:
        """Open again traces whose cohort was closed but could not be used as a whole.

        When some members of a closed cohort are rejected (a verifier, a
        feature) and fewer than ``min_groups`` remain, the rest are innocent:
        they go back into an open cohort of their slice, as if the rejected
        ones had never arrived, instead of sharing their fate.
        """
        self._now = now
        events: list[Event] = []
        for t in traces:
            if t.trace_id in self._open_ids:
                continue
            digest = self._decided.pop(t.trace_id, None)
            events.extend(self._admit(t, now, digest, reprobe=False))
        return events

    def _admit(self, trace: Trace, now: float, digest: str | None, reprobe: bool) -> list[Event]:
        tid = trace.trace_id
        size = dispatch_item_bytes(trace)
        if size > self.item_budget:
            self._decide_id(tid, digest)
            return [
                Rejected(
                    trace,
                    STAGE,
                    _largest_part(trace),
                    f"its dispatch item is {size} bytes: over the {self.item_budget} bytes "
                    "of items one dispatch message can carry",
                )
            ]
        held = held_bytes(trace, size)
        budget = self.settings.max_open_bytes
        if held > budget:
            self._decide_id(tid, digest)
            return [
                Rejected(
                    trace,
                    STAGE,
                    "attempts",
                    f"it would hold about {held} bytes open: over the {budget} bytes of "
                    "cohorting.max_open_bytes that every open trace shares",
                )
            ]
        events: list[Event] = []
        key = slice_values(trace, self._fields)
        group = self._open.get(key)
        if group is None:
            slice_key = format_slice_key(self._fields, key)
            if len(slice_key) > MAX_SLICE_KEY_CHARS:
                self._decide_id(tid, digest)
                return [
                    Rejected(
                        trace,
                        STAGE,
                        "tags",
                        f"its slice key is {len(slice_key)} characters: over the "
                        f"{MAX_SLICE_KEY_CHARS} a dispatch carries",
                    )
                ]
        elif group.item_bytes + size > self.item_budget:
            # Split by construction: this trace would take the cohort's
            # dispatch over the message limit, so the cohort closes first.
            events.extend(self._close_or_reject(key, now, "size"))
            group = None
        # Room for this trace first, oldest cohorts out (its own too, if it is
        # the oldest: the trace then opens the next one).
        events.extend(self.make_room(now, held) if self.room is None else self.room(now, held))
        group = self._open.get(key)
        if group is None:
            if len(self._open) >= self.settings.max_open:
                events.extend(self._close_or_reject(next(iter(self._open)), now, "evicted"))
            group = self._open[key] = _Open(format_slice_key(self._fields, key), now)
            self._rows[group.slice_key] = _Row(self, group)
        group.traces.append(trace)
        group.item_bytes += size
        group.held_bytes += held
        self._open_bytes += held
        self._open_ids[tid] = digest
        if reprobe:
            group.reprobe.add(tid)
        if len(group.traces) >= self.settings.max_groups:
            events.append(self._close(key, now, "size"))
        else:
            self._touch(group)
        return events

    def make_room(self, now: float, incoming: int = 0) -> list[Event]:
        """Evict the oldest open cohorts until ``incoming`` more bytes fit in
        ``max_open_bytes`` (0: until the open traces are within it)."""
        budget = self.settings.max_open_bytes
        events: list[Event] = []
        while self._open and self._open_bytes + incoming > budget:
            events.extend(self.evict_oldest(now, incoming))
        return events

    def on_tick(self, now: float) -> list[Event]:
        """Close (or reject, if too small) every cohort at least ``max_age_s`` old."""
        self._now = now
        events: list[Event] = []
        while self._open:
            key, group = next(iter(self._open.items()))
            if now - group.opened_ts < self.settings.max_age_s:
                break
            events.extend(self._close_or_reject(key, now, "age"))
        if self.room is None:
            # A restored state over a budget lowered since is brought under here.
            events.extend(self.make_room(now))
        return events

    def flush_all(self, now: float | None = None) -> list[Event]:
        """Close every open cohort (those under ``min_groups`` are rejected)."""
        now = self._now if now is None else now
        events: list[Event] = []
        for key in list(self._open):
            events.extend(self._close_or_reject(key, now, "flush"))
        return events

    def on_eof(self) -> list[Event]:
        return self.flush_all()

    # -- state -------------------------------------------------------------

    def snapshot(
        self, trace_ref: TraceRef = trace_inline, *, journaled: bool = False
    ) -> dict[str, Any]:
        """The state as plain JSON; ``trace_ref`` says how to hold each open trace
        (default: its fields; the scorer holds its original message instead).

        ``journaled``: the open cohorts and the decided ids are left empty; the
        state store writes them from :meth:`journals` (the rows that changed,
        the open cohorts' held as ``trace_ref`` says), not whole per batch.
        """
        if journaled:
            self._row_ref = trace_ref
        return {
            "schema": SNAPSHOT_SCHEMA,
            "versions": list(self._versions),
            "now": self._now,
            "open": []
            if journaled
            else [self._group_json(g, trace_ref) for g in self._open.values()],
            "decided": {} if journaled else dict(self._decided),
        }

    def _group_json(self, g: _Open, trace_ref: TraceRef) -> dict[str, Any]:
        return {
            "slice_key": g.slice_key,
            "opened_ts": g.opened_ts,
            "traces": [trace_ref(t) for t in g.traces],
            "digests": [self._open_ids.get(t.trace_id) for t in g.traces],
            "reprobe": sorted(g.reprobe),
        }

    def _row_text(self, g: _Open) -> str:
        return json.dumps(
            self._group_json(g, self._row_ref), separators=(",", ":"), allow_nan=False
        )

    def journals(self, path: tuple[str, ...] = ()) -> dict[str, Journal]:
        """The windows a journaled snapshot leaves empty, by their place in it (under ``path``)."""
        return {
            section((*path, "open"), as_values=True): self._rows,
            section((*path, "decided")): self._decided,
        }

    def restore(self, snapshot: dict[str, Any], trace_from: TraceFrom | None = None) -> None:
        """Replace the state with a snapshot's; ``ValueError`` if it is not one.

        ``trace_from`` turns what ``snapshot(trace_ref)`` held back into a
        trace; a ``None`` from it leaves that trace out (the caller has
        dead-lettered it)."""
        if snapshot.get("schema") != SNAPSHOT_SCHEMA:
            raise ValueError(
                f"schema: expected {SNAPSHOT_SCHEMA!r}, got {snapshot.get('schema')!r}"
            )
        versions = [str(v) for v in snapshot["versions"]]
        if not versions:
            raise ValueError("versions: a snapshot records at least the current version")
        restore_one = trace_from or Trace.model_validate
        opened: OrderedDict[tuple[str, ...], _Open] = OrderedDict()
        rows: Journaled[str, _Row] = Journaled()
        open_ids: dict[str, str | None] = {}
        for g in snapshot["open"]:
            digests = list(g.get("digests") or [None] * len(g["traces"]))
            group = _Open(str(g["slice_key"]), float(g["opened_ts"]))
            for ref, digest in zip(g["traces"], digests, strict=True):
                t = restore_one(ref)
                if t is None:
                    continue
                size = dispatch_item_bytes(t)
                group.traces.append(t)
                group.item_bytes += size
                group.held_bytes += held_bytes(t, size)
                open_ids[t.trace_id] = None if digest is None else str(digest)
            group.reprobe = {str(x) for x in g["reprobe"]} & {t.trace_id for t in group.traces}
            if group.traces:
                opened[tuple(json.loads(group.slice_key).values())] = group
                rows[group.slice_key] = _Row(self, group)
        decided = snapshot["decided"]
        self._versions = versions
        self._now = float(snapshot["now"])
        self._open = opened
        self._rows = rows
        self._open_bytes = sum(g.held_bytes for g in opened.values())
        self._open_ids = open_ids
        self._decided = Window(
            ((str(k), None if v is None else str(v)) for k, v in decided.items())
            if isinstance(decided, dict)
            else ((str(x), None) for x in decided)  # before digests were kept
        )

    # -- internals ---------------------------------------------------------

    def _remember(self, trace_id: str) -> None:
        self._decide_id(trace_id, self._open_ids.pop(trace_id, None))

    def set_dedup_limit(self, limit: int) -> None:
        """Remember at most ``limit`` decided ids from now on (the oldest go at once)."""
        self.dedup_limit = max(0, limit)
        while len(self._decided) > self.dedup_limit:
            self._decided.popitem(last=False)

    def _decide_id(self, trace_id: str, digest: str | None) -> None:
        window = self.dedup_limit
        if window <= 0:
            return
        self._decided[trace_id] = digest
        while len(self._decided) > window:
            self._decided.popitem(last=False)

    def _reject(self, trace: Trace, field_name: str, reason: str) -> Rejected:
        self._remember(trace.trace_id)
        return Rejected(trace, STAGE, field_name, reason)

    def evict_oldest(self, now: float, incoming: int = 0) -> list[Event]:
        """Close (or reject, if too small) the oldest open cohort to make room under
        ``max_open_bytes`` (for ``incoming`` more bytes)."""
        key = next(iter(self._open))
        why = (
            f"evicted to keep the open traces within cohorting.max_open_bytes "
            f"({self.settings.max_open_bytes} bytes"
            + (f", {incoming} more arriving)" if incoming else ")")
        )
        return self._close_or_reject(key, now, "evicted", why)

    def _touch(self, group: _Open) -> None:
        """The cohort changed: its row is rewritten, its caller's memo dropped."""
        group.memo = None
        self._rows[group.slice_key] = self._rows[group.slice_key]

    def _pop(self, key: tuple[str, ...]) -> _Open:
        group = self._open.pop(key)
        del self._rows[group.slice_key]
        self._open_bytes -= group.held_bytes
        return group

    def _close_or_reject(
        self, key: tuple[str, ...], now: float, cause: CloseCause, why: str | None = None
    ) -> list[Event]:
        group = self._open[key]
        if len(group.traces) >= self.settings.min_groups:
            return [self._close(key, now, cause)]
        self._pop(key)
        what = why or {
            "age": "closed by age",
            "evicted": "evicted",
            "flush": "flushed",
            "size": "closed because the next trace would overflow one dispatch",
        }.get(cause, cause)
        reason = (
            f"{what} before reaching min_groups: the cohort had {len(group.traces)} of "
            f"{self.settings.min_groups} prompt groups"
        )
        return [self._reject(t, "slice_key", reason) for t in group.traces]

    def _close(self, key: tuple[str, ...], now: float, cause: CloseCause) -> Closed:
        group = self._pop(key)
        traces = tuple(group.traces)
        for t in traces:
            self._remember(t.trace_id)
        # Members that went stale while the cohort was open are re-probed too.
        reprobe = frozenset(group.reprobe | {t.trace_id for t in traces if self.is_stale(t)})
        subjects = Counter(t.subject for t in traces)
        subject = min(subjects, key=lambda s: (-subjects[s], s))
        cohort = Cohort(
            cohort_id=cohort_id(group.slice_key, (t.trace_id for t in traces)),
            slice_key=group.slice_key,
            subject=subject,
            traces=traces,
            opened_ts=group.opened_ts,
            closed_ts=now,
            cause=cause,
            reprobe_ids=reprobe,
            policy_version=self.policy_version,
        )
        return Closed(cohort, cause)


def _largest_part(trace: Trace) -> str:
    """The field that makes most of a trace's dispatch item (for a size rejection)."""
    parts = {
        "prompt": len(trace.prompt),
        "reference": len(trace.reference),
        "verifier_args": len(json.dumps(trace.verifier_args, ensure_ascii=False)),
    }
    return max(parts, key=lambda k: parts[k])
