"""Alert rules and dashboard queries against the real Prometheus.

promtool checks the config and the rules and runs the rule unit tests; then
a real Prometheus scrapes a live ``tapd run`` and ``tapd trainer`` that have
closed the loop on a small trace stream, and every dashboard and alert
expression runs through its HTTP query API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tapd.json"

pytestmark = pytest.mark.prometheus

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus binary missing"
)

# Panels an operator reads first: each must return series from the live targets.
CORE_PANELS = {
    "Traces consumed per second",
    "Consumer lag by topic",
    "Cohorts scored by recommendation",
    "Dispatches by selection",
    "Median predicted vs realized lift (30m)",
    "Predictor rank quality",
    "Dormant-unit share",
    "Effective rank of hidden features",
    "In-flight dispatches vs max_in_flight",
    "Current thresholds",
    "Targets up and ready",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


@needs_promtool
def test_promtool_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "rules.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    out = promtool("test", "rules", "rules_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_rule_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    # The unit tests must be able to fail: loosen one threshold, expect a failure.
    rules = (PROM_DIR / "rules.yml").read_text()
    broken = rules.replace("tapd_policy_dormant_fraction_ratio) > 0.3", "x) > 0.3")
    assert broken != rules
    (tmp_path / "rules.yml").write_text(broken)
    shutil.copy(PROM_DIR / "rules_test.yml", tmp_path / "rules_test.yml")
    out = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert out.returncode != 0
    assert "TapdPlasticityLoss" in out.stdout + out.stderr


def test_every_alert_is_documented_and_annotated() -> None:
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    for rule in alert_rules():
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path.startswith("https://") and path.endswith("/docs/RUNBOOK.md"), path
        assert anchor == rule["alert"].lower()
        assert anchor in anchors, f"docs/RUNBOOK.md has no section for {rule['alert']}"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and annotation of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    return out


def substitute(expr: str) -> str:
    """Grafana's template variables, as Grafana would expand them."""
    expr = expr.replace("$__rate_interval", "15s").replace("$__interval", "5s")
    expr = expr.replace("$__range", "5m")
    # The dashboard's variables, as Grafana expands "All".
    expr = expr.replace('"$job"', '"tapd-.*"').replace('"$namespace"', '".*"')
    expr = expr.replace('"$instance"', '".*"')
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    for name in ("job", "namespace", "instance"):
        (v,) = [v for v in dash["templating"]["list"] if v["name"] == name]
        assert (
            v["type"] == "query" and v["includeAll"] and v["datasource"]["uid"] == "${datasource}"
        )
    titles = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
    assert titles >= CORE_PANELS
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def _traces_file(path: Path) -> None:
    """Production-like traces (one attempt each) of several slices, and one bad line."""
    from lab import tasks
    from streams.schemas import Attempt, encode

    lines = []
    for c, (subject, difficulty) in enumerate(
        [("add", "2d_carry"), ("sub", "2d_borrow"), ("compare", "3d"), ("digits", "4d")]
    ):
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed=70 + c)):
            attempt = Attempt(completion=task.reference, reward=1.0, n_tokens=3)
            tr = tasks.to_trace(task, policy_version="v0", attempts=[attempt], key=f"prom{i}")
            lines.append(encode(tr).decode())
    lines.append('{"schema": "tapd.trace/1", "trace_id": "no-prompt"}')
    path.write_text("\n".join(lines) + "\n")


def _get(url: str) -> str:
    try:
        return httpx.get(url, timeout=3).text
    except httpx.HTTPError:
        return ""


