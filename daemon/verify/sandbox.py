"""Run untrusted Python (a code verifier's completion plus its tests) in a subprocess.

Layers, outermost first. The kernel ones are the boundary; the audit hook is
defence in depth that also lets us *name* what was blocked:

1. A fresh temporary working directory, a scrubbed environment, and
   ``python -I -S -B`` (isolated: no user site, no PYTHON* variables, no
   bytecode written).
2. Resource limits set by a launcher in the child before it execs the
   interpreter: RLIMIT_CPU (CPU seconds),
   RLIMIT_AS (memory), RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE (output and
   files), RLIMIT_CORE 0; and a wall-clock timeout that kills the whole
   process group (the child runs in its own session).
3. When running as root: a new, empty network namespace (``unshare(2)`` with
   CLONE_NEWNET: only a downed loopback exists, so nothing can be reached),
   and, where the interpreter is readable by ``nobody``, privileges dropped
   to ``nobody``, so RLIMIT_NPROC applies (root ignores it) and filesystem
   permissions forbid writes elsewhere. Without root neither is possible;
   :func:`isolation` probes once and says which layers apply.
4. A bootstrap installs ``sys.addaudithook`` before the code runs: it refuses
   socket creation/connection/name lookups ("network blocked"), opening files
   for writing and removing/renaming/creating paths outside the working
   directory ("write blocked"), process creation ("process creation
   blocked") and ctypes ("ctypes blocked", since ctypes could bypass the
   hook). Every refusal is also recorded on a side channel (an inherited
   descriptor), so catching the exception does not hide it; the bootstrap
   also records there that the code ran to its end, so ``os._exit(0)``
   before the tests is not a pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: float = 2.0
    wall_s: float = 5.0
    memory_mb: int = 256
    max_procs: int = 16
    file_mb: int = 4
    output_chars: int = 4096


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    # "ok", "timeout", "memory", "network blocked", "write blocked",
    # "process creation blocked", "ctypes blocked", "output limit",
    # "assertion failed", "exited early", "killed by signal N", "exit code N"
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: str  # which layers applied, from isolation()


_BOOTSTRAP = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_fd = int(sys.argv[1])
_solution = sys.argv[2]
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.rmtree",
                "shutil.copyfile", "shutil.move"}
_PROC_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                "os.spawn", "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn"}
_realpath = os.path.realpath
_write = os.write
_fspath = os.fspath
_isinstance = isinstance

def _inside(p):
    try:
        if _isinstance(p, int):
            return True  # an fd that is already open
        p = _realpath(_fspath(p))
    except Exception:
        return False
    return p == _root or p.startswith(_root + "/")

def _deny(kind, event):
    try:
        _write(_fd, (kind + "\t" + event + "\n").encode())
    except Exception:
        pass
    raise PermissionError("[tapd-sandbox] " + kind + ": " + event)

def _hook(event, args):
    if event.startswith("socket."):
        _deny("network blocked", event)
    elif event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & _WRITE)
        if writing and not _inside(path):
            _deny("write blocked", event + " " + str(path))
    elif event in _PATH_EVENTS:
        paths = [a for a in args if _isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(p) for p in paths):
            _deny("write blocked", event + " " + " ".join(map(str, paths)))
    elif event in _PROC_EVENTS:
        _deny("process creation blocked", event)
    elif event.startswith("ctypes."):
        _deny("ctypes blocked", event)

with open(_solution) as _f:
    _code = compile(_f.read(), "solution.py", "exec")
sys.addaudithook(_hook)
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
_write(_fd, b"completed\tmain\n")
"""


