"""Scorer replicas across deployment boundaries, on the real Kafka 0.9 broker.

Real ``tapd run`` replicas and a continual ``tapd trainer``: a scale-down
whose replica's state directory is deleted, its return on an empty disk, a
rolling restart of every replica; then the audit of every topic and of
every replica (``lab/replicas.py``). The short form runs here; the full form
(3 replicas, 5,000 traces over 24 slices) is opt-in: ``pytest
--replicas-full`` (it also writes the report section that ``tapd reliability
--replicas`` writes).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lab.replicas import (
    BEGIN,
    END,
    ReplicaConfig,
    ReplicaFigures,
    check_replicas,
    keep_section,
    run,
    short_config,
    write_section,
)


def _ev(event: str, t: float, **fields: Any) -> dict[str, Any]:
    from datetime import UTC, datetime

    ts = datetime.fromtimestamp(1_800_000_000 + t, UTC).isoformat().replace("+00:00", "Z")
    return {"event": event, "timestamp": ts, **fields}


def _replica(
    name: str, labels: list[str], version: float = 3.0, in_flight: float = 0
) -> ReplicaFigures:
    return ReplicaFigures(name, len(labels), labels, version, in_flight, 2, 1, {}, 1)


def test_replica_audit_passes_agreeing_replicas_and_names_each_kind_of_failure() -> None:
    lifts = ["c1", "c2", "c3"]
    trainer = [
        _ev("policy_announced", 10, policy_version="v1"),
        _ev("cohort_trained", 11, cohort_id="c1"),
        _ev("cohort_trained", 21, cohort_id="c2"),
        _ev("policy_announced", 30, policy_version="v2"),
        _ev("cohort_trained", 31, cohort_id="c3"),
    ]
    scorers = {
        "r0": [
            _ev("predictor_restored", 0),
            _ev("cohort_scored", 5, cohort_id="c1", dispatched=True),
            _ev("slot_freed", 11.3, cohort_id="c1"),
            _ev("rollout_sampled", 12, policy_version="v1"),
            _ev("cohort_scored", 25, cohort_id="c3", dispatched=True),
            _ev("slot_freed", 31.2, cohort_id="c3"),
        ],
        "r1": [
            _ev("predictor_restored", 0),
            _ev("cohort_scored", 15, cohort_id="c2", dispatched=True),
            _ev("rollout_sampled", 32, policy_version="v2"),
        ],
    }
    good = [_replica("r0", lifts), _replica("r1", lifts)]
    # r1 was deleted at 18 s: its dispatch c2 went with its state.
    c = check_replicas(lifts, good, scorers, trainer, {"r1": 18.0 + 1_800_000_000})
    assert c.ok, c.problems()
    assert (c.slots_freed_by_lift, c.slots_gone_with_deleted_state) == (2, 1)
    assert max(c.free_delay_s) == pytest.approx(0.3, abs=1e-3)
    assert c.rollout_lag_versions == Counter({0: 2})

    # A replica missing a label, another model version, learning out of order.
    bad = [_replica("r0", lifts), _replica("r1", ["c2", "c1"], version=2.0)]
    c = check_replicas(lifts, bad, scorers, trainer, {"r1": 1_800_000_018.0})
    assert not c.ok
    assert c.missing_labels["r1"] == ["c3"] and c.label_order_differs == ["r1"]
    assert "model versions differ" in c.problems()
    # A slot never freed (r1 kept its state); a rollout two versions behind.
    late = {**scorers, "r1": [*scorers["r1"], _ev("rollout_sampled", 40, policy_version="v0")]}
    c = check_replicas(lifts, good, late, trainer, {})
    assert c.slots_never_freed == ["c2"] and c.max_rollout_lag == 2 and not c.ok


def test_the_report_section_is_replaced_in_place_and_survives_a_full_report(
    tmp_path: Path,
) -> None:
    path = tmp_path / "RELIABILITY.md"
    path.write_text("# Reliability figures\n\n## chaos\n\nrows\n")
    write_section(path, f"{BEGIN}\nfirst\n{END}\n")
    write_section(path, f"{BEGIN}\nsecond\n{END}\n")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Reliability figures\n\n## chaos")
    # The full suite rewrites the file; the replicas section is put back.
    previous = path.read_text()
    path.write_text("# Reliability figures\n\n## chaos (new)\n")
    keep_section(previous, path)
    assert "chaos (new)" in path.read_text() and "second" in path.read_text()


def _needs_broker() -> None:
    from lab.localbroker import find_kafka_home

    if find_kafka_home() is None or (
        shutil.which("java") is None and not os.environ.get("JAVA_HOME")
    ):
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Kafka 0.9.0.1 and a JRE are needed here (CI=true)")
        pytest.skip("Kafka 0.9.0.1 or java not installed: WITH_TEST_DEPS=1 ./scripts/setup.sh")


def _assert_run(cfg: ReplicaConfig, tmp_path: Path) -> Any:
    _needs_broker()
    result = run(cfg, tmp_path / "run")
    a, c = result.audit, result.checks
    events = "\n".join(result.events)
    assert a.lost == 0 and a.duplicated == 0, f"{a.problems()}\n{events}"
    assert a.ok, a.problems()
    assert a.in_cohorts + a.valid_dead_lettered == a.valid == cfg.n_valid
    assert a.bad_dead_lettered == a.bad
    assert a.dispatched > 0 and a.lifts + a.trainer_dead_letters == a.dispatched
    # Every replica learned every lift, in one order, to one model.
    assert c.ok, f"{c.problems()}\n{events}"
    assert set(c.labels_per_replica.values()) == {a.lifts}
    assert len(set(c.model_versions.values())) == 1
    assert c.slots_freed_by_lift + c.slots_gone_with_deleted_state == c.dispatched
    assert c.rollouts > 0 and c.max_rollout_lag <= 1
    # The scale events happened, and partitions moved with their state.
    assert any("state deleted" in e for e in result.events)
    assert sum("rolling restart" in e for e in result.events) == cfg.replicas
    assert sum(f.handoffs.get("rebuilt", 0) for f in result.replicas) > 0
    return result


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_replicas_scale_down_with_a_lost_disk_back_and_a_rolling_restart(
    tmp_path: Path,
) -> None:
    _assert_run(short_config(), tmp_path)


@pytest.mark.kafka
@pytest.mark.replicas_full
@pytest.mark.timeout(5400)
def test_three_replicas_five_thousand_traces_full_run(tmp_path: Path) -> None:
    cfg = ReplicaConfig()
    assert cfg.replicas == 3 and cfg.n_valid >= 5_000 and cfg.slices >= 20
    _assert_run(cfg, tmp_path)
