"""The closed loop's summary: the last-step level and the on-target steps the AUC hides."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lab.eval_run import LOOP_ARMS, evaluate_loop


def _arm(
    curve: list[float], picks: list[str], predicted: list[float] | None = None
) -> dict[str, Any]:
    trained = [j for j, p in enumerate(picks) if p != "none"]
    return {
        "target_nll": curve,
        "picks": picks,
        "transfer_change": 0.0,
        "collateral_change": 0.0,
        # As the loop records them: one per trained step; the label is the step's gain.
        "predicted": predicted or [],
        "realized": [curve[j] - curve[j + 1] for j in trained] if predicted else [],
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
            ["sub/frontier", "add/frontier", "sub/mixed", "sub/frontier"],
            predicted=[0.05, 0.01, 0.04, 0.03],
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
    # The first sub pick gains 0.10; the two later ones -0.02 and 0.94 - last.
    assert steps["first"] == 6 and steps["first_gain"] == pytest.approx(0.10)
    assert steps["again"] == 12
    assert steps["again_gain"] == pytest.approx((-0.02 + (0.94 - 0.9625)) / 2)
    # Step by step: what the predictor expected of each pick, next to what it realized.
    by_step = out["tapd_by_step"]
    assert len(by_step) == 4
    assert by_step[0]["on"] == {
        "n": 6,
        "predicted": pytest.approx(0.05),
        "realized": pytest.approx(0.10),
    }
    assert by_step[0]["off"]["n"] == 0 and math.isnan(by_step[0]["off"]["predicted"])
    assert by_step[1]["off"] == {
        "n": 6,
        "predicted": pytest.approx(0.01),
        "realized": pytest.approx(-0.02),
    }
    assert by_step[1]["on"]["n"] == 0
    assert by_step[3]["on"]["realized"] == pytest.approx(0.94 - 0.9625)
    adv = out["on_target_steps"]["adv_std"]
    assert adv["first"] == 6 and adv["again"] == 0 and math.isnan(adv["again_gain"])
    assert "none" not in out["on_target_steps"]
