"""The thresholds admin API, over real HTTP: auth, validation, run-time effect, audit."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from daemon.config import Thresholds
from daemon.core.decision import ThresholdsHolder
from daemon.runtime.http import AdminApi, HttpServer, publish_thresholds
from daemon.runtime.logging import configure_logging
from daemon.runtime.metrics import ScorerMetrics
from daemon.service.scorer import ThresholdsWatcher, reload_thresholds

TOKEN = "s3cret-token-for-tests"


class Admin:
    def __init__(self, tmp_path: Path, token: str | None) -> None:
        self.file = tmp_path / "thresholds.yaml"
        self.file.write_text(yaml.safe_dump({"min_predicted_lift": 0.0}))
        self.metrics = ScorerMetrics()
        self.holder = ThresholdsHolder(Thresholds())
        publish_thresholds(self.metrics, self.holder.current)
        self.api = AdminApi(
            self.holder,
            self.metrics,
            token,
            lambda: {"broker": True, "predictor": True},
            self.file,
        )
        self.server = HttpServer(self.api, "127.0.0.1", 0).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=5.0)

    def metric(self, name: str, labels: str = "") -> float | None:
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + (labels and "{" + labels + "}") + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("info", stream=buf)
    yield buf
    configure_logging("info")


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    a = Admin(tmp_path, TOKEN)
    yield a
    a.http.close()
    a.server.stop()


def _auth(user: str | None = "alice", token: str = TOKEN) -> dict[str, str]:
    h = {"Authorization": f"Bearer {token}"}
    if user:
        h["X-Tapd-User"] = user
    return h


def test_health_readiness_and_get(admin: Admin) -> None:
    assert admin.http.get("/healthz").status_code == 200
    r = admin.http.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"broker": True, "predictor": True}
    got = admin.http.get("/admin/thresholds").json()
    assert got == Thresholds().model_dump(mode="json")


def test_changes_need_the_right_token(admin: Admin) -> None:
    before = admin.holder.current
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        _auth(token=TOKEN + "x"),
    ):
        r = admin.http.patch("/admin/thresholds", json={"max_in_flight": 9}, headers=headers)
        assert r.status_code == 401, headers
    assert admin.holder.current == before
    assert admin.metric("tapd_admin_requests_total", 'outcome="unauthorized"') == 4


def test_no_configured_token_refuses_every_change(tmp_path: Path) -> None:
    a = Admin(tmp_path, None)
    try:
        r = a.http.put("/admin/thresholds", json={"max_in_flight": 9}, headers=_auth())
        assert r.status_code == 403
        assert "no admin token is configured" in r.json()["error"]
        assert a.http.post("/admin/thresholds/reload", headers=_auth()).status_code == 403
        assert a.holder.current.max_in_flight == Thresholds().max_in_flight
    finally:
        a.server.stop()


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"exploration_share": 1.5}, "exploration_share", "less than or equal to 1"),
        ({"max_in_flight": 0}, "max_in_flight", "greater than or equal to 1"),
        ({"max_in_flight": "many"}, "max_in_flight", "integer"),
        ({"min_lift": 0.1}, "min_lift", "unknown threshold"),
    ],
)
def test_invalid_values_are_refused_with_field_and_reason(
    admin: Admin, change: dict[str, object], field: str, reason: str
) -> None:
    r = admin.http.patch("/admin/thresholds", json=change, headers=_auth())
    assert r.status_code == 422
    body = r.json()
    assert body["field"] == field and reason in body["reason"]
    assert admin.holder.current == Thresholds()
    bad_json = admin.http.patch("/admin/thresholds", content=b"{", headers=_auth())
    assert bad_json.status_code == 422 and bad_json.json()["field"] == "$"


def test_a_valid_change_applies_at_run_time_and_is_audited(admin: Admin, logs: io.StringIO) -> None:
    r = admin.http.patch(
        "/admin/thresholds",
        json={"min_predicted_lift": 0.125, "max_in_flight": 7},
        headers=_auth("alice"),
    )
    assert r.status_code == 200, r.text
    assert admin.holder.current.min_predicted_lift == 0.125
    assert admin.holder.current.max_in_flight == 7
    assert admin.http.get("/admin/thresholds").json()["max_in_flight"] == 7
    assert admin.metric("tapd_threshold", 'name="min_predicted_lift"') == 0.125
    assert admin.metric("tapd_threshold", 'name="max_in_flight"') == 7
    assert admin.metric("tapd_threshold_changes_total", 'source="admin"') == 1
    audit = r.json()["audit"]
    assert audit["who"] == "alice"
    lines = [json.loads(x) for x in logs.getvalue().splitlines() if x.strip()]
    (line,) = [x for x in lines if "max_in_flight" in json.dumps(x) and "alice" in json.dumps(x)]
    text = json.dumps(line)
    assert TOKEN not in logs.getvalue()
    assert '"before"' in text and '"after"' in text

    # Without a user header the token's (non-secret) identity is recorded.
    r = admin.http.patch("/admin/thresholds", json={"max_in_flight": 6}, headers=_auth(None))
    assert r.json()["audit"]["who"].startswith("token:")


def test_reload_endpoint_file_watch_and_bad_file(admin: Admin, logs: io.StringIO) -> None:
    admin.file.write_text(yaml.safe_dump({"exploration_share": 0.5}))
    r = admin.http.post("/admin/thresholds/reload", headers=_auth())
    assert r.status_code == 200, r.text
    assert admin.holder.current.exploration_share == 0.5

    watcher = ThresholdsWatcher(admin.holder, admin.file, admin.metrics)
    admin.file.write_text(yaml.safe_dump({"exploration_share": 0.2, "shadow_mode": True}))
    os.utime(admin.file, ns=(1, 10**18))  # a new mtime whatever the clock's resolution
    assert watcher.poll()
    assert admin.holder.current.shadow_mode and admin.holder.current.exploration_share == 0.2

    admin.file.write_text("exploration_share: 7\n")
    assert not reload_thresholds(admin.holder, admin.file, admin.metrics, source="signal")
    assert admin.holder.current.exploration_share == 0.2  # the old values stay
    assert "thresholds_reload_failed" in logs.getvalue()
    assert "exploration_share" in logs.getvalue()


def test_cli_get_and_set(admin: Admin) -> None:
    from typer.testing import CliRunner

    from daemon.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["thresholds", "get", "--url", admin.server.url])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["max_in_flight"] == Thresholds().max_in_flight
    res = runner.invoke(
        app,
        ["thresholds", "set", "max_in_flight=3", "shadow_mode=true", "--url", admin.server.url],
        env={"TAPD_ADMIN_TOKEN": TOKEN},
    )
    assert res.exit_code == 0, res.output
    assert admin.holder.current.max_in_flight == 3 and admin.holder.current.shadow_mode
    res = runner.invoke(
        app,
        ["thresholds", "set", "max_in_flight=0", "--url", admin.server.url, "--token", TOKEN],
    )
    assert res.exit_code != 0 and "max_in_flight" in res.output
    res = runner.invoke(
        app,
        ["thresholds", "set", "max_in_flight=3", "--url", admin.server.url],
        env={"TAPD_ADMIN_TOKEN": ""},
    )
    assert res.exit_code != 0


def test_promtool_accepts_the_metrics(admin: Admin) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (scripts/setup.sh installs it)")
        pytest.skip("promtool not installed")
    admin.http.patch("/admin/thresholds", json={"max_in_flight": 5}, headers=_auth())
    text = admin.http.get("/metrics").text
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_logs_are_json_with_ids_first_and_secrets_redacted(logs: io.StringIO) -> None:
    from daemon.runtime.logging import bind_ids, get_logger

    log = get_logger("test")
    with bind_ids(cohort_id="c-1", model_version="v3"):
        log.info(
            "cohort_scored",
            trace_id="t-9",
            admin_token="hunter2",
            config={"sasl_plain_password": "pw", "n_tokens": 5},
            detail="header was Bearer abc.def-123",
        )
    log.info("after")
    first, second = (json.loads(x) for x in logs.getvalue().splitlines())
    assert list(first)[:3] == ["trace_id", "cohort_id", "model_version"]
    assert (first["cohort_id"], first["model_version"], first["trace_id"]) == ("c-1", "v3", "t-9")
    assert first["admin_token"] == "[REDACTED]"
    assert first["config"] == {"sasl_plain_password": "[REDACTED]", "n_tokens": 5}
    assert "abc.def-123" not in logs.getvalue() and "hunter2" not in logs.getvalue()
    assert "cohort_id" not in second  # ids are bound to the block only
