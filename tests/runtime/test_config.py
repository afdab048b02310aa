"""Misconfiguration is loud: unknown TAPD_* variables, no transport, a start-up line with
the effective configuration (secrets masked), one Kafka client id per role and replica."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon.cli import app
from daemon.config import (
    MetricsSettings,
    ServiceSettings,
    TapdSettings,
    UnknownVariable,
    check_environment,
    load_settings,
    setting_variables,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("TAPD_TRANSPORT_KIND", "TAPD_TRANSPORT__KIND"),
        ("TAPD_SERVICE__ADMINTOKEN", "TAPD_SERVICE__ADMIN_TOKEN"),
        ("TAPD_THRESHOLDS__MAX_INFLIGHT", "TAPD_THRESHOLDS__MAX_IN_FLIGHT"),
        ("TAPD_LOGLEVEL", "TAPD_LOG_LEVEL"),
    ],
)
def test_unknown_variables_are_refused_with_the_closest_name(name: str, closest: str) -> None:
    with pytest.raises(UnknownVariable) as err:
        check_environment({name: "x", "PATH": "/bin", "TAPD_STATE_DIR": "/tmp"})
    assert err.value.closest == closest and f"did you mean {closest}?" in str(err.value)


def test_every_setting_and_tool_variable_is_known() -> None:
    names = setting_variables()
    for ok in (
        "TAPD_TRANSPORT__KIND",
        "TAPD_TRANSPORT__SASL_PLAIN_PASSWORD",
        "TAPD_THRESHOLDS__SHADOW_MODE",
        "TAPD_SERVICE__ADMIN_TOKEN_FILE",
        "TAPD_CONFIG",
        "TAPD_ADMIN_TOKEN",
        "TAPD_URL",
    ):
        assert ok in names
    check_environment({n: "1" for n in names})  # no exception
    check_environment({"tapd_log_level": "info"})  # names are not case-sensitive


def test_the_cli_refuses_a_misspelt_variable_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["status"], env={"TAPD_TRANSPORT_KIND": "kafka", "TAPD_STATE_DIR": str(tmp_path)}
    )
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "tapd: bad environment: TAPD_TRANSPORT_KIND: not a tapd setting; "
        "did you mean TAPD_TRANSPORT__KIND?"
    )


def test_a_bad_value_is_one_line_naming_the_field(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["status"],
        env={"TAPD_THRESHOLDS__EXPLORATION_SHARE": "7", "TAPD_STATE_DIR": str(tmp_path)},
    )
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "thresholds.exploration_share" in res.stderr and "less than or equal to 1" in res.stderr


@pytest.mark.parametrize("command", [["run"], ["trainer"], ["consume", "tap.traces"]])
def test_no_transport_configured_is_refused(tmp_path: Path, command: list[str]) -> None:
    os.chdir(tmp_path)
    try:
        res = CliRunner().invoke(app, command, env={"TAPD_STATE_DIR": str(tmp_path / "s")})
    finally:
        os.chdir(ROOT)
    assert res.exit_code == 2, res.output
    assert "no transport configured" in res.stderr and "TAPD_TRANSPORT__KIND" in res.stderr
    assert not (tmp_path / "var").exists()  # nothing created in the working directory


def test_cross_field_service_settings() -> None:
    with pytest.raises(ValueError, match="tls_certfile and tls_keyfile"):
        ServiceSettings(tls_certfile=Path("c.pem"))
    with pytest.raises(ValueError, match="admin_token and admin_token_file"):
        ServiceSettings(admin_token="x" * 20, admin_token_file=Path("t"))  # type: ignore[arg-type]


def test_metrics_tenant_settings() -> None:
    assert TapdSettings().metrics.max_tenants == 20 and TapdSettings().metrics.tenants == ()
    with pytest.raises(ValueError, match=r"more than metrics\.max_tenants"):
        MetricsSettings(max_tenants=1, tenants=("a", "b"))
    with pytest.raises(ValueError, match="named twice"):
        MetricsSettings(tenants=("a", "a"))
    with pytest.raises(ValueError, match="1 to 128 characters"):
        MetricsSettings(tenants=("",))
    env = {"TAPD_METRICS__MAX_TENANTS": "3", "TAPD_METRICS__TENANTS": '["acme"]'}
    check_environment(env)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert load_settings().metrics == MetricsSettings(max_tenants=3, tenants=("acme",))


def test_client_ids_per_role_and_replica() -> None:
    s = TapdSettings(service=ServiceSettings(replica="scorer-7c9f"))
    assert s.for_role("scorer").transport.client_id == "tapd-scorer-scorer-7c9f"
    assert s.for_role("trainer").transport.client_id == "tapd-trainer-scorer-7c9f"
    chosen = TapdSettings(transport={"client_id": "mine"})  # type: ignore[arg-type]
    assert chosen.for_role("scorer").transport.client_id == "mine"
    assert load_settings().transport_configured() is ("TAPD_TRANSPORT__KIND" in os.environ)


def test_the_scorer_logs_its_effective_configuration_at_start(tmp_path: Path) -> None:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TAPD_")},
        "TAPD_STATE_DIR": str(tmp_path / "state"),
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_TRANSPORT__SASL_PLAIN_PASSWORD": "sasl-pw-must-not-leak-123",
        "TAPD_SERVICE__READ_TOKEN": "read-token-must-not-leak-456",
        "TAPD_SERVICE__REPLICA": "r-1",
    }
    log = tmp_path / "scorer.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--embedded"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 120
        while '"scorer_started"' not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    (warn,) = [x for x in lines if x["event"] == "transport_embedded"]
    assert warn["level"] == "warning"
    (cfg,) = [x for x in lines if x["event"] == "config"]
    assert cfg["transport"] == "embedded" and cfg["client_id"] == "tapd-scorer-r-1"
    assert cfg["settings"]["transport"]["sasl_plain_password"] in ("**********", "[REDACTED]")
    assert cfg["settings"]["service"]["read_token"] in ("**********", "[REDACTED]")
    assert cfg["settings"]["thresholds"]["known_pass_rate"] == 0.9
    assert "sasl-pw-must-not-leak" not in text and "read-token-must-not-leak" not in text
    assert all(x.get("role") == "scorer" for x in lines)
    assert proc.returncode == 0 and lines[-1]["event"] == "scorer_exiting"
