"""Background refits in a worker process: where they run, what they are sent, what
survives a worker's death, and that no worker outlives its scorer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from daemon.config import PredictorSettings
from daemon.core.predictor import Predictor
from daemon.runtime.predictor_host import PredictorHost
from daemon.runtime.refit_worker import REFIT_NICENESS, LabelHistory, RefitWorker
from lab.checks import synthetic_stream

REPO = Path(__file__).resolve().parents[2]
SETTINGS = PredictorSettings(river_after=8, lgbm_after=40, refit_every_labels=20)


def _labels(seed: int, n: int) -> list[tuple[dict[str, float], float]]:
    stream = synthetic_stream(seed)
    return [next(stream) for _ in range(n)]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture
def host() -> Iterator[PredictorHost]:
    h = PredictorHost(Predictor(SETTINGS), None, background=True)
    yield h
    h.close()


def test_label_history_appends_in_place_and_old_views_survive_growth() -> None:
    h = LabelHistory(3, capacity=2)
    h.append(np.arange(6.0).reshape(2, 3), [0.0, 1.0], [10.0, 11.0])
    X0, y0, _ = h.arrays()
    assert np.shares_memory(X0, h.arrays()[0])  # a view, not a copy
    h.append(np.ones((5, 3)), np.full(5, 2.0), np.full(5, 12.0))  # outgrows the capacity
    assert len(h) == 7 and h.capacity >= 7
    X, y, s = h.arrays()
    assert X.tolist() == [[0, 1, 2], [3, 4, 5]] + [[1, 1, 1]] * 5
    assert y.tolist() == [0, 1, 2, 2, 2, 2, 2] and s.tolist() == [10, 11] + [12] * 5
    assert X0.tolist() == [[0, 1, 2], [3, 4, 5]] and y0.tolist() == [0, 1]  # unchanged
    assert h.arrays(2, 4)[1].tolist() == [2, 2]
    with pytest.raises(ValueError, match="rows"):
        h.append(np.ones((2, 3)), [1.0], [1.0])
    with pytest.raises(ValueError, match="out of the 7 held"):
        h.arrays(0, 8)


def test_refit_runs_in_a_worker_process_on_only_the_new_labels(host: PredictorHost) -> None:
    """The fit runs in another process; a later refit sends that process only the
    labels learned since the last one; the models are those of an inline predictor."""
    inline = Predictor(SETTINGS)
    labels = _labels(2, 60)
    for x, y in labels[:40]:
        inline.learn(x, y)
        host.learn(x, y)  # the 40th label makes a refit due: it starts in the worker
    assert host.refit_running and host.worker is not None
    first = host.poll_refit(wait=True)
    assert first is not None and first.n_labels == 40
    pid = host.last_refit_pid
    assert pid is not None and pid != os.getpid() and pid == host.worker.pid(timeout=60)
    assert host.worker.sent == 40
    # At the lowest priority: the scorer gets the CPU first.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + REFIT_NICENESS)
    # A Ctrl-C reaches the whole process group: the scorer's to handle.
    os.kill(pid, signal.SIGINT)

    for x, y in labels[40:]:
        inline.learn(x, y)
        host.learn(x, y)
    second = host.poll_refit(wait=True)
    assert second is not None and second.n_labels == 60
    assert host.last_refit_pid == pid  # the same worker (alive), sent the 20 new labels
    assert host.worker.sent == 60
    # Promotion decided as inline: same outcomes, same served model.
    assert host.refits == inline.refits and host.model_version == inline.model_version
    probe = [x for x, _ in _labels(1234, 10)]
    assert [host.predict(x) for x in probe] == [inline.predict(x) for x in probe]


def test_start_refit_does_the_bookkeeping_of_refit_job() -> None:
    """The host starts refits itself (no copy of the history on the scoring thread):
    it must leave the predictor as Predictor.refit_job does."""
    a, b = Predictor(SETTINGS, inline_refits=False), Predictor(SETTINGS, inline_refits=False)
    for x, y in _labels(3, 45):
        a.learn(x, y)
        b.learn(x, y)
    a._refit_requested = b._refit_requested = True
    a.refit_job()
    h = PredictorHost(b, None, background=True, worker=RefitWorker(niceness=0))
    try:
        h.start_refit()
        for attr in ("_labels_at_refit", "_refit_requested", "_refit_running"):
            assert getattr(a, attr) == getattr(b, attr), attr
        assert not a.refit_due() and not b.refit_due()
        result = h.poll_refit(wait=True)
        assert result is not None and result.n_labels == 45
    finally:
        h.close()


def test_a_host_restored_with_refits_due_starts_its_worker_with_the_history() -> None:
    """A scorer restored with a long history refits within refit_every_labels: its
    worker is started, and sent the history, at start-up rather than at that refit."""
    p, inline = Predictor(SETTINGS), Predictor(SETTINGS)
    labels = _labels(9, 120)
    for x, y in labels[:100]:
        p.learn(x, y)  # inline refits, as a replay does
        inline.learn(x, y)
    h = PredictorHost(p, None, background=True)
    try:
        assert h.worker is not None and not h.refit_running
        h.worker.wait_idle(timeout=60)
        assert h.worker.sent == 100
        pid = h.worker.pid()
        for x, y in labels[100:]:
            inline.learn(x, y)
            h.learn(x, y)
        assert h.poll_refit(wait=True) is not None
        assert h.last_refit_pid == pid and h.worker.sent == 120
        assert h.model_version == inline.model_version and h.refits == inline.refits
    finally:
        h.close()
    # Below lgbm_after no refit is near: no process.
    fresh = PredictorHost(Predictor(SETTINGS), None, background=True)
    assert fresh.worker is None
    fresh.close()


def test_a_new_worker_is_sent_the_history_in_chunks() -> None:
    worker = RefitWorker(niceness=0, chunk_rows=16)
    h = PredictorHost(Predictor(SETTINGS), None, background=True, worker=worker)
    inline = Predictor(SETTINGS)
    try:
        for x, y in _labels(4, 40):
            inline.learn(x, y)
            h.learn(x, y)
        assert h.poll_refit(wait=True) is not None and worker.sent == 40
        assert h.model_version == inline.model_version and h.refits == inline.refits
    finally:
        h.close()


def test_a_worker_killed_mid_refit_fails_that_refit_and_the_next_runs_in_a_new_one(
    host: PredictorHost,
) -> None:
    labels = _labels(5, 80)
    for x, y in labels[:40]:
        host.learn(x, y)
    assert host.poll_refit(wait=True) is not None
    assert host.worker is not None
    pid = host.worker.pid(timeout=60)
    assert pid is not None
    refits = dict(host.refits)
    # Stopped, the worker cannot take the next refit; killed, it never will.
    os.kill(pid, signal.SIGSTOP)
    try:
        for x, y in labels[40:60]:
            host.learn(x, y)
        assert host.refit_running
    finally:
        os.kill(pid, signal.SIGKILL)
    with capture_logs() as logs:
        assert host.poll_refit(wait=True) is None  # the refit failed; no exception here
    assert host.refits == {**refits, "failed": refits["failed"] + 1}
    failed = [e for e in logs if e["event"] == "predictor_refit_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    assert "BrokenProcessPool" in failed[0]["error"]
    version = host.model_version
    assert host.predict(labels[0][0]).model_version == version  # the served model stays

    for x, y in labels[60:]:
        host.learn(x, y)  # due again: a new worker, sent the whole history
    result = host.poll_refit(wait=True)
    assert result is not None and result.n_labels == 80
    assert host.last_refit_pid not in (None, pid, os.getpid())
    assert host.worker is not None and host.worker.sent == 80
    assert _wait_gone(pid, 30)


def test_a_worker_killed_while_idle_costs_at_most_one_refit(host: PredictorHost) -> None:
    labels = _labels(6, 100)
    for x, y in labels[:40]:
        host.learn(x, y)
    assert host.poll_refit(wait=True) is not None
    old = host.last_refit_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    results = []
    for i in range(3):  # whether the pool has noticed the death by then or not
        for x, y in labels[40 + 20 * i : 60 + 20 * i]:
            host.learn(x, y)
        results.append(host.poll_refit(wait=True))
    assert results[-1] is not None and host.last_refit_pid not in (None, old)
    assert host.refits["failed"] <= 1


def test_close_stops_the_worker(host: PredictorHost) -> None:
    for x, y in _labels(7, 40):
        host.learn(x, y)
    assert host.worker is not None
    pid = host.worker.pid(timeout=60)
    assert pid is not None and _alive(pid)
    host.close()  # applies the refit in flight, then stops the worker
    assert host.refits["promoted"] + host.refits["rejected"] == 1
    assert host.worker is None and _wait_gone(pid, 30)


PARENT = textwrap.dedent(
    """
    import sys, time
    from daemon.config import PredictorSettings
    from daemon.core.predictor import Predictor
    from daemon.runtime.predictor_host import PredictorHost
    from lab.checks import synthetic_stream

    # Killed while refitting: a first refit on 2,000 labels takes a while.
    n = 40 if sys.argv[1] == "idle" else 2000
    host = PredictorHost(Predictor(PredictorSettings(lgbm_after=n)), None, background=True)
    stream = synthetic_stream(8)
    for _ in range(n):
        host.learn(*next(stream))
    print("pid", host.worker.pid(timeout=120), flush=True)
    if sys.argv[1] == "idle":
        host.poll_refit(wait=True)
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("when", ["idle", "refitting"])
def test_a_killed_scorer_leaves_no_worker_behind(when: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, when], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert parent.stdout is not None
        lines = iter(parent.stdout.readline, "")  # log lines come in between
        pid = next(int(line.split()[1]) for line in lines if line.startswith("pid "))
        assert "ready" in (line.strip() for line in lines)
        assert _alive(pid)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert _wait_gone(pid, 30), f"refit worker {pid} outlived its parent"
