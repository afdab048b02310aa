"""The closed loop's summary: the last-step level and the on-target steps the AUC hides."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lab.eval_run import LOOP_ARMS, evaluate_loop


def _arm(curve: list[float], picks: list[str]) -> dict[str, Any]:
    return {
        "target_nll": curve,
        "picks": picks,
        "transfer_change": 0.0,
        "collateral_change": 0.0,
        "predicted": [],
        "realized": [],
    }


def _run(r: int, tapd_last: float) -> dict[str, Any]:
    """Target ``sub``; tapd gains early then loses on repeats; adv_std gains late."""
    flat = _arm([1.0] * 5, ["none"] * 4)
    arms = {
        "none": flat,
        "random": _arm([1.0, 0.99, 0.98, 0.97, 0.96], ["add/frontier"] * 4),
        "adv_std": _arm(
            [1.0, 0.98, 0.96, 0.94, 0.92],
            ["add/frontier", "sub/frontier", "add/frontier", "add/frontier"],
        ),
        "tapd": _arm(
            [1.0, 0.90, 0.92, 0.94, tapd_last],
            ["sub/frontier", "sub/frontier", "sub/mixed", "sub/frontier"],
        ),
        "oracle": _arm(
            [1.0, 0.9, 0.85, 0.8, 0.75], ["sub/frontier", "add/frontier", "none", "none"]
        ),
    }
    assert set(arms) == set(LOOP_ARMS)
    return {"run": r, "target": "sub", "arms": arms}


def test_the_last_step_and_the_repeated_target_steps_are_measured() -> None:
    runs = [_run(r, 0.95 + 0.005 * r) for r in range(6)]
    out = evaluate_loop(runs)
    assert out is not None
    # tapd's AUC is the highest but its last level is the worst of the trained arms.
    assert out["mean_auc"]["tapd"] > out["mean_auc"]["adv_std"]
    assert out["final_gain"]["tapd"] == pytest.approx(1.0 - 0.9625)
    assert out["final_gain"]["adv_std"] == pytest.approx(0.08)
    assert out["final_vs"]["tapd - adv_std"]["mean"]["value"] == pytest.approx(
        (1.0 - 0.9625) - 0.08
    )
    assert out["final_vs"]["tapd - adv_std"]["wins"] == 0
    steps = out["on_target_steps"]["tapd"]
    # The first sub pick gains 0.10; the three later ones -0.02 each.
    assert steps["first"] == 6 and steps["first_gain"] == pytest.approx(0.10)
    assert steps["again"] == 18
    assert steps["again_gain"] == pytest.approx((-0.02 * 2 + (0.94 - 0.9625)) / 3)
    adv = out["on_target_steps"]["adv_std"]
    assert adv["first"] == 6 and adv["again"] == 0 and math.isnan(adv["again_gain"])
    assert "none" not in out["on_target_steps"]
