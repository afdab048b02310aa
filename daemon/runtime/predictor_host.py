"""The shell around the pure predictor: snapshots on disk, refits in a worker process.

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
  as a job in a worker process (:mod:`daemon.runtime.refit_worker`) right
  after the label that made it due, on the labels so far, and its result is
  applied at the latest just before the next label is learned (waiting for
  the job if it is still running). So the model that learns label ``n + 1``
  is a function of labels ``1..n`` only: replicas that learn the same label
  sequence (the lift topic, one partition) hold the same model versions at
  every label count, while scoring never waits for LightGBM between labels.
* **Off the scoring thread.** The host keeps a numpy copy of the label
  history, appended to at each refit with the labels learned since the last
  one; the worker process holds its own copy and is sent only those labels.
  Neither the whole history's conversion nor the fit runs on the scoring
  thread or holds its GIL. A worker that dies fails its refit (logged,
  counted as ``failed``); the next refit due starts a new one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from daemon.config import PredictorSettings
from daemon.core.features import FEATURE_NAMES, FEATURE_SCHEMA, FeatureError
from daemon.core.pipeline import Label
from daemon.core.predictor import Prediction, Predictor, RefitResult
from daemon.runtime.logging import get_logger
from daemon.runtime.modelstore import ModelStore
from daemon.runtime.refit_worker import LabelHistory, RefitWorker

log = get_logger("tapd.predictor")


class PredictorHost:
    def __init__(
        self,
        predictor: Predictor,
        store: ModelStore | None,
        *,
        background: bool = True,
        worker: RefitWorker | None = None,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.background = background
        predictor.inline_refits = not background
        self._checkpointed_version = predictor.version
        self._worker = worker
        self._future: Future[tuple[int, RefitResult]] | None = None
        self._started: float = 0.0
        self._rows: LabelHistory | None = None
        self._rows_of: Any = None  # the predictor's history object the rows copy
        self.last_refit_pid: int | None = None  # the process that ran the last refit
        if background:
            # A restored history is converted here, at start-up, once.
            rows = self._sync_rows()
            if predictor.n_labels >= predictor.settings.lgbm_after:
                # Refits are due: the worker starts now, with the scorer, and
                # is sent the history, so the first refit costs what later
                # ones do.
                self._start_worker(rows)

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
        set_aside = snap is not None and snap.manifest.feature_schema != FEATURE_SCHEMA
        if snap is not None and set_aside:
            # A model of another feature schema cannot score this build's
            # vectors, nor can its labels be relearned (a feature they lack
            # was never computed). The predictor starts again from the
            # heuristic; the old snapshot stays in the store (a rollback to
            # the old build pins it). Its version and label sequence carry on,
            # so model versions stay unique and the store's order holds.
            log.warning(
                "predictor_snapshot_set_aside",
                snapshot=snap.manifest.name,
                feature_schema=snap.manifest.feature_schema,
                this_build=FEATURE_SCHEMA,
            )
            predictor.version = snap.manifest.version + 1
            predictor.label_seq = snap.manifest.label_seq
            snap = None
        if snap is not None:
            predictor.restore(snap)
        n = skipped = 0
        for seq, label in labels:
            if seq <= predictor.label_seq:
                continue
            try:
                predictor.learn(label.features, label.realized_lift, label.selection)
            except FeatureError:
                # Every stored label was learned once, by the build that
                # stored it: only one of another feature schema can fail here.
                if label.feature_schema == FEATURE_SCHEMA:
                    raise
                skipped += 1
            else:
                n += 1
            predictor.label_seq = seq
        host = cls(predictor, store, background=background)
        if n or skipped or set_aside:
            host.checkpoint()
        if skipped:
            log.warning(
                "predictor_labels_skipped",
                labels=skipped,
                reason=f"learned under another feature schema; this build learns {FEATURE_SCHEMA}",
            )
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

    @property
    def worker(self) -> RefitWorker | None:
        """The worker process's handle (None before the first background refit)."""
        return self._worker

    def _sync_rows(self) -> LabelHistory:
        """The host's numpy copy of the predictor's label history, brought up to date.

        The predictor keeps its history as lists of Python floats (and its
        snapshots pickle it so); converting all of it for each refit cost the
        scoring thread ~135 ms at 100k labels. Learned rows never change, so
        only the rows learned since the last call are converted.
        """
        # The predictor's own history, read as it stands (its module is not
        # changed to hold arrays: its source keys the evaluation's cache).
        h = self.predictor._history
        n = len(h.y)
        if self._rows is None or self._rows_of is not h or len(self._rows) > n:
            # First call, or the predictor's history was replaced (a restore).
            self._rows = LabelHistory(len(FEATURE_NAMES), capacity=max(1024, 2 * n))
            self._rows_of = h
            if self._worker is not None:
                self._worker.discard()
        rows = self._rows
        k = len(rows)
        if n > k:
            rows.append(
                np.asarray(h.X[k:n], dtype=np.float64),
                np.asarray(h.y[k:n], dtype=np.float64),
                np.asarray(h.served[k:n], dtype=np.float64),
            )
        return rows

    def _start_worker(self, rows: LabelHistory) -> None:
        if self._worker is None:
            self._worker = RefitWorker()
        try:
            self._worker.start(rows)
        except Exception as exc:
            # The first refit tries again (and fails, counted, if it must).
            log.warning("refit_worker_not_started", error=f"{type(exc).__name__}: {exc}")
            self._worker.discard()

    def start_refit(self) -> None:
        """Start the refit of the labels so far in the worker process (returns at once)."""
        p = self.predictor
        rows = self._sync_rows()
        n = p.n_labels
        if n < 4:
            raise ValueError(f"refit: needs at least 4 labels, has {n}")
        # The bookkeeping of Predictor.refit_job, whose job would start with
        # a copy of the whole history on this thread: the refit of labels
        # 1..n is running, and the next is due by count from n.
        p._labels_at_refit = n
        p._refit_requested = False
        p._refit_running = True
        version = f"v{p.version + 1}"
        self._started = time.perf_counter()
        if self._worker is None:
            self._worker = RefitWorker()
        try:
            self._future = self._worker.submit(
                rows,
                n,
                holdout_fraction=p.settings.holdout_fraction,
                seed=p.settings.seed,
                model_version=version,
            )
        except Exception as exc:
            # No process to run it (spawn failed): a failed refit, retried
            # when the next one is due, like any other.
            failed: Future[tuple[int, RefitResult]] = Future()
            failed.set_exception(exc)
            self._future = failed

    def poll_refit(self, wait: bool = False) -> RefitResult | None:
        """Apply a finished refit (``wait``: block until the running one ends)."""
        fut = self._future
        if fut is None or (not wait and not fut.done()):
            return None
        self._future = None
        result: RefitResult | BaseException
        pid: int | None = None
        try:
            pid, result = fut.result()
            self.last_refit_pid = pid
        except Exception as exc:
            result = exc
            log.error(
                "predictor_refit_failed",
                error=f"{type(exc).__name__}: {exc}",
                labels=self.predictor.n_labels,
                model_version=self.predictor.model_version,
                consequence="the served model stays; the next refit due runs in a new process",
            )
            if self._worker is not None:
                self._worker.discard()
        applied = self.predictor.apply_refit(result)
        log.info(
            "predictor_refit",
            outcome="failed"
            if applied is None
            else ("promoted" if applied.promoted else "rejected"),
            seconds=round(time.perf_counter() - self._started, 3),
            model_version=self.predictor.model_version,
            labels=self.predictor.n_labels,
            **({} if pid is None else {"worker_pid": pid}),
            **({} if applied is None else {"candidate_score": applied.candidate_score}),
        )
        return applied

    def close(self) -> None:
        """Apply the refit in flight, stop the worker process, checkpoint a changed model."""
        self.poll_refit(wait=True)
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self.predictor.version != self._checkpointed_version:
            self.checkpoint()
