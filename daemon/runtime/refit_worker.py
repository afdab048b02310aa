"""Refits in a child process, fed an append-only numpy copy of the label history.

The scorer's predictor refits its batch model (ridge, kNN, LightGBM or their ensemble) on the
whole label history every ``refit_every_labels`` labels. Run on a thread of
the scorer, a refit on 100k labels raised the scoring p99 about fourfold.
Two things delayed the scoring thread: starting the refit converted the
whole history (lists of Python floats) to arrays on it (~0.1 s at 100k
labels), and the refit competed with it for the CPU and for the GIL (much
of a refit is Python: model selection over folds, LightGBM's wrapper between
boosting rounds). Measured per score on a 2-core host shared with other
work, the slow scores waited for a CPU (run-queue time) far more than for
the GIL (time asleep). Here the refit runs in a child process with its own
interpreter, at the lowest CPU priority (:data:`REFIT_NICENESS`); the
scorer's threads only queue messages to it and read its result.

What is sent: the child keeps the rows it has been sent
(:class:`LabelHistory`), so a refit sends only the labels learned since the
previous one. Sending the whole history each time would pickle it (28 floats
a label) on a thread of the scorer, holding the GIL for tens of ms at 100k
labels. A new child (the first refit, or the one after a child died) is sent
the history in chunks of :data:`CHUNK_ROWS`, each pickled briefly.

What may go wrong: a child that dies fails its refit with
:class:`~concurrent.futures.process.BrokenProcessPool`; the caller discards
the worker and the next refit starts a new child. A child whose parent dies
(SIGKILL, OOM) exits by itself (it watches the parent's sentinel), so no
refit outlives the scorer. The child is spawned (a fresh interpreter, as
the scorer runs threads): like any spawned process it imports the parent's
main module, so a script that refits in the background must keep its work
under ``if __name__ == "__main__"`` (tapd's entry points do).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.core.predictor import RefitResult, run_refit

# Rows pickled per message to a new child: ~1.8 MB, a few ms of GIL each.
CHUNK_ROWS = 8192
# The child yields the CPU to the scorer when both want it. On a 2-core host
# shared with other work, what delayed scoring during a refit was mostly
# waiting for a CPU, not for the GIL: a child at the scorer's priority raised
# the p99 as much as the refit thread had; at 19 it rose about a tenth as
# much. The price: a refit takes several times longer while the CPUs are
# saturated (it is applied before the next label, so labels wait for it).
REFIT_NICENESS = 19


class HistoryMismatch(RuntimeError):
    """The child does not hold the rows the parent believes it sent."""


class LabelHistory:
    """Label rows (features, realized lift, served prediction) in preallocated arrays.

    Append-only: a row never changes once appended, so a view of the first
    ``n`` rows stays valid while more are appended (growth copies into new
    arrays and leaves the old ones to the views that hold them).
    """

    def __init__(self, n_features: int, capacity: int = 1024) -> None:
        if n_features < 1:
            raise ValueError(f"n_features: must be >= 1, got {n_features}")
        capacity = max(1, capacity)
        self.n_features = n_features
        self._X = np.empty((capacity, n_features))
        self._y = np.empty(capacity)
        self._served = np.empty(capacity)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._y)

    def append(self, X: npt.ArrayLike, y: npt.ArrayLike, served: npt.ArrayLike) -> None:
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.n_features)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        served = np.asarray(served, dtype=np.float64).reshape(-1)
        k = len(y)
        if len(X) != k or len(served) != k:
            raise ValueError(f"rows: {len(X)} feature rows, {k} labels, {len(served)} served")
        end = self._n + k
        if end > self.capacity:
            cap = max(end, 2 * self.capacity)  # doubling: appends stay O(1) amortised
            for name in ("_X", "_y", "_served"):
                old = getattr(self, name)
                new = np.empty((cap, *old.shape[1:]))
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        self._X[self._n : end] = X
        self._y[self._n : end] = y
        self._served[self._n : end] = served
        self._n = end

    def arrays(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of rows ``start:stop`` (X, y, served); no copy."""
        stop = self._n if stop is None else stop
        if not 0 <= start <= stop <= self._n:
            raise ValueError(f"rows {start}:{stop} out of the {self._n} held")
        return self._X[start:stop], self._y[start:stop], self._served[start:stop]


# --- the child's side ------------------------------------------------------------

# One history per child process, under the token of the worker that feeds it.
_CHILD: dict[str, LabelHistory] = {}


def _lower_priority(pid: int, nice: int) -> None:
    """Set a process's nice value to ``nice`` unless it is already lower-priority."""
    # Where that is not allowed, the refit runs at the scorer's priority.
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, pid) < nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)


def _child_init(nice: int) -> None:
    # A Ctrl-C in a terminal reaches the whole process group: the scorer
    # handles it (a clean shutdown that waits for the refit); the child must
    # not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority(0, nice)  # in case the parent could not
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with_parent, args=(parent.sentinel,), name="tapd-refit-parent", daemon=True
        ).start()


