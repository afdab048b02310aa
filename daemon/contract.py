"""The trainer contract client: bring your own training loop.

tapd's scorer publishes ``tapd.dispatch/1`` (a cohort worth training on) and
learns from ``tapd.lift/1`` (what training on it did). Any trainer that keeps
this contract (docs/TRAINER_CONTRACT.md) closes the loop: verl, OpenRLHF,
prime-rl, a plain TRL script. This client does the transport's part of it so
a training loop only trains and measures::

    client = TrainerClient.from_settings(load_settings(), trainer_id="verl-0")
    for job in client.jobs():
        before = measure(policy)           # the probe, before the update
        train(policy, job.dispatch.items)  # your GRPO/PPO step(s)
        after = measure(policy)
        client.report(job, Measurement(...))

What it guarantees, so that the loop does not have to:

* **one job at a time, committed only when answered**: the dispatch offset is
  committed after the lift (or dead letter) is flushed. A crash redelivers
  the dispatch; nothing is lost.
* **idempotent by cohort id**: every reported lift is first written to a
  durable ledger (SQLite, WAL, full fsync); a redelivered cohort is answered
  from the ledger and never reaches the loop again, so no policy is updated
  twice on one cohort.
* **bad input is data**: an undecodable dispatch goes to the dead-letter
  topic (``stage=decode``); :meth:`TrainerClient.reject` sends one the loop
  cannot train on (``stage=lift``). The scorer frees the cohort's in-flight
  slot either way.

Light on purpose: no torch, transformers or TRL (an import-linter contract
keeps it so), only the transport and the message schemas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from daemon.config import TapdSettings
from streams.deadletter import dead_letter
from streams.durable import connect_durable
from streams.factory import open_transport
from streams.schemas import (
    LIFT_SCHEMA,
    Dispatch,
    LiftResult,
    Plasticity,
    SchemaError,
    decode,
    encode,
)
from streams.transport import Record, Transport, next_offsets


@dataclass(frozen=True)
class Job:
    """One dispatched cohort in hand: train on ``dispatch.items``, then report."""

    dispatch: Dispatch
    record: Record
    received_s: float = field(default_factory=time.monotonic)

    @property
    def cohort_id(self) -> str:
        return self.dispatch.cohort_id


@dataclass(frozen=True)
class Measurement:
    """What the training loop measured; the rest of the lift comes from the dispatch.

    ``nll_*``: mean token NLL of the probe's reference answers (teacher-forced,
    answer tokens plus end-of-sequence), on the policy before and after the
    update; ``acc_*``: greedy accuracy on the same probe items, each judged by
    its own verifier. See docs/TRAINER_CONTRACT.md for what the probe is.
    """

    nll_before: float
    nll_after: float
    acc_before: float
    acc_after: float
    policy_version_before: str
    policy_version_after: str
    steps: int
    train_reward_before: float = 0.0
    train_reward_after: float = 0.0
    mode: Literal["continual", "probe_revert"] = "continual"
    rolled_back: bool = False
    duration_s: float | None = None  # default: since the job was handed out
    plasticity: Plasticity | None = None


class Ledger:
    """Reported lifts by cohort id, durable before anything is sent."""

    def __init__(self, path: Path) -> None:
        self._db = connect_durable(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS lifts (cohort_id TEXT PRIMARY KEY, result TEXT NOT NULL)"
        )

    def get(self, cohort_id: str) -> LiftResult | None:
        row = self._db.execute(
            "SELECT result FROM lifts WHERE cohort_id = ?", (cohort_id,)
        ).fetchone()
        return None if row is None else decode(row[0], LiftResult)

    def put(self, result: LiftResult) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO lifts (cohort_id, result) VALUES (?, ?)",
            (result.cohort_id, encode(result).decode()),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM lifts").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class TrainerClient:
    """Consume ``tapd.dispatch/1`` one cohort at a time, answer with ``tapd.lift/1``."""

    def __init__(
        self,
        transport: Transport,
        *,
        ledger_path: Path,
        trainer_id: str,
        group: str = "tapd-trainer",
        dispatch_topic: str = "tap.dispatch",
        lift_topic: str = "tap.lift",
        dlq_topic: str = "tap.dlq",
        clock: Callable[[], float] = time.time,
        own_transport: bool = False,
    ) -> None:
        self.trainer_id = trainer_id
        self.lift_topic = lift_topic
        self.dlq_topic = dlq_topic
        self.clock = clock
        self.ledger = Ledger(ledger_path)
        self.duplicates = 0  # redelivered cohorts answered from the ledger
        self.dead_letters = 0
        self._transport = transport
        self._own_transport = own_transport
        self._consumer = transport.consumer([dispatch_topic], group)
        self._producer = transport.producer()
        self._in_hand: Job | None = None

    @classmethod
    def from_settings(
        cls,
        settings: TapdSettings,
        *,
        trainer_id: str | None = None,
        ledger_path: Path | None = None,
    ) -> TrainerClient:
        """Transport, topics and group from tapd's settings (``TAPD_*`` variables);
        the ledger in ``<state_dir>/trainer-client/ledger.sqlite`` by default."""
        # One record per poll: a cohort takes minutes to train.
        transport = open_transport(settings.transport, max_poll_records=1)
        return cls(
            transport,
            ledger_path=ledger_path or settings.state_dir / "trainer-client" / "ledger.sqlite",
            trainer_id=trainer_id or settings.trainer.trainer_id,
            group=settings.trainer.group,
            dispatch_topic=settings.topics.dispatch,
            lift_topic=settings.topics.lift,
            dlq_topic=settings.topics.dlq,
            own_transport=True,
        )

    # --- receiving ---------------------------------------------------------------

    def next(self, timeout_s: float = 1.0) -> Job | None:
        """The next cohort to train on, or None when nothing new came.

        Duplicates and undecodable dispatches are answered here (from the
        ledger, or with a dead letter) and committed; they never reach the
        loop."""
        if self._in_hand is not None:
            raise RuntimeError(
                f"cohort {self._in_hand.cohort_id} is still in hand: report or reject it first"
            )
        for record in self._consumer.poll(timeout_s, max_records=1):
            try:
                dispatch = decode(record.value, Dispatch)
            except SchemaError as e:
                self._send_dead_letter(record, "decode", e.field, e.reason)
                continue
            stored = self.ledger.get(dispatch.cohort_id)
            if stored is not None:
                # Redelivered (a crash after the ledger write, or a replay):
                # the same answer again, never a second update.
                self.duplicates += 1
                self._answer(record, self.lift_topic, encode(stored), dispatch.cohort_id)
                continue
            self._in_hand = Job(dispatch, record)
            return self._in_hand
        return None

    def jobs(self, stop: threading.Event | None = None, timeout_s: float = 1.0) -> Iterator[Job]:
        """Jobs until ``stop`` is set; each must be reported or rejected before
        the next is asked for."""
        while stop is None or not stop.is_set():
            job = self.next(timeout_s)
            if job is not None:
                yield job

    # --- answering ---------------------------------------------------------------

    def lift(self, job: Job, m: Measurement) -> LiftResult:
        """The ``tapd.lift/1`` message for ``job`` and measurement ``m`` (validated)."""
        d = job.dispatch
        duration = m.duration_s if m.duration_s is not None else time.monotonic() - job.received_s
        return LiftResult.model_validate(
            {
                "schema": LIFT_SCHEMA,
                "cohort_id": d.cohort_id,
                "ts": self.clock(),
                "trainer_id": self.trainer_id,
                "mode": m.mode,
                # Echoed from the dispatch: the scorer learns the label under
                # the features and the predictor version it scored.
                "feature_schema": d.feature_schema,
                "features": d.features,
                "model_version": d.model_version,
                "predicted_lift": d.predicted_lift,
                "selection": d.selection,
                "nll_before": m.nll_before,
                "nll_after": m.nll_after,
                "nll_lift": m.nll_before - m.nll_after,
                "acc_before": m.acc_before,
                "acc_after": m.acc_after,
                "acc_lift": m.acc_after - m.acc_before,
                "train_reward_before": m.train_reward_before,
                "train_reward_after": m.train_reward_after,
                "policy_version_before": m.policy_version_before,
                "policy_version_after": m.policy_version_after,
                "rolled_back": m.rolled_back,
                "steps": m.steps,
                "duration_s": max(duration, 0.0),
                "plasticity": m.plasticity,
            }
        )

    def report(self, job: Job, m: Measurement) -> LiftResult:
        """Record the lift durably, publish it, then commit the dispatch."""
        self._check_in_hand(job)
        result = self.lift(job, m)
        self.ledger.put(result)
        self._answer(job.record, self.lift_topic, encode(result), job.cohort_id)
        self._in_hand = None
        return result

    def reject(self, job: Job, field: str, reason: str) -> None:
        """Answer a cohort the loop cannot train on with a dead letter (``stage=lift``)."""
        self._check_in_hand(job)
        self._send_dead_letter(job.record, "lift", field, reason)
        self._in_hand = None

    def _check_in_hand(self, job: Job) -> None:
        if self._in_hand is None or self._in_hand.record != job.record:
            raise RuntimeError(f"cohort {job.cohort_id} is not the job in hand")

    def _send_dead_letter(self, record: Record, stage: str, field: str, reason: str) -> None:
        letter = dead_letter(
            record.value,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=stage,
            field=field,
            reason=reason,
            ts=self.clock(),
        )
        self.dead_letters += 1
        self._answer(record, self.dlq_topic, encode(letter), None)

    def _answer(self, record: Record, topic: str, value: bytes, key: str | None) -> None:
        self._producer.send(topic, value, key=key.encode() if key else record.key)
        self._producer.flush()  # durable on the log before the dispatch is done
        self._consumer.commit(next_offsets([record]))

    def close(self) -> None:
        """Close the clients; a job still in hand is redelivered to the next owner."""
        try:
            self._producer.flush()
        finally:
            self._producer.close()
            self._consumer.close()
            self.ledger.close()
            if self._own_transport:
                self._transport.close()

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
