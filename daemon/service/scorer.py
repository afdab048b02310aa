"""``tapd run``: the scorer's long-running I/O shell around :class:`daemon.core.pipeline.Scorer`.

A scorer is one replica of a consumer group on the traces topic. Producers
key traces by slice key, so a slice lives in one partition and the replica
that the group assigns a partition owns that partition's cohorts
(:class:`daemon.runtime.partitions.PartitionedCohorts`: a cohort never mixes
partitions). Every replica also reads the lift, dead-letter and policy
topics whole, in consumer groups of its own: every replica learns every
label in the lift topic's one order (one predictor, the same everywhere);
the replica that holds a dispatch in flight frees its slot when the lift (or
the trainer's dead letter) arrives; every replica knows every kept policy
version.

One loop iteration:

1. apply backpressure: pause the traces consumer while the scorer is not
   accepting traces (in-flight cap reached); the lift consumer keeps
   reading, which is what frees slots;
2. poll traces, policy announcements and lift results (bounded batches),
   feed them to the scorer (traces partition by partition), tick its clock,
   and score queued cohorts for at most ``score_budget_s``;
3. persist, in one SQLite transaction, the scorer snapshot, the consumed
   offsets, the outbox of messages owed, the labels learned and, for every
   partition whose state changed, its *state record*: the open and queued
   cohorts as member offsets and the position (``daemon.runtime.partitions``);
4. send the owed decisions, dispatches and dead letters, flush; then the
   state records (to the compacted changelog, partition p for traces
   partition p), flush; only then commit each traces partition up to its
   oldest trace still held undecided (never below the group's committed
   offset: no rewind), and the other topics' offsets.

Partitions change hands (a scale event, a rolling restart, a replaced pod):
on revocation the replica writes what it owes and the partition's final
state record, commits, and sets the state aside; on assignment it takes the
state back from its own copy if no other replica has written the partition
since, else rebuilds it from the newest state record (re-reading the member
traces and the recent traces of the partition for the duplicate filter), and
seeks to the record's position. The state directory is a cache: a replica
whose disk is new gets a new incarnation, reads the lift and policy topics
from their beginning (learning every label before it joins the traces group)
and rebuilds its partitions from the changelog. docs/ARCHITECTURE.md ("State:
owners and rebuild") has the table.

SIGTERM stops consuming, hands every partition back as above and exits within
``ServiceSettings.grace_period_s``. SIGHUP reloads the thresholds file.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.config import TapdSettings, Thresholds
from daemon.core.pipeline import Effects, Scorer
from daemon.core.tenants import TenantLabels
from daemon.core.vocabulary import PREDICTOR_STAGES, SELECTIONS
from daemon.policy.store import PolicyVersion, version_number
from daemon.runtime.http import audit, publish_thresholds
from daemon.runtime.logging import get_logger
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.modelstore import ModelStore
from daemon.runtime.observe import observe
from daemon.runtime.partitions import (
    Detached,
    PartitionedCohorts,
    PartitionState,
    StateRecord,
    Token,
    fresh,
    join,
    migrate,
    part_key,
    part_of,
    rebuild,
    record,
    split,
)
from daemon.runtime.predictor_host import PredictorHost
from daemon.runtime.state import Outboxed, StateStore
from streams.transport import (
    Consumer,
    OutMessage,
    Producer,
    Record,
    TopicPartition,
    Transport,
)

log = get_logger("tapd.service")

LAG_EVERY_S = 5.0
WATCH_EVERY_S = 1.0
# A rollout reads the policies topic to its end (a broker round trip) at most this
# often; kept versions can be half a second apart, and a rollout may lag by one.
POLICY_RECHECK_S = 0.2


@dataclass(frozen=True, slots=True)
class LoopStats:
    traces: int
    lifts: int
    messages: int


class ThresholdsWatcher:
    """Reloads the thresholds file when its mtime changes (the k8s ConfigMap case),
    and expires run-time overrides that are due.

    A reload replaces the file layer only: overrides set through the admin
    API stay in force (daemon.runtime.thresholds); a new mtime with the same
    content records nothing.
    """

    def __init__(self, holder: Any, path: Path | None, metrics: ScorerMetrics) -> None:
        self.holder = holder
        self.path = path
        self.metrics = metrics
        self._mtime = self._stat()

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns if self.path else None
        except OSError:
            return None

    def poll(self) -> bool:
        expire = getattr(self.holder, "expire", None)
        if expire is not None:
            expire()
        m = self._stat()
        if m is None or m == self._mtime:
            return False
        self._mtime = m
        assert self.path is not None
        return reload_thresholds(self.holder, self.path, self.metrics, source="file")


def reload_thresholds(holder: Any, path: Path, metrics: ScorerMetrics, source: str) -> bool:
    """Reload the file layer; a bad file keeps the old values and says why.

    A recorded change is logged and counted by the holder's ``on_change``
    hook (:func:`daemon.runtime.http.audit`); a holder without one is audited
    here.
    """
    try:
        record = holder.reload_from_file(path, who=f"tapd:{source}", source=source)
    except Exception as e:  # any bad file (unreadable, not YAML, invalid): keep the old values
        log.error(
            "thresholds_reload_failed",
            source=source,
            path=str(path),
            field=getattr(e, "field", None),
            reason=str(getattr(e, "reason", e)),
        )
        return False
    if record is not None and getattr(holder, "on_change", None) is None:
        audit(metrics, record, holder)
    return True


def tenant_labels(settings: TapdSettings) -> TenantLabels:
    """The per-tenant metrics' label chooser: pinned tenants, then the first seen.

    Not persisted: a restarted scorer chooses again from the traces it reads
    (daemon/core/tenants.py)."""
    return TenantLabels(settings.metrics.max_tenants, settings.metrics.tenants)


class ScorerService:
    """The poll loop; see the module docstring."""

    def __init__(
        self,
        settings: TapdSettings,
        transport: Transport,
        scorer: Scorer,
        metrics: ScorerMetrics,
        thresholds_holder: Any,
        on_batch: Callable[[Effects], None] | None = None,
        cohorts_per_poll: int = 1,
        score_budget_s: float = 0.5,
        background_refits: bool = True,
        rollout: PolicyRollout | None = None,
    ) -> None:
        if not isinstance(scorer.cohorts, PartitionedCohorts):
            raise TypeError("the service needs build_scorer's partitioned cohort builder")
        self.settings = settings
        self.transport = transport
        self.scorer = scorer
        self.cohorts: PartitionedCohorts = scorer.cohorts
        self.metrics = metrics
        self.holder = thresholds_holder
        self.on_batch = on_batch
        self.cohorts_per_poll = cohorts_per_poll
        self.score_budget_s = score_budget_s
        self.rollout = rollout
        self.store = StateStore(Path(settings.state_dir) / "scorer-state.sqlite")
        self.incarnation = self.store.incarnation
        self.replica = settings.service.replica_name()
        self.background_refits = background_refits
        self.predictor: PredictorHost | None = None
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.watcher = ThresholdsWatcher(
            thresholds_holder, settings.service.thresholds_file, metrics
        )
        self._producer: Producer | None = None
        self._traces: Consumer | None = None
        self._lift: Consumer | None = None
        self._dlq: Consumer | None = None
        self._policies: Consumer | None = None
        self._policy_tps: list[TopicPartition] = []
        self._policies_checked = -POLICY_RECHECK_S
        # When the loop last polled the lift, dead-letter and policy topics
        # (service.side_poll_interval_s).
        self._side_polled_at = -math.inf
        # Offsets done of the lift, dead-letter and policy topics (traces
        # partitions keep theirs in their part of the cohort builder).
        self._done: dict[TopicPartition, int] = {}
        # Traces partitions given up (revoked) with their state, kept in case
        # they come back unchanged.
        self._suspended: dict[TopicPartition, Detached] = {}
        self._written: dict[TopicPartition, str] = {}  # content of the last state record
        self._recorded_at: dict[TopicPartition, float] = {}  # monotonic time of it
        self._unrecorded: set[TopicPartition] = set()  # read since their last record
        self._committed: dict[TopicPartition, int] = {}  # traces offsets: never below
        # The loop's last batch whose state records were sent but not yet known
        # to be on the log (:meth:`_settle`): the outbox rows up to its sequence
        # number, the state records whose traces offsets it commits, and its
        # side-topic offsets.
        self._unsettled: tuple[int, list[StateRecord], dict[TopicPartition, int]] | None = None
        self._seq = 0
        self._seen_counts: dict[str, float] = {}
        self.loaded = False
        metrics.watch(scorer)

    # --- lifecycle ---------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def _term(signum: int, frame: FrameType | None) -> None:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            self.stop_event.set()

        def _hup(signum: int, frame: FrameType | None) -> None:
            self.reload_event.set()

        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
        signal.signal(signal.SIGHUP, _hup)

    def start(self) -> None:
        """Restore what the disk holds, fence off what another replica took over, send
        what is owed, learn every label up to the end of the lift topic, then join the
        traces group."""
        topics = self.settings.topics
        group = self.settings.service.group
        # The predictor: its latest snapshot plus the labels stored after it.
        self.predictor = PredictorHost.open(
            self.settings.predictor,
            ModelStore(Path(self.settings.state_dir) / "models"),
            self.store.labels_since(0),
            background=self.background_refits,
        )
        self.scorer.predictor = self.predictor
        self._check_topics()
        offsets = self.store.offsets()
        snap = self.store.load_snapshot()
        if snap is not None:
            snap = migrate(snap, {tp: o for tp, o in offsets.items() if tp.topic == topics.traces})
            self.scorer.restore(snap)
        self._done = {
            tp: o for tp, o in offsets.items() if tp.topic not in (topics.traces, topics.policies)
        }
        self._seq = max(
            [p.token.seq for p in self.cohorts.parts.values() if p.token is not None], default=0
        )
        self._producer = self.transport.producer()
        self._fence_and_suspend()
        self._send_outbox()
        # Every replica reads the lift, dead-letter and policy topics whole,
        # in groups of its own: every label reaches every predictor, and a
        # release reaches the replica that holds the slot. The incarnation in
        # the name makes a replica with a new disk read them from the start.
        own = f"{group}.{self.incarnation}"
        # The policy catalog is memory only: read whole at every start.
        self._policy_at: dict[TopicPartition, int] = {}
        self._policies = self.transport.consumer(
            [topics.policies], f"{own}.policies", on_assigned=self._policies_from_start
        )
        self._policy_tps = [
            TopicPartition(topics.policies, p)
            for p in range(self.transport.partitions(topics.policies))
        ]
        if self.rollout is not None:
            self.rollout.refresh = self._policies_to_end
        self._lift = self.transport.consumer([topics.lift], f"{own}.lift")
        # A new incarnation holds no dispatch: old dead letters release nothing.
        self._dlq = self.transport.consumer([topics.dlq], f"{own}.dlq", from_beginning=False)
        self._catch_up()
        self._traces = self.transport.consumer(
            [topics.traces], group, on_revoked=self._revoked, on_assigned=self._assigned
        )
        self.loaded = True
        log.info(
            "scorer_started",
            group=group,
            replica=self.replica,
            incarnation=self.incarnation,
            traces=topics.traces,
            lift=topics.lift,
            labels=self.predictor.n_labels,
            model_version=self.predictor.model_version,
            in_flight=len(self.scorer.in_flight),
        )

    def _check_topics(self) -> None:
        """The changelog must have a partition for every traces partition."""
        topics = self.settings.topics
        n_traces = self.transport.partitions(topics.traces)
        n_log = self.transport.partitions(topics.changelog)
        if n_log < n_traces:
            raise ValueError(
                f"topics.changelog: {topics.changelog!r} has {n_log} partitions, "
                f"{topics.traces!r} has {n_traces}: the changelog needs one per traces partition"
            )
        n_lift = self.transport.partitions(topics.lift)
        if n_lift > 1:
            # One partition is the one order in which every replica learns the
            # labels; several interleave differently per replica.
            log.warning(
                "lift_topic_partitioned",
                topic=topics.lift,
                partitions=n_lift,
                consequence="replicas may learn labels in different orders and hold different models",
            )

    def _latest(self, tp: TopicPartition) -> PartitionState | None:
        return self._latest_many([tp]).get(tp)

    def _latest_many(
        self, tps: Sequence[TopicPartition]
    ) -> dict[TopicPartition, PartitionState | None]:
        """The newest state record of each traces partition in ``tps`` (the last record
        of the changelog partition of the same number)."""
        changelog = self.settings.topics.changelog
        ends = self.transport.end_offsets([TopicPartition(changelog, tp.partition) for tp in tps])
        out: dict[TopicPartition, PartitionState | None] = {}
        for tp in tps:
            ctp = TopicPartition(changelog, tp.partition)
            end = ends.get(ctp, 0)
            out[tp] = None
            for rec in self.transport.read(ctp, end - 1, end) if end > 0 else []:
                try:
                    state = PartitionState.decode(rec.value)
                except (ValueError, KeyError, TypeError) as e:
                    log.error("partition_state_unreadable", partition=tp.partition, reason=str(e))
                    continue
                if state.tp == tp:
                    out[tp] = state
        return out

    def _mine(self, latest: PartitionState | None) -> bool:
        """No other incarnation has written the partition's state since this one did."""
        return latest is None or latest.token.incarnation == self.incarnation

    def _fence_and_suspend(self) -> None:
        """At start: the partitions the disk holds are this replica's to hand back only
        if no other replica has written their state since (else the disk's copy and
        the messages it still owes for them are stale: dropped). What is kept is set
        aside until the group assigns the partition."""
        latest = self._latest_many(list(self.cohorts.parts))
        stale = [tp for tp, state in latest.items() if not self._mine(state)]
        if stale:
            dropped = self.store.drop_owned(part_key(tp) for tp in stale)
            log.warning(
                "partition_state_superseded",
                partitions=[tp.partition for tp in stale],
                outbox_rows_dropped=dropped,
            )
        taken = self._take(list(self.cohorts.parts))
        for tp, detached in taken.items():
            if tp not in stale:
                self._suspended[tp] = detached

    def _catch_up(self) -> None:
        """Read the policy, lift and dead-letter topics up to where they end now, and
        be assigned all three (the dead-letter consumer starts at the end: it must
        hold its position before this replica dispatches anything)."""
        topics = self.settings.topics
        targets: dict[TopicPartition, int] = {}
        for topic in (topics.policies, topics.lift):
            tps = [TopicPartition(topic, p) for p in range(self.transport.partitions(topic))]
            targets.update(self.transport.end_offsets(tps))
        self.transport.partitions(topics.dlq)  # exists before its consumer joins
        deadline = time.monotonic() + self.settings.service.catch_up_timeout_s

        def done(tp: TopicPartition) -> int:
            return (self._policy_at if tp.topic == topics.policies else self._done).get(tp, 0)

        consumers = {"policies": self._policies, "lift": self._lift, "dlq": self._dlq}
        unassigned = set(consumers)
        behind = dict(targets)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            behind = {tp: end for tp, end in behind.items() if done(tp) < end}
            unassigned = {n for n in unassigned if not (c := consumers[n]) or not c.lag()}
            if not behind and not unassigned:
                break
            self._consume_side_topics(wait=0.2)
        if behind or unassigned:
            log.warning(
                "catch_up_incomplete",
                behind={part_key(tp): end - done(tp) for tp, end in behind.items()},
                unassigned=sorted(unassigned),
            )
        else:
            assert self.predictor is not None
            log.info("caught_up", labels=self.predictor.n_labels)

    def _consume_side_topics(self, wait: float) -> int:
        """One poll of the policy, lift and dead-letter consumers, persisted."""
        assert self._lift is not None and self._dlq is not None and self._policies is not None
        s = self.settings.service
        # Each one waits a little: a poll that returns at once may never drive
        # a consumer's group join to its end.
        self._apply_policies(self._policies.poll(min(wait, 0.1), s.max_poll_records))
        lifts = self._fresh(self._lift.poll(wait, s.max_poll_records))
        lifts += self._fresh(self._dlq.poll(min(wait, 0.05), s.max_poll_records))
        fx = self._learn(lifts, time.time()) if lifts else Effects()
        if lifts or fx:
            self._persist_and_send([], lifts, fx)
        return len(lifts)

    # --- partitions change hands --------------------------------------------------

    def _take(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, Detached]:
        """Remove the state of ``tps`` from the scorer; what was removed."""
        if not tps:
            return {}
        snap = self.scorer.snapshot()
        out = {}
        for tp in tps:
            snap, taken = split(snap, tp)
            if taken is not None:
                out[tp] = taken
        self.scorer.restore(snap)
        for tp in tps:
            self._written.pop(tp, None)
            self._unrecorded.discard(tp)
        self.metrics.partitions_owned.set(len(self.cohorts.parts))
        return out

    def _put(self, parts: Mapping[TopicPartition, Detached]) -> None:
        if not parts:
            return
        snap = self.scorer.snapshot()
        for tp, detached in parts.items():
            snap = join(snap, tp, detached)
        self.scorer.restore(snap)
        self.metrics.partitions_owned.set(len(self.cohorts.parts))

    def _revoked(self, tps: list[TopicPartition]) -> None:
        """Before a rebalance takes ``tps``: their state record and offsets go out
        (after every decision owed), and their state is set aside."""
        mine = [tp for tp in tps if tp in self.cohorts.parts]
        if not mine or not self.loaded:
            return
        try:
            self._persist_and_send([], [], Effects(), handback=True)
        except Exception as e:
            # Kept in the outbox: sent later only if no one else has taken over.
            log.error(
                "handoff_flush_failed", partitions=[tp.partition for tp in mine], reason=str(e)
            )
        self._suspended.update(self._take(mine))
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in mine))

    def _assigned(self, tps: list[TopicPartition]) -> None:
        """A rebalance gave ``tps``: take each one's state back, from this replica's
        own copy if no one wrote it since, else from its state record on the
        changelog (its member traces re-read), else fresh; resume reading there."""
        assert self._traces is not None
        parts: dict[TopicPartition, Detached] = {}
        seeks: dict[TopicPartition, int] = {}
        hows: dict[str, list[int]] = {"kept": [], "rebuilt": [], "fresh": []}
        new = [
            tp
            for tp in tps
            if tp.topic == self.settings.topics.traces and tp not in self.cohorts.parts
        ]
        states = self._latest_many(new)
        for tp in new:
            latest = states[tp]
            mine = self._suspended.pop(tp, None)
            if mine is not None and self._mine(latest):
                parts[tp], how = mine, "kept"
                self._written[tp] = "" if latest is None else latest.content()
            elif latest is not None:
                parts[tp], how = self._rebuild(latest), "rebuilt"
                self._written[tp] = latest.content()
            else:
                parts[tp], how = Detached(fresh(self.cohorts.versions)), "fresh"
            position = parts[tp].part.get("position")
            if position is not None:
                seeks[tp] = int(position)
            hows[how].append(tp.partition)
            self.metrics.partition_handoffs.labels(how=how).inc()
        self._put(parts)
        for tp, position in seeks.items():
            self._traces.seek(tp, position)
        for tp in parts:
            try:
                floor = self._traces.committed(tp)
            except Exception:  # the floor only guards commits; unknown: none
                floor = None
            self._committed[tp] = max(self._committed.get(tp, 0), floor or 0)
        if parts:
            log.info("partitions_assigned", **{k: sorted(v) for k, v in hows.items() if v})

    def _rebuild(self, state: PartitionState) -> Detached:
        tp = state.tp
        window = min(
            self.settings.cohorting.dedup_window, self.settings.service.handoff_dedup_records
        )
        start = max(0, min([*state.held(), state.position - window]))
        t0 = time.monotonic()
        records = self.transport.read(tp, start, state.position) if start < state.position else []
        detached, missing = rebuild(state, records, self.cohorts.versions, window)
        if missing:
            log.error(
                "partition_state_incomplete",
                partition=tp.partition,
                missing_offsets=missing[:20],
                n_missing=len(missing),
            )
        log.info(
            "partition_rebuilt",
            partition=tp.partition,
            from_replica=state.replica,
            position=state.position,
            open=len(state.open),
            pending=len(state.pending),
            records_read=len(records),
            seconds=round(time.monotonic() - t0, 3),
        )
        return detached

    # --- the loop -------------------------------------------------------------------

    def run(
        self,
        until: Callable[[Scorer], bool] | None = None,
        max_seconds: float | None = None,
    ) -> None:
        """Loop until SIGTERM (or ``until(scorer)`` / ``max_seconds``), then shut down."""
        if not self.loaded:
            self.start()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        last_lag = 0.0
        last_watch = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.iterate()
                now_m = time.monotonic()
                if now_m - last_lag >= LAG_EVERY_S:
                    self._update_lag()
                    last_lag = now_m
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    if self.watcher.path is not None:
                        reload_thresholds(self.holder, self.watcher.path, self.metrics, "signal")
                elif now_m - last_watch >= WATCH_EVERY_S:
                    self.watcher.poll()
                    last_watch = now_m
                if until is not None and until(self.scorer):
                    break
                if deadline is not None and now_m >= deadline:
                    break
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop consuming, hand back every partition (state record, offsets), close."""
        t0 = time.monotonic()
        if self._traces is not None:
            self._traces.pause()
        if self.loaded:
            # Whatever is open or queued goes out in the partitions' state
            # records: the next owner (maybe this replica again) scores it.
            self._persist_and_send([], [], Effects(), handback=True)
        for c in (self._traces, self._lift, self._dlq, self._policies):
            if c is not None:
                c.close()
        if self._producer is not None:
            self._producer.close()
        if self.predictor is not None:
            self.predictor.close()
            self.predictor = None
        self.store.close()
        self.loaded = False
        self._traces = self._lift = self._dlq = self._policies = None
        self._producer = None
        log.info("scorer_stopped", seconds=round(time.monotonic() - t0, 3))

    def iterate(self) -> LoopStats:
        assert self._traces is not None and self._lift is not None and self._dlq is not None
        assert self._policies is not None
        s = self.settings.service
        accepting = self.scorer.accepting_traces()
        if accepting and self._traces.paused():
            self._traces.resume()
            log.info("consumption_resumed")
        elif not accepting and not self._traces.paused():
            self._traces.pause()
            log.info(
                "consumption_paused",
                in_flight=len(self.scorer.in_flight),
                max_in_flight=self.scorer.max_in_flight,
            )
        self.metrics.consumption_paused.set(0 if accepting else 1)
        busy = self.scorer.has_work
        wait = 0.0 if busy else s.poll_timeout_s / 2
        lifts: list[Record] = []
        with self.metrics.processing_seconds.labels(stage="poll").time():
            traces = self._owned(self._traces.poll(wait, s.max_poll_records))
            idle = not (traces or busy)
            clock = time.monotonic()
            if idle or clock - self._side_polled_at >= s.side_poll_interval_s:
                self._side_polled_at = clock
                self._apply_policies(self._policies.poll(0.0, s.max_poll_records))
                lifts = self._fresh(self._lift.poll(wait if idle else 0.0, s.max_poll_records))
                lifts += self._fresh(self._dlq.poll(0.05 if idle else 0.0, s.max_poll_records))
            if lifts:
                # More may be waiting right behind them: the next loop polls again.
                self._side_polled_at = -math.inf
                # A kept version is announced (and flushed) before the lift that
                # names it: read it now, before a rollout asks for it.
                self._apply_policies(self._policies.poll(0.05, s.max_poll_records))
        now = time.time()
        fx = Effects()
        if lifts:
            fx += self._learn(lifts, now)
        by_tp: dict[TopicPartition, list[Record]] = {}
        for r in traces:
            by_tp.setdefault(r.tp, []).append(r)
        for tp, records in by_tp.items():
            with self.cohorts.feeding(tp) as part:
                fx += self.scorer.on_traces(records, now)
                part.position = records[-1].offset + 1
            self._unrecorded.add(tp)
        fx += self.scorer.on_tick(now)
        worked = self.scorer.has_work
        # Score for at most score_budget_s (at least one window): the next poll
        # is never further away than that plus one cohort's rollouts, and one
        # persist-flush-commit covers everything scored in between.
        deadline = time.monotonic() + self.score_budget_s
        fx += self.scorer.step(now, self.cohorts_per_poll)
        while self.scorer.has_work and time.monotonic() < deadline:
            fx += self.scorer.step(now, self.cohorts_per_poll)
        sent = 0
        if traces or lifts or fx or worked or self._record_due():
            sent = self._persist_and_send(traces, lifts, fx, overlap=True)
        else:
            # Nothing new to overlap with: the last batch settles now.
            self._settle()
        self._publish_quality()
        return LoopStats(len(traces), len(lifts), sent)

    def _record_due(self) -> bool:
        """A partition read since its last state record is due one: when the stream
        goes quiet, the record (and the commit) still catch up within
        ``service.state_record_interval_s``."""
        due = time.monotonic() - self.settings.service.state_record_interval_s
        return any(self._recorded_at.get(tp, -math.inf) <= due for tp in self._unrecorded)

    def _learn(self, records: Sequence[Record], now: float) -> Effects:
        """Lifts and dead letters: every replica learns each lift; the one holding the
        dispatch frees its slot (logged, so an audit can time it)."""
        held = set(self.scorer.in_flight)
        fx = self.scorer.on_lift(records, now)
        for cohort_id in held - set(self.scorer.in_flight):
            log.info("slot_freed", cohort_id=cohort_id, in_flight=len(self.scorer.in_flight))
        return fx

    def _policies_from_start(self, tps: list[TopicPartition]) -> None:
        assert self._policies is not None
        for tp in tps:
            self._policies.seek(tp, 0)
            self._policy_at[tp] = 0

    def _policies_to_end(self) -> None:
        """Bring the policy catalog up to date before a rollout samples: a rollout
        must come from the newest kept version (or the one before it, kept while
        it sampled), and a trainer on a small policy keeps one every half second.
        The consumer's buffered records every time (cheap); the topic read to its
        end outside the consumer at most every POLICY_RECHECK_S, for when the
        consumer is behind (after a group join, or a long scoring run)."""
        assert self._policies is not None
        self._apply_policies(self._policies.poll(0.0, self.settings.service.max_poll_records))
        now = time.monotonic()
        if now - self._policies_checked < POLICY_RECHECK_S:
            return
        self._policies_checked = now
        try:
            for tp, end in self.transport.end_offsets(self._policy_tps).items():
                start = self._policy_at.get(tp, 0)
                if end > start:
                    self._apply_policies(self.transport.read(tp, start, end))
        except Exception as e:  # the consumer still delivers them later
            log.warning("policy_refresh_failed", reason=str(e))

    def _apply_policies(self, records: Sequence[Record]) -> None:
        for rec in records:
            if rec.offset < self._policy_at.get(rec.tp, 0):
                continue
            self._policy_at[rec.tp] = rec.offset + 1
            try:
                announced = PolicyVersion.decode(rec.value)
            except ValueError as e:
                log.warning("policy_record_rejected", offset=rec.offset, reason=str(e))
                continue
            n = version_number(announced.version) or 0
            if n > self.metrics.policy_version_announced._value.get():
                self.metrics.policy_version_announced.set(n)
            if self.rollout is not None:
                self.rollout.announce(announced)

    def end_of_stream(self) -> None:
        """Close every open cohort now (a finite stream: replay, demo, benchmarks).

        The closed cohorts are queued, persisted and scored by the loop as usual.
        """
        self._persist_and_send([], [], self.scorer.flush(time.time()))

    def _owned(self, records: Sequence[Record]) -> list[Record]:
        # Records of a partition this replica does not hold (a rebalance in
        # between) or below its position (already read) are not its to feed.
        out = []
        for r in records:
            part = self.cohorts.parts.get(r.tp)
            if part is not None and (part.position is None or r.offset >= part.position):
                out.append(r)
        return out

    def _fresh(self, records: Sequence[Record]) -> list[Record]:
        # Records below the stored offsets were processed by a previous
        # incarnation whose broker commit did not happen.
        return [r for r in records if r.offset >= self._done.get(r.tp, 0)]

    def _persist_and_send(
        self,
        traces: Sequence[Record],
        others: Sequence[Record],
        fx: Effects,
        *,
        handback: bool = False,
        overlap: bool = False,
    ) -> int:
        """One transaction for the batch (snapshot, offsets, owed messages, labels,
        changed partition state records), then send, flush, commit.

        ``handback``: every partition whose state differs from its last record
        gets a new one now (a revocation, a shutdown), however recent that was.
        ``overlap`` (the loop): the state records' flush and the commits are left
        to the next batch's call, or to :meth:`_settle` (see there)."""
        assert self._producer is not None
        self._settle()
        t0 = time.perf_counter()
        observe(fx.events, self.metrics)
        messages = fx.messages(self.settings.topics)
        owners = self._owners(messages)
        # A partition that owes a message (a decision, a dispatch, a dead letter)
        # gets its state record in this batch: a re-read would send it again.
        for key in {o for o in owners if o is not None}:
            owed = self.cohorts.parts.get(part_of(key))
            if owed is not None:
                owed.changed = True
        # Cohorts scored (or rejected) in this batch no longer belong to their
        # partition's state.
        queued = {c.cohort_id for c in self.scorer.pending}
        for cohort_id in [c for c in self.cohorts.closed if c not in queued]:
            self.cohorts.forget(cohort_id)
        # The id windows (decided traces, learned lifts) are journaled: the
        # store writes the rows this batch changed, not the windows whole.
        snap = self.scorer.snapshot(journaled=True)
        states, whys = self._states(snap, handback)
        encoded = [st.encode() for st in states]
        for st, value in zip(states, encoded, strict=True):
            owners.append(part_key(st.tp))
            messages.append(
                OutMessage(
                    self.settings.topics.changelog, part_key(st.tp).encode(), value, st.partition
                )
            )
        offsets: dict[TopicPartition, int] = {}
        for r in others:
            if offsets.get(r.tp, -1) < r.offset + 1:
                offsets[r.tp] = r.offset + 1
        label_seq = self.store.save(
            snap, offsets, messages, fx.labels, owners, journals=self.scorer.journals()
        )
        self._done.update(offsets)
        written_at = time.monotonic()
        for st in states:
            self._written[st.tp] = st.content()
            self._recorded_at[st.tp] = written_at
            self.cohorts.parts[st.tp].changed = False
            self._unrecorded.discard(st.tp)
        for why, value in zip(whys, encoded, strict=True):
            self.metrics.state_records.labels(cause=why).inc()
            self.metrics.state_record_bytes.inc(len(value))
        if self.predictor is not None:
            self.predictor.after_batch(label_seq)
        self.metrics.processing_seconds.labels(stage="persist").observe(time.perf_counter() - t0)
        sent, unflushed = self._send_outbox(flush_records=not overlap)
        if unflushed is not None:
            self._unsettled = (unflushed, states, offsets)
        else:
            with self.metrics.processing_seconds.labels(stage="commit").time():
                self._commit_traces(states)
                self._commit_side(offsets)
        if self.on_batch is not None and fx:
            self.on_batch(fx)
        return sent

    def _owners(self, messages: Sequence[OutMessage]) -> list[str | None]:
        """The traces partition each message belongs to (decisions, dispatches and dead
        letters of its traces); labels and lift rejections belong to none."""
        topics = self.settings.topics
        out: list[str | None] = []
        for m in messages:
            owner = None
            if m.topic in (topics.decisions, topics.dispatch) and m.key is not None:
                tp = self.cohorts.partition_of(m.key.decode())
                owner = None if tp is None else part_key(tp)
            elif m.topic == topics.dlq and m.key is not None:
                source, _, rest = m.key.decode().partition("/")
                if source == topics.traces:
                    owner = f"{source}/{rest.partition('/')[0]}"
            out.append(owner)
        return out

    def _states(
        self, snap: Mapping[str, Any], handback: bool = False
    ) -> tuple[list[StateRecord], list[str]]:
        """The state records of the partitions whose state changed since the last one
        written, each with a new token (an unchanged partition's record is on the log).

        A partition whose traces only joined open cohorts since its last record
        (``Part.changed`` unset) waits for ``service.state_record_interval_s``
        unless ``handback``: the record lists every open cohort, and what it
        would add is rebuilt by re-reading the traces after its position.

        ``snap`` is journaled (its open cohorts are left out): the records read
        them from the builders, each cohort encoded once until it changes. Each
        record comes with its cause (``tapd_partition_state_records``)."""
        out: list[StateRecord] = []
        whys: list[str] = []
        now = time.time()
        due = time.monotonic() - self.settings.service.state_record_interval_s
        for tp, part in self.cohorts.parts.items():
            if part.position is None:
                continue  # nothing read yet: nothing held
            if not (handback or part.changed or self._recorded_at.get(tp, -math.inf) <= due):
                continue
            token = Token(self.incarnation, self._seq + 1)
            st = record(
                self.cohorts, snap, self.scorer.where, tp, part.position, token, self.replica, now
            )
            content = st.content()
            if content == self._written.get(tp):
                part.changed = False
                self._unrecorded.discard(tp)
                continue
            if st.missing:
                log.error("partition_state_members_unknown", partition=tp.partition, n=st.missing)
            self._seq += 1
            part.token = token
            snap["cohorts"]["parts"][part_key(tp)]["token"] = token.to_json()
            out.append(st)
            whys.append("changed" if part.changed else "handback" if handback else "interval")
        return out, whys

    def _send_outbox(self, flush_records: bool = True) -> tuple[int, int | None]:
        """Send what is owed: decisions, dispatches and dead letters first, flushed,
        then the partition state records that count them as done, flushed.

        Returns how many were sent, and, where ``flush_records`` is unset and
        state records went out unflushed, the outbox sequence number that
        :meth:`_settle` marks sent once they are flushed (else None)."""
        assert self._producer is not None
        owed = self.store.outbox()
        if not owed:
            return 0, None
        owed = self._fence(owed)
        changelog = self.settings.topics.changelog
        unflushed = False
        with self.metrics.processing_seconds.labels(stage="dispatch").time():
            for phase in (False, True):
                batch = [o for o in owed if (o.message.topic == changelog) == phase]
                for item in batch:
                    m = item.message
                    self._producer.send(m.topic, m.value, key=m.key, partition=m.partition)
                if batch and phase and not flush_records:
                    unflushed = True
                elif batch:
                    self._producer.flush(self.settings.service.grace_period_s)
        if not owed:
            return 0, None
        if unflushed:
            return len(owed), owed[-1].seq
        self.store.sent(owed[-1].seq)
        return len(owed), None

    def _settle(self) -> None:
        """Finish the loop's last batch: flush its state records, mark its outbox
        rows sent, commit its offsets.

        Why later than its send: waiting for the broker to acknowledge a batch's
        state records took as long as a round trip, twice per batch with the
        decisions' own flush, with the loop idle; sent unflushed, they are
        acknowledged while the loop reads and scores the next batch. Nothing
        is assumed on the log before it is: the rows stay owed (a crash re-sends
        them, as after a crash before a flush), the offsets stay uncommitted,
        and the next batch's decisions are flushed only after these records
        (the flush is the producer's whole), so a partition's records keep
        their order. Called before every persist, after a loop that persisted
        nothing, and before a hand-back or shutdown (their persist settles
        first and does not overlap)."""
        if self._unsettled is None:
            return
        assert self._producer is not None
        seq, states, offsets = self._unsettled
        with self.metrics.processing_seconds.labels(stage="dispatch").time():
            self._producer.flush(self.settings.service.grace_period_s)
        self._unsettled = None
        self.store.sent(seq)
        with self.metrics.processing_seconds.labels(stage="commit").time():
            self._commit_traces(states, wait=False)
            self._commit_side(offsets, wait=False)

    def _fence(self, owed: list[Outboxed]) -> list[Outboxed]:
        """Rows of a partition this replica does not hold now are sent only if no other
        replica has written that partition's state since (a failed hand-back, a
        restart): else that replica has redone their work, and they are dropped."""
        held = {part_key(tp) for tp in self.cohorts.parts}
        check = [part_of(o) for o in {o.owner for o in owed} if o is not None and o not in held]
        stale = {part_key(tp) for tp, st in self._latest_many(check).items() if not self._mine(st)}
        if not stale:
            return owed
        self.store.drop_owned(stale)
        log.warning("outbox_rows_superseded", partitions=sorted(stale))
        return [o for o in owed if o.owner not in stale]

    def _commit_traces(self, states: Sequence[StateRecord], wait: bool = True) -> None:
        """Commit each partition up to its oldest trace still held undecided, never
        below what the group had committed (no rewind). ``wait=False`` (the loop):
        no round trip waited for; the state records hold the positions, so a
        commit lost on the way only means a new owner re-reads a little more."""
        if self._traces is None:
            return
        offsets = {}
        for st in states:
            c = st.commit_offset
            if c > self._committed.get(st.tp, 0):
                offsets[st.tp] = c
        if not offsets:
            return
        try:
            self._traces.commit(offsets, wait=wait)
        except Exception as e:
            # The state records hold the positions; a failed commit only
            # means a new owner re-reads (and skips) a little more.
            log.warning("commit_failed", topics=[self.settings.topics.traces], reason=str(e))
            return
        self._committed.update(offsets)

    def _commit_side(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        topics = self.settings.topics
        owners = (
            (self._lift, topics.lift),
            (self._dlq, topics.dlq),
        )
        for consumer, topic in owners:
            mine = {tp: o for tp, o in offsets.items() if tp.topic == topic}
            if consumer is not None and mine:
                try:
                    consumer.commit(mine, wait=wait)
                except Exception as e:
                    # The state store holds these offsets; a failed broker
                    # commit only means a redelivery that _fresh() drops.
                    log.warning("commit_failed", topics=[topic], reason=str(e))

    # --- metrics -------------------------------------------------------------------

    def _update_lag(self) -> None:
        for consumer in (self._traces, self._lift, self._dlq):
            if consumer is None:
                continue
            try:
                lag = consumer.lag()
            except Exception as e:
                log.warning("lag_unavailable", reason=str(e))
                continue
            per_topic: dict[str, int] = {}
            for tp, n in lag.items():
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + n
            for topic, n in per_topic.items():
                self.metrics.consumer_lag.labels(topic=topic).set(n)

    def _publish_quality(self) -> None:
        publish_predictor(self.metrics, self.scorer.predictor, self._seen_counts)
        if self.rollout is not None:
            self.metrics.rollout_policy_version.set(version_number(self.rollout.version) or 0)


def publish_predictor(metrics: ScorerMetrics, predictor: Any, seen: dict[str, float]) -> None:
    """Copy the predictor's state into the gauges; counters advance by the delta since ``seen``."""
    q = getattr(predictor, "quality", None)
    if q is not None:
        metrics.predictor_spearman.set(q.spearman)
        metrics.predictor_pairwise_accuracy.set(q.pairwise_accuracy)
        metrics.selection_gain.set(q.selection_gain)
        for sel in SELECTIONS:
            metrics.realized_lift_mean.labels(selection=sel).set(q.mean_realized(sel))
    metrics.predictor_labels.set(getattr(predictor, "n_labels", 0))
    metrics.predictor_model_version.set(getattr(predictor, "version", 0))
    active = getattr(predictor, "stage", "heuristic")
    for stage in PREDICTOR_STAGES:
        metrics.predictor_stage.labels(stage=stage).set(1 if stage == active else 0)
    totals = {"drift": float(getattr(predictor, "drift_detected", 0))}
    for outcome, n in dict(getattr(predictor, "refits", {})).items():
        totals[f"refit:{outcome}"] = float(n)
    for key, total in totals.items():
        delta = total - seen.get(key, 0.0)
        if delta <= 0:
            continue
        seen[key] = total
        if key == "drift":
            metrics.predictor_drift.inc(delta)
        else:
            metrics.predictor_refits.labels(outcome=key.split(":", 1)[1]).inc(delta)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# --- composition -------------------------------------------------------------------


class PolicyRollout:
    """The configured rollout engine on the current policy version.

    The policy loads on the first sample, not at start: traffic that carries
    its K attempts never needs it, and readiness must not wait on a load.
    Kept versions are known from the policies topic (:meth:`announce`: the
    service feeds every record to it). A sample comes from the newest kept
    version known: the cohort's own (the one it closed under) or a newer one
    announced since, whose weights are loaded from the announced URI,
    checksum checked, first; re-probing a stale cohort with the policy the
    trainer now holds is the point of re-probing. A version not (yet)
    announced, or whose bytes do not match, is not loaded: the engine keeps
    the weights it has and says so (an engine without in-place weights, such
    as vLLM, keeps sampling from the base policy).
    """

    def __init__(self, settings: TapdSettings) -> None:
        self.settings = settings
        self.catalog: dict[str, PolicyVersion] = {}
        self.version = "v0"
        self._wanted = "v0"
        self._engine: Any = None
        self._missing: str | None = None
        self._aligner: Any = None  # daemon.policy.alignment.UpdateAlignment, on first use
        # Set by the service: reads the policies topic to its end before a sample.
        self.refresh: Callable[[], None] | None = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from daemon.policy.rollout import make_rollout_engine

            self._engine = make_rollout_engine(self.settings.policy)
        self._load(self.target)
        return self._engine

    @property
    def target(self) -> str:
        """The version to sample from: the newest of the cohort's and those announced."""
        known = [self._wanted, *self.catalog]
        return max(known, key=lambda v: version_number(v) or 0)

    def announce(self, announced: PolicyVersion) -> None:
        """A kept version from the policies topic (the newest record per version wins)."""
        self.catalog[announced.version] = announced

    def sample(self, prompts: Sequence[str], k: int, **kw: Any) -> Any:
        if self.refresh is not None:
            self.refresh()
        engine = self.engine
        log.info(
            "rollout_sampled",
            policy_version=self.version,
            target=self.target,
            prompts=len(prompts),
        )
        return engine.sample(prompts, k, **kw)

    def update_alignment(
        self, traces: Sequence[Any], probe: Mapping[str, Sequence[Any]]
    ) -> float | None:
        """The cohort's update_alignment with its target at the loaded weights.

        Its gradient comes from ``policy.update_alignment_attempts`` fresh
        attempts per prompt sampled from those weights (seeded by the trace
        ids: every replica gets the same value), or from the cohort's own
        attempts when that is 0 (:meth:`UpdateAlignment.measure`).

        None (the feature reads 0, "not measured") where the engine holds no
        weights in this process (vLLM), the cohort has no target in the probe,
        or the measurement fails: a failure of the policy is not the traces'
        fault, so it is logged and the cohort is still scored.
        """
        from collections import Counter

        from daemon.policy.alignment import UpdateAlignment
        from streams.probes import cohort_target

        # The cohort's subject as featurize takes it: the most common, ties by name.
        counts = Counter(t.subject for t in traces)
        subject = max(counts, key=lambda k: (counts[k], k))
        target = cohort_target(subject, None, probe)
        if target is None:
            return None
        try:
            engine = self.engine  # loads the policy and the version to sample from
            model, tok = getattr(engine, "model", None), getattr(engine, "tokenizer", None)
            if model is None or tok is None:
                return None
            if self._aligner is None:
                self._aligner = UpdateAlignment(
                    model,
                    tok,
                    engine.format_prompt,
                    probe,
                    self.settings.trainer.foothold_probability,
                )
            grpo = self.settings.grpo
            got = self._aligner.measure(
                traces,
                [target],
                self.version,
                self,
                self.settings.policy.update_alignment_attempts,
                max_new_tokens=grpo.max_completion_length,
                temperature=grpo.temperature,
            )
            return float(got[target])
        except Exception as e:  # any failure of the model: not measured
            log.error("update_alignment_failed", target=target, reason=repr(e))
            return None

    def sync(self, version: str) -> None:
        """Sample from ``version`` from now on (applied at the next sample)."""
        if version:
            self._wanted = version

    def _load(self, version: str) -> None:
        from daemon.policy.store import ChecksumMismatch, load_uri

        model = getattr(self._engine, "model", None)
        if version == self.version or model is None:
            return
        announced = self.catalog.get(version)
        if announced is None:
            if self._missing != version:
                self._missing = version
                log.warning("policy_not_announced", policy_version=version, loaded=self.version)
            return
        try:
            state = load_uri(announced.uri, announced.sha256, map_location=self._engine.device)
        except (OSError, ChecksumMismatch, RuntimeError, ValueError) as e:
            if self._missing != version:
                self._missing = version
                log.error(
                    "policy_load_failed",
                    policy_version=version,
                    uri=announced.uri,
                    reason=str(e),
                    loaded=self.version,
                )
            return
        model.load_state_dict(state, strict=False)
        model.eval()
        self.version = version
        self._missing = None
        log.info("policy_synced", policy_version=version, uri=announced.uri)


def build_scorer(
    settings: TapdSettings,
    thresholds: Callable[[], Thresholds],
    rollout: PolicyRollout | None = None,
) -> Scorer:
    """The pure pipeline with its collaborators, as the settings configure them.

    Its predictor starts fresh; :meth:`ScorerService.start` replaces it with
    the one restored from the model store and the stored labels.
    """
    from daemon.core import decision
    from daemon.core.features import featurize
    from daemon.core.predictor import Predictor
    from daemon.policy.rollout import fill_attempts
    from daemon.verify.settings import configure as configure_verifiers
    from streams.probes import read_probe_file, targets

    configure_verifiers(settings.verify)  # caps on verifier_args, the code sandbox
    predictor = Predictor(settings.predictor)
    engine = rollout or PolicyRollout(settings)
    probe_path = settings.policy.probe_path
    probe = targets(read_probe_file(probe_path)) if probe_path is not None else None
    # Per target: a cohort's target_similarity is measured against its own
    # target's probe items (the ones its lift is measured on).
    probe_prompts = (
        {t: tuple(it.prompt for it in items) for t, items in probe.items()}
        if probe is not None
        else None
    )
    # Only where the scorer holds the weights: the hf engine on a configured model.
    align = (
        probe is not None
        and settings.policy.update_alignment
        and settings.policy.rollout_engine == "hf"
        and settings.policy.model_path is not None
    )
    grpo = settings.grpo

    def fill(cohort: Any, seed: int) -> Any:
        engine.sync(cohort.policy_version)
        return fill_attempts(
            cohort.traces,
            engine,
            grpo.num_generations,
            seed,
            reprobe_ids=cohort.reprobe_ids,
            policy_version=cohort.policy_version or None,
            grpo=grpo,
        )

    def feats(traces: Sequence[Any]) -> Mapping[str, float]:
        aligned = engine.update_alignment(traces, probe) if align and probe is not None else None
        return featurize(traces, probe_prompts=probe_prompts, update_alignment=aligned)

    return Scorer(
        settings,
        PartitionedCohorts(settings.cohorting, engine.version),
        predictor,
        decision.decide,
        fill,
        feats,
        thresholds,
        timer=time.perf_counter,
        seed=settings.predictor.seed,
    )


RESTART = "restart"


def run_scorer(settings: TapdSettings, transport: Transport | None = None) -> str | None:
    """The ``tapd run`` process: HTTP (health, readiness, metrics, admin), signals, loop.

    Returns :data:`RESTART` when the process should start again (a predictor
    rollback through the admin API moved the model pointer after shutdown).
    """
    from daemon.runtime.http import (
        AdminApi,
        HttpServer,
        ReadinessMonitor,
        ensure_admin_token,
    )
    from daemon.runtime.inspect import STATE_FILE, Live, ScorerInspector
    from daemon.runtime.thresholds import NAMES, OverrideStore, RoundTrips, ThresholdsHolder
    from streams.factory import open_transport

    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    topics = settings.topics
    metrics = ScorerMetrics(
        topics=(topics.traces, topics.lift, topics.dlq),
        thresholds=NAMES,
        tenant_labels=tenant_labels(settings),
    )
    trips = RoundTrips()
    overrides = OverrideStore(state_dir / STATE_FILE)
    holder = ThresholdsHolder(settings.thresholds, store=overrides, lease_floor=trips.floor)
    path = settings.service.thresholds_file
    if path is not None:
        reload_thresholds(holder, path, metrics, source="file")
    holder.on_change = lambda record: audit(metrics, record, holder)
    publish_thresholds(metrics, holder)
    if holder.overrides:
        log.warning(
            "threshold_overrides_restored",
            overrides={n: o.to_json() for n, o in holder.overrides.items()},
        )
    own_transport = transport is None
    transport = transport or open_transport(
        settings.transport, max_poll_records=settings.service.max_poll_records
    )
    service: ScorerService | None = None
    rollback: dict[str, str] = {}

    def ready() -> dict[str, bool]:
        return {
            "broker": bool(transport.ping()),
            "predictor": service is not None and service.loaded,
        }

    def request_rollback(name: str, who: str) -> None:
        rollback.update(name=name, who=who)
        log.warning("model_rollback_requested", rollback_to=name, who=who)
        if service is not None:
            service.stop_event.set()

    svc = settings.service
    token = ensure_admin_token(
        state_dir,
        svc.admin_token.get_secret_value() if svc.admin_token else None,
        svc.admin_token_file,
    )
    live = Live(
        sample=metrics.registry.get_sample_value,
        ready=ready,
        thresholds=holder,
        request_rollback=request_rollback,
    )
    api = AdminApi(
        holder,
        metrics,
        token,
        ready,
        path,
        read_token=svc.read_token.get_secret_value() if svc.read_token else None,
        inspector=ScorerInspector(settings, live),
        max_body_bytes=svc.http_max_body_bytes,
        timeout_s=svc.http_timeout_s,
    )
    server = HttpServer(
        api,
        svc.host,
        svc.port,
        timeout_s=svc.http_timeout_s,
        max_connections=svc.http_max_connections,
        backlog=svc.http_backlog,
        tls_certfile=svc.tls_certfile,
        tls_keyfile=svc.tls_keyfile,
    ).start()
    monitor = ReadinessMonitor(ready, metrics.up_ready).start()
    log.info("http_listening", url=server.url, tls=server.tls)
    try:
        rollout = PolicyRollout(settings)
        if settings.policy.model_path is not None:
            # Loaded before the consumers join their groups: a first load of
            # tens of seconds inside the loop outlives the session timeout and
            # costs a rebalance at every start.
            t0 = time.monotonic()
            rollout.engine  # noqa: B018 - loads the policy
            log.info("policy_loaded", seconds=round(time.monotonic() - t0, 3))
        scorer = build_scorer(settings, lambda: holder.current, rollout)

        def on_batch(fx: Effects) -> None:
            live.remember(fx.decisions)
            trips.observe(fx)

        service = ScorerService(
            settings, transport, scorer, metrics, holder, on_batch=on_batch, rollout=rollout
        )
        service.install_signal_handlers()
        service.start()
        # What is built by now (the imported modules, settings, the predictor,
        # a policy) lives as long as the process. Left to the cyclic collector,
        # each full collection walks those hundreds of thousands of objects
        # again, and the held traces' allocations set collections off all the
        # time: that was the largest share of decoding a record in the running
        # scorer. Frozen, collections walk only what the loop made.
        gc.collect()
        gc.freeze()
        # The loop's own garbage is acyclic almost all of it (decoded traces,
        # freed by reference counting when their cohorts close); a young
        # collection every 700 allocations (the default) ran ~70 times per
        # 500-record batch to find nearly nothing (about 7 % of the scorer's CPU
        # in bench_scorer).
        # One every 50,000 allocations is about one per batch.
        gc.set_threshold(50_000, 20, 100)
        service.run()
    finally:
        monitor.stop()
        server.stop()
        overrides.close()
        if own_transport:
            transport.close()
    if rollback:
        ModelStore(state_dir / "models").pin(rollback["name"])
        log.warning("model_rolled_back", latest=rollback["name"], who=rollback["who"])
        return RESTART
    log.info("scorer_exiting")
    return None


if __name__ == "__main__":  # ``python -m daemon.service.scorer``: the same as ``tapd run``
    from daemon.config import load_settings
    from daemon.runtime.logging import configure_logging

    _settings = load_settings().for_role("scorer")
    configure_logging(
        _settings.log_level, role="scorer", service=True, replica=_settings.service.replica_name()
    )
    run_scorer(_settings)


def replay_file(settings: TapdSettings, path: Path, out: Any) -> int:
    """Run a JSONL trace file through the pipeline in shadow mode; print each decision.

    A temporary embedded log carries the file, so the path is the service's
    own (decode, dead letters, cohorting, rollouts, features, predictor,
    decision); shadow mode, because no trainer answers a replay.
    """
    import json
    import tempfile

    from daemon.core.cohorting import partition_key, validate_slice_key
    from daemon.runtime.thresholds import ThresholdsHolder
    from streams.embedded import EmbeddedTransport

    with tempfile.TemporaryDirectory(prefix="tapd-replay-") as tmp:
        state = Path(tmp)
        settings = settings.model_copy(
            update={
                "state_dir": state,
                "transport": settings.transport.model_copy(
                    update={"kind": "embedded", "embedded_path": state / "log.sqlite"}
                ),
                "thresholds": settings.thresholds.replace(shadow_mode=True),
            }
        )
        transport = EmbeddedTransport(state / "log.sqlite")
        producer = transport.producer()
        n_lines = 0
        fields = validate_slice_key(settings.cohorting.slice_key)
        with Path(path).open("rb") as fh:
            for line in fh:
                if line.strip():
                    raw = line.rstrip(b"\r\n")
                    producer.send(settings.topics.traces, raw, key=partition_key(raw, fields))
                    n_lines += 1
        producer.flush()
        producer.close()
        metrics = ScorerMetrics(tenant_labels=tenant_labels(settings))
        holder = ThresholdsHolder(settings.thresholds)
        scorer = build_scorer(settings, lambda: holder.current)
        printed = 0

        def show(fx: Effects) -> None:
            nonlocal printed
            for d in fx.decisions:
                out.write(json.dumps(d.to_json()) + "\n")
                printed += 1
            for dl in fx.dead_letters:
                out.write(
                    json.dumps({"dead_letter": dl.model_dump(mode="json", by_alias=True)}) + "\n"
                )

        service = ScorerService(
            settings,
            transport,
            scorer,
            metrics,
            holder,
            on_batch=show,
            cohorts_per_poll=4,
            background_refits=False,
        )
        flushed = False

        def done(s: Scorer) -> bool:
            nonlocal flushed
            if not flushed and metrics.traces_consumed._value.get() >= n_lines:
                flushed = True
                service.end_of_stream()
            return flushed and not s.pending

        service.run(until=done)
        return printed
