"""The inspection CLI against a real ``tapd run`` on the embedded log: status, cohorts,
explain, models (list, rollback with restart), policies, dead letters (list, show,
redrive once), positional consume, produce's schema check, generate; and the same
answers from the state directory when no scorer runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import PredictorSettings
from daemon.core.predictor import Predictor
from daemon.runtime.modelstore import ModelStore
from lab.reliability import ServiceProcess, _wait_ready, free_port, tapd_argv
from streams.schemas import DeadLetter, Dispatch, decode

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    state: Path
    proc: ServiceProcess

    def tapd(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args],
            cwd=ROOT,
            env={**os.environ, **self.env, **env},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert "Traceback" not in out.stderr, out.stderr
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.tapd(*args).stdout)

    def jsonl(self, *args: str) -> list[Any]:
        return [json.loads(x) for x in self.tapd(*args).stdout.splitlines() if x.strip()]

    def wait(self, what: str, cond: Any, timeout_s: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            got = cond()
            if got:
                return got
            assert self.proc.alive(), self.proc.logs()[-3000:]
            assert time.monotonic() < deadline, f"{what}\n{self.proc.logs()[-3000:]}"
            time.sleep(0.5)


def _snapshots(models: Path) -> list[str]:
    """Two predictor snapshots, as two promotions would have left them."""
    store = ModelStore(models)
    p = Predictor(PredictorSettings())
    names = []
    for version in (1, 2):
        p.version = version
        names.append(store.save(p.snapshot(created_ts=1_000.0 + version)))
    return names


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("inspect")
    port = free_port()
    env = {
        "TAPD_STATE_DIR": str(tmp / "state"),
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp / "log.sqlite"),
        "TAPD_TRANSPORT__EMBEDDED_PARTITIONS": "2",
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__POLL_TIMEOUT_S": "0.2",
        "TAPD_COHORTING__MAX_GROUPS": "4",
        "TAPD_COHORTING__MAX_AGE_S": "3600",
        "TAPD_THRESHOLDS__MAX_IN_FLIGHT": "2",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "1.0",
    }
    _snapshots(tmp / "state" / "models")
    (tmp / "state" / "trainer" / "checkpoints").mkdir(parents=True)
    (tmp / "state" / "trainer" / "checkpoints" / "policy-000001.pt").write_bytes(b"x" * 10)
    proc = ServiceProcess(tapd_argv("run"), env, tmp / "scorer.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout_s=180)
        s = Stack(env, url, tmp / "state", proc)
        # 4 slices x 5 traces: a cohort per slice closes at 4 groups, one trace
        # per slice stays open; with 2 in-flight slots the rest wait (pending).
        s.tapd("generate", "--n", "20", "--k", "8", "--topic", "tap.traces")
        s.wait(
            "two dispatched, the rest pending",
            lambda: (
                (st := s.json("status"))["cohorts"]["in_flight"] == 2
                and st["cohorts"]["pending"] >= 1
            ),
        )
        yield s
    finally:
        proc.kill()


def test_status(stack: Stack) -> None:
    st = stack.json("status")
    assert st["scorer"] == "running" and st["ready"] == {"broker": True, "predictor": True}
    assert st["cohorts"]["open"] == 4 and st["cohorts"]["max_in_flight"] == 2
    assert st["paused"] is True  # the in-flight cap is reached: backpressure
    assert set(st["lag"]) == {"tap.traces", "tap.lift", "tap.dlq"}
    assert st["predictor"]["latest_snapshot"].startswith("v2.")
    assert st["transport"]["kind"] == "embedded"


def test_cohorts_by_state(stack: Stack) -> None:
    everything = stack.jsonl("cohorts")
    by_state: dict[str, list[Any]] = {}
    for row in everything:
        by_state.setdefault(row["state"], []).append(row)
    assert len(by_state["open"]) == 4 and len(by_state["in_flight"]) == 2
    assert all(r["n_groups"] == 1 for r in by_state["open"])
    flights = stack.jsonl("cohorts", "--in-flight")
    assert [r["cohort_id"] for r in flights] == [r["cohort_id"] for r in by_state["in_flight"]]
    assert all(0 < r["lease_left_s"] <= 3600 for r in flights)
    pending = stack.jsonl("cohorts", "--pending")
    assert pending and all(r["state"] == "pending" and r["cohort_id"] for r in pending)
    bad = stack.tapd("cohorts", "--open", "--pending", check=False)
    assert bad.returncode == 2 and "at most one" in bad.stderr


def _lift_for(dispatch: Dispatch, lift_dict: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            **lift_dict,
            "cohort_id": dispatch.cohort_id,
            "features": dict(dispatch.features),
            "feature_schema": dispatch.feature_schema,
            "model_version": dispatch.model_version,
            "predicted_lift": dispatch.predicted_lift,
            "selection": dispatch.selection,
            "nll_lift": 0.0421,
            "policy_version_before": "v0",
            "policy_version_after": "v0",
        }
    ).encode()


def test_explain_an_in_flight_cohort_then_its_lift(
    stack: Stack, lift_dict: dict[str, Any], tmp_path: Path
) -> None:
    (flight, *_) = stack.jsonl("cohorts", "--in-flight")
    cid = flight["cohort_id"]
    got = stack.json("explain", cid)
    assert got["state"] == "in_flight" and got["in_flight"]["selection"] == flight["selection"]
    d = got["decision"]
    assert d["dispatched"] is True and d["recommendation"] and d["reason"]
    assert "group_passrate_mean" in d["features"] and "uncertainty" in d
    assert len(d["trace_ids"]) == 4

    # The trainer answers: the lift comes back and is learned.
    dispatches = [
        decode(line, Dispatch)
        for line in stack.tapd("consume", "tap.dispatch", "--offset", "0").stdout.splitlines()
    ]
    (dispatch,) = [x for x in dispatches if x.cohort_id == cid]
    lift = tmp_path / "lift.jsonl"
    lift.write_bytes(_lift_for(dispatch, lift_dict) + b"\n")
    assert json.loads(stack.tapd("produce", str(lift), "-t", "tap.lift").stdout)["sent"] == 1
    got = stack.wait(
        "learned", lambda: (e := stack.json("explain", cid))["state"] == "learned" and e
    )
    assert got["lift"]["realized_lift"] == 0.0421 and got["decision"]["cohort_id"] == cid
    missing = stack.tapd("explain", "no-such-cohort", check=False)
    assert missing.returncode == 1 and missing.stderr.strip().endswith("not known to this scorer")


def test_policies_list(stack: Stack) -> None:
    got = stack.json("policies", "list")
    assert [v["version"] for v in got["versions"]] == ["v0", "v1"]
    assert got["versions"][1]["bytes"] == 10


def test_positional_consume(stack: Stack, tmp_path: Path) -> None:
    topic = "test.positions"
    src = tmp_path / "lines.jsonl"
    src.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    assert (
        json.loads(stack.tapd("produce", str(src), "-t", topic, "--no-validate").stdout)["sent"]
        == 10
    )
    every = stack.jsonl("consume", topic, "--offset", "0", "--meta")
    assert sorted(json.loads(r["value"])["i"] for r in every) == list(range(10))
    assert {r["partition"] for r in every} == {0, 1}
    p0 = [r for r in every if r["partition"] == 0]
    last2 = stack.jsonl("consume", topic, "--partition", "0", "--last", "2", "--meta")
    assert [(r["partition"], r["offset"]) for r in last2] == [(0, r["offset"]) for r in p0[-2:]]
    from3 = stack.jsonl("consume", topic, "-p", "1", "-o", "3")
    p1 = [json.loads(r["value"]) for r in every if r["partition"] == 1]
    assert from3 == p1[3:]
    nope = stack.tapd("consume", topic, "-p", "5", "-o", "0", check=False)
    assert nope.returncode == 1 and "no partition 5" in nope.stderr


def test_produce_checks_the_schema_against_the_topic_and_keys_letters_per_file(
    stack: Stack, tmp_path: Path, lift_dict: dict[str, Any], trace_dict: dict[str, Any]
) -> None:
    poison = '{"schema": "tapd.trace/1", "x": ' + "9" * 5000 + "}"
    lines = [
        json.dumps({**trace_dict, "trace_id": "inspect-good-1"}),
        json.dumps(lift_dict),  # a lift result on the traces topic
        poison,  # Python's int limit: not a SchemaError, still a dead letter
        json.dumps({**trace_dict, "trace_id": "inspect-good-2"}),
    ]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines) + "\n")
    b.write_text("\n".join([lines[0], lines[1]]) + "\n")
    out = stack.tapd("produce", str(a), "-t", "tap.traces")
    assert json.loads(out.stdout) == {
        "topic": "tap.traces",
        "sent": 2,
        "rejected": 2,
        "dlq": "tap.dlq",
    }
    assert "line 2: schema: tapd.lift/1 does not belong on tap.traces" in out.stderr
    # The line is named, with the field the decoder found it in.
    assert "line 3: x: an integer of 5000 digits" in out.stderr
    stack.tapd("produce", str(b), "-t", "tap.traces")
    letters = stack.jsonl("consume", "tap.dlq", "--offset", "0", "--meta")
    produced = [r for r in letters if decode(r["value"], DeadLetter).stage == "produce"]
    keys = [r["key"] for r in produced]
    assert len(produced) == 3 and len(set(keys)) == 3  # line 2 of a and of b: two keys
    assert all(k.startswith("tap.traces/produce/") for k in keys)


def test_consume_validate_survives_poison(
    stack: Stack, tmp_path: Path, trace_dict: dict[str, Any]
) -> None:
    topic = "test.poison"
    good = json.dumps({**trace_dict, "trace_id": "consume-good"})
    src = tmp_path / "mixed.jsonl"
    src.write_text(
        "\n".join(
            [
                '{"schema": "tapd.trace/1", "n": ' + "7" * 5000 + "}",
                "[" * 5000 + "]" * 5000,
                good,
            ]
        )
        + "\n"
    )
    stack.tapd("produce", str(src), "-t", topic, "--no-validate")
    out = stack.tapd("consume", topic, "--offset", "0", "--validate", "trace")
    assert out.stdout.splitlines() == [good]
    assert json.loads(out.stderr.splitlines()[-1]) == {"topic": topic, "consumed": 1, "rejected": 2}
    letters = [
        decode(r["value"], DeadLetter)
        for r in stack.jsonl("consume", "tap.dlq", "--offset", "0", "--meta")
        if decode(r["value"], DeadLetter).source_topic == topic
    ]
    assert len(letters) == 2 and {x.stage for x in letters} == {"consume"}


def test_dlq_list_show_and_redrive_once(
    stack: Stack, tmp_path: Path, lift_dict: dict[str, Any]
) -> None:
    src = tmp_path / "wrong.jsonl"
    body = json.dumps({**lift_dict, "cohort_id": "redrive-me"})
    src.write_text(body + "\n")
    stack.tapd("produce", str(src), "-t", "tap.traces")
    rows = stack.jsonl("dlq", "list", "--stage", "produce", "--since", "1h")
    (row,) = [r for r in rows if r["bytes"] == len(body)]
    assert row["source_topic"] == "tap.traces" and row["field"] == "schema"
    assert stack.jsonl("dlq", "list", "--stage", "produce", "--since", "2020-01-01T00:00:00Z")
    assert not [r for r in stack.jsonl("dlq", "list", "--stage", "nope") if r["bytes"] == len(body)]
    shown = stack.json("dlq", "show", f"{row['partition']}:{row['offset']}")
    assert shown["original"] == body and shown["stage"] == "produce"

    dry = stack.tapd("dlq", "redrive", "--stage", "produce", "--dry-run")
    assert json.loads(dry.stdout.splitlines()[-1])["dry_run"] is True
    before = stack.tapd("consume", "tap.traces", "--offset", "0").stdout.splitlines()
    first = json.loads(stack.tapd("dlq", "redrive", "--stage", "produce").stdout)
    assert first["redriven"] >= 1
    again = json.loads(stack.tapd("dlq", "redrive", "--stage", "produce").stdout)
    assert again["redriven"] == 0 and again["already"] == first["redriven"]
    after = stack.tapd("consume", "tap.traces", "--offset", "0").stdout.splitlines()
    assert len(after) == len(before) + first["redriven"]
    assert body in after[len(before) :] or body in after  # byte for byte, on its source topic
    assert after.count(body) == before.count(body) + 1
    bad = stack.tapd("dlq", "list", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_generate_prints_valid_traces(stack: Stack) -> None:
    from streams.schemas import Trace

    lines = stack.tapd("generate", "--n", "6", "--k", "4", "--seed", "3").stdout.splitlines()
    traces = [decode(x, Trace) for x in lines]
    assert len(traces) == 6 and all(len(t.attempts) == 4 for t in traces)
    assert len({t.tags["operation"] for t in traces}) == 4


def test_models_list_and_rollback_restarts_the_scorer(stack: Stack) -> None:
    models = stack.json("models", "list")
    names = [m["name"] for m in models["snapshots"]]
    assert names[:2] == ["v1.000000000", "v2.000000000"] and models["latest"] == names[-1]
    pid = stack.proc.proc.pid if stack.proc.proc else None
    out = stack.json("models", "rollback", "v1")
    assert out["rollback_to"] == "v1.000000000" and out["restarting"] is True
    # The command returned once the restarted scorer was ready: the next
    # command reaches it at once (the runbook's next line relies on it).
    assert out["restarted"] is True
    assert len(stack.proc.events("scorer_started")) >= 2
    assert httpx.get(stack.url + "/readyz", timeout=5).status_code == 200
    # The same process starts again (exec) on the pinned snapshot.
    _wait_ready(stack.url, stack.proc, timeout_s=180)
    assert stack.proc.proc is not None and stack.proc.proc.pid == pid
    rolled = stack.proc.events("model_rolled_back")
    assert rolled and rolled[-1]["latest"] == "v1.000000000"
    restored = stack.proc.events("predictor_restored")[-1]
    assert restored["model_version"] == "v1"
    # Overrides survive the restart too.
    assert httpx.get(stack.url + "/healthz", timeout=5).status_code == 200


def test_offline_reads_the_state_directory(stack: Stack) -> None:
    stack.proc.kill(15)
    st = stack.tapd("status")
    assert "no scorer answers" in st.stderr
    got = json.loads(st.stdout)
    assert got["scorer"] == "not running" and got["cohorts"]["open"] == 4
    # v1, and the label learned since replayed into it at the restart
    assert got["predictor"]["latest_snapshot"].startswith("v1.")
    assert set(got["lag"]) == {"tap.traces", "tap.lift", "tap.dlq"}
    assert len(stack.jsonl("cohorts", "--open")) == 4
    assert len(stack.jsonl("cohorts", "--in-flight")) == 2
    models = stack.json("models", "list")
    assert models["latest"].startswith("v1.")
    # Offline rollback moves the pointer for the next start.
    out = stack.json("models", "rollback", "v2")
    assert out == {**out, "latest": "v2.000000000", "restarting": False}
    assert ModelStore(stack.state / "models").latest() == "v2.000000000"
