"""The closed loop on the real test broker, every part its own process.

kcat (an independent Kafka client) produces the traces; ``tapd run`` scores
them, filling attempts from the tiny policy, and dispatches; the trainer
process trains the tiny policy with GRPO and publishes the lift; the scorer's
predictor learns from it, and /metrics shows the label count and the model
version advance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from lab import tasks
from lab.demo import trainer_command
from lab.localbroker import KAFKA09_API_VERSION, KCAT_ARGS
from lab.reliability import trace_key
from streams.schemas import Attempt, Dispatch, decode, encode

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _traces_file(path: Path) -> int:
    """Frontier slices, each trace carrying ONE attempt as production traffic does."""
    lines = []
    for c, (subject, difficulty) in enumerate(
        [("add", "2d_carry"), ("sub", "2d_borrow"), ("mul", "2x1")]
    ):
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed=40 + c)):
            attempt = Attempt(completion=task.reference, reward=1.0, n_tokens=3)
            tr = tasks.to_trace(task, policy_version="v0", attempts=[attempt], key=f"e2e{i}")
            raw = encode(tr)
            # "key<TAB>value" for kcat -K: keyed by slice key, the producer contract
            lines.append(f"{(trace_key(raw) or b'').decode()}\t{raw.decode()}")
    lines.append('-\t{"schema": "tapd.trace/1", "trace_id": "no-prompt"}')
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _create_topic(kcat: str, bootstrap: str, topic: str, timeout_s: float = 30.0) -> None:
    """Auto-create a topic by asking for its metadata, then wait for partition leaders."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = subprocess.run(
            [kcat, *KCAT_ARGS, "-b", bootstrap, "-L", "-J", "-t", topic],
            capture_output=True,
            timeout=30,
            check=False,
        )
        try:
            meta = json.loads(res.stdout or b"{}")
            parts = [p for t in meta.get("topics", []) for p in t.get("partitions", [])]
            if parts and all(p.get("leader", -1) >= 0 for p in parts):
                return
        except json.JSONDecodeError:
            pass
        assert time.monotonic() < deadline, f"topic {topic} has no leaders: {res.stderr[-500:]!r}"
        time.sleep(0.5)


