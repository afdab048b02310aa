"""Poison messages against real processes: nothing crashes, freezes or loses a valid message.

Issue 13's blocker: one JSON integer of more than 4,300 digits (even in an
ignored field) raised a ValueError nobody caught, and the scorer crashed on
every restart, the valid messages after it never processed. Here a real
``tapd run`` (embedded log) is fed that poison and its relatives on all three
topics it reads, between valid traces, while a prober asks ``/healthz`` every
50 ms: every answer comes within 1 s, every poison is a dead letter naming
its stage and field and carrying its bytes, every valid trace after the poison
is decided, and a restart does not read the poison again. The trainer's side
(``tapd trainer``'s service loop on a real log) gets the same.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import TapdSettings, Topics, TransportSettings
from lab import tasks
from streams.factory import open_transport
from streams.schemas import Attempt, DeadLetter, Trace, decode, encode
from streams.transport import Transport

REPO = Path(__file__).resolve().parents[2]
K = 4
HUGE = b"9" * 5_000  # over Python's 4,300-digit int-to-string limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _valid(slice_no: int, n: int, seed: int) -> list[bytes]:
    subject, difficulty = [("add", "2d_carry"), ("sub", "2d_borrow"), ("mul", "2x1")][slice_no]
    out = []
    for i, task in enumerate(tasks.make_tasks(subject, difficulty, n, seed)):
        attempts = [
            Attempt(
                completion=task.reference if j < 2 else "0",
                reward=1.0 if j < 2 else 0.0,
                n_tokens=3,
                token_logprobs=[-0.4, -0.9, -0.2],
            )
            for j in range(K)
        ]
        key = f"{slice_no}:{seed}:{i}"
        out.append(encode(tasks.to_trace(task, policy_version="v0", attempts=attempts, key=key)))
    return out


def _patch(raw: bytes, tail: bytes) -> bytes:
    """``raw`` (a JSON object) with ``tail`` (raw JSON members) added at its end."""
    return raw[:-1] + b"," + tail + b"}"


def poisons(valid: bytes) -> list[tuple[bytes, str, str]]:
    """(raw, stage, field) of each poison, derived from one valid trace."""
    d = json.loads(valid)
    other = valid.replace(f'"reference":"{d["reference"]}"'.encode(), b'"reference":"-1"')
    assert other != valid  # the same id, other content
    return [
        (_patch(valid.replace(d["trace_id"].encode(), b"poison-1"), b'"x":' + HUGE), "decode", "x"),
        (
            _patch(
                valid.replace(d["trace_id"].encode(), b"poison-2"),
                b'"verifier_args":{"n":' + HUGE + b"}",
            ),
            "decode",
            "verifier_args.n",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "decode", "$"),
        (valid.replace(b"prompt", b"pr\xffompt", 1), "decode", "$"),
        (valid.replace(b'"reward":1.0', b'"reward":true', 1), "decode", "attempts[0].reward"),
        (
            valid.replace(b'"token_logprobs":[-0.4', b'"token_logprobs":[-1e308', 1),
            "decode",
            "attempts[0].token_logprobs[0]",
        ),
        (other, "cohorting", "trace_id"),
    ]


class Prober:
    """Asks ``/healthz`` every 50 ms; keeps the slowest answer and every failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.slowest = 0.0
        self.asked = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                else:
                    why = "not 200"
                took = time.monotonic() - t0
                self.asked += 1
                self.slowest = max(self.slowest, took)
                if not ok:
                    self.failures.append(why)
                time.sleep(0.05)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _read(transport: Transport, topic: str) -> list[bytes]:
    consumer = transport.consumer([topic], f"audit-{uuid.uuid4().hex[:8]}")
    got: list[bytes] = []
    try:
        while batch := consumer.poll(0.0, 1000):
            got += [r.value for r in batch]
    finally:
        consumer.close()
    return got


@pytest.fixture
def log(tmp_path: Path) -> Iterator[tuple[TransportSettings, Topics, Transport]]:
    settings = TransportSettings(
        kind="embedded", embedded_path=tmp_path / "log.sqlite", embedded_partitions=2
    )
    run = uuid.uuid4().hex[:8]
    topics = Topics(**{k: f"p{run}.{k}" for k in Topics.model_fields})
    transport = open_transport(settings)
    yield settings, topics, transport
    transport.close()


def _start(
    tmp: Path, settings: TransportSettings, topics: Topics, port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(settings.embedded_path),
        "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": "2",
        "TAPD_SERVICE__GROUP": f"scorer-{topics.traces}",
        **{f"TAPD_TOPICS__{k.upper()}": v for k, v in topics.model_dump().items()},
        "TAPD_STATE_DIR": str(tmp / "state"),
        "TAPD_COHORTING__MAX_GROUPS": "4",
        "TAPD_COHORTING__MIN_GROUPS": "2",
        "TAPD_COHORTING__MAX_AGE_S": "30",
        "TAPD_GRPO__NUM_GENERATIONS": str(K),
        "TAPD_THRESHOLDS__SHADOW_MODE": "true",
        "TAPD_THRESHOLDS__REDUNDANCY_CEILING": "0.95",
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__POLL_TIMEOUT_S": "0.1",
        "TAPD_SERVICE__MAX_POLL_RECORDS": "5",
        "OMP_NUM_THREADS": "1",
    }
    out = (tmp / "scorer.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"], cwd=REPO, env=env, stdout=out, stderr=out
    )


