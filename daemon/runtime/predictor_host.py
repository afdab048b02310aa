"""The shell around the pure predictor: snapshots on disk, refits on a worker thread.

:class:`daemon.core.predictor.Predictor` only computes. This host owns what
it must not do itself, and is what the scorer calls its predictor (it keeps
the ``predict`` / ``learn`` contract):

* **Restore.** :meth:`PredictorHost.open` loads the latest snapshot from the
  :class:`~daemon.runtime.modelstore.ModelStore` and replays the labels the
  scorer's state store holds after that snapshot's sequence number.
* **Checkpoints.** After each persisted batch (:meth:`after_batch`), a
  predictor whose version changed (a promotion) is snapshotted, with the
  sequence number of the last label it has learned.
* **Refits, the same on every replica.** A refit is due by label count or
  by drift (both functions of the label sequence alone; no clock). It starts
  as a job on one worker thread right after the label that made it due, on
  a copy of the labels so far, and its result is applied at the latest just
  before the next label is learned (waiting for the job if it is still
  running). So the model that learns label ``n + 1`` is a function of labels
  ``1..n`` only: replicas that learn the same label sequence (the lift topic,
  one partition) hold the same model versions at every label count, while
  scoring never waits for LightGBM between labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from daemon.config import PredictorSettings
from daemon.core.pipeline import Label
from daemon.core.predictor import Prediction, Predictor, RefitResult
from daemon.runtime.logging import get_logger
from daemon.runtime.modelstore import ModelStore

log = get_logger("tapd.predictor")


class PredictorHost:
    def __init__(
        self,
        predictor: Predictor,
        store: ModelStore | None,
        *,
        background: bool = True,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.background = background
        predictor.inline_refits = not background
        self._checkpointed_version = predictor.version
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[RefitResult] | None = None
        self._started: float = 0.0

    @classmethod
    def open(
        cls,
        settings: PredictorSettings,
        store: ModelStore | None,
        labels: Iterable[tuple[int, Label]],
        *,
        background: bool = True,
    ) -> PredictorHost:
        """Resume from the latest snapshot and replay the stored labels after it.

        The replay refits inline: a refit applied at label ``n`` rather than
        just before ``n + 1`` leaves the same model at every label boundary.
        """
        predictor = Predictor(settings, inline_refits=True)
        snap = store.load() if store is not None else None
        if snap is not None:
            predictor.restore(snap)
        n = 0
        for seq, label in labels:
            if seq <= predictor.label_seq:
                continue
            predictor.learn(label.features, label.realized_lift, label.selection)
            predictor.label_seq = seq
            n += 1
        host = cls(predictor, store, background=background)
        if n:
            host.checkpoint()
        log.info(
            "predictor_restored",
            model_version=predictor.model_version,
            stage=predictor.stage,
            labels=predictor.n_labels,
            replayed=n,
        )
        return host

    # --- the predictor contract (what the scorer calls) -----------------------

    def predict(self, features: Mapping[str, float]) -> Prediction:
        return self.predictor.predict(features)

    def learn(
        self, features: Mapping[str, float], realized_lift: float, selection: str = "exploit"
    ) -> None:
        # The refit started after the previous label is part of the model
        # that learns this one, on every replica alike.
        self.poll_refit(wait=True)
        self.predictor.learn(features, realized_lift, selection)
        if self.background and self.predictor.refit_due():
            self.start_refit()

    # What the metrics read (daemon.service.scorer.publish_predictor).
    @property
    def quality(self) -> Any:
        return self.predictor.quality

    @property
    def n_labels(self) -> int:
        return self.predictor.n_labels

    @property
    def version(self) -> int:
        return self.predictor.version

    @property
    def model_version(self) -> str:
        return self.predictor.model_version

    @property
    def stage(self) -> str:
        return self.predictor.stage

    @property
    def drift_detected(self) -> int:
        return self.predictor.drift_detected

    @property
    def refits(self) -> dict[str, int]:
        return self.predictor.refits

    @property
    def refit_running(self) -> bool:
        return self._future is not None

    # --- the shell ------------------------------------------------------------

    def checkpoint(self) -> str | None:
        if self.store is None:
            return None
        name = self.store.save(self.predictor.snapshot(created_ts=time.time()))
        self._checkpointed_version = self.predictor.version
        return name

    def after_batch(self, label_seq: int | None = None) -> None:
        """Called by the loop once a batch (and its labels) is durable."""
        p = self.predictor
        if label_seq is not None and label_seq > p.label_seq:
            p.label_seq = label_seq
        self.poll_refit()
        # A snapshot never holds a refit in flight: restored, it could not
        # finish it, and would diverge from the replicas that did.
        if self._future is None and p.version != self._checkpointed_version:
            self.checkpoint()

    def start_refit(self) -> None:
        job = self.predictor.refit_job()
        self._started = time.perf_counter()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapd-refit")
        self._future = self._pool.submit(job)

    def poll_refit(self, wait: bool = False) -> RefitResult | None:
        """Apply a finished refit (``wait``: block until the running one ends)."""
        fut = self._future
        if fut is None or (not wait and not fut.done()):
            return None
        self._future = None
        result: RefitResult | BaseException
        try:
            result = fut.result()
        except Exception as exc:
            result = exc
        applied = self.predictor.apply_refit(result)
        log.info(
            "predictor_refit",
            outcome="failed"
            if applied is None
            else ("promoted" if applied.promoted else "rejected"),
            seconds=round(time.perf_counter() - self._started, 3),
            model_version=self.predictor.model_version,
            labels=self.predictor.n_labels,
            **({} if applied is None else {"candidate_score": applied.candidate_score}),
        )
        return applied

    def close(self) -> None:
        self.poll_refit(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.predictor.version != self._checkpointed_version:
            self.checkpoint()
