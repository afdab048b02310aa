"""The ``tapd trainer`` loop end to end, on the embedded log and the real test broker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from daemon.config import TapdSettings, TransportSettings
from daemon.runtime.metrics import TrainerMetrics
from daemon.service.trainer import Rejected, TrainerService, build_trainer, run_trainer, validate
from daemon.verify.registry import get_verifier
from lab.tasks import write_probe
from streams.deadletter import original
from streams.factory import open_transport
from streams.schemas import DeadLetter, Dispatch, LiftResult, decode
from streams.transport import Record, TopicPartition, Transport

pytestmark = pytest.mark.slow


def settings_for(tmp_path: Path, transport: TransportSettings, tiny_policy: Path) -> TapdSettings:
    suffix = tmp_path.name[-12:]
    return TapdSettings(
        state_dir=tmp_path / "state",
        transport=transport,
        topics={  # type: ignore[arg-type]
            "dispatch": f"t.dispatch.{suffix}",
            "lift": f"t.lift.{suffix}",
            "dlq": f"t.dlq.{suffix}",
        },
        policy={  # type: ignore[arg-type]
            "model_path": tiny_policy,
            "device": "cpu",
            "probe_path": write_probe(tmp_path / "probe.jsonl", 17, seed=0),
        },
        grpo={"steps": 2, "max_completion_length": 8},  # type: ignore[arg-type]
        trainer={  # type: ignore[arg-type]
            "mode": "probe_revert",
            "group": f"tapd-trainer-{suffix}",
            "metrics_port": 0,
        },
        service={"poll_timeout_s": 0.2},  # type: ignore[arg-type]
    )


def compare_dispatch(dispatch_dict: dict[str, Any]) -> dict[str, Any]:
    d = dict(dispatch_dict)
    d["cohort_id"] = "coh-compare-3d"
    d["subject"] = "compare"  # a target of the test probe: its lift has a target part
    d["items"] = [
        {"trace_id": f"t{i}", "prompt": p, "reference": r, "verifier": "exact"}
        for i, (p, r) in enumerate(
            [("354?358=", "<"), ("426?420=", ">"), ("725?725=", "="), ("919?185=", ">")]
        )
    ]
    return d


def read_all(transport: Transport, topic: str, n: int, timeout_s: float = 30.0) -> list[Record]:
    c = transport.consumer([topic], f"reader-{topic}")
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(c.poll(0.5, 100))
    c.close()
    return out


def test_validate_names_the_field_and_reason(dispatch_dict: dict[str, Any]) -> None:
    bad = validate(b"{not json", get_verifier)
    assert isinstance(bad, Rejected) and (bad.stage, bad.field) == ("decode", "$")
    d = compare_dispatch(dispatch_dict)
    d["items"][2]["verifier"] = "no_such_verifier"
    rejected = validate(json.dumps(d).encode(), get_verifier)
    assert isinstance(rejected, Rejected) and rejected.field == "items[2].verifier"
    assert "no_such_verifier" in rejected.reason
    d["items"][2] = {**d["items"][2], "verifier": "numeric", "reference": "not a number"}
    rejected = validate(json.dumps(d).encode(), get_verifier)
    assert isinstance(rejected, Rejected) and rejected.field == "items[2].reference"
    assert isinstance(
        validate(json.dumps(compare_dispatch(dispatch_dict)).encode(), get_verifier), Dispatch
    )


def test_trainer_consumes_trains_once_and_publishes(
    transport_settings: TransportSettings,
    tmp_path: Path,
    tiny_policy: Path,
    dispatch_dict: dict[str, Any],
) -> None:
    settings = settings_for(tmp_path, transport_settings, tiny_policy)
    transport = open_transport(settings.transport, max_poll_records=1)
    good = json.dumps(compare_dispatch(dispatch_dict)).encode()
    unknown = compare_dispatch(dispatch_dict)
    unknown["cohort_id"] = "coh-unknown-verifier"
    unknown["items"][1]["verifier"] = "no_such_verifier"
    # A subject the probe names no target for: trained, its label the whole probe's.
    untargeted = {**compare_dispatch(dispatch_dict), "cohort_id": "coh-no-target"}
    untargeted["subject"] = "no_such_subject"
    producer = transport.producer()
    # One partition key for all, so that the redelivery comes after the first copy.
    for value in (good, b"\x00garbage", good, json.dumps(unknown).encode(),
                  json.dumps(untargeted).encode()):  # fmt: skip
        producer.send(settings.topics.dispatch, value, key=b"k")
    producer.flush()
    producer.close()

    metrics = TrainerMetrics()
    service = TrainerService(
        settings, transport, build_trainer(settings), get_verifier, metrics, clock=lambda: 5.0
    )
    handled = 0
    deadline = time.monotonic() + 90
    while handled < 5 and time.monotonic() < deadline:
        handled += service.step()
    service.close()
    assert handled == 5

    lifts = [decode(r.value, LiftResult) for r in read_all(transport, settings.topics.lift, 3)]
    assert [x.cohort_id for x in lifts].count("coh-no-target") == 1
    [untargeted_lift] = [x for x in lifts if x.cohort_id == "coh-no-target"]
    assert untargeted_lift.target is None and untargeted_lift.target_lift is None
    lifts = [x for x in lifts if x.cohort_id != "coh-no-target"]
    assert len(lifts) == 2
    assert lifts[0] == lifts[1]  # the redelivery republished, it did not retrain
    lift = lifts[0]
    assert lift.cohort_id == "coh-compare-3d" and lift.mode == "probe_revert"
    assert lift.features == dispatch_dict["features"]
    assert lift.predicted_lift == dispatch_dict["predicted_lift"]
    assert lift.steps == 2 and lift.nll_lift == pytest.approx(lift.nll_before - lift.nll_after)

    letters = [decode(r.value, DeadLetter) for r in read_all(transport, settings.topics.dlq, 2)]
    assert sorted((x.stage, x.field) for x in letters) == [
        ("decode", "$"),
        ("verifier", "items[1].verifier"),
    ]
    assert b"\x00garbage" in [original(x) for x in letters]

    text = generate_latest(metrics.registry).decode()
    assert 'tapd_trainer_cohorts_total{outcome="trained"} 2.0' in text
    # The compare cohort has its target in the probe; the other names none.
    assert 'tapd_trainer_lift_without_target_total{reason="no_target"} 1.0' in text
    assert 'tapd_trainer_part_nll_lift_nats_count{part="target"} 1.0' in text
    assert 'tapd_trainer_cohorts_total{outcome="duplicate"} 1.0' in text
    assert "tapd_trainer_dead_letters_total 2.0" in text
    # Everything handled was committed: a new consumer of the group starts after it.
    again = transport.consumer([settings.topics.dispatch], settings.trainer.group)
    assert again.poll(1.0, 10) == []
    again.close()
    transport.close()


def test_sigterm_finishes_the_cohort_in_hand_then_commits(
    tmp_path: Path, tiny_policy: Path, dispatch_dict: dict[str, Any]
) -> None:
    transport_settings = TransportSettings(kind="embedded", embedded_path=tmp_path / "log.sqlite")
    settings = settings_for(tmp_path, transport_settings, tiny_policy)
    transport = open_transport(settings.transport)
    producer = transport.producer()
    producer.send(settings.topics.dispatch, json.dumps(compare_dispatch(dispatch_dict)).encode())
    producer.flush()

    def terminate_when_published() -> None:
        read_all(transport, settings.topics.lift, 1, timeout_s=90)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_published, daemon=True)
    killer.start()
    run_trainer(settings, transport)  # returns on SIGTERM
    killer.join(5)
    tp = TopicPartition(settings.topics.dispatch, 0)
    consumer = transport.consumer([settings.topics.dispatch], settings.trainer.group)
    assert consumer.committed(tp) == 1
    assert consumer.poll(0.5, 10) == []
    consumer.close()