prometheus_logs: list[str] = []  # the fixture's folder: the roles' stderr files


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, lab_env: dict[str, str]) -> Iterator[str]:
    """A real Prometheus scraping a live ``tapd run`` and ``tapd trainer``.

    Both roles run on the embedded transport (one SQLite file) and close the
    loop on a small trace file, so lift, predictor and plasticity series are
    real values, not stand-ins.
    """
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus binary missing")
    tmp = tmp_path_factory.mktemp("prom")
    scorer_port, trainer_port, prom_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "TAPD_STATE_DIR": str(tmp / "state"),
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp / "log.sqlite"),
        "TAPD_SERVICE__PORT": str(scorer_port),
        "TAPD_SERVICE__POLL_TIMEOUT_S": "0.2",
        "TAPD_COHORTING__MAX_GROUPS": "4",
        "TAPD_GRPO__NUM_GENERATIONS": "4",
        "TAPD_PREDICTOR__RIVER_AFTER": "2",
        "TAPD_THRESHOLDS__MAX_IN_FLIGHT": "2",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "1.0",
        "TAPD_GRPO__STEPS": "2",
        **lab_env,
        "TAPD_TRAINER__METRICS_PORT": str(trainer_port),
        "TAPD_LOG_LEVEL": "info",
    }
    tapd = [sys.executable, "-m", "daemon.cli"]
    procs = {
        name: subprocess.Popen(
            [*tapd, name],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / f"{name}.log").open("wb"),
        )
        for name in ("run", "trainer")
    }
    shutil.copy(PROM_DIR / "rules.yml", tmp / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {
                "job_name": "tapd-scorer",
                "static_configs": [{"targets": [f"127.0.0.1:{scorer_port}"]}],
            },
            {
                "job_name": "tapd-trainer",
                "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}],
            },
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{prom_port}"
    prometheus_logs[:] = [str(tmp)]

    def logs() -> str:
        return "".join(
            f"--- {n}\n" + (tmp / f"{n}.log").read_text(errors="replace")[-2000:]
            for n in ("run", "trainer", "prometheus")
        )

    try:
        # Traces go in only once both roles are scraped, so that the counters'
        # rates are seen to move.
        deadline = time.monotonic() + 120
        while True:
            for p in (prom, *procs.values()):
                assert p.poll() is None, logs()
            r = _get(f"{url}/api/v1/query?query=count_over_time(up%5B1m%5D)")
            series = json.loads(r)["data"]["result"] if r.startswith("{") else []
            if len(series) == 2 and min(float(s["value"][1]) for s in series) >= 3:
                break
            assert time.monotonic() < deadline, "targets not scraped in 120 s\n" + logs()
            time.sleep(0.5)
        _traces_file(tmp / "traces.jsonl")
        subprocess.run(
            [*tapd, "produce", str(tmp / "traces.jsonl"), "--topic", "tap.traces"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        # The loop has closed when the scorer has learned lift and the trainer
        # has measured plasticity; then let Prometheus scrape a few more times.
        deadline = time.monotonic() + 240
        while True:
            for p in (prom, *procs.values()):
                assert p.poll() is None, logs()
            scorer = _get(f"http://127.0.0.1:{scorer_port}/metrics")
            trainer = _get(f"http://127.0.0.1:{trainer_port}/metrics")
            labels = re.search(r"^tapd_lift_labels_total ([0-9.]+)", scorer, re.M)
            if labels and float(labels.group(1)) >= 2 and "tapd_policy_effective_rank " in trainer:
                break
            assert time.monotonic() < deadline, "the loop did not close in 240 s\n" + logs()
            time.sleep(1.0)
        time.sleep(5.0)
        yield url
    finally:
        for p in (prom, *procs.values()):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return list(body["data"]["result"])


@needs_prometheus
def test_targets_are_up(prometheus: str) -> None:
    up = {s["metric"]["job"]: s["value"][1] for s in query(prometheus, "up")}
    assert up == {"tapd-scorer": "1", "tapd-trainer": "1"}


@needs_prometheus
def test_every_dashboard_query_runs(prometheus: str) -> None:
    dash = json.loads(DASHBOARD.read_text())
    core_exprs = {
        t["expr"] for p in dash["panels"] if p["title"] in CORE_PANELS for t in p["targets"]
    }
    empty = []
    for where, expr in dashboard_queries():
        result = query(prometheus, substitute(expr))
        if expr in core_exprs and not result:
            empty.append(where)
    assert not empty, f"core panels without data: {empty}"


@needs_prometheus
def test_every_alert_expression_runs(prometheus: str) -> None:
    for rule in alert_rules():
        query(prometheus, rule["expr"])
    # Both roles are up and ready: the down conditions do not hold. Whether
    # each rule fires when it should is promtool's unit tests' job.
    by_name = {r["alert"]: r["expr"] for r in alert_rules()}
    assert not query(prometheus, by_name["TapdTrainerDown"])
    assert not query(prometheus, by_name["TapdScorerDown"])


@needs_prometheus
def test_prometheus_evaluates_every_rule_without_error(prometheus: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad


@needs_prometheus
def test_a_healthy_run_raises_no_alert(prometheus: str) -> None:
    """The shipped rules against a healthy closed loop: nothing pending, nothing firing.

    (The label gates of TapdDispatchedLiftNegative and TapdPredictorRankCollapsed
    are not reached by a run this short; rules_test.yml replays healthy-shaped
    series past those gates.)
    """
    # Let every rule be evaluated a few times on the final state.
    time.sleep(3.0)
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    raised = {(a["labels"]["alertname"], a["state"]) for a in alerts}
    assert not raised, raised
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    states = {r["name"]: r["state"] for g in groups for r in g["rules"]}
    assert set(states.values()) == {"inactive"}, states


@needs_prometheus
def test_every_stderr_line_of_both_roles_is_json(prometheus: str) -> None:
    """Both roles' whole stderr (start, training, libraries, HTTP) is JSON lines."""
    tmp = Path(prometheus_logs[0])
    for role in ("run", "trainer"):
        text = (tmp / f"{role}.log").read_text(errors="replace")
        lines = [x for x in text.splitlines() if x.strip()]
        assert lines, role
        bad = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                bad.append(line[:200])
                continue
            assert isinstance(obj, dict) and "event" in obj and "level" in obj, line[:200]
            assert obj.get("role") in ("scorer", "trainer"), line[:200]
        assert not bad, f"{role}: {len(bad)} non-JSON lines, e.g. {bad[:3]}"
