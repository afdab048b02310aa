from __future__ import annotations

from pathlib import Path

from daemon.verify.sandbox import SandboxLimits, isolation, run_python

LIMITS = SandboxLimits(cpu_s=1.0, wall_s=3.0, memory_mb=200)


def test_correct_solution_passes() -> None:
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')\n", LIMITS)
    assert r.ok, r
    assert r.reason == "ok" and r.returncode == 0
    assert r.stdout == "done\n"
    assert r.isolation == isolation()


def test_failing_assertion_reports_why() -> None:
    r = run_python("assert 1 + 1 == 3\n", LIMITS)
    assert not r.ok
    assert r.reason == "assertion failed"
    assert "AssertionError" in r.stderr


def test_infinite_loop_is_killed_within_its_time_limit() -> None:
    r = run_python("while True:\n    pass\n", LIMITS)
    assert not r.ok and r.reason == "timeout"
    assert r.duration_s < LIMITS.wall_s + 2.0


def test_sleeping_code_is_killed_by_the_wall_clock() -> None:
    r = run_python("import time\ntime.sleep(60)\n", SandboxLimits(cpu_s=1.0, wall_s=1.0))
    assert not r.ok and r.reason == "timeout"
    assert r.duration_s < 3.0


def test_memory_bomb_is_stopped_within_its_limit() -> None:
    r = run_python("a = []\nwhile True:\n    a.append(bytearray(10**7))\n", LIMITS)
    assert not r.ok and r.reason == "memory", r


def test_fork_bomb_is_stopped() -> None:
    r = run_python("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert not r.ok
    assert r.reason == "process creation blocked", r
    r = run_python("import subprocess\nsubprocess.run(['true'])\n", LIMITS)
    assert r.reason == "process creation blocked", r


def test_network_connect_is_blocked_even_if_the_error_is_caught() -> None:
    src = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "except Exception:\n"
        "    pass\n"
    )
    r = run_python(src, LIMITS)
    assert not r.ok and r.reason == "network blocked", r


def test_write_outside_the_work_dir_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "escape.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')\n", LIMITS)
    assert not r.ok and r.reason == "write blocked", r
    assert not target.exists()
    # Writing inside its own working directory is fine.
    r = run_python(
        "open('scratch.txt', 'w').write('x')\nprint(open('scratch.txt').read())\n", LIMITS
    )
    assert r.ok and r.stdout == "x\n"


def test_output_is_truncated_and_bounded() -> None:
    r = run_python("while True:\n    print('x' * 1000)\n", SandboxLimits(wall_s=3.0, file_mb=1))
    assert not r.ok and r.reason == "output limit", r
    assert len(r.stdout) <= SandboxLimits().output_chars + 20


def test_environment_is_scrubbed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TAPD_SECRET_FOR_TEST", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))\n", LIMITS)
    assert r.ok and "TAPD_SECRET_FOR_TEST" not in r.stdout
