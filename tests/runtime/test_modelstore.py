"""The label history (in the scorer's state store) and model versions on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from daemon.core.features import FEATURE_SCHEMA
from daemon.core.pipeline import Label
from daemon.core.predictor import Manifest, Snapshot
from daemon.runtime.modelstore import ModelStore
from daemon.runtime.state import StateStore

X = {"adv_std": 0.2, "frac_all_wrong": 0.1}


def _label(cohort_id: str, y: float, selection: str = "exploit") -> Label:
    return Label(cohort_id, 1.0, X, FEATURE_SCHEMA, y, 0.05, selection, "v1")


def test_labels_are_stored_once_numbered_with_the_batch(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite")
    seq = store.save({"n": 1}, {}, [], [_label("c1", 0.1), _label("c2", -0.2, "explore_random")])
    assert seq == 2
    # A redelivered lift result keeps its first number and adds nothing.
    assert store.save({"n": 2}, {}, [], [_label("c1", 0.5)]) == 2
    store.close()
    reopened = StateStore(tmp_path / "state.sqlite")
    got = list(reopened.labels_since(0))
    assert [(s, lb.cohort_id) for s, lb in got] == [(1, "c1"), (2, "c2")]
    assert got[0][1] == _label("c1", 0.1)  # the first content, whole
    assert [lb.cohort_id for _, lb in reopened.labels_since(1)] == ["c2"]
    assert got[1][1].selection == "explore_random" and reopened.label_count() == 2


def test_a_failed_batch_stores_no_label(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite")
    with pytest.raises(ValueError):  # NaN in the snapshot: the whole transaction rolls back
        store.save({"x": float("nan")}, {}, [], [_label("c1", 0.1)])
    assert store.label_count() == 0 and store.load_snapshot() is None


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


def test_old_versions_are_pruned_but_never_the_latest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", keep=2)
    for v in range(1, 6):
        store.save(_snap(v, v * 10))
    assert store.versions() == ["v4.000000040", "v5.000000050"]
    assert store.latest() == "v5.000000050"
