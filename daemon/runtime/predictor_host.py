"""The shell around the pure predictor: snapshots on disk, refits on a worker thread.

:class:`daemon.core.predictor.Predictor` only computes. This host owns what
it must not do itself:

* **Restore.** :meth:`PredictorHost.open` loads the latest snapshot from the
  :class:`~daemon.runtime.modelstore.ModelStore` and replays the labels the
  scorer's state store holds after that snapshot's sequence number.
* **Checkpoints.** After each persisted batch (:meth:`after_batch`), a
  predictor whose version changed (a promotion) is snapshotted, with the
  sequence number of the last label it has learned.
* **Refits.** A refit due by label count, drift, or time
  (``predictor.refit_every_s`` since the last one, with new labels) runs as a
  job on one worker thread; the loop thread applies the result at its next
  batch. The job works on copies, so scoring never waits for LightGBM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from daemon.config import PredictorSettings
from daemon.core.pipeline import Label
from daemon.core.predictor import Predictor, RefitResult
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.background = background
        self.clock = clock
        predictor.inline_refits = not background
        self._checkpointed_version = predictor.version
        self._refit_at = clock()
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
        clock: Callable[[], float] = time.monotonic,
    ) -> PredictorHost:
        """Resume from the latest snapshot and replay the stored labels after it."""
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
        host = cls(predictor, store, background=background, clock=clock)
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
        if self.background:
            now = self.clock()
            timed = (
                p.new_labels_since_refit > 0
                and p.n_labels >= p.settings.lgbm_after
                and now - self._refit_at >= p.settings.refit_every_s
            )
            if self._future is None and (p.refit_due() or timed):
                self.start_refit()
        if p.version != self._checkpointed_version:
            self.checkpoint()

    def start_refit(self) -> None:
        job = self.predictor.refit_job()
        self._refit_at = self.clock()
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
            **({} if applied is None else {"candidate_score": applied.candidate_score}),
        )
        return applied

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.poll_refit(wait=True)
        if self.predictor.version != self._checkpointed_version:
            self.checkpoint()