# The limits and namespaces are applied by a small launcher in the child,
# which then execs the real interpreter: a fresh single-threaded process, so
# none of the hazards of ``preexec_fn`` in a threaded parent (torch) apply.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), tuple(value))
if cfg["netns"]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        os.write(2, b"tapd-sandbox: unshare(CLONE_NEWNET) failed\n")
        os._exit(97)
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.execv(sys.argv[2], sys.argv[2:])
"""


def _launch(limits: SandboxLimits, netns: bool, drop_root: bool, argv: list[str]) -> list[str]:
    """The command that runs ``argv`` under the limits and layers."""
    cpu = max(1, int(limits.cpu_s + 0.999))
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.file_mb * 1024 * 1024
    cfg = {
        "rlimits": {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [mem, mem],
            "RLIMIT_FSIZE": [fsize, fsize],
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_NPROC": [limits.max_procs, limits.max_procs],
        },
        "netns": netns,
        "uid": NOBODY if drop_root else None,
    }
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg), *argv]


def _probe(netns: bool, drop_root: bool) -> bool:
    """Whether a child with these layers starts and sees no network but loopback."""
    # /proc/self/net/dev lists the interfaces of the child's own namespace
    # (/sys/class/net would show the namespace sysfs was mounted in).
    code = (
        "import sys; rows=open('/proc/self/net/dev').read().splitlines()[2:];"
        "sys.exit(0 if [r.split(':')[0].strip() for r in rows]==['lo'] else 3)"
    )
    try:
        rc = subprocess.run(
            _launch(
                SandboxLimits(),
                netns,
                drop_root,
                [sys.executable, "-I", "-S", "-c", code if netns else "pass"],
            ),
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            timeout=10,
            capture_output=True,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return False
    return rc == 0


@functools.cache
def isolation() -> str:
    """Which layers apply here, probed once: e.g. ``netns+nobody+rlimits+audit``.

    The ``nobody`` layer also needs the interpreter to be readable by nobody
    (not so for an interpreter under /root), hence the probe rather than a
    check of the effective uid.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return "rlimits+audit"
    for netns, drop in ((True, True), (True, False), (False, True)):
        if _probe(netns, drop):
            layers = ["netns"] * netns + ["nobody"] * drop
            return "+".join([*layers, "rlimits", "audit"])
    return "rlimits+audit"


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data.decode("utf-8", errors="replace")
    return text[:limit] + ("…[truncated]" if len(text) > limit else "")


def _classify(rc: int, stderr: str, side: str) -> str:
    kinds = [line.split("\t")[0] for line in side.splitlines()]
    blocked = [k for k in kinds if k != "completed"]
    if blocked:
        return blocked[0]
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout"
        if sig == signal.SIGXFSZ:
            return "output limit"
        return f"killed by signal {sig}"
    if "MemoryError" in stderr:
        return "memory"
    if "File too large" in stderr:
        return "output limit"
    if "AssertionError" in stderr:
        return "assertion failed"
    if rc == 0 and "completed" not in kinds:
        # os._exit(0) before the tests ran must not count as passing them.
        return "exited early"
    return f"exit code {rc}"


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``source`` as ``__main__`` under the sandbox; never raises for what the code does."""
    limits = limits or SandboxLimits()
    layers = isolation()
    netns = "netns" in layers
    drop_root = "nobody" in layers
    work = Path(tempfile.mkdtemp(prefix="tapd-sbx-"))
    # Outputs live outside the working dir so that the code cannot tamper with them.
    side = Path(tempfile.mkdtemp(prefix="tapd-sbx-out-"))
    try:
        (work / "solution.py").write_text(source)
        (work / "bootstrap.py").write_text(_BOOTSTRAP)
        if drop_root:
            os.chown(work, NOBODY, NOBODY)
            for p in work.iterdir():
                os.chown(p, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        with (
            open(side / "stdout", "wb") as out,
            open(side / "stderr", "wb") as err,
            open(side / "violations", "wb") as vio,
        ):
            t0 = time.monotonic()
            interpreter = [sys.executable, "-I", "-S", "-B", "bootstrap.py"]
            proc = subprocess.Popen(
                _launch(limits, netns, drop_root, [*interpreter, str(vio.fileno()), "solution.py"]),
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(vio.fileno(),),
                start_new_session=True,
            )
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Kill the whole group either way: forked stragglers must not outlive the run.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            duration = time.monotonic() - t0
        stdout = _read(side / "stdout", limits.output_chars)
        stderr = _read(side / "stderr", limits.output_chars)
        violations = _read(side / "violations", 4096)
        reason = "timeout" if timed_out else _classify(rc, stderr, violations)
        ok = reason == "exit code 0"
        return SandboxResult(
            ok=ok,
            reason="ok" if ok else reason,
            returncode=rc,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            isolation=layers,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(side, ignore_errors=True)
