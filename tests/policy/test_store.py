"""The policy store: kept versions as files with their checksum, announced as records,
loaded by URI only when the bytes are the announced ones, pruned to the newest N."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from daemon.policy.store import (
    ChecksumMismatch,
    PolicyStore,
    PolicyVersion,
    load_uri,
)


def _state(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), x), "b": torch.arange(3, dtype=torch.float32) + x}


def test_a_kept_version_round_trips_through_its_announcement(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "policies")
    store.save(3, _state(0.5))
    announced = store.describe(3)
    assert announced is not None and announced.version == "v3"
    assert announced.uri.startswith("file://") and announced.size_bytes > 0
    assert store.describe(3) == announced  # the same record every time (re-announcement)
    wire = PolicyVersion.decode(announced.encode())
    assert wire == announced
    got = load_uri(wire.uri, wire.sha256)
    assert torch.equal(got["w"], _state(0.5)["w"]) and torch.equal(got["b"], _state(0.5)["b"])
    assert store.describe(4) is None


def test_weights_that_are_not_the_announced_bytes_are_refused(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    store.save(1, _state(1.0))
    announced = store.describe(1)
    assert announced is not None
    store.save(1, _state(2.0))  # overwritten after the announcement
    with pytest.raises(ChecksumMismatch, match="sha256"):
        load_uri(announced.uri, announced.sha256)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", "$"),
        (b'{"schema":"tapd.policy/2","version":"v1"}', "schema"),
        (
            b'{"schema":"tapd.policy/1","version":"latest","uri":"x","sha256":"'
            + b"0" * 64
            + b'"}',
            "version",
        ),
        (b'{"schema":"tapd.policy/1","version":"v1","uri":"x","sha256":"abc"}', "sha256"),
    ],
)
def test_a_bad_announcement_names_its_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field if field != '$' else '[$]'}"):
        PolicyVersion.decode(raw)


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    for n in range(1, 9):
        store.save(n, _state(float(n)))
    size_before = store.disk_bytes()
    gone = store.prune(keep=3, protect={2})
    assert gone == [1, 3, 4, 5]
    assert store.versions() == [2, 6, 7, 8]
    assert not list(tmp_path.glob("policy-000001*"))  # checksum files go too
    assert 0 < store.disk_bytes() < size_before
