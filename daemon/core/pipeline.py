"""The scoring pipeline as values in, effects out: no I/O, no clock, no threads.

traces -> cohorts -> (rollouts) -> features -> predictor -> decision -> dispatch
lift   -> learn (once per cohort id) -> online quality

The :class:`Scorer` is fed records (bytes as read from the log) and the
clock's ``now``; each call returns :class:`Effects`: the dispatches, dead
letters, decision records and labels to put on the log, and the typed
events (:mod:`daemon.core.events`) that the shell logs and counts. The service shell
persists them in its outbox together with :meth:`Scorer.snapshot` and the
consumed offsets, so the whole of the scorer's memory survives a crash.

Work is split so that the poll loop stays responsive:

* ``on_traces`` and ``on_tick`` are cheap: decode, cohort, queue closed cohorts.
* ``step(now, max_cohorts)`` does the slow part (rollouts, features, predict)
  for a bounded number of queued cohorts, decides them as one window and
  dispatches the chosen ones; it scores nothing while ``max_in_flight``
  cohorts await their lift.
* ``accepting_traces`` is the backpressure signal: false while the in-flight
  cap is reached or closed cohorts pile up, so the shell pauses trace
  consumption (it keeps reading the lift topic, which is what frees slots).

No input stops the pipeline. Every record is decoded by the one
poison-message mechanism (:func:`streams.deadletter.decode_record`); after
decoding, every failure is isolated to the smallest unit it belongs to and
turned into dead letters: a trace a verifier or a feature refuses goes alone
(its cohort goes on, and if it falls under ``min_groups`` the innocent rest
is readmitted to cohorting), a cohort whose dispatch cannot be built is
refused before any slot is taken, and an exception nobody foresaw becomes a
dead letter of stage ``internal`` for what it touched. Dead letters after
decoding carry the trace's original bytes, kept with its origin (topic,
partition, offset) from the moment it was read until its fate is decided,
in the snapshot too.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from daemon.config import TapdSettings, Thresholds, Topics
from daemon.core import events as ev
from daemon.core.cohorting import (
    Closed,
    Cohort,
    CohortBuilder,
    Conflict,
    Duplicate,
    Rejected,
    Stale,
    slice_key_of,
)
from daemon.core.decision import ScoredCohort
from daemon.core.features import FEATURE_SCHEMA, FeatureError, prepare_many
from daemon.core.journal import HELD, Journal, Journaled, Window, held_key, section
from daemon.core.tenants import tenant_counts, tenant_of_record
from streams.deadletter import (
    INTERNAL,
    Poison,
    content_digest,
    dead_letter_key,
    decode_or_dead_letter,
    decode_record,
    original,
)
from streams.deadletter import dead_letter as build_dead_letter
from streams.rejection import Rejection
from streams.schemas import (
    DISPATCH_SCHEMA,
    DeadLetter,
    Dispatch,
    DispatchItem,
    LiftResult,
    Trace,
    encode,
)
from streams.transport import OutMessage, Record

SNAPSHOT_SCHEMA = "tapd.scorer/1"
DECISION_SCHEMA = "tapd.decision/1"
LABEL_SCHEMA = "tapd.label/1"
# Lift cohort ids remembered to make learning idempotent. A redelivery older
# than this many labels would be learned twice; the lift topic's retention
# and the commit cadence keep redeliveries far younger than that.
LEARNED_WINDOW = 200_000


# --- collaborators (implemented in daemon.core.predictor / decision / rollout) ----


class PredictionLike(Protocol):
    lift: float
    uncertainty: float
    stage: str
    model_version: str


class PredictorLike(Protocol):
    def predict(self, features: Mapping[str, float]) -> Any: ...

    def learn(
        self, features: Mapping[str, float], realized_lift: float, selection: str = ...
    ) -> None: ...


# (window of scored cohorts, thresholds, in-flight count, rng) -> a decision
# each (daemon.core.decision.decide).
Decide = Callable[[Sequence[ScoredCohort], Thresholds, int, random.Random], Sequence[Any]]


class FillResultLike(Protocol):
    @property
    def traces(self) -> Sequence[Trace]: ...

    @property
    def rejected(self) -> Sequence[Rejected]: ...


# (cohort, seed) -> its traces topped up to K attempts, and the ones rejected
# (daemon.policy.rollout.fill_attempts with the current policy).
FillFn = Callable[[Cohort, int], FillResultLike]
FeaturizeFn = Callable[[Sequence[Trace]], Mapping[str, float]]


# --- effects -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    cohort_id: str
    ts: float
    slice_key: str
    subject: str
    n_groups: int
    features: Mapping[str, float]
    predicted_lift: float
    uncertainty: float
    stage: str
    model_version: str
    recommendation: str
    reason: str
    selection: str | None
    dispatched: bool
    shadow: bool
    # Members, so that an audit can account for every trace from the topics alone.
    trace_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__}
        out["trace_ids"] = list(self.trace_ids)
        return {"schema": DECISION_SCHEMA, **out}


@dataclass(frozen=True, slots=True)
class Label:
    """One realized lift learned by the predictor (compacted by cohort id)."""

    cohort_id: str
    ts: float
    features: Mapping[str, float]
    feature_schema: str
    realized_lift: float
    predicted_lift: float
    selection: str
    model_version: str

    def to_json(self) -> dict[str, Any]:
        return {"schema": LABEL_SCHEMA, **{k: getattr(self, k) for k in self.__slots__}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Label:
        if d.get("schema") != LABEL_SCHEMA:
            raise ValueError(f"schema: expected {LABEL_SCHEMA!r}, got {d.get('schema')!r}")
        return cls(
            cohort_id=str(d["cohort_id"]),
            ts=float(d["ts"]),
            features={str(k): float(v) for k, v in d["features"].items()},
            feature_schema=str(d["feature_schema"]),
            realized_lift=float(d["realized_lift"]),
            predicted_lift=float(d["predicted_lift"]),
            selection=str(d["selection"]),
            model_version=str(d["model_version"]),
        )


@dataclass
class Effects:
    dispatches: list[Dispatch] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    events: list[ev.Event] = field(default_factory=list)

    def __iadd__(self, other: Effects) -> Effects:
        self.dispatches += other.dispatches
        self.dead_letters += other.dead_letters
        self.decisions += other.decisions
        self.labels += other.labels
        self.events += other.events
        return self

    def __bool__(self) -> bool:
        return bool(self.dispatches or self.dead_letters or self.decisions or self.labels)

    def messages(self, topics: Topics) -> list[OutMessage]:
        """The records to produce, keyed by their idempotency key."""
        out = [OutMessage(topics.dlq, dead_letter_key(d), encode(d)) for d in self.dead_letters]
        out += [
            OutMessage(topics.decisions, d.cohort_id.encode(), _json(d.to_json()))
            for d in self.decisions
        ]
        out += [
            OutMessage(topics.dispatch, d.cohort_id.encode(), encode(d)) for d in self.dispatches
        ]
        out += [
            OutMessage(topics.labels, lb.cohort_id.encode(), _json(lb.to_json()))
            for lb in self.labels
        ]
        return out


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def dead_letter(record: Record, stage: str, field_name: str, reason: str, now: float) -> DeadLetter:
    """The dead letter for a record (streams.deadletter builds every one tapd sends)."""
    return build_dead_letter(
        record.value,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        stage=stage,
        field=field_name,
        reason=reason,
        ts=now,
    )


# --- bookkeeping ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scored:
    cohort: Cohort
    traces: tuple[Trace, ...]
    features: dict[str, float]
    prediction: Any


@dataclass(frozen=True, slots=True)
class InFlight:
    cohort_id: str
    selection: str
    predicted_lift: float
    dispatched_ts: float


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a trace was read and its original bytes, until its fate is decided:
    a later rejection cites them, and the snapshot holds the trace as them."""

    topic: str
    partition: int
    offset: int
    raw: bytes
    # False only for a trace restored from a snapshot written before originals
    # were kept: ``raw`` is then its re-encoding.
    exact: bool = True

    def ref(self) -> list[Any]:
        # A decoded trace was valid UTF-8: the text round-trips to the same bytes.
        return [self.topic, self.partition, self.offset, self.raw.decode("utf-8")]

    def stored(self) -> str:
        """The original as text, as its journaled row holds it."""
        return self.raw.decode("utf-8")

    def where(self) -> list[Any]:
        """:meth:`ref` without the text: a journaled snapshot's reference (the
        text is a row of its own, written once: :data:`HELD`)."""
        return [self.topic, self.partition, self.offset]


