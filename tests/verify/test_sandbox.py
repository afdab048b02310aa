"""The sandbox's mechanics: what the probe guarantees, limits, the result protocol, refusals."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from unprivileged import Unprivileged

from daemon.config import TapdSettings, VerifySettings
from daemon.verify.errors import SandboxUnavailable
from daemon.verify.sandbox import (
    SandboxLimits,
    _parse,
    isolation,
    run_code,
    sandbox_pids,
)

LIMITS = SandboxLimits(cpu_s=1.0, wall_s=3.0, memory_mb=200)


def test_probe_reports_a_dropped_uid_and_namespaces() -> None:
    iso = isolation()
    assert iso.outside_uid != 0 and iso.outside_gid != 0
    if os.geteuid() == 0:
        assert iso.drop_to == (65534, 65534)
        assert (iso.outside_uid, iso.outside_gid) == (65534, 65534)
    else:
        assert iso.drop_to is None and iso.outside_uid == os.geteuid()
    assert "net,pid,ipc,uts,mount ns" in iso.describe()


def test_values_come_back_as_plain_reprs_and_errors_as_names() -> None:
    r = run_code(
        "def f(x):\n    return [x, (x,), {x: None}, {x}]\nprint('noise')\n",
        ["f(1)", "f('a')", "f([])", "g(1)", "f"],
        LIMITS,
    )
    assert r.ready and r.load_error is None and r.violation is None
    assert r.values == {0: "[1, (1,), {1: None}, {1}]", 1: "['a', ('a',), {'a': None}, {'a'}]"}
    assert r.errors == {2: "TypeError", 3: "NameError", 4: "TypeError"}
    assert "noise" in r.stderr  # the code's prints are diagnostics, never results


def test_code_sees_an_empty_environment_and_no_host_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAPD_SERVICE__ADMIN_TOKEN", "hunter2-token")
    r = run_code(
        "import os\n"
        "def facts():\n"
        "    return (sorted(os.environ), os.getcwd(), sorted(os.listdir('/')),\n"
        "            os.path.exists('/etc/passwd'), os.getuid(), os.getpid())\n",
        ["facts()"],
        LIMITS,
    )
    env, cwd, top, passwd, uid, pid = eval(r.values[0])  # a literal from the test's own run
    assert "TAPD_SERVICE__ADMIN_TOKEN" not in env and set(env) <= {
        "PATH",
        "LANG",
        "HOME",
        "TMPDIR",
        "PWD",
    }
    assert cwd == "/work" and passwd is False and uid == 65534
    assert pid < 10  # a PID namespace of its own
    assert "etc" not in top and "root" not in top and "home" not in top


def test_the_working_directory_is_the_only_writable_place_and_has_a_quota() -> None:
    r = run_code(
        "import os\n"
        "def write(p):\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "        return 'ok'\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        "def fill():\n"
        "    n = 0\n"
        "    try:\n"
        "        with open('big', 'wb') as f:\n"
        "            while n < 10**9:\n"
        "                f.write(b'x' * 65536)\n"
        "                n += 65536\n"
        "    except OSError as e:\n"
        "        return (n, e.errno)\n",
        ["write('scratch')", "write('/usr/x')", "write('/x')", "fill()"],
        SandboxLimits(cpu_s=2.0, wall_s=5.0, memory_mb=200, disk_mb=4, file_mb=64),
    )
    assert r.values[0] == "'ok'"
    assert r.values[1] in ("30", "13")  # EROFS or EACCES
    assert r.values[2] in ("30", "13")
    written, err = eval(r.values[3])
    assert err == 28 and written <= 4 * 1024 * 1024  # ENOSPC at the quota


def test_timeouts_are_bounded_and_leave_nothing_behind() -> None:
    before = set(sandbox_pids())
    limits = SandboxLimits(cpu_s=0.5, wall_s=1.0, memory_mb=200)
    t0 = time.monotonic()
    r = run_code("import time\ntime.sleep(60)\n", ["1"], limits)
    assert r.timed_out and r.load_error == "missing"
    assert time.monotonic() - t0 < 3.0
    # RLIMIT_CPU (1 s) ends it long before the wall clock, however loaded the host.
    r = run_code("while True:\n    pass\n", ["1"], SandboxLimits(cpu_s=0.5, wall_s=60.0))
    assert r.load_error == "missing" and not r.timed_out and r.returncode is not None
    assert set(sandbox_pids()) <= before


def test_waiting_for_the_sandbox_leaves_other_threads_running() -> None:
    beats: list[float] = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            beats.append(time.monotonic())
            time.sleep(0.01)

    t = threading.Thread(target=heartbeat)
    t.start()
    try:
        run = run_code("import time\ntime.sleep(60)\n", ["1"], SandboxLimits(wall_s=3.0))
    finally:
        stop.set()
        t.join()
    assert run.timed_out
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert len(beats) > 30 and max(gaps) < 1.0


def test_output_floods_are_cut_off() -> None:
    limits = SandboxLimits(cpu_s=2.0, wall_s=4.0, output_bytes=64 * 1024)
    r = run_code("import sys\nwhile True:\n    sys.stderr.write('x' * 4096)\n", ["1"], limits)
    assert len(r.stderr) <= 64 * 1024
    r = run_code(
        "import os\nwhile True:\n    os.write(3, b'x' * 4096)\n",
        ["1"],
        limits,
    )
    assert r.violation is not None and not r.values


def test_the_result_protocol_is_strict() -> None:
    ok = b'{"ready": 1}\n{"load": "ok"}\n{"h": 0, "v": "5"}\n{"h": 1, "e": "NameError"}\n'
    assert _parse(ok, 2) == (True, None, {0: "5"}, {1: "NameError"}, None)
    bad = {
        b'{"h": 0, "v": "5"}\n': "output before set-up",
        b'{"ready": 1}\n{"h": 0, "v": "5"}\n': "a value for no expression",
        b'{"ready": 1}\n{"load": "ok"}\n{"h": 0, "v": "5"}\n{"h": 0, "v": "6"}\n': "two values",
        b'{"ready": 1}\n{"load": "ok"}\n{"h": 7, "v": "5"}\n': "a value for no expression",
        b'{"ready": 1}\n{"load": "ok"}\ncompleted\n': "not JSON",
        b'{"ready": 1}\n{"load": "ok"}\n{"load": "ok"}\n': "two load records",
        b'{"ready": 1}\n{"load": "ok"}\n{"h": 0, "v": 5}\n': "malformed",
    }
    for out, why in bad.items():
        violation = _parse(out, 2)[4]
        assert violation is not None and why in violation, (out, violation)


def test_a_root_sandbox_uid_is_refused_by_configuration() -> None:
    with pytest.raises(ValidationError) as e:
        VerifySettings(sandbox_uid=0)
    assert "sandbox_uid" in str(e.value)
    with pytest.raises(ValidationError):
        TapdSettings(verify={"sandbox_gid": 0})


def test_a_missing_bubblewrap_is_refused_naming_the_setting() -> None:
    with pytest.raises(SandboxUnavailable) as e:
        isolation(VerifySettings(bwrap="no-such-bwrap"))
    assert e.value.field == "verifier"
    assert "verify.bwrap" in e.value.reason and "bubblewrap" in e.value.reason


def test_without_user_namespaces_an_unprivileged_service_refuses_code(
    unprivileged: Unprivileged,
) -> None:
    # bwrap --disable-userns: inside, no further user namespace can be made,
    # as on a host whose kernel forbids them to unprivileged users.
    script = (
        "from daemon.verify.sandbox import isolation\n"
        "from daemon.verify.errors import SandboxUnavailable\n"
        "try:\n    isolation()\nexcept SandboxUnavailable as e:\n    print(e.reason)\n"
        "else:\n    print('RAN CODE')\n"
    )
    cmd = unprivileged.command("-c", script)
    python_at = cmd.index(unprivileged.python)
    wrapped = [
        *cmd[:python_at],
        "bwrap",
        "--unshare-user",
        "--disable-userns",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--",
        *cmd[python_at:],
    ]
    proc = subprocess.run(wrapped, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAN CODE" not in proc.stdout
    assert "unprivileged user namespace" in proc.stdout, proc.stdout
    assert "user.max_user_namespaces" in proc.stdout and "verify.sandbox_uid" in proc.stdout


def test_code_dies_with_the_process_that_started_it() -> None:
    # A scorer killed mid-verdict must not leave its sandbox running.
    script = (
        "import sys, threading\n"
        "from daemon.verify.sandbox import SandboxLimits, run_code\n"
        "threading.Thread(target=run_code, args=('import time\\ntime.sleep(60)', ['1'],"
        " SandboxLimits(cpu_s=60, wall_s=60))).start()\n"
        "import time\ntime.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    before = set(sandbox_pids())
    scorer = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (started := set(sandbox_pids()) - before) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started, "the sandbox did not start"
    finally:
        scorer.kill()
        scorer.wait()
    deadline = time.monotonic() + 5
    while started & set(sandbox_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not started & set(sandbox_pids())
