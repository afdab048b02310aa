"""The escape and grader-gaming corpus, as root (the test process in CI) and as an
unprivileged user: escapes 0, wrong code rewarded 0, correct code rewarded 1."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from sandbox_attacks import ATTEMPTS, run_corpus
from unprivileged import Unprivileged

# Each attempt's verifier runs with timeout_s=1: 1 CPU second, 3 s of wall clock.
WALL_S = 3.0


def _shadow_line() -> str | None:
    try:
        return Path("/etc/shadow").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def _assert_contained(report: dict[str, Any]) -> None:
    results = report["results"]
    assert [r["name"] for r in results] == [a.name for a in ATTEMPTS]
    kinds = Counter(r["kind"] for r in results)
    assert kinds["escape"] + kinds["gaming"] >= 40, kinds
    rewarded = [r for r in results if r["kind"] != "control" and r["reward"] != 0.0]
    assert rewarded == [], f"escape or gaming attempts rewarded: {rewarded}"
    refused = [r for r in results if r["kind"] == "control" and r["reward"] != 1.0]
    assert refused == [], f"correct code not rewarded: {refused}"
    ev = report["evidence"]
    assert ev["listener_hits"] == {}, ev
    assert ev["files_created"] == [], ev
    assert ev["victim_killed"] is False, ev
    assert ev["sandbox_processes_left"] == [], ev
    assert ev["host_temp_leftovers"] == [], ev
    slow = [r for r in results if r["seconds"] > WALL_S + 2.0]
    assert slow == [], f"attempts that held the caller past their limit: {slow}"


def test_corpus_is_contained_in_this_process() -> None:
    # As root (CI): code runs as verify.sandbox_uid after setpriv, in a user
    # namespace. As any other user: in a user namespace only.
    report = run_corpus({"shadow_line": _shadow_line(), "victim_uid": 65534})
    if os.geteuid() == 0:
        assert "setuid+userns" in report["isolation"], report["isolation"]
        assert "65534 outside" in report["isolation"]
    else:
        assert f"{os.geteuid()} outside" in report["isolation"]
    _assert_contained(report)


def test_corpus_is_contained_as_an_unprivileged_user(unprivileged: Unprivileged) -> None:
    ctx = unprivileged.tree / "ctx.json"
    # The unprivileged user cannot read /etc/shadow itself: it is told its first
    # line, so that code reading it through the sandbox would be rewarded.
    ctx.write_text(json.dumps({"shadow_line": _shadow_line(), "victim_uid": None}))
    os.chmod(ctx, 0o644)
    proc = subprocess.run(
        unprivileged.command(str(unprivileged.tree / "src" / "sandbox_attacks.py"), str(ctx)),
        capture_output=True,
        text=True,
        cwd=unprivileged.tree,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["uid"] == unprivileged.uid
    assert report["isolation"].startswith("bwrap[userns;"), report["isolation"]
    assert f"{unprivileged.uid} outside" in report["isolation"]
    _assert_contained(report)
