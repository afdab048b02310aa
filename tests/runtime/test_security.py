"""Security, end to end: a real ``tapd run`` process with an admin token and a
SASL password configured; the admin endpoint refuses what it must; no secret
reaches the logs or /metrics; the code verifier's sandbox contains hostile
completions; Kafka security settings reach the client config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.config import ServiceSettings, TransportSettings
from daemon.verify.registry import get_verifier
from lab.reliability import ServiceProcess, _wait_ready, free_port, tapd_argv
from streams.kafka import client_config

ADMIN_TOKEN = "adm-7f3c9e1b2d4a-secret"
SASL_PASSWORD = "sasl-4b8e2f6a9c1d-secret"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServiceProcess]]:
    tmp = tmp_path_factory.mktemp("security")
    port = free_port()
    env = {
        "TAPD_STATE_DIR": str(tmp / "state"),
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp / "log.sqlite"),
        # Configured but unused by the embedded log: it must still never leak.
        "TAPD_TRANSPORT__SASL_PLAIN_PASSWORD": SASL_PASSWORD,
        "TAPD_TRANSPORT__SASL_PLAIN_USERNAME": "tapd",
        "TAPD_SERVICE__ADMIN_TOKEN": ADMIN_TOKEN,
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_LOG_LEVEL": "debug",
    }
    proc = ServiceProcess(tapd_argv("run"), env, tmp / "scorer.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url, proc
    finally:
        proc.kill()


def test_admin_endpoint_refuses_missing_and_wrong_tokens_and_leaks_no_secret(
    scorer: tuple[str, ServiceProcess],
) -> None:
    url, proc = scorer
    change = {"max_in_flight": 7}
    refusals = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},  # right secret, wrong scheme
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"Authorization": "Bearer"},
    ]
    for headers in refusals:
        r = httpx.patch(f"{url}/admin/thresholds", json=change, headers=headers, timeout=10)
        assert r.status_code == 401, (headers, r.text)
        r = httpx.post(f"{url}/admin/thresholds/reload", headers=headers, timeout=10)
        assert r.status_code == 401
    # Reading needs the token too.
    assert httpx.get(f"{url}/admin/thresholds", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    got = httpx.get(f"{url}/admin/thresholds", headers=auth, timeout=10).json()
    assert got["effective"]["max_in_flight"] != 7
    ok = httpx.patch(
        f"{url}/admin/thresholds",
        json=change,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Tapd-User": "oncall"},
        timeout=10,
    )
    assert ok.status_code == 200 and ok.json()["thresholds"]["max_in_flight"] == 7
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'tapd_admin_requests_total{outcome="unauthorized"} 13.0' in metrics
    assert 'tapd_admin_requests_total{outcome="ok"} 2.0' in metrics
    responses = ok.text + httpx.get(f"{url}/admin/thresholds", headers=auth, timeout=10).text
    logs = proc.logs()
    assert '"thresholds_changed"' in logs and '"oncall"' in logs  # the audit line is there
    for secret in (ADMIN_TOKEN, SASL_PASSWORD):
        for where, text in (("logs", logs), ("metrics", metrics), ("responses", responses)):
            assert secret not in text, f"{secret[:4]}... leaked in {where}"
            assert secret[:12] not in text, f"a prefix of a secret leaked in {where}"


def test_without_a_configured_token_one_is_generated_and_required(tmp_path: Path) -> None:
    # No default token exists: the scorer writes a random one (mode 0600) to its
    # state directory, and every admin request needs it.
    port = free_port()
    env = {
        "TAPD_STATE_DIR": str(tmp_path / "state"),
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp_path / "log.sqlite"),
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__ADMIN_TOKEN": "",
    }
    proc = ServiceProcess(tapd_argv("run"), env, tmp_path / "scorer.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        token_file = tmp_path / "state" / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": "Bearer"}):
            r = httpx.patch(
                f"{url}/admin/thresholds", json={"shadow_mode": True}, headers=headers, timeout=10
            )
            assert r.status_code == 401, r.text
        auth = {"Authorization": f"Bearer {token}"}
        got = httpx.get(f"{url}/admin/thresholds", headers=auth, timeout=10).json()
        assert got["effective"]["shadow_mode"] is False
        assert token not in proc.logs()
    finally:
        proc.kill()


def test_admin_endpoint_listens_on_loopback_by_default() -> None:
    # Reachable from elsewhere only when an operator binds it there on purpose.
    assert ServiceSettings().host == "127.0.0.1"


# --- the code verifier's sandbox, through the verifier itself ---------------------

HOSTILE = {
    "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
    "network_low_level": "import _socket\n_socket.socket()\n",
    "dns": "import socket\nsocket.getaddrinfo('example.com', 80)\n",
    "write_outside": "open('/tmp/tapd-sandbox-escape.txt', 'w').write('x')\n",
    "write_outside_os_open": "import os\nos.open('/tmp/tapd-sandbox-escape2.txt', os.O_WRONLY | os.O_CREAT)\n",
    "write_home_dotfile": "import os\nopen(os.path.expanduser('~/../escape.txt'), 'w').write('x')\n",
    "remove_outside": "import os\nos.remove('/etc/hostname')\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "spawn": "import subprocess\nsubprocess.Popen(['sh', '-c', 'echo pwned'])\n",
    "posix_spawn": "import os\nos.posix_spawn('/bin/true', ['true'], {})\n",
    "ctypes_escape": "import ctypes\nctypes.CDLL(None).system(b'true')\n",
    "runaway_time": "while True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(3600)\n",
    "runaway_memory": "a = []\nwhile True:\n    a.append(bytearray(10**7))\n",
    "exit_before_tests": "import os\nos._exit(0)\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_code_verifier_gives_no_reward_to_hostile_code(name: str) -> None:
    verify = get_verifier("code", {"timeout_s": 2.0})
    # The "solution" also defines f, so a sandbox that let it run to the end
    # would pass the reference's test.
    completion = f"```python\n{HOSTILE[name]}def f(x):\n    return x\n```"
    reward = verify(completion, "assert f(1) == 1")
    assert reward == 0.0, name
    for leftover in ("/tmp/tapd-sandbox-escape.txt", "/tmp/tapd-sandbox-escape2.txt"):
        assert not Path(leftover).exists()


def test_code_verifier_still_rewards_honest_code() -> None:
    verify = get_verifier("code", {"timeout_s": 2.0})
    assert verify("```python\ndef f(x):\n    return x\n```", "assert f(1) == 1") == 1.0


# --- Kafka security settings reach the client -------------------------------------


@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("SASL_SSL", "SCRAM-SHA-512"), ("SASL_PLAINTEXT", "PLAIN"), ("SSL", None)],
)
def test_kafka_security_settings_reach_the_client_config(
    tmp_path: Path, protocol: str, mechanism: str | None
) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    settings = TransportSettings(
        kind="kafka",
        bootstrap_servers="k1:9093, k2:9093",
        security_protocol=protocol,  # type: ignore[arg-type]
        sasl_mechanism=mechanism,  # type: ignore[arg-type]
        sasl_plain_username="tapd",
        sasl_plain_password=SASL_PASSWORD,  # type: ignore[arg-type]
        ssl_cafile=ca,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    cfg = client_config(settings)
    assert cfg["security_protocol"] == protocol
    assert cfg["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    if protocol.startswith("SASL_"):
        assert cfg["sasl_mechanism"] == mechanism
        assert cfg["sasl_plain_username"] == "tapd"
        assert cfg["sasl_plain_password"] == SASL_PASSWORD  # the real value goes to the client
    else:
        assert "sasl_plain_password" not in cfg
    if "SSL" in protocol:
        assert (cfg["ssl_cafile"], cfg["ssl_certfile"], cfg["ssl_keyfile"]) == (
            str(ca),
            str(cert),
            str(key),
        )
        assert cfg["ssl_check_hostname"] is True
    else:
        assert "ssl_cafile" not in cfg
    # ...and is masked wherever the config is printed.
    for shown in (repr(cfg), str(cfg), json.dumps({"cfg": str(cfg)})):
        assert SASL_PASSWORD not in shown