def _kcat_read(kcat: str, bootstrap: str, topic: str) -> list[bytes]:
    res = subprocess.run(
        [
            kcat,
            *KCAT_ARGS,
            "-b",
            bootstrap,
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-D",
            "\n\x1e",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return [m.strip() for m in res.stdout.split(b"\n\x1e") if m.strip()]


@pytest.mark.kafka
@pytest.mark.slow
def test_closed_loop_on_kafka(
    kafka_broker: str, kcat: str, tmp_path: Path, lab_env: dict[str, str]
) -> None:
    run = uuid.uuid4().hex[:8]
    topics = {
        k: f"e2e.{run}.{k}" for k in ("traces", "dispatch", "lift", "dlq", "labels", "decisions")
    }
    port = _free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TAPD_STATE_DIR": str(tmp_path / "state"),
        "TAPD_TRANSPORT__KIND": "kafka",
        "TAPD_TRANSPORT__BOOTSTRAP_SERVERS": kafka_broker,
        "TAPD_TRANSPORT__API_VERSION": KAFKA09_API_VERSION,
        "TAPD_TRANSPORT__SESSION_TIMEOUT_MS": "6000",
        **{f"TAPD_TOPICS__{k.upper()}": v for k, v in topics.items()},
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__GROUP": f"e2e-scorer-{run}",
        "TAPD_SERVICE__POLL_TIMEOUT_S": "0.2",
        "TAPD_COHORTING__MAX_GROUPS": "4",
        "TAPD_GRPO__NUM_GENERATIONS": "4",
        "TAPD_COHORTING__MAX_AGE_S": "30",
        "TAPD_PREDICTOR__RIVER_AFTER": "2",
        "TAPD_THRESHOLDS__MAX_IN_FLIGHT": "2",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "1.0",
        "TAPD_THRESHOLDS__REDUNDANCY_CEILING": "0.95",
        "TAPD_TRAINER__GROUP": f"e2e-trainer-{run}",
        "TAPD_GRPO__STEPS": "2",
        **lab_env,
        "TAPD_TRAINER__METRICS_PORT": "0",
    }
    # Topics exist before the roles start, as a deployment creates them
    # (Strimzi KafkaTopic, the compose topic job): the test broker's
    # auto-create on first use is not how production meets them.
    for name in topics.values():
        _create_topic(kcat, kafka_broker, name)
    traces = tmp_path / "traces.jsonl"
    n_lines = _traces_file(traces)
    subprocess.run(
        [
            kcat,
            *KCAT_ARGS,
            "-b",
            kafka_broker,
            "-P",
            "-K",
            "\t",
            "-t",
            topics["traces"],
            "-l",
            str(traces),
        ],
        check=True,
        timeout=30,
    )
    procs = {
        "trainer": subprocess.Popen(
            trainer_command(),
            cwd=REPO,
            env=env,
            stdout=(tmp_path / "trainer.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
        "scorer": subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=REPO,
            env=env,
            stdout=(tmp_path / "scorer.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
    }
    try:
        # ~40 s on an idle two-core box; the margin is for a loaded one.
        deadline = time.monotonic() + 300
        m: dict[str, float] = {}
        while time.monotonic() < deadline:
            for name, p in procs.items():
                assert p.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            m = _metrics(port)
            if (
                m.get("tapd_lift_labels_total", 0) >= 2
                and m.get("tapd_predictor_model_version", 0) >= 1
            ):
                break
            time.sleep(1.0)
        else:
            pytest.fail(
                f"the loop did not close: {m}\n"
                + (tmp_path / "scorer.log").read_text()[-2000:]
                + (tmp_path / "trainer.log").read_text()[-2000:]
            )

        assert m["tapd_traces_consumed_total"] == n_lines
        assert m['tapd_dead_letters_total{stage="decode"}'] == 1
        assert m["tapd_traces_misrouted_total"] == 0  # kcat sent each with its slice key
        assert m["tapd_predictor_labels"] >= 2
        assert m['tapd_predictor_stage{stage="river"}'] == 1
        assert (
            m['tapd_realized_lift_nats_count{selection="explore_random"}']
            + m.get('tapd_realized_lift_nats_count{selection="explore_uncertain"}', 0)
            >= 2
        )
        # What crossed the broker, read back by kcat.
        dispatches = [
            decode(v, Dispatch) for v in _kcat_read(kcat, kafka_broker, topics["dispatch"])
        ]
        assert len({d.cohort_id for d in dispatches}) >= 2
        assert all(len(d.items) == 4 for d in dispatches)
        lifts = [json.loads(v) for v in _kcat_read(kcat, kafka_broker, topics["lift"])]
        assert {x["cohort_id"] for x in lifts} <= {d.cohort_id for d in dispatches}
        assert all(x["steps"] >= 1 for x in lifts)
        dlq = [json.loads(v) for v in _kcat_read(kcat, kafka_broker, topics["dlq"])]
        assert [d["stage"] for d in dlq] == ["decode"] and dlq[0]["field"] == "ts"

        promtool = shutil.which("promtool")
        if promtool:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=3).text
            res = subprocess.run(
                [promtool, "check", "metrics"],
                input=text,
                text=True,
                capture_output=True,
                check=False,
            )
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            try:
                assert p.wait(30) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            except subprocess.TimeoutExpired:
                p.kill()
                raise
    # One logging pipeline: every line either role printed (kafka-python,
    # transformers, TRL, uvicorn included) is a JSON object with its role.
    for name in procs:
        for line in (tmp_path / f"{name}.log").read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                assert obj["role"] in ("scorer", "trainer") and "event" in obj, line[:200]
