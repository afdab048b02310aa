"""``tapd eval --quick`` end to end: real GRPO on the tiny policy, the seeds' findings' direction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def tapd_eval(out: Path, state: Path) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "eval",
            "--quick",
            "--out",
            str(out),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_quick_eval_reproduces_the_direction_of_the_seeds_findings(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    s = tapd_eval(out, state)

    assert s["n_cohorts"] == 24  # 4 subjects x 6 control variants
    assert len({r["subject"] for r in s["loso"]["per_subject"]}) == 4
    # What tapd would train (held-out predictions, gated by reward trust as
    # the decision policy gates them) teaches more than a random pick.
    assert s["loo"]["selection_gain_abs"]["tapd"] > 0.0, s["loo"]["selection_gain_abs"]
    # Every weak-verifier cohort is caught before training: trust under the
    # floor and the decision fix_verifier.
    it = s["integrity"]
    assert it["n_weak"] == 4
    assert it["n_weak_flagged"] == it["n_weak"], it
    # ...and training on them does not raise true probe accuracy.
    assert it["weak_accuracy_change"]["value"] <= 0.0, it

    report = (out / "RESULTS.md").read_text()
    assert "Spearman" in report and "tapd eval --quick" in report
    for name in ("scatter", "selection", "savings", "loop", "loso"):
        assert (out / "img" / f"{name}.png").stat().st_size > 1000
    assert len(s["loop"]["per_step"]["predictor"]) == s["config"]["loop_steps"] + 1

    # A rerun resumes from the cache: no new GRPO run, the same numbers.
    cache = next(state.glob("eval/*/results.jsonl"))
    lines = cache.read_text().count("\n")
    again = tapd_eval(tmp_path / "out2", state)
    assert cache.read_text().count("\n") == lines
    assert again["loo"] == s["loo"] and again["loop"] == s["loop"]
