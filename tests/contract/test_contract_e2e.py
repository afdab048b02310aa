"""The loop closes through the trainer contract: a real scorer process
(``tapd run``) dispatches, the example custom trainer (a plain TRL loop on
:class:`daemon.contract.TrainerClient`, ``python -m lab.custom_trainer``)
trains and reports, and the scorer learns the lift as a label. Every part is
its own process on one embedded log; tapd's own trainer never runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from daemon.config import TransportSettings
from lab import tasks
from lab.localbroker import free_port
from lab.reliability import trace_key
from streams.factory import open_transport
from streams.schemas import Attempt, Dispatch, LiftResult, decode, encode

REPO = Path(__file__).resolve().parents[2]


def _metrics(port: int) -> dict[str, float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=3).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _traces() -> list[bytes]:
    """Frontier slices, one attempt per trace as production traffic has it."""
    out = []
    for c, (subject, difficulty) in enumerate([("add", "2d_carry"), ("sub", "2d_borrow")]):
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed=60 + c)):
            attempt = Attempt(completion=task.reference, reward=1.0, n_tokens=3)
            tr = tasks.to_trace(task, policy_version="v0", attempts=[attempt], key=f"tc{c}-{i}")
            out.append(encode(tr))
    return out


def _read_all(settings: TransportSettings, topic: str) -> list[bytes]:
    transport = open_transport(settings)
    consumer = transport.consumer([topic], f"check-{time.monotonic_ns()}")
    got = [r.value for r in consumer.poll(0.5, 1_000)]
    consumer.close()
    transport.close()
    return got


@pytest.mark.slow
def test_a_custom_trl_loop_closes_the_loop_through_the_client(
    tmp_path: Path, lab_env: dict[str, str]
) -> None:
    log_path = tmp_path / "log.sqlite"
    settings = TransportSettings(kind="embedded", embedded_path=log_path, embedded_partitions=2)
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TAPD_STATE_DIR": str(tmp_path / "state"),
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(log_path),
        "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": "2",
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__POLL_TIMEOUT_S": "0.2",
        "TAPD_COHORTING__MAX_GROUPS": "4",
        "TAPD_COHORTING__MAX_AGE_S": "30",
        "TAPD_GRPO__NUM_GENERATIONS": "4",
        "TAPD_GRPO__STEPS": "2",
        "TAPD_THRESHOLDS__MAX_IN_FLIGHT": "2",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "1.0",
        "TAPD_THRESHOLDS__REDUNDANCY_CEILING": "0.95",
        **lab_env,
    }
    traces = _traces()
    transport = open_transport(settings)
    producer = transport.producer()
    for t in traces:
        producer.send("tap.traces", t, key=trace_key(t))  # the producer contract
    producer.flush()
    producer.close()
    transport.close()

    procs = {
        "scorer": subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=REPO,
            env=env,
            stdout=(tmp_path / "scorer.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
        "custom": subprocess.Popen(
            [sys.executable, "-m", "lab.custom_trainer"],
            cwd=REPO,
            env=env,
            stdout=(tmp_path / "custom.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
    }

    def logs() -> str:
        return "\n".join(
            f"--- {n}\n" + (tmp_path / f"{n}.log").read_text(errors="replace")[-2500:]
            for n in procs
        )

    try:
        deadline = time.monotonic() + 300
        m: dict[str, float] = {}
        while time.monotonic() < deadline:
            for p in procs.values():
                assert p.poll() is None, logs()
            m = _metrics(port)
            if m.get("tapd_lift_labels_total", 0) >= 2:
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"the loop did not close: {m}\n{logs()}")
        # The custom loop stops first (it may have reported one more lift since);
        # the scorer then learns every lift on the log before it stops.
        procs["custom"].send_signal(signal.SIGTERM)
        assert procs["custom"].wait(60) == 0, logs()
        on_log = len({decode(v, LiftResult).cohort_id for v in _read_all(settings, "tap.lift")})
        while (
            time.monotonic() < deadline and _metrics(port).get("tapd_lift_labels_total", 0) < on_log
        ):
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            try:
                assert p.wait(60) == 0, logs()
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError(f"{name} did not stop on SIGTERM\n{logs()}") from None

    dispatched = {decode(v, Dispatch).cohort_id for v in _read_all(settings, "tap.dispatch")}
    lifts = [decode(v, LiftResult) for v in _read_all(settings, "tap.lift")]
    # Every lift answers a dispatch, comes from the custom loop, trained for
    # real (TRL steps), and the scorer learned each as a label.
    assert len(lifts) >= 2 and {x.cohort_id for x in lifts} <= dispatched
    assert {x.trainer_id for x in lifts} == {"trl-example"}
    assert all(x.steps >= 1 and x.policy_version_after != x.policy_version_before for x in lifts)
    labels = [json.loads(v) for v in _read_all(settings, "tap.labels")]
    assert {x["cohort_id"] for x in labels} == {x.cohort_id for x in lifts}
    assert {x["realized_lift"] for x in labels} == {x.nll_lift for x in lifts}
    # the custom loop's versions went to the policy store the scorer samples from
    assert (tmp_path / "state" / "trainer" / "checkpoints" / "policy-000001.pt").is_file()
