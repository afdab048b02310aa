"""``tapd trainer``: the GRPO trainer process, a thin I/O shell.

    dispatch topic ──► decode + validate ──► CohortTrainer.on_dispatch ──► lift topic
                           │ (bad)                    │ kept version      flush, then commit
                           └──► dead-letter topic     └──► policies topic (flushed first)

One cohort at a time (``max_records=1``): a cohort takes seconds to minutes,
and a consumer that held a batch would outlive ``max_poll_interval_ms``. The
order per dispatch is: the ledger records the result (inside
``on_dispatch``), the lift (or dead letter) is sent and flushed, and only then
is the dispatch offset committed. A crash anywhere redelivers the dispatch,
and the ledger turns the redelivery into a re-publication of the same result.

A bad dispatch never stops the process: it is decoded by the one
poison-message mechanism (:func:`streams.deadletter.decode_record`), so any
failure, foreseen or not, goes to the dead-letter topic with the stage, field
and reason (stage ``internal`` for a failure nobody foresaw), and
``tapd_trainer_dead_letters_total`` counts it. SIGTERM lets the cohort in hand
finish, commits, and closes.

Policy versions travel as records: every kept version is announced on the
policies topic (version, URI, SHA-256, size; compacted by version) and
flushed before the lift that names it, so a scorer that learns the new
version from the lift can already load it. The store keeps the newest
``policy.keep_versions`` checkpoints (and the one in use); the announcement
of the current version is repeated at start, and a redelivered dispatch
re-announces its version byte for byte.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.config import TapdSettings
from daemon.policy.store import version_number
from daemon.runtime.logging import bind_ids, get_logger
from daemon.runtime.metrics import TrainerMetrics
from daemon.trainer.cohort import CohortTrainer, Handled
from daemon.trainer.probe import Probe, VerifierLookup
from streams.deadletter import INTERNAL, Poison, dead_letter, dead_letter_key, decode_record
from streams.schemas import DeadLetter, Dispatch, LiftResult, encode
from streams.transport import Record, Transport, next_offsets

log = get_logger("tapd.trainer")


@dataclass(frozen=True)
class Rejected:
    """Why a dispatch cannot be trained on."""

    stage: str  # a bounded stage name of daemon.core.vocabulary.PIPELINE_STAGES
    field: str
    reason: str


def check_verifiers(dispatch: Dispatch, verifiers: VerifierLookup) -> Rejected | None:
    """Why some item's verifier cannot judge its reference, if one cannot.

    A verifier raises on what the task got wrong (unknown name, bad
    arguments, unusable reference): find out before training, not in the
    middle of a GRPO step. Any exception counts, not only the foreseen ones.
    """
    for i, it in enumerate(dispatch.items):
        try:
            verifiers(it.verifier, dict(it.verifier_args))("", it.reference)
        except ValueError as e:
            sub = getattr(e, "field", "verifier")
            return Rejected("verifier", f"items[{i}].{sub}", str(getattr(e, "reason", e)))
        except Exception as e:
            return Rejected("verifier", f"items[{i}].verifier", f"verifier failed: {e!r}")
    return None


def validate(raw: bytes, verifiers: VerifierLookup) -> Dispatch | Rejected:
    """Decode a dispatch and check that every item's verifier can judge its reference."""
    decoded = decode_record(Record("dispatch", 0, 0, None, raw, 0), Dispatch, "decode", 0.0)
    if isinstance(decoded, Poison):
        return Rejected(decoded.stage, decoded.field, decoded.reason)
    return check_verifiers(decoded, verifiers) or decoded