def _wait(cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"tapd run exited ({proc.returncode}) while waiting for {what}:\n"
                + (tmp / "scorer.log").read_text(errors="replace")[-3000:]
            )
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_tapd_run_answers_health_through_poison_and_processes_what_follows(
    tmp_path: Path, log: tuple[TransportSettings, Topics, Transport]
) -> None:
    settings, topics, transport = log
    before = _valid(0, 4, seed=1) + _valid(1, 4, seed=2)
    after = _valid(2, 4, seed=3) + _valid(0, 4, seed=4)
    bad = poisons(before[0])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, settings, topics, port)
    try:
        _wait(lambda: _ready(url), 90, "readiness", proc, tmp_path)
        with Prober(url + "/healthz") as prober:
            producer = transport.producer()
            # One partition for the traces, so that the first copy of the
            # conflicting duplicate is read before the second.
            for raw in [*before, *(b for b, _, _ in bad), *after]:
                producer.send(topics.traces, raw, key=b"same-partition")
            lift_poison = b'{"schema":"tapd.lift/1","cohort_id":' + HUGE + b"}"
            producer.send(topics.lift, lift_poison)
            dlq_poison = b'{"schema":"tapd.dlq/1","offset":' + HUGE + b"}"
            producer.send(topics.dlq, dlq_poison)
            producer.flush()
            producer.close()
            want = {decode(v, Trace).trace_id for v in before + after}

            def decided() -> set[str]:
                ids: set[str] = set()
                for v in _read(transport, topics.decisions):
                    ids.update(json.loads(v)["trace_ids"])
                return ids

            _wait(lambda: decided() >= want, 120, "decisions on every valid trace", proc, tmp_path)
            _wait(
                lambda: len(_read(transport, topics.dlq)) >= len(bad) + 2,
                30,
                "dead letters",
                proc,
                tmp_path,
            )
            time.sleep(1.0)  # and after it
        assert proc.poll() is None
        assert not prober.failures and prober.asked >= 10
        assert prober.slowest < 1.0, prober.slowest
        assert httpx.get(url + "/healthz", timeout=1).status_code == 200

        decisions = [json.loads(v) for v in _read(transport, topics.decisions)]
        members = [tid for d in decisions for tid in d["trace_ids"]]
        assert sorted(members) == sorted(want)  # each valid trace in exactly one cohort
        on_dlq = _read(transport, topics.dlq)
        letters = [decode(v, DeadLetter) for v in on_dlq if v != dlq_poison]
        ours = [x for x in letters if x.source_topic == topics.traces]
        got = {base64.b64decode(x.original_b64): (x.stage, x.field) for x in ours}
        assert got == {raw: (stage, field) for raw, stage, field in bad}
        assert len(ours) == len(bad)
        [lift_letter] = [x for x in letters if x.source_topic == topics.lift]
        assert (lift_letter.stage, lift_letter.field) == ("lift", "cohort_id")
        assert base64.b64decode(lift_letter.original_b64) == lift_poison
        # The dead letter on the dead-letter topic is ignored, not re-dead-lettered.
        assert not [x for x in letters if x.source_topic == topics.dlq]

        # A restart does not read the poison again (it was committed, not retried).
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc = _start(tmp_path, settings, topics, port)
        _wait(lambda: _ready(url), 90, "readiness after restart", proc, tmp_path)
        time.sleep(2.0)
        assert len(_read(transport, topics.dlq)) == len(on_dlq)
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_trainer_loop_dead_letters_poison_dispatches_and_moves_on(
    tmp_path: Path, tiny_policy: Path, dispatch_dict: dict[str, Any]
) -> None:
    from daemon.service.trainer import TrainerService, build_trainer
    from daemon.verify.registry import get_verifier
    from lab.tasks import write_probe

    transport_settings = TransportSettings(
        kind="embedded", embedded_path=tmp_path / "log.sqlite", embedded_partitions=1
    )
    settings = TapdSettings(
        state_dir=tmp_path / "state",
        transport=transport_settings,
        policy={  # type: ignore[arg-type]
            "model_path": tiny_policy,
            "device": "cpu",
            "probe_path": write_probe(tmp_path / "probe.jsonl", 8, seed=0),
        },
        service={"poll_timeout_s": 0.2},  # type: ignore[arg-type]
    )
    transport = open_transport(transport_settings, max_poll_records=1)
    valid = json.dumps(dispatch_dict).encode()

    def lookup(name: str, args: Any) -> Any:
        if args.get("explode"):
            raise RuntimeError("a verifier bug")
        return get_verifier(name, args)

    bad_item = dict(dispatch_dict)
    bad_item["items"] = [{**dispatch_dict["items"][0], "verifier_args": {"explode": 1}}]
    cases = [
        (_patch(valid, b'"x":' + HUGE), ("decode", "x")),
        (b"{" * 50_000, ("decode", "$")),
        (
            valid.replace(b'"uncertainty": 0.02', b'"uncertainty": "0.02"'),
            ("decode", "uncertainty"),
        ),
        (json.dumps(bad_item).encode(), ("verifier", "items[0].verifier")),
    ]
    producer = transport.producer()
    for raw, _ in cases:
        producer.send(settings.topics.dispatch, raw)
    producer.flush()
    service = TrainerService(settings, transport, build_trainer(settings), lookup)
    try:
        handled = sum(service.step() for _ in range(len(cases) + 3))
        assert handled == len(cases)
        letters = [decode(v, DeadLetter) for v in _read(transport, settings.topics.dlq)]
        assert [(x.stage, x.field) for x in letters] == [want for _, want in cases]
        assert [base64.b64decode(x.original_b64) for x in letters] == [raw for raw, _ in cases]
        assert "a verifier bug" in letters[-1].reason
        assert service.metrics.dead_letters._value.get() == len(cases)
        assert not _read(transport, settings.topics.lift)
    finally:
        service.close()
        transport.close()