def _cohort_json(c: Cohort, ref: Callable[[Trace], Any]) -> dict[str, Any]:
    return {
        "cohort_id": c.cohort_id,
        "slice_key": c.slice_key,
        "subject": c.subject,
        "traces": [ref(t) for t in c.traces],
        "opened_ts": c.opened_ts,
        "closed_ts": c.closed_ts,
        "cause": c.cause,
        "reprobe_ids": sorted(c.reprobe_ids),
        "policy_version": c.policy_version,
    }


def _cohort_from(d: Mapping[str, Any], restore: Callable[[Any], Trace | None]) -> Cohort | None:
    traces = tuple(t for t in (restore(x) for x in d["traces"]) if t is not None)
    if not traces:
        return None
    return Cohort(
        cohort_id=str(d["cohort_id"]),
        slice_key=str(d["slice_key"]),
        subject=str(d["subject"]),
        traces=traces,
        opened_ts=float(d["opened_ts"]),
        closed_ts=float(d["closed_ts"]),
        cause=d["cause"],
        reprobe_ids=frozenset(d.get("reprobe_ids", ())),
        policy_version=str(d.get("policy_version", "")),
    )


def dispatch_for(
    cohort: Cohort,
    traces: Sequence[Trace],
    features: Mapping[str, float],
    prediction: Any,
    recommendation: str,
    selection: str,
    now: float,
) -> Dispatch:
    return Dispatch.model_validate(
        {
            "schema": DISPATCH_SCHEMA,
            "cohort_id": cohort.cohort_id,
            "slice_key": cohort.slice_key,
            "subject": cohort.subject,
            "ts": now,
            "policy_version": cohort.policy_version or cohort.traces[0].policy_version,
            "model_version": str(prediction.model_version),
            "feature_schema": FEATURE_SCHEMA,
            "features": dict(features),
            "predicted_lift": float(prediction.lift),
            "uncertainty": max(0.0, float(prediction.uncertainty)),
            "selection": selection,
            "recommendation": recommendation,
            "items": [
                DispatchItem(
                    trace_id=t.trace_id,
                    prompt=t.prompt,
                    reference=t.reference,
                    verifier=t.verifier,
                    verifier_args=t.verifier_args,
                ).model_dump(mode="json")
                for t in traces
            ],
        }
    )


