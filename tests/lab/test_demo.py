"""``tapd demo`` end to end, reduced: embedded log, tiny policy, a real trainer process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon.cli import app


@pytest.mark.slow
def test_demo_runs_the_closed_loop_and_writes_summary_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--cohorts", "8", "--out", str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "cohorts scored" in res.output and str(out) in res.output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["traces"] > 0
    assert summary["cohorts_scored"] >= 8
    # The loop closed: cohorts were trained by the trainer process and each
    # lift came back once.
    assert summary["dispatched"] >= 1
    assert summary["lift_results"] == summary["dispatched"]
    assert sum(summary["recommendations"].values()) == summary["cohorts_scored"]
    # Scrambled and weak-verifier slices are caught before training.
    assert summary["recommendations"].get("fix_verifier", 0) >= 1
    assert math.isfinite(summary["mean_lift_exploration"]) or math.isfinite(
        summary["mean_lift_selected"]
    )
    for name in ("predicted_vs_realized.png", "probe_nll.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert (out / "trainer.log").read_text().count("cohort_trained") == summary["lift_results"]


def test_replay_prints_a_decision_per_cohort_and_the_dead_letters(tmp_path: Path) -> None:
    from lab import tasks
    from streams.schemas import Attempt, encode

    lines = []
    for c, (subject, difficulty) in enumerate([("add", "2d_carry"), ("sub", "2d_borrow")]):
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed=c)):
            attempts = [
                Attempt(completion=task.reference, reward=1.0, n_tokens=2),
                Attempt(completion="0", reward=0.0, n_tokens=1),
            ]
            lines.append(
                encode(tasks.to_trace(task, policy_version="v0", attempts=attempts, key=i))
            )
    lines.insert(3, b'{"schema": "tapd.trace/9"}')
    path = tmp_path / "traces.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    env = {"TAPD_COHORTING__MAX_GROUPS": "4", "TAPD_GRPO__NUM_GENERATIONS": "2"}
    res = CliRunner().invoke(app, ["replay", str(path)], env=env)
    assert res.exit_code == 0, res.output
    out = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    decisions = [x for x in out if x.get("schema") == "tapd.decision/1"]
    dead = [x["dead_letter"] for x in out if "dead_letter" in x]
    assert len(decisions) == 2 and all(d["shadow"] and not d["dispatched"] for d in decisions)
    assert sorted(len(d["trace_ids"]) for d in decisions) == [4, 4]
    assert [(d["stage"], d["field"]) for d in dead] == [("decode", "schema")]
    assert "unknown version" in dead[0]["reason"]
