"""Thresholds as layers: configuration < file < run-time overrides.

The file is the desired state and never silently undoes an override;
overrides carry who/when/why/expiry and survive a restart; values are
validated strictly and across fields; no-op changes are not recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import Thresholds, load_thresholds
from daemon.runtime.thresholds import (
    OverrideStore,
    RoundTrips,
    ThresholdError,
    ThresholdsHolder,
    read_overrides,
)

T = Thresholds()


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_an_override_applies_and_is_audited() -> None:
    h = ThresholdsHolder(clock=Clock(1234.5))
    rec = h.apply(
        {"max_in_flight": 8, "exploration_share": T.exploration_share},
        who="alice",
        why="trainer caught up",
        principal="admin:12345678",
    )
    assert rec is not None and h.current.max_in_flight == 8
    assert (rec.who, rec.source, rec.when, rec.why) == (
        "alice",
        "admin",
        1234.5,
        "trainer caught up",
    )
    assert rec.principal == "admin:12345678"
    # exploration_share already had that value: neither a change nor an override
    assert rec.what == {"max_in_flight": 8} and rec.overrides_set == {"max_in_flight": 8}
    assert rec.before == {"max_in_flight": T.max_in_flight} and rec.after == {"max_in_flight": 8}
    assert set(h.overrides) == {"max_in_flight"}
    assert h.view()["source"]["max_in_flight"] == "override"
    assert h.history == [rec]


def test_no_op_changes_are_not_recorded() -> None:
    changes: list[object] = []
    h = ThresholdsHolder(on_change=changes.append)
    assert h.apply({"max_in_flight": T.max_in_flight}, who="alice") is None
    assert h.apply({"shadow_mode": True}, who="alice") is not None
    assert h.apply({"shadow_mode": True}, who="bob") is None  # same override again
    assert h.clear(["max_in_flight"], who="alice") is None  # there was none
    assert len(changes) == len(h.history) == 1


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"max_in_flight": True}, "max_in_flight", "valid integer"),  # bool is not an int
        ({"max_in_flight": "5"}, "max_in_flight", "valid integer"),  # nor a numeric string
        ({"max_in_flight": 5.0}, "max_in_flight", "valid integer"),
        ({"shadow_mode": "yes"}, "shadow_mode", "valid boolean"),  # nor a string boolean
        ({"shadow_mode": 1}, "shadow_mode", "valid boolean"),
        ({"min_predicted_lift": True}, "min_predicted_lift", "valid number"),
        ({"min_predicted_lift": float("nan")}, "min_predicted_lift", "finite"),
        ({"min_predicted_lift": float("inf")}, "min_predicted_lift", "finite"),
        ({"exploration_share": 1.5}, "exploration_share", "less than or equal to 1"),
        ({"max_in_flight": 0}, "max_in_flight", "greater than or equal to 1"),
        ({"dispatch_timeout_s": 1}, "dispatch_timeout_s", "greater than or equal to 10"),
        ({"min_lift": 0.1}, "min_lift", "unknown threshold"),
        # cross-field: a cohort cannot be both known and without a foothold
        ({"no_foothold_pass_rate": 0.95}, "no_foothold_pass_rate", "under known_pass_rate"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    change: dict[str, object], field: str, reason: str
) -> None:
    h = ThresholdsHolder()
    old = h.current
    with pytest.raises(ThresholdError) as err:
        h.apply({"top_k_per_window": 9, **change}, who="bob")
    assert err.value.field == field and reason in err.value.reason, err.value
    assert h.current is old and h.history == [] and not h.overrides


def test_a_file_change_never_discards_an_override(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.yaml"
    path.write_text("max_in_flight: 3\nshadow_mode: false\n")
    h = ThresholdsHolder()
    assert h.reload_from_file(path) is not None
    assert h.current.max_in_flight == 3 and h.view()["source"]["max_in_flight"] == "file"
    h.apply({"shadow_mode": True}, who="oncall", why="lift negative")
    # A touch (ConfigMap sync, Argo reconcile) changes nothing.
    os.utime(path, ns=(1, 10**18))
    assert h.reload_from_file(path) is None
    assert h.current.shadow_mode is True
    # The file changes other keys: they follow the file, the override stays.
    path.write_text("max_in_flight: 5\nshadow_mode: false\nexploration_share: 0.5\n")
    rec = h.reload_from_file(path)
    assert rec is not None and rec.source == "file" and rec.shadowed == {}
    assert rec.what == {"max_in_flight": 5, "exploration_share": 0.5}
    assert h.current.shadow_mode is True
    # The file changes a key an override holds: the override stays in force
    # and the hidden file value is reported.
    h.apply({"max_in_flight": 9}, who="oncall", why="burst")
    path.write_text("max_in_flight: 6\nshadow_mode: false\nexploration_share: 0.5\n")
    rec = h.reload_from_file(path)
    assert rec is not None and rec.what == {}
    assert rec.shadowed == {"max_in_flight": {"file": 6, "override": 9}}
    assert h.current.max_in_flight == 9
    view = h.view()
    assert view["overrides"]["max_in_flight"]["who"] == "oncall"
    assert view["overrides"]["max_in_flight"]["why"] == "burst"
    assert view["file"]["max_in_flight"] == 6 and view["effective"]["max_in_flight"] == 9
    assert view["source"] == {
        **view["source"],
        "max_in_flight": "override",
        "shadow_mode": "override",
    }
    # Clearing an override hands the key back to the file.
    rec = h.clear(["max_in_flight"], who="oncall")
    assert rec is not None and rec.what == {"max_in_flight": 6} and h.current.max_in_flight == 6
    assert h.view()["source"]["max_in_flight"] == "file"


def test_a_bad_file_is_refused_whole(tmp_path: Path) -> None:
    h = ThresholdsHolder()
    for text, field in [
        ("redundancy_ceiling: 7\n", "redundancy_ceiling"),
        ('shadow_mode: "yes"\n', "shadow_mode"),
        ("max_in_flight: true\n", "max_in_flight"),
        ("max_inflight: 3\n", "max_inflight"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ThresholdError) as err:
            h.reload_from_file(path)
        assert err.value.field == field, (text, err.value)
    assert h.current == T and h.history == []
    path.write_text("max_inflight: 3\n")
    with pytest.raises(ThresholdError, match="did you mean max_in_flight"):
        h.reload_from_file(path)


def test_overrides_expire() -> None:
    clock = Clock()
    seen: list[object] = []
    h = ThresholdsHolder(clock=clock, on_change=seen.append)
    h.apply({"max_in_flight": 9}, who="alice", expires_at=clock.t + 60)
    with pytest.raises(ThresholdError, match="future"):
        h.apply({"max_in_flight": 8}, who="alice", expires_at=clock.t - 1)
    clock.t += 59
    assert h.current.max_in_flight == 9
    clock.t += 2
    assert h.current.max_in_flight == T.max_in_flight  # dropped on the first read after expiry
    last = h.history[-1]
    assert (last.source, last.action, last.overrides_cleared) == (
        "expired",
        "expire",
        ["max_in_flight"],
    )
    assert last.what == {"max_in_flight": T.max_in_flight} and len(seen) == 2


def test_overrides_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "scorer-state.sqlite"
    clock = Clock()
    store = OverrideStore(db)
    h = ThresholdsHolder(store=store, clock=clock)
    h.apply({"shadow_mode": True}, who="oncall", why="incident 42")
    h.apply({"max_in_flight": 7}, who="oncall", expires_at=clock.t + 10)
    store.close()
    assert {o.name for o in read_overrides(db)} == {"shadow_mode", "max_in_flight"}

    clock.t += 20  # max_in_flight's override expired while the scorer was down
    again = ThresholdsHolder(store=OverrideStore(db), clock=clock)
    assert again.current.shadow_mode is True and again.current.max_in_flight == T.max_in_flight
    assert again.overrides["shadow_mode"].why == "incident 42"
    assert [o.name for o in read_overrides(db)] == ["shadow_mode"]


def test_the_lease_cannot_go_under_twice_the_slowest_round_trip() -> None:
    trips = RoundTrips()

    class D:
        def __init__(self, cid: str, ts: float) -> None:
            self.cohort_id, self.ts = cid, ts

    class Fx:
        def __init__(self, dispatches: list[D], labels: list[D]) -> None:
            self.dispatches, self.labels = dispatches, labels

    trips.observe(Fx([D("a", 100.0), D("b", 100.0)], []))
    trips.observe(Fx([], [D("a", 130.0), D("b", 190.0)]))
    assert trips.floor() == 180.0
    h = ThresholdsHolder(lease_floor=trips.floor)
    with pytest.raises(ThresholdError) as err:
        h.apply({"dispatch_timeout_s": 60}, who="alice")
    assert err.value.field == "dispatch_timeout_s" and "180 s" in err.value.reason
    assert h.apply({"dispatch_timeout_s": 200}, who="alice") is not None


def test_shipped_files_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in (root / "deploy" / "thresholds" / "thresholds.yaml",):
        assert load_thresholds(path) == Thresholds.strict(
            {**T.model_dump(), **__import__("yaml").safe_load(path.read_text())}
        )
