"""checkov, as a platform team's CI runs it: on the kustomize output of every
overlay and on every Dockerfile. Each finding is fixed or waived with a
reason in a baseline file (k8s/checkov-baseline.yaml,
deploy/checkov-baseline.yaml); a waiver that no longer matches a finding is
stale and fails too.

checkov pins dozens of packages (networkx<2.7, packaging<24, boto3, ...), so
it lives in its own virtualenv (``.cache/checkov``, made by
``WITH_TEST_DEPS=1 ./scripts/setup.sh``) rather than in tapd's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def checkov_bin() -> str:
    for candidate in (
        os.environ.get("TAPD_CHECKOV"),
        str(ROOT / ".cache" / "checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    reason = "checkov not installed: run WITH_TEST_DEPS=1 ./scripts/setup.sh"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def kustomize(overlay: str) -> str:
    cmd = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    out = subprocess.run(
        [*cmd, str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[str, str]]]:
    """(check id, resource) of every failed check, by framework; one checkov run."""
    checkov = checkov_bin()
    work = tmp_path_factory.mktemp("checkov")
    (work / "k8s").mkdir()
    for overlay in OVERLAYS:
        (work / "k8s" / f"{overlay}.yaml").write_text(kustomize(overlay))
    (work / "docker").mkdir()
    for dockerfile in (ROOT / "deploy").glob("Dockerfile.*"):
        shutil.copy(dockerfile, work / "docker" / dockerfile.name)
    res = subprocess.run(
        [
            checkov,
            "-d",
            str(work),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--compact",
            "--quiet",
            "--skip-download",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # exit 1 = some check failed (compared with the baselines below)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    reports: Any = json.loads(res.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    out: dict[str, set[tuple[str, str]]] = {"kubernetes": set(), "dockerfile": set()}
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for f in report["results"]["failed_checks"]:
            if report["check_type"] == "kubernetes":
                kind, _namespace, name = f["resource"].split(".", 2)
                out["kubernetes"].add((f["check_id"], f"{kind}/{name}"))
            else:
                out["dockerfile"].add((f["check_id"], Path(f["file_path"]).name))
    assert sum(r["summary"]["passed"] for r in reports) > 100  # it really ran the checks
    return out


def waivers(path: Path) -> set[tuple[str, str]]:
    doc = yaml.safe_load(path.read_text())
    out = set()
    for w in doc["waivers"]:
        assert len(w["reason"].split()) >= 10, f"{w['check']}: give the reason"
        out |= {(w["check"], r) for r in w["resources"]}
    return out


@pytest.mark.parametrize(
    "framework, baseline",
    [
        ("kubernetes", ROOT / "k8s" / "checkov-baseline.yaml"),
        ("dockerfile", ROOT / "deploy" / "checkov-baseline.yaml"),
    ],
)
def test_every_checkov_finding_is_fixed_or_waived_with_a_reason(
    findings: dict[str, set[tuple[str, str]]], framework: str, baseline: Path
) -> None:
    waived = waivers(baseline)
    assert findings[framework] - waived == set(), "new findings: fix them or waive with a reason"
    assert waived - findings[framework] == set(), "stale waivers: the check passes now"
