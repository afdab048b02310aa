"""Alert rules and dashboard queries against the real Prometheus.

promtool checks the config and the rules and runs the rule unit tests; then
a real Prometheus scrapes live targets that serve tapd's real metric
registries (daemon.metrics), and every dashboard and alert expression runs
through its HTTP query API.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
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

# Stand-in targets: the REAL ScorerMetrics/TrainerMetrics registries with
# values, served by prometheus_client, moving every 200 ms so rates exist.
TARGETS = textwrap.dedent(
    """
    import sys, time
    from prometheus_client import start_http_server
    from daemon.metrics import ScorerMetrics, TrainerMetrics, RECOMMENDATIONS, SELECTIONS, STAGES

    s, t = ScorerMetrics(), TrainerMetrics()
    start_http_server(int(sys.argv[1]), addr="127.0.0.1", registry=s.registry)
    start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=t.registry)
    for name, v in (("max_in_flight", 4), ("min_predicted_lift", 0.0), ("exploration_share", 0.25)):
        s.threshold.labels(name=name).set(v)
    s.threshold_changes.labels(source="admin").inc()
    s.admin_requests.labels(outcome="ok").inc()
    s.predictor_stage.labels(stage="river").set(1)
    s.predictor_refits.labels(outcome="promoted").inc()
    s.up_ready.set(1)
    t.policy_version.set(3)
    i = 0
    while True:
        i += 1
        s.traces_consumed.inc(50)
        s.traces_duplicate.inc(1)
        s.dead_letters.labels(stage=STAGES[i % len(STAGES)]).inc()
        s.consumer_lag.labels(topic="tap.traces").set(1000 + 10 * i)
        s.consumer_lag.labels(topic="tap.lift").set(3)
        s.consumption_paused.set(i % 2)
        s.processing_seconds.labels(stage="features").observe(0.01 * (i % 7))
        s.cohorts_open.set(12)
        s.cohorts_closed.labels(cause="size").inc()
        s.cohorts_scored.labels(recommendation=RECOMMENDATIONS[i % len(RECOMMENDATIONS)]).inc()
        s.dispatches.labels(selection=SELECTIONS[i % len(SELECTIONS)]).inc()
        s.dispatches_in_flight.set(4)
        s.predicted_lift.observe(0.05 * ((i % 5) - 1))
        s.realized_lift.labels(selection=SELECTIONS[i % len(SELECTIONS)]).observe(0.03 * ((i % 4) - 1))
        s.lift_labels.inc()
        s.realized_lift_mean.labels(selection="exploit").set(0.04)
        s.realized_lift_mean.labels(selection="explore_random").set(0.01)
        s.selection_gain.set(0.03)
        s.predictor_spearman.set(0.6)
        s.predictor_pairwise_accuracy.set(0.7)
        s.predictor_labels.set(i)
        s.predictor_model_version.set(2)
        if i % 10 == 0:
            s.predictor_drift.inc()
        t.cohorts.labels(outcome="trained").inc()
        t.cohort_seconds.observe(1.5)
        t.nll_lift.observe(0.02)
        t.accuracy_lift.set(0.01)
        t.train_reward.labels(phase="before").set(0.4)
        t.train_reward.labels(phase="after").set(0.5)
        t.probe_nll.set(2.1)
        t.probe_accuracy.set(0.3)
        t.dormant_fraction.set(0.05)
        t.effective_rank.set(30 - (i % 3))
        t.weight_norm.set(120.0)
        t.grad_norm.set(0.8)
        t.entropy.set(1.2)
        time.sleep(0.2)
    """
)


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
        assert path == "docs/RUNBOOK.md" and anchor == rule["alert"].lower()
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
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
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


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus binary missing")
    tmp = tmp_path_factory.mktemp("prom")
    scorer_port, trainer_port, prom_port = free_port(), free_port(), free_port()
    targets = subprocess.Popen(
        [sys.executable, "-c", TARGETS, str(scorer_port), str(trainer_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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
    try:
        deadline = time.monotonic() + 30
        while True:
            assert prom.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            assert targets.poll() is None, targets.stderr.read().decode() if targets.stderr else ""
            try:
                # Ready when both targets have been scraped a few times.
                r = httpx.get(f"{url}/api/v1/query", params={"query": "count_over_time(up[1m])"})
                series = r.json()["data"]["result"] if r.status_code == 200 else []
                if len(series) == 2 and min(float(s["value"][1]) for s in series) >= 4:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not scrape the targets in 30 s"
            time.sleep(0.5)
        yield url
    finally:
        for p in (prom, targets):
            p.terminate()
            try:
                p.wait(timeout=10)
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
    # The stand-in scorer sits at its in-flight cap and the trainer is up:
    # the stuck-at-cap condition holds, the trainer-down one does not.
    by_name = {r["alert"]: r["expr"] for r in alert_rules()}
    assert query(prometheus, by_name["TapdDispatchesStuckAtCap"])
    assert not query(prometheus, by_name["TapdTrainerDown"])
    assert query(prometheus, by_name["TapdPredictorDrift"])


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