def _exit_with_parent(sentinel: int) -> None:
    # An idle pool worker blocks on a queue whose write end it holds itself:
    # it would never see the parent go. This thread does.
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _child_append(token: str, start: int, X: np.ndarray, y: np.ndarray, served: np.ndarray) -> int:
    history = _CHILD.get(token)
    if history is None:
        if start != 0:
            raise HistoryMismatch(f"a new child was sent rows from {start}, not from 0")
        _CHILD.clear()
        history = _CHILD[token] = LabelHistory(X.shape[1], capacity=max(1024, 2 * len(y)))
    if len(history) != start:
        raise HistoryMismatch(f"the child holds {len(history)} rows, was sent rows from {start}")
    history.append(X, y, served)
    return len(history)


def _child_refit(
    token: str, n: int, holdout_fraction: float, seed: int, model_version: str
) -> tuple[int, RefitResult]:
    history = _CHILD.get(token)
    held = 0 if history is None else len(history)
    if history is None or held != n:
        raise HistoryMismatch(f"refit of {n} labels, the child holds {held}")
    X, y, served = history.arrays(0, n)
    result = run_refit(
        X, y, served, holdout_fraction=holdout_fraction, seed=seed, model_version=model_version
    )
    return os.getpid(), result


# --- the parent's side ----------------------------------------------------------


class RefitWorker:
    """One child process that runs refits, and how much of the history it holds.

    Started at the first refit, or earlier with :meth:`start` (a scorer
    restored with a long history refits within ``refit_every_labels``): a
    scorer that never refits starts no process. Jobs run one at a time, in
    the order submitted (one worker process, FIFO).
    """

    def __init__(self, *, niceness: int = REFIT_NICENESS, chunk_rows: int = CHUNK_ROWS) -> None:
        self.niceness = niceness
        self.chunk_rows = max(1, chunk_rows)
        self._pool: ProcessPoolExecutor | None = None
        self._pid: Future[int] | None = None
        self._last: Future[Any] | None = None  # the last job queued
        self._token = ""
        self._sent = 0  # rows the current child has been sent

    @property
    def sent(self) -> int:
        """Rows of the history the current child has been sent (0: no child)."""
        return self._sent

    def pid(self, timeout: float | None = None) -> int | None:
        """The current child's process id (waits for it to start); None without one."""
        return None if self._pid is None else self._pid.result(timeout)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until the child has done every job queued so far (raises what the last raised)."""
        if self._last is not None:
            self._last.result(timeout)

    def start(self, history: LabelHistory) -> None:
        """Start the child now and send it the history, so the next refit sends only new rows."""
        try:
            self._send(history, len(history))
        except BrokenProcessPool:
            self.discard()
            self._send(history, len(history))

    def submit(
        self,
        history: LabelHistory,
        n: int,
        *,
        holdout_fraction: float,
        seed: int,
        model_version: str,
    ) -> Future[tuple[int, RefitResult]]:
        """Queue a refit of the first ``n`` rows; the future gives (child pid, result)."""
        try:
            pool = self._send(history, n)
        except BrokenProcessPool:
            # The child died while idle and the pool has noticed: nothing was
            # lost yet, so this refit goes to a new child at once.
            self.discard()
            pool = self._send(history, n)
        fut = pool.submit(_child_refit, self._token, n, holdout_fraction, seed, model_version)
        self._last = fut
        return fut

    def _send(self, history: LabelHistory, n: int) -> ProcessPoolExecutor:
        """The pool (started if need be), once the child has been sent rows up to ``n``."""
        if n > len(history):
            raise ValueError(f"n: {n} rows asked, the history holds {len(history)}")
        if self._pool is not None and n < self._sent:
            self.discard()  # the history was replaced: the child's copy is not a prefix of it
        pool = self._pool
        if pool is None:
            pool = self._pool = self._new_pool()
            self._token = uuid.uuid4().hex
            self._sent = 0
        for lo in range(self._sent, n, self.chunk_rows):
            hi = min(n, lo + self.chunk_rows)
            # Views: the rows never change, and the pool's feeder thread
            # pickles them after this returns.
            self._last = pool.submit(_child_append, self._token, lo, *history.arrays(lo, hi))
        self._sent = n
        return pool

    def _new_pool(self) -> ProcessPoolExecutor:
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.niceness)
        pool = ProcessPoolExecutor(
            max_workers=1,
            # spawn, not fork: the scorer runs threads (consumers, HTTP), and
            # a forked child could inherit a lock one of them held.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(nice,),
        )
        before = {p.pid for p in multiprocessing.active_children()}
        self._pid = self._last = pool.submit(os.getpid)  # starts the child
        for child in multiprocessing.active_children():
            if child.pid not in before and child.pid is not None:
                # At once: its start-up (an interpreter, numpy, LightGBM:
                # seconds of CPU) must not compete with scoring either.
                _lower_priority(child.pid, nice)
        return pool

    def discard(self) -> None:
        """Drop the child (dead or idle): the next refit starts a new one, sent everything."""
        pool, self._pool, self._pid, self._last, self._sent = self._pool, None, None, None, 0
        if pool is not None:
            # Not waited for: a dead child is already gone, an idle one
            # exits on the shutdown message.
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the child and wait for it to exit (call with no refit running)."""
        pool, self._pool, self._pid, self._last, self._sent = self._pool, None, None, None, 0
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
