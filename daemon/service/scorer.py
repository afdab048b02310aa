"""``tapd run``: the scorer's long-running I/O shell around :class:`daemon.core.pipeline.Scorer`.

One loop iteration:

1. apply backpressure: pause the traces consumer while the scorer is not
   accepting traces (in-flight cap reached); the lift consumer, a separate
   consumer in its own group, keeps reading, which is what frees slots;
2. poll traces and lift results (bounded batches), feed them to the scorer,
   tick its clock, and score at most ``cohorts_per_poll`` queued cohorts (the
   slow part: rollouts), so that a poll is never further away than one
   cohort's scoring time from the last;
3. persist, in one SQLite transaction, the scorer snapshot (open cohorts
   included), the consumed offsets and the outbox of messages owed;
4. send the outbox, flush, mark it sent, and only then commit the offsets
   to the broker.

Why the snapshot rather than committing only up to the oldest open cohort:
re-reading the traces of open cohorts after a crash would rebuild them under
a different clock (age closes) and a different partition interleaving, so a
re-formed cohort could differ from one already dispatched, and a trace would
end up in two cohorts. A snapshot replays nothing that was decided. Records
below the stored offsets are skipped after a restart (the broker commit can
lag the state by one batch); the outbox is re-sent, which is harmless because
every message carries its idempotency key (cohort id, trace origin).

SIGTERM stops consuming, persists the work in hand (open and queued cohorts go
into the snapshot: handed back to the next incarnation), commits and exits
within ``ServiceSettings.grace_period_s``. SIGHUP reloads the thresholds file.
"""

from __future__ import annotations

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
from daemon.core.vocabulary import SELECTIONS
from daemon.runtime.http import audit, publish_thresholds
from daemon.runtime.logging import get_logger
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.modelstore import ModelStore
from daemon.runtime.observe import observe
from daemon.runtime.predictor_host import PredictorHost
from daemon.runtime.state import StateStore
from streams.transport import Consumer, Producer, Record, TopicPartition, Transport

log = get_logger("tapd.service")

LAG_EVERY_S = 5.0
WATCH_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class LoopStats:
    traces: int
    lifts: int
    messages: int


class ThresholdsWatcher:
    """Reloads the thresholds file when its mtime changes (the k8s ConfigMap case)."""

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
        m = self._stat()
        if m is None or m == self._mtime:
            return False
        self._mtime = m
        assert self.path is not None
        return reload_thresholds(self.holder, self.path, self.metrics, source="file")


