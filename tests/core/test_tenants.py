"""The tenant-label chooser: at most N tenants labelled, the rest as other."""

from __future__ import annotations

import json

import pytest

from daemon.core.tenants import (
    OTHER,
    UNKNOWN,
    TenantLabels,
    tenant_counts,
    tenant_of_record,
)
from streams.schemas import MAX_ID_CHARS, MAX_MESSAGE_BYTES


def test_the_first_n_distinct_tenants_keep_their_label_the_rest_are_other() -> None:
    labels = TenantLabels(3)
    seen = [labels.label(t) for t in ["a", "b", "a", "c", "d", "b", "e", "c"]]
    assert seen == ["a", "b", "a", "c", OTHER, "b", OTHER, "c"]
    assert labels.tenants == ("a", "b", "c") and len(labels) == 3
    assert labels.values() == ("a", "b", "c", OTHER, UNKNOWN)


def test_labels_stay_bounded_over_many_tenants() -> None:
    labels = TenantLabels(20)
    out = {labels.label(f"tenant-{i}") for i in range(100_000)}
    assert len(out) == 21 and OTHER in out
    assert len(labels.values()) == 22
    # A label once given is never taken back.
    assert labels.label("tenant-0") == "tenant-0" and labels.label("tenant-20") == OTHER


def test_pinned_tenants_hold_their_label_before_any_traffic() -> None:
    labels = TenantLabels(2, pinned=["vip"])
    assert labels.tenants == ("vip",)
    assert [labels.label(t) for t in ["x", "y", "vip"]] == ["x", OTHER, "vip"]
    with pytest.raises(ValueError, match="more than max_tenants"):
        TenantLabels(1, pinned=["a", "b"])
    with pytest.raises(ValueError, match=">= 0"):
        TenantLabels(-1)


def test_zero_labels_every_tenant_other() -> None:
    labels = TenantLabels(0)
    assert {labels.label(t) for t in ["a", "b"]} == {OTHER}
    assert labels.values() == (OTHER, UNKNOWN)


def test_reserved_words_take_no_slot() -> None:
    labels = TenantLabels(1, pinned=[OTHER])
    assert labels.tenants == ()
    assert labels.label(OTHER) == OTHER and labels.label(UNKNOWN) == UNKNOWN
    assert labels.label("a") == "a" and labels.label("b") == OTHER


def test_a_fresh_chooser_relabels_by_the_new_order() -> None:
    """Not persisted: after a restart the first tenants read get the slots."""
    before, after = TenantLabels(1), TenantLabels(1)
    assert [before.label(t) for t in ["a", "b"]] == ["a", OTHER]
    assert [after.label(t) for t in ["b", "a"]] == ["b", OTHER]


def test_the_tenant_of_an_undecodable_record_is_read_best_effort() -> None:
    assert tenant_of_record(b'{"tenant": "acme", "attempts": "oops"}') == "acme"
    assert tenant_of_record(b'{"schema": "tapd.trace/1"}') == "default"
    for raw in [
        b"not json",
        b"\xff not utf-8",
        b'["tenant"]',
        b'{"tenant": 7}',
        b'{"tenant": ""}',
        json.dumps({"tenant": "x" * (MAX_ID_CHARS + 1)}).encode(),
        b"[" * 100_000,
        b" " * (MAX_MESSAGE_BYTES + 1),
    ]:
        assert tenant_of_record(raw) == UNKNOWN, raw[:40]


def test_tenant_counts_keep_first_seen_order() -> None:
    assert tenant_counts(["b", "a", "b", "c"]) == (("b", 2), ("a", 1), ("c", 1))
    assert tenant_counts([]) == ()