# --- the pipeline -----------------------------------------------------------------


class Scorer:
    """The stateful pipeline core; see the module docstring."""

    def __init__(
        self,
        settings: TapdSettings,
        cohorts: CohortBuilder,
        predictor: PredictorLike,
        decide: Decide,
        fill: FillFn,
        featurize: FeaturizeFn,
        thresholds: Callable[[], Thresholds],
        timer: Callable[[], float] | None = None,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.cohorts = cohorts
        self.predictor = predictor
        self.decide = decide
        self.fill = fill
        self.featurize = featurize
        self.thresholds = thresholds
        # A monotonic clock for stage timings, injected by the shell (None: untimed).
        self.timer = timer
        self._events: list[ev.Event] = []
        self.rng = random.Random(seed)
        self.seed = seed
        # Closed cohorts waiting for the slow scoring step.
        self.pending: deque[Cohort] = deque()
        self.in_flight: OrderedDict[str, InFlight] = OrderedDict()
        self.learned = Window()
        # Trace id -> where it was read and its bytes, until its fate is decided.
        self._origins: dict[str, _Origin] = {}
        # The originals of the held traces (open or queued, fate undecided) as
        # journaled rows, by where they were read: a journaled snapshot refers
        # to them, and the store writes each once, not with every batch.
        self._held: Journaled[str, _Origin] = Journaled()
        self._json_cache: dict[str, dict[str, Any]] = {}
        self._where_cache: dict[str, dict[str, Any]] = {}
        # Traces a restore could not bring back: dead-lettered at the next call.
        self._unrestored: list[tuple[Record, str, str, str]] = []

    # --- backpressure ----------------------------------------------------------

    @property
    def max_in_flight(self) -> int:
        return self.thresholds().max_in_flight

    def accepting_traces(self) -> bool:
        """False while the trainer is the bottleneck: the shell pauses trace consumption."""
        if len(self.in_flight) >= self.max_in_flight:
            return False
        return len(self.pending) <= self.max_in_flight

    @property
    def has_work(self) -> bool:
        return bool(self.pending) and self._slots() > 0

    def _slots(self) -> int:
        return self.max_in_flight - len(self.in_flight)

    # --- traces ----------------------------------------------------------------

    def on_traces(self, records: Sequence[Record], now: float) -> Effects:
        """Decode and cohort a batch of trace records (cheap)."""
        fx = self._restored_letters(now)
        # Decoded first, so that the batch's tenants are reported (and so
        # given their metric labels) in the order they were read.
        decoded: list[tuple[Record, Trace | Poison, str]] = []
        misrouted = 0
        fields = self.cohorts.slice_fields
        # Timed per batch, not per record: a clock read, an event and a
        # histogram observation per trace cost more than the cohorting itself.
        with self._timed("decode", bool(records)):
            for rec in records:
                got = decode_record(rec, Trace, "decode", now)
                if isinstance(got, Poison):
                    tenant = tenant_of_record(rec.value)
                else:
                    tenant = got.tenant
                    # The producer contract: keyed by slice key, so that every copy
                    # of a trace meets the one partition (and replica) that
                    # deduplicates it. A trace keyed otherwise is still cohorted; it
                    # is counted, because a resent copy of it may be counted twice.
                    key = rec.key
                    if key is None or key.decode(errors="replace") != slice_key_of(got, fields):
                        misrouted += 1
                decoded.append((rec, got, tenant))
        if records:
            self._emit(
                ev.TracesConsumed(len(records), tenant_counts(t for _, _, t in decoded), misrouted)
            )
        held: list[Trace] = []
        with self._timed("cohorting", bool(records)):
            for rec, trace, tenant in decoded:
                if isinstance(trace, Poison):
                    self._poison(trace, rec, fx, tenant)
                    continue
                try:
                    events = self.cohorts.on_item(trace, now, content_digest(rec.value))
                except Exception as e:  # a bug must not turn this record into a crash loop
                    self._poison(self._internal(rec, "cohorting", e, now), rec, fx, trace.tenant)
                    continue
                if not any(
                    isinstance(e, Duplicate | Conflict)
                    and (e.trace_id if isinstance(e, Duplicate) else e.trace.trace_id)
                    == trace.trace_id
                    for e in events
                ):
                    # Remembered until the trace's fate is decided (scored or rejected).
                    self._hold(
                        trace.trace_id, _Origin(rec.topic, rec.partition, rec.offset, rec.value)
                    )
                    held.append(trace)
                fx += self._cohort_events(events, now, rec)
            # The held traces' own share of their features, now rather than
            # when their cohorts close (what is left then is the cohort-wide
            # part), in one pass over the batch. Only a cache: if it fails,
            # featurize computes it again and dead-letters a trace that cannot
            # be featurized alone, with the reason (_features).
            with contextlib.suppress(Exception):
                prepare_many(held)
        return self._done(fx)

    def _poison(self, poison: Poison, rec: Record, fx: Effects, tenant: str | None) -> None:
        """Dead-letter an undecodable record (``tenant``: its tenant; None if not a trace)."""
        fx.dead_letters.append(poison.letter)
        self._emit(
            ev.TraceRejected(
                poison.stage, poison.field, poison.reason, offset=rec.offset, tenant=tenant
            )
        )

    @staticmethod
    def _internal(rec: Record, stage: str, e: BaseException, now: float) -> Poison:
        return Poison(dead_letter(rec, INTERNAL, "$", f"{stage} failed unexpectedly: {e!r}", now))

    def on_tick(self, now: float) -> Effects:
        fx = self._restored_letters(now)
        fx += self.expire_in_flight(now)
        fx += self._cohort_events(self.cohorts.on_tick(now), now, None)
        return self._done(fx)

    def flush(self, now: float) -> Effects:
        """Close every open cohort (end of a finite stream: replay, demo)."""
        return self._done(self._cohort_events(self.cohorts.flush_all(now), now, None))

    def _cohort_events(self, events: Sequence[Any], now: float, rec: Record | None) -> Effects:
        fx = Effects()
        for e in events:
            if isinstance(e, Closed):
                self.pending.append(e.cohort)
                self._emit(ev.CohortClosed(e.cohort.cohort_id, e.cause, e.cohort.n_groups))
            elif isinstance(e, Rejected):
                fx.dead_letters.append(self._reject_trace(e, now))
            elif isinstance(e, Conflict) and rec is not None:
                # This copy's own bytes, not the first copy's (which keeps its place).
                fx.dead_letters.append(dead_letter(rec, "cohorting", "trace_id", e.reason, now))
                self._emit(
                    ev.TraceRejected(
                        "cohorting",
                        "trace_id",
                        e.reason,
                        trace_id=e.trace.trace_id,
                        tenant=e.trace.tenant,
                    )
                )
            elif isinstance(e, Duplicate):
                self._emit(ev.TraceDuplicate(e.trace_id))
            elif isinstance(e, Stale):
                self._emit(ev.TraceStale(e.trace.trace_id, e.action, e.trace.policy_version))
        return fx

    def _reject_trace(self, rej: Rejected, now: float) -> DeadLetter:
        """The dead letter of a trace rejected after decoding: its original bytes.

        Its fate is decided, so its origin is forgotten."""
        origin = self._release(rej.trace.trace_id)
        self._emit(
            ev.TraceRejected(
                rej.stage,
                rej.field,
                rej.reason,
                trace_id=rej.trace.trace_id,
                tenant=rej.trace.tenant,
            )
        )
        if origin is not None:
            src = Record(origin.topic, origin.partition, origin.offset, None, origin.raw, 0)
            reason = rej.reason if origin.exact else f"{rej.reason} [original re-encoded]"
            return dead_letter(src, rej.stage, rej.field, reason, now)
        # Only a trace restored from a snapshot of an older version has no
        # original: its re-encoding stands in, and the reason says so.
        reason = f"{rej.reason} [original bytes unavailable: re-encoded]"
        try:
            raw = encode(rej.trace)
        except Exception:  # a re-encoding over the size limit: keep what identifies it
            raw = json.dumps({"trace_id": rej.trace.trace_id}).encode()
        src = Record(self.settings.topics.traces, -1, -1, None, raw, 0)
        return dead_letter(src, rej.stage, rej.field, reason, now)

    # --- scoring (slow) --------------------------------------------------------

    def step(self, now: float, max_cohorts: int = 1) -> Effects:
        """Score up to ``max_cohorts`` queued cohorts as one decision window.

        Nothing is scored while every in-flight slot is taken: a cohort's
        chance to be dispatched is decided when it is scored, so it waits
        (queued, in the snapshot) until a lift result frees a slot.
        """
        fx = self._restored_letters(now)
        # A window never holds more cohorts than free slots: a "train" cohort
        # must not lose its chance because its window was full.
        n = max(0, min(max_cohorts, len(self.pending), self._slots()))
        window = [self.pending.popleft() for _ in range(n)]
        scored: list[_Scored] = []
        try:
            for cohort in window:
                item = self._featurize(cohort, now, fx)
                if item is not None:
                    scored.append(item)
            if scored:
                fx += self._decide(scored, now)
        finally:
            # Origins are forgotten as fates are decided (dead letter or
            # decision); a readmitted trace keeps its own.
            for cohort in window:
                self._json_cache.pop(cohort.cohort_id, None)
                self._where_cache.pop(cohort.cohort_id, None)
        return self._done(fx)

    def _reject_all(
        self, traces: Sequence[Trace], stage: str, field_name: str, reason: str, now: float
    ) -> list[DeadLetter]:
        return [self._reject_trace(Rejected(t, stage, field_name, reason), now) for t in traces]

    def _featurize(self, cohort: Cohort, now: float, fx: Effects) -> _Scored | None:
        """Rollouts, features and prediction; ``None`` (and dead letters) if it cannot be.

        A failure is pinned on the traces that cause it whenever it can be:
        they are dead-lettered alone and the rest of the cohort goes on.
        """
        with self._timed("rollout"):
            traces = self._fill(cohort, now, fx)
        with self._timed("features"):
            got = self._features(cohort, traces, now, fx)
        if got is None:
            return None
        traces, features = got
        try:
            with self._timed("predict"):
                prediction = self.predictor.predict(features)
        except Exception as e:
            stage = "predict" if isinstance(e, ValueError) else INTERNAL
            fx.dead_letters += self._reject_all(traces, stage, "features", repr(e), now)
            self._emit(ev.CohortRejected(cohort.cohort_id, stage, repr(e)))
            return None
        return _Scored(cohort, tuple(traces), features, prediction)

    def _fill(self, cohort: Cohort, now: float, fx: Effects) -> list[Trace]:
        """The cohort's traces topped up to K attempts; rejected ones dead-lettered."""
        seed = self._cohort_seed(cohort)
        try:
            parts = [self.fill(cohort, seed)]
        except Exception:
            # Which trace broke the rollouts? Each alone (slow, but only
            # after a failure nobody foresaw): the others go on.
            parts = []
            for t in cohort.traces:
                one = replace(cohort, traces=(t,), reprobe_ids=cohort.reprobe_ids & {t.trace_id})
                try:
                    parts.append(self.fill(one, seed))
                except Exception as e:
                    reason = f"rollout failed unexpectedly: {e!r}"
                    fx.dead_letters += self._reject_all([t], INTERNAL, "$", reason, now)
        traces: list[Trace] = []
        for part in parts:
            for rej in part.rejected:
                fx.dead_letters.append(self._reject_trace(rej, now))
            traces += part.traces
        return traces

    def _features(
        self, cohort: Cohort, traces: list[Trace], now: float, fx: Effects
    ) -> tuple[list[Trace], dict[str, float]] | None:
        if not self._enough(cohort, traces, now, fx):
            return None
        try:
            return traces, {k: float(v) for k, v in self.featurize(traces).items()}
        except Exception as first:
            error: Exception = first
        # Find the traces that break the features alone (a non-finite value,
        # an exception): each is dead-lettered by itself, the rest go on.
        kept: list[Trace] = []
        for t in traces:
            try:
                self.featurize([t])
            except Exception as e:
                stage = "features" if isinstance(e, Rejection) else INTERNAL
                field_name = str(getattr(e, "field", "$"))
                reason = str(getattr(e, "reason", repr(e)))
                fx.dead_letters += self._reject_all([t], stage, field_name, reason, now)
                continue
            kept.append(t)
        if len(kept) < len(traces):
            if not self._enough(cohort, kept, now, fx):
                return None
            try:
                return kept, {k: float(v) for k, v in self.featurize(kept).items()}
            except Exception as e:
                error = e
        # Only the traces together fail: the cohort as a whole is refused.
        stage = "features" if isinstance(error, Rejection) else INTERNAL
        reason = str(getattr(error, "reason", repr(error)))
        fx.dead_letters += self._reject_all(kept, stage, "cohort", reason, now)
        self._emit(ev.CohortRejected(cohort.cohort_id, stage, reason))
        return None

    def _enough(self, cohort: Cohort, traces: list[Trace], now: float, fx: Effects) -> bool:
        """Whether ``traces`` are still a cohort; if not, they go back to cohorting.

        The members lost were rejected for themselves: the others are
        innocent, and are readmitted as if those had never arrived.
        """
        need = self.settings.cohorting.min_groups
        if len(traces) >= need:
            return True
        reason = (
            f"{len(traces)} of {cohort.n_groups} prompt groups left after rejections, "
            f"under min_groups={need}: the rest are readmitted"
        )
        self._emit(ev.CohortRejected(cohort.cohort_id, "features", reason))
        if traces:
            originals = {t.trace_id: t for t in cohort.traces}
            # As they arrived (rollouts are redone when the new cohort closes).
            fx += self._cohort_events(
                self.cohorts.readmit([originals[t.trace_id] for t in traces], now), now, None
            )
        return False

    def _decide(self, scored: Sequence[_Scored], now: float) -> Effects:
        fx = Effects()
        th = self.thresholds()
        try:
            with self._timed("decision"):
                decisions = list(
                    self.decide(
                        [
                            ScoredCohort(s.cohort.cohort_id, s.features, s.prediction)
                            for s in scored
                        ],
                        th,
                        len(self.in_flight),
                        self.rng,
                    )
                )
            if len(decisions) != len(scored):
                raise ValueError(f"{len(decisions)} decisions for {len(scored)} cohorts")
        except Exception as e:
            for s in scored:
                reason = f"decision failed unexpectedly: {e!r}"
                fx.dead_letters += self._reject_all(s.traces, INTERNAL, "$", reason, now)
                self._emit(ev.CohortRejected(s.cohort.cohort_id, INTERNAL, reason))
            return fx
        for s, d in zip(scored, decisions, strict=True):
            try:
                fx += self._record(s, d, th, now)
            except Exception as e:
                reason = f"recording the decision failed unexpectedly: {e!r}"
                fx.dead_letters += self._reject_all(s.traces, INTERNAL, "$", reason, now)
                self._emit(ev.CohortRejected(s.cohort.cohort_id, INTERNAL, reason))
        return fx

    def _record(self, s: _Scored, d: Any, th: Thresholds, now: float) -> Effects:
        """The decision record of one cohort and, if chosen, its dispatch."""
        fx = Effects()
        dispatch: Dispatch | None = None
        if d.dispatch and d.selection is not None:
            # Built and size-checked before anything is recorded: a dispatch
            # that cannot be sent is refused here, holding no slot (the cohort
            # builder bounds cohorts so that this does not happen).
            try:
                dispatch = dispatch_for(
                    s.cohort,
                    s.traces,
                    s.features,
                    s.prediction,
                    d.recommendation,
                    d.selection,
                    now,
                )
                encode(dispatch)
            except Exception as e:
                field_name = str(getattr(e, "field", "$"))
                reason = f"the cohort's dispatch cannot be sent: {getattr(e, 'reason', e)}"
                fx.dead_letters += self._reject_all(s.traces, "dispatch", field_name, reason, now)
                self._emit(ev.CohortRejected(s.cohort.cohort_id, "dispatch", reason))
                return fx
        lift, spread = float(s.prediction.lift), float(s.prediction.uncertainty)
        if not (math.isfinite(lift) and math.isfinite(spread)):
            # The decision record must go out as JSON: refuse it here, not at send time.
            raise ValueError(f"prediction is not finite (lift {lift}, uncertainty {spread})")
        record = DecisionRecord(
            cohort_id=s.cohort.cohort_id,
            ts=now,
            slice_key=s.cohort.slice_key,
            subject=s.cohort.subject,
            n_groups=len(s.traces),
            features=s.features,
            predicted_lift=lift,
            uncertainty=spread,
            stage=str(s.prediction.stage),
            model_version=str(s.prediction.model_version),
            recommendation=d.recommendation,
            reason=d.reason,
            selection=d.selection,
            dispatched=dispatch is not None,
            shadow=th.shadow_mode,
            trace_ids=tuple(t.trace_id for t in s.traces),
        )
        fx.decisions.append(record)
        for t in s.traces:  # decided: their originals are no longer needed
            self._release(t.trace_id)
        self._emit(
            ev.CohortScored(
                cohort_id=record.cohort_id,
                model_version=record.model_version,
                predicted_lift=record.predicted_lift,
                uncertainty=record.uncertainty,
                recommendation=d.recommendation,
                selection=d.selection,
                dispatched=record.dispatched,
                reason=d.reason,
            )
        )
        if dispatch is not None and d.selection is not None:
            fx.dispatches.append(dispatch)
            self.in_flight[dispatch.cohort_id] = InFlight(
                dispatch.cohort_id, d.selection, dispatch.predicted_lift, now
            )
            self._emit(
                ev.Dispatched(
                    dispatch.cohort_id, d.selection, tenant_counts(t.tenant for t in s.traces)
                )
            )
        return fx

    def _cohort_seed(self, cohort: Cohort) -> int:
        # Rollouts of a replayed cohort sample the same attempts.
        return (int(cohort.cohort_id[:8], 16) ^ self.seed) & 0x7FFFFFFF

    # --- lift ------------------------------------------------------------------

    def on_lift(self, records: Sequence[Record], now: float) -> Effects:
        """Learn each lift result once (by cohort id) and free its in-flight slot.

        Records from the dead-letter topic are read too: a dispatch that the
        trainer rejected will never have a lift, so its slot is freed here.
        """
        fx = Effects()
        for rec in records:
            if rec.topic == self.settings.topics.dlq:
                # Never dead-letter a dead letter: at worst the lease frees the slot.
                with contextlib.suppress(Exception):
                    self._release_rejected(rec)
                continue
            with self._timed("lift"):
                lift = decode_record(rec, LiftResult, "lift", now)
                if isinstance(lift, Poison):
                    self._poison(lift, rec, fx, None)
                    continue
                try:
                    fx += self._learn(lift, now)
                except Exception as e:
                    # A label the predictor cannot use (a feature missing or
                    # not finite) is kept, not learned, and the slot freed.
                    stage = "lift" if isinstance(e, ValueError) else INTERNAL
                    field_name = str(getattr(e, "field", "features" if stage == "lift" else "$"))
                    reason = str(getattr(e, "reason", e if stage == "lift" else repr(e)))
                    fx.dead_letters.append(dead_letter(rec, stage, field_name, reason, now))
                    self._emit(ev.TraceRejected(stage, field_name, reason, trace_id=lift.cohort_id))
        return self._done(fx)

    def _release_rejected(self, rec: Record) -> None:
        # Never dead-letter a dead letter: anything unreadable here is not ours.
        letter = decode_record(rec, DeadLetter)
        if isinstance(letter, Poison) or letter.source_topic != self.settings.topics.dispatch:
            return
        rejected = decode_or_dead_letter(
            original(letter), Dispatch, topic=letter.source_topic, partition=0, offset=0, ts=0.0
        )
        if isinstance(rejected, Poison):
            return
        cohort_id = rejected.cohort_id
        if self.in_flight.pop(cohort_id, None) is not None:
            self._emit(ev.DispatchReleased(cohort_id, "rejected", letter.reason))

    def expire_in_flight(self, now: float) -> Effects:
        """Free the slots of dispatches whose lift is overdue (lease expiry)."""
        timeout = self.thresholds().dispatch_timeout_s
        for cohort_id, flight in list(self.in_flight.items()):
            if now - flight.dispatched_ts > timeout:
                del self.in_flight[cohort_id]
                self._emit(ev.DispatchReleased(cohort_id, "expired"))
        return self._done(Effects())

    def _learn(self, lift: LiftResult, now: float) -> Effects:
        fx = Effects()
        flight = self.in_flight.pop(lift.cohort_id, None)
        if lift.cohort_id in self.learned:
            self._emit(ev.LiftDuplicate(lift.cohort_id))
            return fx
        selection = flight.selection if flight else lift.selection
        # Learned first: a label the predictor refuses (ValueError) is a dead
        # letter, and is not remembered as learned.
        # The primary label: the lift on the cohort's target when the trainer
        # measured one (LiftResult.label), else on the whole probe.
        try:
            self.predictor.learn(dict(lift.features), lift.label, selection)
        except FeatureError as e:
            if lift.feature_schema == FEATURE_SCHEMA:
                raise
            # A lift from before a feature-schema change (a dispatch of the
            # previous build): say so, not just which feature is missing.
            raise FeatureError(
                e.field,
                f"{e.reason}: the lift's features are {lift.feature_schema!r}, "
                f"this build learns {FEATURE_SCHEMA!r}",
            ) from e
        self.learned[lift.cohort_id] = None
        while len(self.learned) > LEARNED_WINDOW:
            self.learned.popitem(last=False)
        if lift.policy_version_after:
            self.cohorts.set_policy_version(lift.policy_version_after)
        # The label goes out (tap.labels, and the shell's label store) in the
        # same transaction as the snapshot that remembers it as learned. It is
        # a function of the lift alone (its ts too): every replica learns every
        # lift and publishes the byte-identical label, compacted by cohort id.
        fx.labels.append(
            Label(
                cohort_id=lift.cohort_id,
                ts=lift.ts,
                features=dict(lift.features),
                feature_schema=lift.feature_schema,
                realized_lift=lift.label,
                predicted_lift=lift.predicted_lift,
                selection=selection,
                model_version=lift.model_version,
            )
        )
        self._emit(
            ev.LiftLearned(
                lift.cohort_id, lift.model_version, lift.label, lift.predicted_lift, selection
            )
        )
        return fx

    # --- state -----------------------------------------------------------------

    def snapshot(self, *, journaled: bool = False) -> dict[str, Any]:
        """The whole state as plain JSON; :meth:`restore` takes it back.

        ``journaled``: the id windows (decided trace ids, learned cohort ids)
        are left empty; the state store writes them from :meth:`journals`, a
        batch's changed rows only, and fills them in again when it loads.
        """
        return {
            "schema": SNAPSHOT_SCHEMA,
            # Open and queued traces as their original messages and origins:
            # a restore decodes them again, so nothing but the bytes is kept.
            "cohorts": self.cohorts.snapshot(
                self._where if journaled else self._ref, journaled=journaled
            ),
            "pending": [self._pending_json(c, journaled) for c in self.pending],
            "in_flight": [
                [f.cohort_id, f.selection, f.predicted_lift, f.dispatched_ts]
                for f in self.in_flight.values()
            ],
            "learned": [] if journaled else list(self.learned),
            **({"held": {}} if journaled else {}),
            "rng": _rng_state(self.rng),
        }

    def journals(self) -> dict[str, Journal]:
        """The windows a journaled snapshot leaves empty, by their place in it."""
        return {
            section(("learned",), as_list=True): self.learned,
            HELD: self._held,
            **self.cohorts.journals(("cohorts",)),
        }

    def _hold(self, trace_id: str, origin: _Origin) -> None:
        self._origins[trace_id] = origin
        self._held[held_key(origin.where())] = origin

    def _release(self, trace_id: str) -> _Origin | None:
        origin = self._origins.pop(trace_id, None)
        key = None if origin is None else held_key(origin.where())
        if key is not None and key in self._held:
            del self._held[key]
        return origin

    def _ref(self, trace: Trace) -> Any:
        origin = self._origins.get(trace.trace_id)
        if origin is None:  # never for a trace read from a log; kept restorable anyway
            return trace.model_dump(mode="json", by_alias=True)
        return origin.ref()

    def _where(self, trace: Trace) -> Any:
        origin = self._origins.get(trace.trace_id)
        return self._ref(trace) if origin is None else origin.where()

    def where(self, trace: Trace) -> Any:
        """How a journaled snapshot holds a trace: ``[topic, partition, offset]``
        where it was read (the trace itself if it was not read from a log)."""
        return self._where(trace)

    def _pending_json(self, c: Cohort, journaled: bool = False) -> dict[str, Any]:
        # Queued cohorts are immutable and re-snapshotted every batch until
        # scored: serialize each once.
        cache = self._where_cache if journaled else self._json_cache
        body = cache.get(c.cohort_id)
        if body is None:
            body = cache[c.cohort_id] = _cohort_json(c, self._where if journaled else self._ref)
        return body

    def restore(self, snap: Mapping[str, Any]) -> None:
        """Replace the state with a snapshot's.

        A trace that no longer decodes (the schema became stricter since it
        was stored) is not restored: it is dead-lettered, with its original
        bytes, in the effects of the next call.
        """
        if snap.get("schema") != SNAPSHOT_SCHEMA:
            raise ValueError(f"schema: expected {SNAPSHOT_SCHEMA!r}, got {snap.get('schema')!r}")
        self._origins = {}
        self._held = Journaled()
        self._json_cache, self._where_cache = {}, {}
        self._unrestored = []
        # Snapshots written before originals were kept: origins without bytes.
        legacy = {str(k): v for k, v in snap.get("origins", {}).items()}
        restore = lambda ref: self._restore_trace(ref, legacy)  # noqa: E731
        self.cohorts.restore(dict(snap["cohorts"]), restore)
        self.pending = deque(
            c for c in (_cohort_from(d, restore) for d in snap["pending"]) if c is not None
        )
        self.in_flight = OrderedDict(
            (c, InFlight(c, s, float(p), float(t))) for c, s, p, t in snap["in_flight"]
        )
        self.learned = Window((str(c), None) for c in snap["learned"])
        if "rng" in snap:
            self.rng.setstate(_rng_from(snap["rng"]))

    def _restore_trace(self, ref: Any, legacy: Mapping[str, Any]) -> Trace | None:
        if isinstance(ref, list) and len(ref) == 3:
            # A journaled reference whose original was not stored (never
            # written so): say so rather than fail the whole restore.
            rec = Record(str(ref[0]), int(ref[1]), int(ref[2]), None, b"", 0)
            self._unrestored.append((rec, "decode", "$", "not restorable: no original stored"))
            return None
        if isinstance(ref, list):  # [topic, partition, offset, original text]
            rec = Record(str(ref[0]), int(ref[1]), int(ref[2]), None, str(ref[3]).encode(), 0)
            got = decode_record(rec, Trace, "decode", 0.0)
            if isinstance(got, Poison):
                self._unrestored.append((rec, got.stage, got.field, got.reason))
                return None
            self._hold(got.trace_id, _Origin(rec.topic, rec.partition, rec.offset, rec.value))
            return got
        try:
            trace = Trace.model_validate(ref)
        except Exception as e:
            raw = json.dumps(ref, separators=(",", ":"), allow_nan=False).encode()
            where = Record(self.settings.topics.traces, -1, -1, None, raw, 0)
            self._unrestored.append((where, "decode", "$", f"not restorable: {e!r}"))
            return None
        o = legacy.get(trace.trace_id)
        if o is not None:
            try:
                raw = encode(trace)
            except Exception:
                raw = json.dumps({"trace_id": trace.trace_id}).encode()
            self._hold(trace.trace_id, _Origin(str(o[0]), int(o[1]), int(o[2]), raw, False))
        return trace

    def _restored_letters(self, now: float) -> Effects:
        """Dead letters for the traces a restore could not bring back (once)."""
        fx = Effects()
        if self._unrestored:
            for rec, stage, field_name, reason in self._unrestored:
                fx.dead_letters.append(dead_letter(rec, stage, field_name, reason, now))
                self._emit(
                    ev.TraceRejected(
                        stage,
                        field_name,
                        reason,
                        offset=rec.offset,
                        tenant=tenant_of_record(rec.value),
                    )
                )
            self._unrestored = []
        return fx

    # --- events ----------------------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        self._events.append(event)

    def _done(self, fx: Effects) -> Effects:
        """Hand the events gathered since the last public call to the caller."""
        if self._events:
            fx.events += self._events
            self._events = []
        return fx

    @contextmanager
    def _timed(self, stage: str, when: bool = True) -> Iterator[None]:
        if self.timer is None or not when:
            yield
            return
        t0 = self.timer()
        try:
            yield
        finally:
            self._events.append(ev.StageTimed(stage, self.timer() - t0))


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state: Sequence[Any]) -> tuple[Any, ...]:
    return (int(state[0]), tuple(int(x) for x in state[1]), state[2])