class TrainerService:
    """Consume dispatches, train, publish lifts; commit only what is durable."""

    def __init__(
        self,
        settings: TapdSettings,
        transport: Transport,
        trainer: CohortTrainer,
        verifiers: VerifierLookup,
        metrics: TrainerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.trainer = trainer
        self.verifiers = verifiers
        self.metrics = metrics or TrainerMetrics()
        self.clock = clock
        self.stopping = threading.Event()
        self.consumer = transport.consumer([settings.topics.dispatch], settings.trainer.group)
        self.producer = transport.producer()
        self.metrics.policy_version.set(trainer.version)

    def step(self) -> int:
        """Poll and handle at most one dispatch; the number of records handled."""
        records = self.consumer.poll(self.settings.service.poll_timeout_s, max_records=1)
        for record in records:
            try:
                self._handle(record)
            except Exception as e:
                # Whatever this record did, it must not be redelivered into a
                # crash loop: it is dead-lettered, and the next one handled.
                log.exception("dispatch_failed", error=repr(e))
                self._reject(record, Rejected(INTERNAL, "$", f"handling failed: {e!r}"))
            self.producer.flush()
            try:
                self.consumer.commit(next_offsets([record]))
            except Exception as e:
                # A rebalance took the partition (a slow cohort, a starved
                # heartbeat): the dispatch comes back to whoever owns it now,
                # and the ledger turns it into a re-publication. Exiting here
                # would only make a slow record a crash loop.
                log.warning("commit_failed", offset=record.offset, reason=str(e))
        return len(records)

    def _handle(self, record: Record) -> None:
        topics = self.settings.topics
        decoded = decode_record(record, Dispatch, "decode", self.clock())
        if isinstance(decoded, Poison):
            self._send_letter(record, decoded.letter)
            return
        problem = check_verifiers(decoded, self.verifiers)
        if problem is not None:
            self._reject(record, problem)
            return
        checked = decoded
        with bind_ids(cohort_id=checked.cohort_id, model_version=checked.model_version):
            try:
                handled = self.trainer.on_dispatch(checked, self.clock())
            except Exception as e:  # a cohort must never take the process down
                log.exception("cohort_failed", error=str(e))
                self.metrics.cohorts.labels(outcome="failed").inc()
                self._reject(record, Rejected("lift", "$", f"training failed: {e!r}"))
                return
            r = handled.result
            if r.policy_version_after != r.policy_version_before:
                self._announce(r.policy_version_after, checked.policy_version)
            self.producer.send(topics.lift, encode(handled.result), key=checked.cohort_id.encode())
            self._observe(handled)

    def _announce(self, version: str, in_use: str = "") -> None:
        """Publish a kept version's record and flush it (before any lift names it),
        then apply the retention; v0 (the configured base policy) has none."""
        n = version_number(version)
        store = self.trainer.policies
        described = store.describe(n) if n else None
        if described is None:
            return
        self.producer.send(
            self.settings.topics.policies, described.encode(), key=described.version.encode()
        )
        self.producer.flush()
        log.info(
            "policy_announced",
            policy_version=described.version,
            uri=described.uri,
            sha256=described.sha256,
            size_bytes=described.size_bytes,
        )
        protect = {m for m in (n, version_number(in_use), self.trainer.version) if m}
        gone = store.prune(self.settings.policy.keep_versions, protect)
        if gone:
            log.info("policy_versions_pruned", versions=[f"v{g}" for g in gone])
        self.metrics.policy_store_bytes.set(store.disk_bytes())
        self.metrics.policy_versions_stored.set(len(store.versions()))

    def _reject(self, record: Record, rejected: Rejected) -> None:
        letter = dead_letter(
            record.value,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=rejected.stage,
            field=rejected.field,
            reason=rejected.reason,
            ts=self.clock(),
        )
        self._send_letter(record, letter)

    def _send_letter(self, record: Record, letter: DeadLetter) -> None:
        log.warning(
            "dispatch_rejected",
            stage=letter.stage,
            field=letter.field,
            reason=letter.reason,
            partition=record.partition,
            offset=record.offset,
        )
        self.producer.send(self.settings.topics.dlq, encode(letter), key=dead_letter_key(letter))
        self.metrics.dead_letters.inc()

    def _observe(self, handled: Handled) -> None:
        r: LiftResult = handled.result
        m = self.metrics
        fields: dict[str, Any] = {
            "policy_version_before": r.policy_version_before,
            "policy_version_after": r.policy_version_after,
            "nll_lift": round(r.nll_lift, 5),
            "acc_lift": round(r.acc_lift, 4),
            "target": r.target,
        }
        if handled.duplicate:
            m.cohorts.labels(outcome="duplicate").inc()
            log.info("cohort_duplicate_republished", **fields)
            return
        m.cohorts.labels(outcome="rolled_back" if r.rolled_back else "trained").inc()
        if r.rolled_back:
            m.rollbacks.inc()
        m.cohort_seconds.observe(r.duration_s)
        m.nll_lift.observe(r.nll_lift)
        m.accuracy_lift.set(r.acc_lift)
        for part, pl in (
            ("target", r.target_lift),
            ("transfer", r.transfer_lift),
            ("collateral", r.collateral_lift),
        ):
            if pl is not None:
                m.part_nll_lift.labels(part=part).observe(pl.nll_lift)
                m.part_accuracy_lift.labels(part=part).set(pl.acc_lift)
                fields[f"{part}_nll_lift"] = round(pl.nll_lift, 5)
                fields[f"{part}_acc_lift"] = round(pl.acc_lift, 4)
        if r.target_lift is None:
            reason = "no_target" if r.target is None else "no_foothold"
            m.lift_without_target.labels(reason=reason).inc()
            log.warning("lift_without_target", cohort_id=r.cohort_id, reason=reason, **fields)
        m.train_reward.labels(phase="before").set(r.train_reward_before)
        m.train_reward.labels(phase="after").set(r.train_reward_after)
        # Probe figures of the policy now in use (the pre-update one after a
        # rollback or a revert).
        kept = r.mode == "continual" and not r.rolled_back
        m.probe_nll.set(r.nll_after if kept else r.nll_before)
        m.probe_accuracy.set(r.acc_after if kept else r.acc_before)
        p = r.plasticity
        if p is not None:
            m.dormant_fraction.set(p.dormant_fraction)
            m.effective_rank.set(p.effective_rank)
            m.weight_norm.set(p.weight_norm)
            m.grad_norm.set(p.grad_norm)
            m.entropy.set(p.policy_entropy)
        m.policy_version.set(version_number(self.trainer.policy_version) or 0)
        log.info(
            "cohort_trained",
            mode=r.mode,
            rolled_back=r.rolled_back,
            steps=r.steps,
            duration_s=round(r.duration_s, 3),
            train_reward_before=r.train_reward_before,
            train_reward_after=r.train_reward_after,
            **fields,
        )

    def run(self) -> None:
        """Until :meth:`stop`: the cohort in hand always finishes and is committed."""
        # The version in use, announced again: a scorer that starts on an
        # empty disk finds it even if the topic was recreated.
        self._announce(self.trainer.policy_version)
        log.info(
            "trainer_started",
            mode=self.trainer.mode,
            policy_version=self.trainer.policy_version,
            topic=self.settings.topics.dispatch,
            group=self.settings.trainer.group,
        )
        try:
            while not self.stopping.is_set():
                self.step()
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            self.producer.close()
            self.consumer.close()
            self.trainer.close()
            log.info("trainer_stopped", policy_version=self.trainer.policy_version)


def build_trainer(settings: TapdSettings, state_dir: Path | None = None) -> CohortTrainer:
    """The policy, the probe and the ledger the settings name."""
    from daemon.policy.store import PolicyStore, format_prompt, load_policy, resolve_device
    from daemon.trainer.backend import make_backend
    from daemon.verify.registry import get_verifier
    from daemon.verify.settings import configure as configure_verifiers
    from streams.probes import read_probe_file

    configure_verifiers(settings.verify)  # caps on verifier_args, the code sandbox
    p = settings.policy
    if p.probe_path is None:
        raise ValueError("policy.probe_path: the trainer needs a probe file to measure lift on")
    probe_items = read_probe_file(p.probe_path)
    model, tok = load_policy(p.model_path, resolve_device(p.device), cache_dir=p.cache_dir)
    probe = Probe(
        probe_items,
        get_verifier,
        format_prompt,
        max_new_tokens=settings.grpo.max_completion_length,
    )
    t = settings.trainer
    state = state_dir or settings.state_dir / "trainer"
    return CohortTrainer(
        model,
        tok,
        probe,
        get_verifier,
        params=settings.grpo,
        mode=t.mode,
        rollback_nll_worsening=t.rollback_nll_worsening,
        state_dir=state,
        trainer_id=t.trainer_id,
        format_prompt=format_prompt,
        backend=make_backend(t.backend),
        policies=PolicyStore(
            settings.policy_store_dir() if state_dir is None else state / "checkpoints"
        ),
        foothold_probability=t.foothold_probability,
    )


def run_trainer(settings: TapdSettings, transport: Transport | None = None) -> None:
    """The ``tapd trainer`` process: metrics server, signals, loop."""
    from daemon.runtime.http import HttpServer, ReadinessMonitor, metrics_app
    from daemon.verify.registry import get_verifier
    from streams.factory import open_transport

    metrics = TrainerMetrics()
    own_transport = transport is None
    transport = transport or open_transport(settings.transport, max_poll_records=1)
    loaded = threading.Event()

    def ready() -> dict[str, bool]:
        return {"broker": bool(transport.ping()), "policy": loaded.is_set()}

    svc = settings.service
    server = HttpServer(
        metrics_app(metrics.registry, ready, metrics.up_ready),
        svc.host,
        settings.trainer.metrics_port,
        timeout_s=svc.http_timeout_s,
        max_connections=svc.http_max_connections,
        backlog=svc.http_backlog,
        tls_certfile=svc.tls_certfile,
        tls_keyfile=svc.tls_keyfile,
    ).start()
    monitor = ReadinessMonitor(ready, metrics.up_ready).start()
    log.info("metrics_listening", url=server.url)
    service = TrainerService(settings, transport, build_trainer(settings), get_verifier, metrics)
    loaded.set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("trainer_stopping", signal=signal.Signals(signum).name)
        service.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        monitor.stop()
        server.stop()
        if own_transport:
            transport.close()
        log.info("trainer_exiting")
