"""Run untrusted Python under kernel isolation: bubblewrap namespaces, seccomp, rlimits.

The mechanism (docs/SECURITY.md has the threat model):

* **A separate unprivileged user, always.** As root, tapd first drops to
  ``verify.sandbox_uid:sandbox_gid`` (``setpriv``, util-linux) and only then
  starts ``bwrap``; as any other user, ``bwrap`` puts the code in a new user
  namespace where it is uid 65534 and holds no capability outside it. When
  neither is possible, code is refused (:class:`SandboxUnavailable`, naming
  the setting to fix); there is no weaker fallback.
* **Namespaces** (``bwrap --unshare-all``): an empty network namespace, a new
  PID namespace (the parent's ``/proc/<pid>`` does not exist in there, nor
  does any process to signal), IPC and UTS namespaces, a mount namespace
  whose root is a read-only tmpfs holding only ``/usr`` (read-only), a fresh
  ``/proc`` and ``/dev``, and ``/work`` (the working directory, ``HOME`` and
  ``TMPDIR``): a tmpfs of ``verify.disk_mb``, the total disk quota and the
  only writable place. No ``/etc``, no home, no
  state directory, no parent environment (``--clearenv``).
* **Lifetime**: ``bwrap`` runs its own PID 1 in the namespace; when the
  harness exits, the kernel kills every process left in there (a ``setsid``
  daemon included). The parent-death signal (``setpriv --pdeathsig`` and
  ``bwrap --die-with-parent``) kills the sandbox when the scorer dies; on a
  timeout the parent kills the whole process group.
* **seccomp** (libseccomp through ``pyseccomp``): no sockets but AF_UNIX,
  no ptrace, keyrings, BPF, io_uring, mounts, namespaces, module or clock
  changes; after set-up the harness adds a filter that forbids ``execve``.
* **rlimits**, set by the harness before the code runs: CPU seconds,
  address space, processes (counted inside the sandbox's user namespace),
  file size, open files, no core dumps.

The harness (:mod:`daemon.verify.harness`) only evaluates expressions; the
parent never reads a verdict from the child (see :mod:`daemon.verify.code`).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import VerifySettings
from daemon.verify.errors import SandboxUnavailable
from daemon.verify.settings import current

INSIDE_UID = 65534  # who the code is inside its user namespace
HARNESS_MARK = "# tapd-sandbox-harness"
_HARNESS = HARNESS_MARK + "\n" + (Path(__file__).with_name("harness.py")).read_text()
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

# Denied to sandboxed code with EPERM (on top of the namespaces and the
# missing capabilities): kernel surfaces that code under test never needs.
_DENY = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "setns",
    "unshare",
    "fsopen",
    "fsmount",
    "fsconfig",
    "move_mount",
    "open_tree",
    "open_by_handle_at",
    "name_to_handle_at",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "quotactl",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    "personality",
    "lookup_dcookie",
    "uselib",
    "mbind",
    "move_pages",
    "migrate_pages",
    "set_mempolicy",
)


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: float = 2.0
    wall_s: float = 5.0
    memory_mb: int = 256
    max_procs: int = 16
    file_mb: int = 8
    disk_mb: int = 16
    output_bytes: int = 64 * 1024
    open_files: int = 64

    @classmethod
    def from_settings(cls, s: VerifySettings, *, timeout_s: float, memory_mb: int) -> SandboxLimits:
        return cls(
            cpu_s=timeout_s,
            wall_s=timeout_s * 2 + 1.0,  # start-up, and time spent waiting
            memory_mb=memory_mb,
            max_procs=s.max_procs,
            file_mb=s.file_mb,
            disk_mb=s.disk_mb,
            output_bytes=s.max_output_kb * 1024,
        )


@dataclass(frozen=True)
class SandboxRun:
    """What the parent observed; every field except ``timed_out`` and
    ``returncode`` comes from the (untrusted) child."""

    ready: bool  # the harness set itself up (before any candidate code ran)
    load_error: str | None  # the candidate's module raised this (None: loaded)
    values: Mapping[int, str]  # hole -> repr of its plain value
    errors: Mapping[int, str]  # hole -> name of the exception it raised
    violation: str | None  # the result channel broke the protocol
    timed_out: bool
    output_exceeded: bool
    returncode: int | None
    stderr: str
    duration_s: float


@dataclass(frozen=True)
class Isolation:
    """How this host runs code, found by :func:`isolation`'s probe."""

    outside_uid: int  # the uid the code's processes have outside the sandbox
    outside_gid: int
    drop_to: tuple[int, int] | None  # (uid, gid) set by setpriv when tapd is root
    bwrap: str
    setpriv: str
    python: str
    binds: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        how = "setuid+userns" if self.drop_to else "userns"
        return (
            f"bwrap[{how}; uid {INSIDE_UID} inside, {self.outside_uid} outside; "
            "net,pid,ipc,uts,mount ns; seccomp; rlimits]"
        )


