"""The admin API over real HTTP (uvicorn): auth before anything, layered thresholds,
audit, limits that hold against abuse, TLS, and the metrics it exports."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from daemon.config import Thresholds
from daemon.runtime.http import AdminApi, HttpServer, audit, ensure_admin_token, publish_thresholds
from daemon.runtime.logging import configure_logging
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.thresholds import NAMES, ThresholdsHolder
from daemon.service.scorer import ThresholdsWatcher, reload_thresholds

TOKEN = "s3cret-token-for-tests-0123456789"
READ = "read-only-token-for-tests-98765"


class Admin:
    def __init__(self, tmp_path: Path, timeout_s: float = 10.0, **server: Any) -> None:
        self.file = tmp_path / "thresholds.yaml"
        self.file.write_text(yaml.safe_dump({"min_predicted_lift": 0.0}))
        self.metrics = ScorerMetrics(thresholds=NAMES)
        self.holder = ThresholdsHolder(Thresholds())
        self.holder.on_change = lambda rec: audit(self.metrics, rec, self.holder)
        publish_thresholds(self.metrics, self.holder)
        self.api = AdminApi(
            self.holder,
            self.metrics,
            TOKEN,
            lambda: {"broker": True, "predictor": True},
            self.file,
            read_token=READ,
            timeout_s=timeout_s,
        )
        self.server = HttpServer(self.api, "127.0.0.1", 0, timeout_s=timeout_s, **server).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=10.0, verify=False)

    def metric(self, name: str, labels: str = "") -> float | None:
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + (labels and "{" + labels + "}") + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def close(self) -> None:
        self.http.close()
        self.server.stop()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("info", stream=buf, role="scorer")
    yield buf
    configure_logging("info")


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    a = Admin(tmp_path)
    yield a
    a.close()


def _auth(user: str | None = "alice", token: str = TOKEN) -> dict[str, str]:
    h = {"Authorization": f"Bearer {token}"}
    if user:
        h["X-Tapd-User"] = user
    return h


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]


def test_probes_and_metrics_are_open_and_answer_head(admin: Admin) -> None:
    assert admin.http.get("/healthz").status_code == 200
    r = admin.http.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"broker": True, "predictor": True}
    head = admin.http.head("/metrics")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/plain")
    assert admin.http.get("/nope").status_code == 404
    assert admin.http.post("/healthz").status_code == 405


def test_every_admin_route_needs_a_token_and_the_read_token_only_reads(admin: Admin) -> None:
    for method, path in [
        ("GET", "/admin/thresholds"),
        ("PATCH", "/admin/thresholds"),
        ("POST", "/admin/thresholds/reload"),
        ("DELETE", "/admin/thresholds/overrides/shadow_mode"),
    ]:
        r = admin.http.request(method, path, json={"shadow_mode": True})
        assert r.status_code == 401, (method, path)
    got = admin.http.get("/admin/thresholds", headers=_auth(token=READ))
    assert got.status_code == 200
    assert got.json()["effective"] == Thresholds().model_dump(mode="json")
    assert got.json()["source"]["max_in_flight"] == "config"
    r = admin.http.patch("/admin/thresholds", json={"shadow_mode": True}, headers=_auth(token=READ))
    assert r.status_code == 403 and not admin.holder.current.shadow_mode
    assert admin.metric("tapd_admin_requests_total", 'outcome="forbidden"') == 1
    assert admin.metric("tapd_admin_requests_total", 'outcome="unauthorized"') == 4


def test_wrong_tokens_are_refused_and_logged_with_the_source(
    admin: Admin, logs: io.StringIO
) -> None:
    before = admin.holder.current
    for headers in (
        {},
        {"Authorization": "Bearer wrong-wrong-wrong"},
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        _auth(token=TOKEN + "x"),
        _auth(token=TOKEN[:-1]),
    ):
        r = admin.http.patch("/admin/thresholds", json={"max_in_flight": 9}, headers=headers)
        assert r.status_code == 401, headers
    assert admin.holder.current == before
    refused = [x for x in _lines(logs) if x["event"] == "admin_request"]
    assert len(refused) == 6
    for line in refused:
        assert line["outcome"] == "unauthorized" and line["client"] == "127.0.0.1"
        assert line["role"] == "scorer" and line["level"] == "warning"
    assert TOKEN not in logs.getvalue() and TOKEN[:12] not in logs.getvalue()


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (b'{"exploration_share": 1.5}', "exploration_share", "less than or equal to 1"),
        (b'{"max_in_flight": 0}', "max_in_flight", "greater than or equal to 1"),
        (b'{"max_in_flight": true}', "max_in_flight", "valid integer"),
        (b'{"max_in_flight": "5"}', "max_in_flight", "valid integer"),
        (b'{"shadow_mode": "yes"}', "shadow_mode", "valid boolean"),
        (b'{"min_predicted_lift": NaN}', "$", "NaN is not a JSON number"),
        (b'{"min_predicted_lift": 1e400}', "min_predicted_lift", "finite"),
        (b'{"min_lift": 0.1}', "min_lift", "unknown threshold"),
        (b'{"set": {"max_in_flight": 3}, "ttl": 3}', "ttl", "unknown key"),
        (b'{"set": {"max_in_flight": 3}, "expires_in_s": true}', "expires_in_s", "seconds"),
        (b"{", "$", "not valid JSON"),
        (b"[" * 30_000 + b"]" * 30_000, "$", "not valid JSON"),  # deep nesting: 422, not 500
        (b"[" * 50_000 + b"]" * 50_000, "$", "body over"),  # and over the body limit: 413
        (b'{"a": "\xff"}', "$", "not valid JSON"),
    ],
)
def test_invalid_changes_are_refused_with_field_and_reason(
    admin: Admin, body: bytes, field: str, reason: str
) -> None:
    r = admin.http.patch(
        "/admin/thresholds",
        content=body,
        headers={**_auth(), "Content-Type": "application/json"},
    )
    if len(body) > 64 * 1024:
        assert r.status_code == 413 and reason in r.json()["error"]
        return
    assert r.status_code == 422, r.text
    got = r.json()
    assert got["field"] == field and reason in got["reason"], got
    assert admin.holder.current == Thresholds() and not admin.holder.overrides


def test_an_override_applies_at_once_and_is_audited(admin: Admin, logs: io.StringIO) -> None:
    r = admin.http.patch(
        "/admin/thresholds",
        json={"set": {"min_predicted_lift": 0.125, "max_in_flight": 7}, "why": "drill"},
        headers=_auth("alice <root>"),  # a claim, sanitized, kept next to the principal
    )
    assert r.status_code == 200, r.text
    assert admin.holder.current.min_predicted_lift == 0.125
    assert admin.holder.current.max_in_flight == 7
    view = admin.http.get("/admin/thresholds", headers=_auth()).json()
    assert view["effective"]["max_in_flight"] == 7 and view["source"]["max_in_flight"] == "override"
    o = view["overrides"]["max_in_flight"]
    assert (o["who"], o["why"]) == ("alice__root_", "drill")
    assert o["principal"].startswith("admin:") and TOKEN not in json.dumps(view)
    assert admin.metric("tapd_threshold", 'name="min_predicted_lift"') == 0.125
    assert admin.metric("tapd_threshold_override", 'name="max_in_flight"') == 1
    assert admin.metric("tapd_threshold_override", 'name="shadow_mode"') == 0
    assert admin.metric("tapd_threshold_changes_total", 'source="admin"') == 1
    audit_lines = [x for x in _lines(logs) if x["event"] == "thresholds_changed"]
    assert len(audit_lines) == 1
    line = audit_lines[0]
    assert line["who"] == "alice__root_" and line["principal"].startswith("admin:")
    assert line["before"] == {"min_predicted_lift": 0.0, "max_in_flight": 4}
    assert line["why"] == "drill" and line["role"] == "scorer"
    ok = [x for x in _lines(logs) if x["event"] == "admin_request" and x["outcome"] == "ok"]
    assert ok and ok[0]["client"] == "127.0.0.1" and ok[0]["who"] == "alice__root_"

    # The same change again is a no-op: answered, neither recorded nor counted.
    again = admin.http.patch(
        "/admin/thresholds",
        json={"set": {"min_predicted_lift": 0.125, "max_in_flight": 7}, "why": "drill"},
        headers=_auth("alice"),
    )
    assert again.status_code == 200 and again.json()["noop"] is True
    assert admin.metric("tapd_threshold_changes_total", 'source="admin"') == 1
    assert len([x for x in _lines(logs) if x["event"] == "thresholds_changed"]) == 1

    # Clear it: the configured value is back.
    r = admin.http.delete("/admin/thresholds/overrides/max_in_flight", headers=_auth())
    assert r.status_code == 200 and admin.holder.current.max_in_flight == 4
    assert admin.metric("tapd_threshold_override", 'name="max_in_flight"') == 0


def test_reload_and_file_watch_keep_overrides(admin: Admin, logs: io.StringIO) -> None:
    admin.file.write_text(yaml.safe_dump({"exploration_share": 0.5}))
    r = admin.http.post("/admin/thresholds/reload", headers=_auth())
    assert r.status_code == 200, r.text
    assert admin.holder.current.exploration_share == 0.5

    admin.http.patch("/admin/thresholds", json={"shadow_mode": True}, headers=_auth())
    watcher = ThresholdsWatcher(admin.holder, admin.file, admin.metrics)
    admin.file.write_text(yaml.safe_dump({"exploration_share": 0.2, "shadow_mode": False}))
    os.utime(admin.file, ns=(1, 10**18))  # a new mtime whatever the clock's resolution
    assert watcher.poll()
    # The file's shadow_mode: false does not undo the admin's override.
    assert admin.holder.current.shadow_mode and admin.holder.current.exploration_share == 0.2
    os.utime(admin.file, ns=(1, 2 * 10**18))  # a touch: nothing recorded
    n = admin.metric("tapd_threshold_changes_total", 'source="file"')
    assert watcher.poll() and admin.metric("tapd_threshold_changes_total", 'source="file"') == n

    admin.file.write_text("exploration_share: 7\n")
    assert not reload_thresholds(admin.holder, admin.file, admin.metrics, source="signal")
    assert admin.holder.current.exploration_share == 0.2  # the old values stay
    failed = [x for x in _lines(logs) if x["event"] == "thresholds_reload_failed"]
    assert failed and failed[-1]["field"] == "exploration_share"


def test_bodies_are_limited_and_auth_comes_first(admin: Admin) -> None:
    big = b'{"x": "' + b"a" * 200_000 + b'"}'
    r = admin.http.patch("/admin/thresholds", content=big, headers=_auth())
    assert r.status_code == 413
    # Without a token the body is never looked at.
    r = admin.http.patch("/admin/thresholds", content=big)
    assert r.status_code == 401
    assert admin.metric("tapd_admin_requests_total", 'outcome="too_large"') == 1


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                chunks.append(got)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_hostile_content_lengths_are_answered_without_reading(admin: Admin) -> None:
    port = admin.server.port
    for cl in (b"-1", b"abc", b"1e9"):
        got = _raw(
            port,
            b"PATCH /admin/thresholds HTTP/1.1\r\nHost: x\r\nContent-Length: " + cl + b"\r\n\r\n",
        )
        assert got.startswith(b"HTTP/1.1 400"), (cl, got[:80])
    # A huge declared body with the right token: refused at once, nothing read.
    t0 = time.monotonic()
    got = _raw(
        port,
        b"PATCH /admin/thresholds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Length: 419430400\r\n\r\n",
    )
    assert got.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 5
    # ...and without a token: 401, also without reading.
    got = _raw(
        port, b"PATCH /admin/thresholds HTTP/1.1\r\nHost: x\r\nContent-Length: 419430400\r\n\r\n"
    )
    assert got.startswith(b"HTTP/1.1 401")
    assert admin.http.get("/healthz").status_code == 200


def test_slow_clients_are_cut_off_and_do_not_block_others(tmp_path: Path) -> None:
    a = Admin(tmp_path, timeout_s=1.0)
    try:
        port = a.server.port
        # Half-sent headers, and a body that never comes.
        stalled = []
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            else:
                s.sendall(
                    b"PATCH /admin/thresholds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + TOKEN.encode()
                    + b"\r\nContent-Length: 100\r\n\r\n{"
                )
            stalled.append(s)
        # Others are served meanwhile.
        t0 = time.monotonic()
        assert a.http.get("/healthz").status_code == 200
        assert time.monotonic() - t0 < 1.0
        # Each stalled connection is answered (408) or closed within the timeout.
        deadline = time.monotonic() + 6
        for s in stalled:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
            except TimeoutError:
                pytest.fail("a stalled connection was kept open past the timeout")
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:60]
            s.close()
    finally:
        a.close()


def test_a_burst_of_concurrent_requests_is_served(admin: Admin) -> None:
    url = admin.server.url

    def one(i: int) -> int:
        path = ("/healthz", "/readyz", "/metrics")[i % 3]
        return httpx.get(url + path, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=64) as pool:
        codes = list(pool.map(one, range(128)))
    assert codes == [200] * 128


def test_a_generated_token_is_private_and_kept(tmp_path: Path) -> None:
    first = ensure_admin_token(tmp_path, None, None)
    path = tmp_path / "admin-token"
    assert len(first) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert ensure_admin_token(tmp_path, None, None) == first
    assert (
        ensure_admin_token(tmp_path, "configured-token-123456", None) == "configured-token-123456"
    )
    given = tmp_path / "secret"
    given.write_text("from-a-mounted-secret-file\n")
    assert ensure_admin_token(tmp_path, None, given) == "from-a-mounted-secret-file"
    given.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        ensure_admin_token(tmp_path, None, given)
    with pytest.raises(ValueError, match="needs a token"):
        AdminApi(ThresholdsHolder(), ScorerMetrics(), "", lambda: {})


def test_tls(tmp_path: Path, logs: io.StringIO) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl missing")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    a = Admin(tmp_path, tls_certfile=cert, tls_keyfile=key)
    try:
        assert a.server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(a.server.url + "/admin/thresholds", headers=_auth(), verify=ctx)
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(a.server.url.replace("https", "http") + "/healthz", timeout=3)
        # The CLI trusts the scorer's certificate through TAPD_ADMIN_CACERT.
        from typer.testing import CliRunner

        from daemon.cli import app

        res = CliRunner().invoke(
            app,
            ["thresholds", "get", "--url", a.server.url],
            env={"TAPD_ADMIN_TOKEN": TOKEN, "TAPD_ADMIN_CACERT": str(cert)},
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["effective"]["max_in_flight"] == 4
    finally:
        a.close()


def test_cli_get_set_clear_with_the_token_from_env_or_file(
    admin: Admin, tmp_path: Path, logs: io.StringIO
) -> None:
    from typer.testing import CliRunner

    from daemon.cli import app

    runner = CliRunner()
    url = admin.server.url
    res = runner.invoke(app, ["thresholds", "get", "--url", url], env={"TAPD_ADMIN_TOKEN": ""})
    assert res.exit_code == 1 and "HTTP 401" in res.stderr and "Traceback" not in res.output
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"TAPD_ADMIN_TOKEN_FILE": str(token_file), "USER": "carol"}
    res = runner.invoke(
        app,
        ["thresholds", "set", "max_in_flight=3", "shadow_mode=true", "--url", url,
         "--why", "drill", "--for", "2h"],
        env=env,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert admin.holder.current.max_in_flight == 3 and admin.holder.current.shadow_mode
    o = admin.holder.overrides["shadow_mode"]
    assert o.who == "carol" and o.why == "drill" and o.expires_at is not None
    assert 7100 < o.expires_at - time.time() <= 7200
    # A value already in effect: says nothing changed.
    res = runner.invoke(app, ["thresholds", "set", "top_k_per_window=4", "--url", url], env=env)
    assert res.exit_code == 0 and "nothing changed" in res.stderr
    for bad, fragment in [
        ("max_in_flight=0", "max_in_flight"),
        ("min_predicted_lift=NaN", "min_predicted_lift"),
        ("shadow_mode=yes", "shadow_mode"),
        ("oops", "expected NAME=VALUE"),
    ]:
        res = runner.invoke(app, ["thresholds", "set", bad, "--url", url], env=env)
        assert res.exit_code != 0 and fragment in res.stderr, (bad, res.output)
        assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["thresholds", "clear", "--url", url], env=env)
    assert res.exit_code == 0, res.output
    assert not admin.holder.overrides and admin.holder.current.max_in_flight == 4
    # Unreachable: one line, no traceback.
    res = runner.invoke(app, ["thresholds", "get", "--url", "http://127.0.0.1:1"], env=env)
    assert res.exit_code == 1 and "cannot reach the scorer" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


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


def test_metrics_are_pre_initialised_and_carry_build_and_process_info(admin: Admin) -> None:
    text = admin.http.get("/metrics").text
    assert 'tapd_dead_letters_total{stage="cohorting"} 0.0' in text
    assert 'tapd_dead_letters_total{stage="internal"} 0.0' in text
    assert 'tapd_dispatches_released_total{cause="expired"} 0.0' in text
    assert 'tapd_partition_state_records_total{cause="interval"} 0.0' in text
    assert 'tapd_cohorts_scored_total{recommendation="fix_verifier"} 0.0' in text
    assert 'tapd_predictor_refits_total{outcome="promoted"} 0.0' in text
    assert 'tapd_threshold_override{name="shadow_mode"} 0.0' in text
    for name in ("consumed", "dead_lettered", "dispatched"):
        for tenant in ("other", "unknown"):
            assert f'tapd_tenant_traces_{name}_total{{tenant="{tenant}"}} 0.0' in text
    assert "tapd_build_info{" in text and 'role="scorer"' in text
    assert "process_resident_memory_bytes" in text and "python_info{" in text


def test_readiness_is_kept_current_without_requests() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    from daemon.runtime.http import ReadinessMonitor

    gauge = Gauge("ready_probe", "test", registry=CollectorRegistry())
    state = {"broker": True}
    mon = ReadinessMonitor(lambda: dict(state), gauge, every_s=0.05).start()
    try:
        deadline = time.monotonic() + 5
        while gauge._value.get() != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gauge._value.get() == 1
        state["broker"] = False
        while gauge._value.get() != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gauge._value.get() == 0
    finally:
        mon.stop()
    assert not threading.current_thread().name.startswith("tapd-ready")
