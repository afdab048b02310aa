"""Label history and model versions on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from daemon.modelstore import LabelLog, Manifest, ModelStore, Snapshot

X = {"adv_std": 0.2, "frac_all_wrong": 0.1}


def test_labels_are_counted_once_and_numbered(tmp_path: Path) -> None:
    log = LabelLog(tmp_path / "labels.jsonl")
    a = log.append("c1", X, 0.1, "exploit", ts=1.0)
    b = log.append("c2", X, -0.2, "explore_random", ts=2.0)
    assert a is not None and b is not None and (a.seq, b.seq) == (1, 2)
    assert log.append("c1", X, 0.5) is None  # redelivered lift result
    reopened = LabelLog(tmp_path / "labels.jsonl")
    assert len(reopened) == 2 and "c1" in reopened and reopened.last_seq == 2
    assert [lab.cohort_id for lab in reopened.since(1)] == ["c2"]
    assert list(reopened.since(0))[1].selection == "explore_random"


def test_bad_labels_name_the_field(tmp_path: Path) -> None:
    log = LabelLog(tmp_path / "labels.jsonl")
    with pytest.raises(ValueError, match="realized_lift: not finite"):
        log.append("c1", X, float("nan"))
    with pytest.raises(ValueError, match="cohort_id"):
        log.append("", X, 0.1)
    assert len(log) == 0


def test_torn_last_line_is_dropped_and_the_log_stays_appendable(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    log = LabelLog(path)
    log.append("c1", X, 0.1)
    with path.open("a") as f:
        f.write('{"seq": 2, "cohort_id": "c2", "feat')  # killed mid-write
    log = LabelLog(path)
    assert len(log) == 1
    assert log.append("c2", X, 0.3) is not None
    assert [lab.seq for lab in LabelLog(path).since(0)] == [1, 2]


def test_corrupt_middle_line_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    log = LabelLog(path)
    log.append("c1", X, 0.1)
    log.append("c2", X, 0.2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"labels.jsonl:2: unreadable label"):
        LabelLog(path)


def _snap(version: int, seq: int) -> Snapshot:
    m = Manifest(
        version=version,
        stage="lightgbm",
        label_seq=seq,
        n_labels=seq,
        holdout_score=0.8,
        feature_schema="tapd.features/1",
        created_ts=time.time(),
    )
    return Snapshot(m, b"state-%d" % seq, ("model-a", "model-b"))


def test_versions_round_trip_with_a_latest_pointer(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    assert store.latest() is None and store.load() is None
    store.save(_snap(2, 40))
    name = store.save(_snap(3, 60))
    assert store.latest() == name == "v3.000000060"
    loaded = store.load()
    assert loaded is not None and loaded.state == b"state-60"
    assert loaded.lgbm_models == ("model-a", "model-b")
    manifest = json.loads((tmp_path / "models" / name / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["label_seq"] == 60
    assert manifest["feature_schema"] == "tapd.features/1" and manifest["holdout_score"] == 0.8
    assert store.versions() == ["v2.000000040", "v3.000000060"]


def test_half_written_version_is_invisible(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.save(_snap(1, 8))
    # What a kill during save leaves behind: a temp dir, never renamed.
    (tmp_path / "models" / ".tmp-v2.000000040-999").mkdir()
    (tmp_path / "models" / ".tmp-v2.000000040-999" / "state.pkl").write_bytes(b"partial")
    assert store.latest() == "v1.000000008"
    assert store.versions() == ["v1.000000008"]
