"""``tapd eval --quick`` end to end: real GRPO on the tiny policy, every reported key, resumable."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HEADLINE_KEYS = (
    "label_reliability",
    "loco_spearman",
    "loso_spearman",
    "loco_spearman_best_baseline",
    "top10_gain_nats",
    "top10_gain_nats_best_baseline",
    "top10_gain_nats_oracle",
    "loop_paired_runs",
    "loop_advantage_vs_random",
    "loop_p_value_vs_random",
    "loop_advantage_vs_adv_std",
    "broken_verifier_cohorts_trained",
    "broken_verifier_cohorts_passing_gate",
    "eval_cpu_minutes",
)


def tapd_eval(out: Path, state: Path, *extra: str) -> dict:
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
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.science
def test_quick_eval_reports_every_key_and_resumes(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    s = tapd_eval(out, state)

    # 4 subjects x (4 honest variants + 2 broken-verifier variants), one cohort each.
    b = s["battery"]
    assert (b["n_cohorts"], b["n_honest"]) == (24, 16)
    for key in HEADLINE_KEYS:
        assert isinstance(s[key], float), key
    assert s["loop_paired_runs"] == 2.0
    # The cost is every unit's CPU, the loop's runs a part of it.
    assert 0 < s["loop_cpu_s"] < s["cpu_s"] == pytest.approx(60 * s["eval_cpu_minutes"])
    assert math.isfinite(s["loco_spearman"]) and math.isfinite(s["label_reliability"])
    # The gate: no broken verifier passes, none is dispatched, no honest one is flagged.
    assert s["broken_verifier_cohorts_passing_gate"] == 0.0
    assert s["broken_verifier_cohorts_trained"] == 0.0
    assert b["integrity"]["sound_flagged"] == 0
    # The label is the lift on the cohort's own target: frontier cohorts teach it,
    # no-foothold cohorts change nothing (all-wrong groups have no gradient).
    v = b["by_variant"]
    assert v["frontier"]["label"] > v["easy"]["label"]
    assert v["frontier"]["label"] > 0.0
    assert abs(v["hard"]["label"]) < 1e-3
    # Every arm of the loop ran the same steps; "none" never trains.
    assert s["loop"]["trained_steps"]["none"] == 0
    assert len(s["loop"]["per_step"]["tapd"]) == s["config"]["loop_steps"] + 1

    report = (out / "RESULTS.md").read_text()
    assert "tapd eval --quick" in report and "## Targets" in report
    for name in ("scatter", "selection", "loop", "loso"):
        assert (out / "img" / f"{name}.png").stat().st_size > 1000

    # A rerun resumes from the cache: no new GRPO run, the same numbers.
    cache = next(state.glob("eval/*/results.jsonl"))
    lines = cache.read_text().count("\n")
    again = tapd_eval(tmp_path / "out2", state)
    assert cache.read_text().count("\n") == lines
    assert again["battery"] == s["battery"] and again["loop"] == s["loop"]

    # The loop's runs shared by two worker processes: the same numbers. A
    # copy of the cache without its loop rows makes them run again.
    parallel = tmp_path / "state-parallel"
    shutil.copytree(state, parallel)
    copy = next(parallel.glob("eval/*/results.jsonl"))
    kept = [ln for ln in copy.read_text().splitlines() if json.loads(ln)["key"][0] != "loop"]
    copy.write_text("\n".join(kept) + "\n")
    third = tapd_eval(tmp_path / "out3", parallel, "--jobs", "2")
    assert copy.read_text().count("\n") == lines
    assert third["loop"] == s["loop"]
