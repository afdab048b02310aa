"""One logging pipeline: every line JSON with role and ids, libraries included; secrets masked
without mangling prose."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.runtime.logging import (
    JsonLines,
    bind_ids,
    configure_logging,
    get_logger,
    register_secret,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("info", stream=buf, role="scorer", replica="pod-7")
    yield buf
    configure_logging("info")


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]


def test_tapd_lines_are_json_with_role_replica_and_ids_first(logs: io.StringIO) -> None:
    log = get_logger("tapd.test")
    with bind_ids(cohort_id="c-1", model_version="v3"):
        log.info(
            "cohort_scored",
            trace_id="t-9",
            admin_token="hunter2",
            config={"sasl_plain_password": "pw", "n_tokens": 5, "known_pass_rate": 0.9},
        )
    log.info("after")
    first, second = _lines(logs)
    assert list(first)[:3] == ["trace_id", "cohort_id", "model_version"]
    assert (first["role"], first["replica"], first["logger"]) == ("scorer", "pod-7", "tapd.test")
    assert first["admin_token"] == "[REDACTED]"
    # A secret's key is masked; data that merely contains "pass" or "token" is not.
    assert first["config"] == {
        "sasl_plain_password": "[REDACTED]",
        "n_tokens": 5,
        "known_pass_rate": 0.9,
    }
    assert "hunter2" not in logs.getvalue()
    assert "cohort_id" not in second and second["role"] == "scorer"


def test_library_logs_go_through_the_same_pipeline(logs: io.StringIO) -> None:
    # kafka-python logs through the standard library, from its own threads.
    def heartbeat() -> None:
        logging.getLogger("kafka.coordinator").warning(
            "Heartbeat failed for group %s because it is rebalancing", "tapd-scorer"
        )

    t = threading.Thread(target=heartbeat)
    t.start()
    t.join()
    logging.getLogger("kafka.conn").info("chatter below WARNING is dropped")
    logging.getLogger("urllib3.connectionpool").error("Retrying")
    lines = _lines(logs)
    assert [x["logger"] for x in lines] == ["kafka.coordinator", "urllib3.connectionpool"]
    hb = lines[0]
    assert hb["event"] == "Heartbeat failed for group tapd-scorer because it is rebalancing"
    assert (hb["level"], hb["role"], hb["replica"]) == ("warning", "scorer", "pod-7")


def test_secrets_are_masked_but_prose_is_left_alone(logs: io.StringIO) -> None:
    register_secret("s3cr3t-value-registered")
    log = get_logger("tapd.test")
    log.warning("admin_request", error="missing or wrong bearer token")
    log.warning("echo", detail="header was Authorization: Bearer abc.def-123456")
    logging.getLogger("kafka.conn").warning("connect with s3cr3t-value-registered failed")
    a, b, c = _lines(logs)
    assert a["error"] == "missing or wrong bearer token"  # not "bearer [REDACTED]"
    assert b["detail"] == "header was Authorization: Bearer [REDACTED]"
    assert c["event"] == "connect with [REDACTED] failed"
    assert "abc.def-123456" not in logs.getvalue() and "s3cr3t" not in logs.getvalue()


def test_json_lines_wraps_any_text_line() -> None:
    out = io.StringIO()
    w = JsonLines(out)
    w.write('{"event": "already json"}\nplain text from a library\nbar 10%\rbar 100%\n')
    w.write("partial ")
    w.write("line\n")
    w.flush()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines[0] == {"event": "already json"}
    assert lines[1]["event"] == "stderr_text" and lines[1]["text"] == "plain text from a library"
    assert lines[2]["text"] == "bar 100%"  # a redrawn progress bar keeps its last state
    assert lines[3]["text"] == "partial line"


def test_service_mode_leaves_no_text_line_on_stderr(tmp_path: Path) -> None:
    # A real process: libraries with their own handlers, progress bars, prints,
    # a warning: stderr is JSON lines only, and no progress bar is drawn.
    script = """
import logging, sys, warnings
from daemon.runtime.logging import configure_logging, get_logger
configure_logging("info", role="trainer", service=True, replica="r1")
from tqdm import tqdm
for _ in tqdm(range(50)):
    pass
print("a stray print to stderr", file=sys.stderr)
own = logging.getLogger("some.library")
own.propagate = False
own.addHandler(logging.StreamHandler())  # its own handler, bound to the wrapped stderr
own.warning("library text")
warnings.warn("careful")
get_logger("tapd.x").info("done")
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [json.loads(x) for x in out.stderr.splitlines() if x.strip()]
    texts = [x.get("text") for x in lines if x["event"] == "stderr_text"]
    assert texts == ["a stray print to stderr", "library text"]
    assert all(x["role"] == "trainer" and x["replica"] == "r1" for x in lines)
    assert any("careful" in x["event"] for x in lines if x.get("logger") == "py.warnings")
    assert lines[-1]["event"] == "done"
    assert "it/s" not in out.stderr and "100%" not in out.stderr