# --- seccomp -------------------------------------------------------------------


_CLONE_THREAD = 0x00010000


@functools.cache
def _bpf(for_code: bool) -> bytes:
    """A seccomp program (classic BPF, native architecture), built by libseccomp.

    ``for_code=False``: the filter bwrap installs before the interpreter
    starts: the kernel surfaces in ``_DENY`` fail with EPERM, sockets other
    than AF_UNIX with EAFNOSUPPORT. ``for_code=True``: the filter the harness
    adds before the candidate's code runs: any of those, starting a process
    (fork, vfork, clone without CLONE_THREAD) or ``execve`` kills the whole
    process, so an escape attempt, caught or not, ends the run with no value
    and earns nothing. Threads stay allowed.
    """
    try:
        import pyseccomp as sc
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise SandboxUnavailable(f"pyseccomp is not installed ({e})") from None
    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.KILL_PROCESS if for_code else sc.ERRNO(errno.EPERM)
    names = (*_DENY, "execve", "execveat", "fork", "vfork") if for_code else _DENY
    for name in names:
        with contextlib.suppress(Exception):  # a syscall this kernel/arch lacks
            f.add_rule(deny, name)
    wrong_family = sc.KILL_PROCESS if for_code else sc.ERRNO(errno.EAFNOSUPPORT)
    f.add_rule(wrong_family, "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    if for_code:
        f.add_rule(sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    else:
        # glibc falls back to clone(2), whose flags can be filtered; clone3's cannot.
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # In memory: the sandbox needs no writable directory on the host.
    with os.fdopen(os.memfd_create("tapd-seccomp", os.MFD_CLOEXEC), "w+b") as t:
        f.export_bpf(t)
        t.seek(0)
        return t.read()


# --- the command ---------------------------------------------------------------


def _root_links() -> list[str]:
    """Debian's merged /usr: /bin, /lib, ... are links into /usr; keep them so."""
    out: list[str] = []
    for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / d
        if p.is_symlink():
            out += ["--symlink", os.readlink(p), f"/{d}"]
        elif p.is_dir():
            out += ["--ro-bind", str(p), f"/{d}"]
    return out


def _command(iso: Isolation, limits: SandboxLimits, seccomp_fd: int) -> list[str]:
    argv = [iso.setpriv]
    if iso.drop_to is not None:
        uid, gid = iso.drop_to
        argv += [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    # After the uid change (which clears it): SIGKILL when the scorer thread dies.
    argv += ["--pdeathsig", "KILL", "--", iso.bwrap]
    argv += ["--unshare-all", "--unshare-user", "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
    argv += ["--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID)]
    argv += ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8"]
    argv += ["--setenv", "HOME", "/work", "--setenv", "TMPDIR", "/work"]
    argv += ["--ro-bind", "/usr", "/usr", *_root_links()]
    for b in iso.binds:
        argv += ["--ro-bind", b, b]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(limits.disk_mb * 1024 * 1024), "--tmpfs", "/work"]
    argv += ["--chdir", "/work", "--remount-ro", "/"]
    argv += ["--seccomp", str(seccomp_fd)]
    argv += ["--", iso.python, "-I", "-S", "-B", "-c", _HARNESS]
    return argv


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    cpu = max(1, int(limits.cpu_s + 0.999))
    return {
        "RLIMIT_CPU": cpu,
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_NPROC": limits.max_procs,
        "RLIMIT_FSIZE": limits.file_mb * 1024 * 1024,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_CORE": 0,
    }


# --- running -------------------------------------------------------------------

_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}


def _slot(n: int) -> threading.BoundedSemaphore:
    with _slots_lock:
        if n not in _slots:
            _slots[n] = threading.BoundedSemaphore(n)
        return _slots[n]


def _exchange(
    proc: subprocess.Popen[bytes],
    payload: bytes,
    limits: SandboxLimits,
    on_output: Callable[[], None] | None = None,
) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin, drain stdout/stderr with bounded buffers, until EOF or the deadline.

    Returns (stdout, stderr, timed_out, output_exceeded). Never blocks past
    ``limits.wall_s``; waiting releases the GIL, so other threads run.
    """
    assert proc.stdin and proc.stdout and proc.stderr
    deadline = time.monotonic() + limits.wall_s
    sel = selectors.DefaultSelector()
    fds = {proc.stdin.fileno(): "in", proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    for fd in fds:
        os.set_blocking(fd, False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ)
    out = bytearray()
    err = bytearray()
    todo = memoryview(payload)
    open_reads = 2
    timed_out = exceeded = False
    try:
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                fd = key.fd
                if fds[fd] == "in":
                    try:
                        n = os.write(fd, todo[:65536])
                    except (BrokenPipeError, BlockingIOError) as e:
                        n = 0 if isinstance(e, BlockingIOError) else len(todo)
                    todo = todo[n:]
                    if not todo:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_reads -= 1
                elif fds[fd] == "out":
                    if on_output is not None and not out:
                        on_output()
                    out += chunk
                    if len(out) > limits.output_bytes:
                        exceeded = True
                        open_reads = 0
                        break
                elif len(err) < limits.output_bytes:
                    err += chunk[: limits.output_bytes - len(err)]
    finally:
        sel.close()
    return bytes(out), bytes(err), timed_out, exceeded


def _kill(proc: subprocess.Popen[bytes]) -> int | None:
    # The group is setpriv->bwrap; bwrap's death tears the namespaces down
    # (--die-with-parent), and with them every process the code started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.kill()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        return None


def _parse(
    stdout: bytes, n_holes: int
) -> tuple[bool, str | None, dict[int, str], dict[int, str], str | None]:
    """The result channel, strictly: anything off-protocol is a violation."""
    ready = False
    load: str | None = "missing"
    values: dict[int, str] = {}
    errors: dict[int, str] = {}
    violation: str | None = None
    for raw in stdout.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            return ready, load, values, errors, "a line that is not JSON"
        if not isinstance(rec, dict):
            return ready, load, values, errors, "a record that is not an object"
        if not ready:
            if rec != {"ready": 1}:
                return ready, load, values, errors, "output before set-up"
            ready = True
            continue
        if "load" in rec:
            if load != "missing":
                return ready, load, values, errors, "two load records"
            load = None if rec.get("load") == "ok" else str(rec.get("type", "?"))[:100]
            continue
        h = rec.get("h")
        if load is not None or type(h) is not int or not 0 <= h < n_holes:
            return ready, load, values, errors, "a value for no expression"
        if h in values or h in errors:
            return ready, load, values, errors, "two values for one expression"
        if isinstance(rec.get("v"), str):
            values[h] = rec["v"]
        elif isinstance(rec.get("e"), str):
            errors[h] = rec["e"][:100]
        else:
            return ready, load, values, errors, "a malformed value record"
    return ready, load, values, errors, violation


def _run(
    iso: Isolation,
    source: str,
    imports: Sequence[str],
    holes: Sequence[str],
    limits: SandboxLimits,
    on_output: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> SandboxRun:
    payload = json.dumps(
        {
            "source": source,
            "imports": list(imports),
            "holes": list(holes),
            "rlimits": _rlimits(limits),
            "seccomp": _bpf(for_code=True).hex(),
            "max_chars": limits.output_bytes // 2,
        }
    ).encode()
    fd = os.memfd_create("tapd-seccomp", 0)
    try:
        os.write(fd, _bpf(for_code=False))
        os.lseek(fd, 0, os.SEEK_SET)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            _command(iso, limits, fd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_ENV,
            cwd="/",
            pass_fds=(fd,),
            start_new_session=True,
        )
    finally:
        os.close(fd)
    try:
        hook = None if on_output is None else functools.partial(on_output, proc)
        out, err, timed_out, exceeded = _exchange(proc, payload, limits, hook)
    finally:
        rc = _kill(proc)
    ready, load, values, errors, violation = _parse(out, len(holes))
    if exceeded:
        violation = violation or "output over the limit"
    return SandboxRun(
        ready=ready,
        load_error=load,
        values=values,
        errors=errors,
        violation=violation,
        timed_out=timed_out,
        output_exceeded=exceeded,
        returncode=rc,
        stderr=err.decode("utf-8", errors="replace"),
        duration_s=time.monotonic() - t0,
    )


def run_code(
    source: str,
    holes: Sequence[str],
    limits: SandboxLimits,
    *,
    imports: Sequence[str] = (),
    settings: VerifySettings | None = None,
) -> SandboxRun:
    """Run ``source`` in the sandbox and evaluate ``holes`` in its namespace.

    Raises :class:`SandboxUnavailable` when this host cannot isolate code;
    never raises for anything the code does.
    """
    s = settings or current()
    iso = isolation(s)
    with _slot(s.max_concurrent):
        return _run(iso, source, imports, holes, limits)


# --- the probe -----------------------------------------------------------------


_MUST_DIE = {
    "starting a process": "import os\nos.fork()\n",
    "executing a program": "import os\nos.execv('/usr/bin/true', ['true'])\n",
    "an internet socket": "import socket\nsocket.socket(socket.AF_INET)\n",
}


class _NoInterpreter(SandboxUnavailable):
    """This interpreter does not run in the sandbox (another may)."""


_PROBE = """
import os, time
time.sleep(0.3)  # the parent looks at the sandbox's processes meanwhile
def facts():
    out = {"uid_map": open("/proc/self/uid_map").read().split(),
           "gid_map": open("/proc/self/gid_map").read().split(),
           "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
           "shadow": os.path.exists("/etc/shadow"), "env": sorted(os.environ)}
    try:
        open("/probe", "w")
        out["root_writable"] = True
    except OSError:
        out["root_writable"] = False
    return out
"""


def _interpreters(s: VerifySettings) -> list[tuple[str, tuple[str, ...]]]:
    """(interpreter, extra read-only binds) to try, best first."""
    found: list[tuple[str, tuple[str, ...]]] = []
    if s.python is not None:
        exe = os.path.realpath(s.python)
        prefix = str(Path(exe).parent.parent)
        return [(exe, () if exe.startswith("/usr/") else (prefix,))]
    own = os.path.realpath(sys.executable)
    own_binds = () if own.startswith("/usr/") else (os.path.realpath(sys.base_prefix),)
    found.append((own, own_binds))
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(p) and (p, ()) not in found:
            found.append((os.path.realpath(p), ()))
    return found


def _tools(s: VerifySettings) -> tuple[str, str]:
    bwrap = shutil.which(s.bwrap, path=_ENV["PATH"] + ":" + os.environ.get("PATH", ""))
    if bwrap is None:
        raise SandboxUnavailable(
            f"bubblewrap not found (verify.bwrap={s.bwrap!r}; Debian package `bubblewrap`)"
        )
    setpriv = shutil.which(s.setpriv, path=_ENV["PATH"] + ":" + os.environ.get("PATH", ""))
    if setpriv is None:
        raise SandboxUnavailable(
            f"setpriv not found (verify.setpriv={s.setpriv!r}; Debian package `util-linux`)"
        )
    return bwrap, setpriv


def _tree_ids(pid: int) -> set[tuple[int, int]]:
    """(uid, gid) of ``pid`` and every descendant, as the host sees them (real,
    effective, saved and filesystem ids all count)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(d))
    ids: set[tuple[int, int]] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(OSError):
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
            )
            uids = {int(x) for x in status["Uid"].split()}
            gids = {int(x) for x in status["Gid"].split()}
            ids |= {(u, g) for u in uids for g in gids}
    return ids


def _check(facts: Any, iso: Isolation, ids: set[tuple[int, int]]) -> str | None:
    """What the probe found wrong, or None."""
    if not isinstance(facts, dict):
        return "no facts"
    if not ids:
        return "could not see the sandbox's processes from outside"
    if any(u == 0 or g == 0 for u, g in ids):
        return "the code's processes run as root (uid or gid 0) outside the sandbox"
    if ids != {(iso.outside_uid, iso.outside_gid)}:
        return (
            f"the code's processes run as {sorted(ids)}, not "
            f"{iso.outside_uid}:{iso.outside_gid} (verify.sandbox_uid/sandbox_gid)"
        )
    uid_map = facts.get("uid_map", [])
    if len(uid_map) != 3 or uid_map[0] != str(INSIDE_UID) or uid_map[2] != "1":
        return f"unexpected uid map inside the sandbox {uid_map}"
    if max(facts.get("pids", [1 << 30])) > 64:
        return "the sandbox sees processes outside its PID namespace"
    if facts.get("shadow") or facts.get("root_writable"):
        return "the sandbox's filesystem is not isolated"
    if set(facts.get("env", [])) - {"PATH", "LANG", "HOME", "TMPDIR", "PWD", "LC_CTYPE"}:
        return f"the sandbox inherits environment variables {facts.get('env')}"
    return None


def _probe_one(
    s: VerifySettings, bwrap: str, setpriv: str, python: str, binds: tuple[str, ...]
) -> Isolation:
    root = os.geteuid() == 0
    drop = (s.sandbox_uid, s.sandbox_gid) if root else None
    outside = drop if drop else (os.geteuid(), os.getegid())
    iso = Isolation(outside[0], outside[1], drop, bwrap, setpriv, python, binds)
    limits = SandboxLimits(cpu_s=5.0, wall_s=20.0, memory_mb=256)
    try:
        ids: set[tuple[int, int]] = set()
        run = _run(
            iso, _PROBE, (), ("facts()",), limits, lambda proc: ids.update(_tree_ids(proc.pid))
        )
    except OSError as e:
        raise SandboxUnavailable(f"cannot start {setpriv} / {bwrap}: {e}") from None
    if not run.ready and any(p in run.stderr for p in (python, *binds)):
        raise _NoInterpreter(f"{python} does not start in the sandbox: {run.stderr[-300:]}")
    if not run.ready:
        why = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
        if root:
            raise SandboxUnavailable(
                f"bwrap failed after dropping to verify.sandbox_uid={s.sandbox_uid} "
                f"(verify.sandbox_gid={s.sandbox_gid}): {why[0]}. The kernel must allow user "
                "namespaces (sysctl user.max_user_namespaces > 0) and the interpreter "
                f"{python} (verify.python) must be readable by that uid"
            )
        raise SandboxUnavailable(
            f"tapd runs as uid {os.geteuid()} (not root), so the code sandbox needs an "
            f"unprivileged user namespace, and bwrap could not make one: {why[0]}. Allow them "
            "(sysctl user.max_user_namespaces > 0; kernel.apparmor_restrict_unprivileged_userns"
            "=0 where AppArmor restricts them) or run tapd as root, which drops to "
            "verify.sandbox_uid"
        )
    if 0 not in run.values:
        raise _NoInterpreter(
            f"the probe did not run (interpreter {python}, verify.python): "
            f"{run.load_error or run.errors.get(0) or run.violation} {run.stderr[-300:]}"
        )
    try:
        facts = ast.literal_eval(run.values[0])
    except (ValueError, SyntaxError):
        facts = None
    wrong = _check(facts, iso, ids)
    if wrong is None:
        # Each of these must end the run: seccomp kills the harness.
        for what, attempt in _MUST_DIE.items():
            run = _run(iso, attempt, (), ("1",), limits)
            if run.load_error != "missing" or run.values:
                wrong = f"{what} is not refused inside the sandbox"
                break
    if wrong:
        raise SandboxUnavailable(f"refusing to run code: {wrong}")
    return iso


_probe_lock = threading.Lock()
_probed: dict[tuple[Any, ...], Isolation | SandboxUnavailable] = {}


def isolation(settings: VerifySettings | None = None) -> Isolation:
    """The isolation this host gives code, probed once per configuration.

    Runs a probe program in the sandbox and checks from its facts that each
    guarantee holds (outside uid not root, PID namespace, no internet
    sockets, no host files, no exec, empty environment). Raises
    :class:`SandboxUnavailable` with the setting to fix otherwise.
    """
    s = settings or current()
    key = (s.sandbox_uid, s.sandbox_gid, s.bwrap, s.setpriv, s.python, os.geteuid())
    with _probe_lock:
        if key not in _probed:
            try:
                bwrap, setpriv = _tools(s)
                tried: list[str] = []
                for python, binds in _interpreters(s):
                    try:
                        _probed[key] = _probe_one(s, bwrap, setpriv, python, binds)
                        break
                    except _NoInterpreter as e:
                        tried.append(str(e))
                else:
                    raise SandboxUnavailable("; ".join(tried))
            except SandboxUnavailable as e:
                _probed[key] = e
        found = _probed[key]
    if isinstance(found, SandboxUnavailable):
        raise found
    return found


def sandbox_pids() -> list[int]:
    """Host pids of processes running the harness (for tests and operators)."""
    out: list[int] = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            if HARNESS_MARK.encode() in cmd and b"bwrap" not in cmd.split(b"\0")[0]:
                out.append(int(d))
    return out
