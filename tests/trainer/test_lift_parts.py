"""Lift per part of the probe: the cohort's target, transfer, collateral (no training here)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from daemon.trainer.probe import (
    DEFAULT_FOOTHOLD_PROBABILITY,
    ProbeReport,
    has_foothold,
    part_lift,
    probe_parts,
)
from streams.probes import ProbeItem, cohort_target
from streams.schemas import Dispatch, LiftResult, SchemaError, decode, encode


def item(target: str, prompt: str = "1+1=") -> ProbeItem:
    return ProbeItem(target=target, prompt=prompt, reference="2", verifier="numeric")


def report(nll: list[float], tokens: list[int], correct: list[bool]) -> ProbeReport:
    total = sum(nll) / sum(tokens)
    return ProbeReport(
        total, sum(correct) / len(correct), 0.0, 0.0, 1.0, tuple(nll), tuple(tokens), tuple(correct)
    )


ITEMS = [item("add"), item("add"), item("add"), item("sub"), item("sub")]
# Summed NLL per item: item 2 (add) and item 4 (sub) have no foothold (p < 1/64).
BEFORE = report([1.0, 2.0, 30.0, 0.5, 12.0], [2, 2, 5, 1, 3], [True, False, False, True, False])
AFTER = report([0.5, 1.0, 31.0, 0.7, 12.5], [2, 2, 5, 1, 3], [True, True, False, True, False])


def test_foothold_is_the_probability_of_producing_the_reference() -> None:
    assert has_foothold(-math.log(1 / 64) - 1e-9, 1 / 64)
    assert not has_foothold(-math.log(1 / 64) + 1e-9, 1 / 64)
    assert DEFAULT_FOOTHOLD_PROBABILITY == 1 / 64


def test_probe_splits_into_target_transfer_and_collateral() -> None:
    parts = probe_parts(ITEMS, BEFORE, "add")
    assert (parts.target, parts.transfer, parts.collateral) == ((0, 1), (3,), (2, 4))
    # Another target swaps target and transfer; collateral does not depend on it.
    other = probe_parts(ITEMS, BEFORE, "sub")
    assert (other.target, other.transfer, other.collateral) == ((3,), (0, 1), (2, 4))
    # No target: every foothold item is transfer.
    none = probe_parts(ITEMS, BEFORE, None)
    assert none.target == () and none.transfer == (0, 1, 3)
    with pytest.raises(ValueError, match="before"):
        probe_parts(ITEMS[:2], BEFORE, "add")


def test_part_lift_pools_tokens_and_counts_accuracy_per_item() -> None:
    t = part_lift(BEFORE, AFTER, (0, 1))
    assert t is not None
    assert (t.items, t.tokens) == (2, 4)
    assert t.nll_before == pytest.approx(3.0 / 4) and t.nll_after == pytest.approx(1.5 / 4)
    assert t.nll_lift == pytest.approx(0.375)
    assert (t.acc_before, t.acc_after, t.acc_lift) == (0.5, 1.0, 0.5)
    c = part_lift(BEFORE, AFTER, (2, 4))
    assert c is not None and c.nll_lift == pytest.approx(-1.5 / 8)
    assert part_lift(BEFORE, AFTER, ()) is None


def test_cohort_target_rule() -> None:
    known = {"add", "sub"}
    assert cohort_target("add", None, known) == "add"
    assert cohort_target("poetry", None, known) is None
    # A dispatch that names its target wins over the subject, if the probe has it.
    assert cohort_target("add", "sub", known) == "sub"
    assert cohort_target("add", "mul", known) is None


def test_lift_message_revision_2_is_backward_compatible(
    lift_dict: dict[str, Any], dispatch_dict: dict[str, Any]
) -> None:
    # An older trainer's message (no parts) decodes; its label is the whole-probe lift.
    old = decode(json.dumps(lift_dict), LiftResult)
    assert old.target is None and old.target_lift is None and old.label == old.nll_lift
    # ...and encodes without the new fields, as an older consumer expects.
    assert "target_lift" not in json.loads(encode(old))
    part = {
        "items": 48,
        "tokens": 150,
        "nll_before": 1.2,
        "nll_after": 1.1,
        "nll_lift": 0.1,
        "acc_before": 0.3,
        "acc_after": 0.4,
        "acc_lift": 0.1,
    }
    new = decode(
        json.dumps(
            {
                **lift_dict,
                "target": "add",
                "target_lift": {**part, "nll_lift": 0.25},
                "transfer_lift": part,
                "collateral_lift": {**part, "nll_lift": -0.5},
            }
        ),
        LiftResult,
    )
    assert new.label == 0.25  # the predictor learns the target's lift
    assert decode(encode(new), LiftResult) == new
    with pytest.raises(SchemaError) as e:
        decode(json.dumps({**lift_dict, "target_lift": {**part, "items": 0}}), LiftResult)
    assert e.value.field == "target_lift.items"
    # A dispatch may name its target; older dispatches do not.
    assert decode(json.dumps(dispatch_dict), Dispatch).target is None
    d = decode(json.dumps({**dispatch_dict, "target": "add"}), Dispatch)
    assert d.target == "add" and decode(encode(d), Dispatch) == d