def reload_thresholds(holder: Any, path: Path, metrics: ScorerMetrics, source: str) -> bool:
    """Reload from the file; a bad file keeps the old values and says why."""
    try:
        record = holder.reload_from_file(path, who=f"tapd:{source}")
    except Exception as e:  # any bad file (unreadable, not YAML, invalid): keep the old values
        log.error("thresholds_reload_failed", source=source, path=str(path), reason=str(e))
        return False
    if record.what:
        audit(metrics, record, source, holder.current)
    return True


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
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.scorer = scorer
        self.metrics = metrics
        self.holder = thresholds_holder
        self.on_batch = on_batch
        self.cohorts_per_poll = cohorts_per_poll
        self.score_budget_s = score_budget_s
        self.store = StateStore(Path(settings.state_dir) / "scorer-state.sqlite")
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
        self._done: dict[TopicPartition, int] = {}
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
        """Restore the durable state, re-send what the last incarnation owed, open consumers."""
        # The predictor: its latest snapshot plus the labels stored after it.
        self.predictor = PredictorHost.open(
            self.settings.predictor,
            ModelStore(Path(self.settings.state_dir) / "models"),
            self.store.labels_since(0),
            background=self.background_refits,
        )
        self.scorer.predictor = self.predictor.predictor
        snap = self.store.load_snapshot()
        if snap is not None:
            self.scorer.restore(snap)
            log.info(
                "state_restored",
                open_cohorts=self.scorer.cohorts.n_open,
                pending=len(self.scorer.pending),
                in_flight=len(self.scorer.in_flight),
            )
        self._done = self.store.offsets()
        self._producer = self.transport.producer()
        self._send_outbox()
        topics = self.settings.topics
        group = self.settings.service.group
        self._traces = self.transport.consumer([topics.traces], group, on_revoked=self._revoked)
        self._lift = self.transport.consumer(
            [topics.lift], f"{group}.lift", on_revoked=self._revoked
        )
        # A dispatch the trainer rejected frees its in-flight slot as a lift
        # would; its own consumer and group, so the lift consumer's
        # assignment never waits on a second topic.
        self._dlq = self.transport.consumer([topics.dlq], f"{group}.dlq", on_revoked=self._revoked)
        # Commit what the state already holds, so that lag reads true at once.
        self._commit(self._done)
        self.loaded = True
        log.info("scorer_started", group=group, traces=topics.traces, lift=topics.lift)

    def _revoked(self, tps: list[TopicPartition]) -> None:
        # Everything read is already in the state store; commit it while we still own it.
        done = {tp: o for tp, o in self._done.items() if tp in set(tps)}
        if done:
            topics = self.settings.topics
            consumer = {topics.traces: self._traces, topics.dlq: self._dlq}.get(
                tps[0].topic if tps else "", self._lift
            )
            if consumer is not None:
                try:
                    consumer.commit(done)
                except Exception as e:
                    log.warning("commit_on_revoke_failed", reason=str(e))

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
        """Stop consuming, persist the work in hand, commit, close."""
        t0 = time.monotonic()
        if self._traces is not None:
            self._traces.pause()
        if self.loaded:
            # Whatever is queued stays in the snapshot: the next incarnation scores it.
            self._persist_and_send([], [], Effects())
        for c in (self._traces, self._lift, self._dlq):
            if c is not None:
                c.close()
        if self._producer is not None:
            self._producer.close()
        if self.predictor is not None:
            self.predictor.close()
            self.predictor = None
        self.store.close()
        self.loaded = False
        self._traces = self._lift = self._dlq = None
        self._producer = None
        log.info("scorer_stopped", seconds=round(time.monotonic() - t0, 3))

    # --- one iteration -----------------------------------------------------------

    def iterate(self) -> LoopStats:
        assert self._traces is not None and self._lift is not None and self._dlq is not None
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
        traces = self._fresh(self._traces.poll(wait, s.max_poll_records))
        lifts = self._fresh(self._lift.poll(0.0 if traces or busy else wait, s.max_poll_records))
        lifts += self._fresh(self._dlq.poll(0.0 if traces or busy else 0.05, s.max_poll_records))
        now = time.time()
        fx = Effects()
        if lifts:
            fx += self.scorer.on_lift(lifts, now)
        if traces:
            fx += self.scorer.on_traces(traces, now)
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
        if traces or lifts or fx or worked:
            sent = self._persist_and_send(traces, lifts, fx)
        self._publish_quality()
        return LoopStats(len(traces), len(lifts), sent)

    def end_of_stream(self) -> None:
        """Close every open cohort now (a finite stream: replay, demo, benchmarks).

        The closed cohorts are queued, persisted and scored by the loop as usual.
        """
        self._persist_and_send([], [], self.scorer.flush(time.time()))

    def _fresh(self, records: Sequence[Record]) -> list[Record]:
        # Records below the stored offsets were processed by a previous
        # incarnation whose broker commit did not happen.
        return [r for r in records if r.offset >= self._done.get(r.tp, 0)]

    def _persist_and_send(
        self, traces: Sequence[Record], lifts: Sequence[Record], fx: Effects
    ) -> int:
        assert self._producer is not None
        offsets: dict[TopicPartition, int] = {}
        for r in (*traces, *lifts):
            if offsets.get(r.tp, -1) < r.offset + 1:
                offsets[r.tp] = r.offset + 1
        observe(fx.events, self.metrics)
        messages = fx.messages(self.settings.topics)
        label_seq = self.store.save(self.scorer.snapshot(), offsets, messages, fx.labels)
        self._done.update(offsets)
        if self.predictor is not None:
            self.predictor.after_batch(label_seq)
        sent = self._send_outbox()
        self._commit(offsets)
        if self.on_batch is not None and fx:
            self.on_batch(fx)
        return sent

    def _send_outbox(self) -> int:
        assert self._producer is not None
        owed = self.store.outbox()
        if not owed:
            return 0
        with self.metrics.processing_seconds.labels(stage="dispatch").time():
            for item in owed:
                self._producer.send(item.message.topic, item.message.value, key=item.message.key)
            self._producer.flush(self.settings.service.grace_period_s)
        self.store.sent(owed[-1].seq)
        return len(owed)

    def _commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        topics = self.settings.topics
        owners = (
            (self._traces, (topics.traces,)),
            (self._lift, (topics.lift,)),
            (self._dlq, (topics.dlq,)),
        )
        for consumer, owned in owners:
            mine = {tp: o for tp, o in offsets.items() if tp.topic in owned}
            if consumer is not None and mine:
                try:
                    consumer.commit(mine)
                except Exception as e:
                    # The state store holds these offsets; a failed broker
                    # commit only means a redelivery that _fresh() drops.
                    log.warning("commit_failed", topics=list(owned), reason=str(e))

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
    for stage in ("heuristic", "river", "lightgbm"):
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
    Kept versions come from the :class:`~daemon.policy.store.PolicyStore`
    the trainer writes; when a cohort closes under a newer version than the
    one loaded, its weights are loaded before sampling (an engine without
    in-place weights, such as vLLM, keeps sampling from the base policy).
    """

    def __init__(self, settings: TapdSettings) -> None:
        from daemon.policy.store import PolicyStore

        self.settings = settings
        self.policies = PolicyStore(settings.policy_store_dir())
        self.version = "v0"
        self._wanted = "v0"
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from daemon.policy.rollout import make_rollout_engine

            self._engine = make_rollout_engine(self.settings.policy)
        self._load(self._wanted)
        return self._engine

    def sample(self, prompts: Sequence[str], k: int, **kw: Any) -> Any:
        return self.engine.sample(prompts, k, **kw)

    def sync(self, version: str) -> None:
        """Sample from ``version`` from now on (applied at the next sample)."""
        if version:
            self._wanted = version

    def _load(self, version: str) -> None:
        model = getattr(self._engine, "model", None)
        if version == self.version or model is None:
            return
        state = self.policies.load(version, map_location=self._engine.device)
        if state is None:
            return
        model.load_state_dict(state, strict=False)
        model.eval()
        self.version = version
        log.info("policy_synced", policy_version=version)


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
    from daemon.core.cohorting import CohortBuilder
    from daemon.core.features import featurize
    from daemon.core.predictor import Predictor
    from daemon.policy.rollout import fill_attempts
    from streams.probes import read_probe_file, targets

    predictor = Predictor(settings.predictor)
    engine = rollout or PolicyRollout(settings)
    probe_path = settings.policy.probe_path
    # Per target: a cohort's target_similarity is measured against its own
    # target's probe items (the ones its lift is measured on).
    probe_prompts = (
        {
            t: tuple(it.prompt for it in items)
            for t, items in targets(read_probe_file(probe_path)).items()
        }
        if probe_path is not None
        else None
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
        return featurize(traces, probe_prompts=probe_prompts)

    return Scorer(
        settings,
        CohortBuilder(settings.cohorting, engine.version),
        predictor,
        decision.decide,
        fill,
        feats,
        thresholds,
        timer=time.perf_counter,
        seed=settings.predictor.seed,
    )


def run_scorer(settings: TapdSettings, transport: Transport | None = None) -> None:
    """The ``tapd run`` process: HTTP (health, readiness, metrics, admin), signals, loop."""
    from daemon.core.decision import ThresholdsHolder
    from daemon.runtime.http import AdminApi, HttpServer
    from streams.factory import open_transport

    metrics = ScorerMetrics()
    holder = ThresholdsHolder(settings.thresholds)
    path = settings.service.thresholds_file
    if path is not None:
        reload_thresholds(holder, path, metrics, source="file")
    publish_thresholds(metrics, holder.current)
    own_transport = transport is None
    transport = transport or open_transport(
        settings.transport, max_poll_records=settings.service.max_poll_records
    )
    service: ScorerService | None = None

    def ready() -> dict[str, bool]:
        return {
            "broker": bool(transport.ping()),
            "predictor": service is not None and service.loaded,
        }

    token = settings.service.admin_token
    api = AdminApi(holder, metrics, token.get_secret_value() if token else None, ready, path)
    server = HttpServer(api, settings.service.host, settings.service.port).start()
    log.info("http_listening", url=server.url)
    try:
        scorer = build_scorer(settings, lambda: holder.current)
        service = ScorerService(settings, transport, scorer, metrics, holder)
        service.install_signal_handlers()
        service.run()
    finally:
        server.stop()
        if own_transport:
            transport.close()


if __name__ == "__main__":  # ``python -m daemon.service.scorer``: the same as ``tapd run``
    from daemon.config import load_settings
    from daemon.runtime.logging import configure_logging

    _settings = load_settings()
    configure_logging(_settings.log_level, role="scorer")
    run_scorer(_settings)


def replay_file(settings: TapdSettings, path: Path, out: Any) -> int:
    """Run a JSONL trace file through the pipeline in shadow mode; print each decision.

    A temporary embedded log carries the file, so the path is the service's
    own (decode, dead letters, cohorting, rollouts, features, predictor,
    decision); shadow mode, because no trainer answers a replay.
    """
    import json
    import tempfile

    from daemon.core.decision import ThresholdsHolder
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
        with Path(path).open("rb") as fh:
            for line in fh:
                if line.strip():
                    producer.send(settings.topics.traces, line.rstrip(b"\r\n"))
                    n_lines += 1
        producer.flush()
        producer.close()
        metrics = ScorerMetrics()
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
            settings, transport, scorer, metrics, holder, on_batch=show, cohorts_per_poll=4,
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
