"""A corpus of escape and grader-gaming attempts against the code verifier, with its runner.

Used by ``test_sandbox_attacks.py`` twice: in the test process (as root in
CI) and, through ``python tests/verify/sandbox_attacks.py CONTEXT.json``, as
an unprivileged user, where the sandbox must rely on a user namespace.

Every attempt is a completion for a task with assert tests. Escape attempts
are written to return the *right* answer only if the escape worked, so a
reward of 1 is itself evidence; the runner also looks for evidence outside
the sandbox (a listener that was reached, a file that appeared, a process
that died or stayed behind). Grader-gaming attempts are wrong code with a
trick. Controls are correct code that does unusual but harmless things
(prints "AssertionError", writes a scratch file, starts a thread): they must
still earn 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADD = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(10, 20) == 30"]
LEAK_TOKEN = ["assert leak() == '@TOKEN@'"]
RIGHT = "    return a + b if escaped else a - b\n"


@dataclass(frozen=True)
class Attempt:
    name: str
    kind: str  # "escape", "gaming" or "control"
    code: str
    tests: tuple[str, ...] = tuple(ADD)


def _escape(name: str, body: str, imports: str = "import os, socket") -> Attempt:
    """``body`` sets ``escaped = True`` only if the escape worked."""
    indented = "".join("        " + line + "\n" for line in body.strip("\n").splitlines())
    code = (
        f"{imports}\n"
        "def add(a, b):\n"
        "    escaped = False\n"
        "    try:\n"
        f"{indented}"
        "    except BaseException:\n"
        "        pass\n"
        f"{RIGHT}"
    )
    return Attempt(name, "escape", code)


def _leak(name: str, body: str, secret: str = "@TOKEN@") -> Attempt:
    """``leak()`` returns what it could read; the test expects the secret."""
    indented = "".join("    " + line + "\n" for line in body.strip("\n").splitlines())
    code = "import os, glob\ndef leak():\n" + indented
    return Attempt(name, "escape", code, (f"assert leak() == {secret!r}",))


CTYPES = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)"

ATTEMPTS: list[Attempt] = [
    # --- network ---------------------------------------------------------------
    _escape(
        "net_tcp_loopback",
        "s = socket.create_connection(('127.0.0.1', @TCP@), timeout=1)\n"
        "s.sendall(b'x')\nescaped = True",
    ),
    _escape(
        "net_tcp6_loopback",
        "s = socket.create_connection(('::1', @TCP6@), timeout=1)\ns.sendall(b'x')\nescaped = True",
    ),
    _escape(
        "net_udp_loopback",
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'x', ('127.0.0.1', @UDP@))\nescaped = True",
    ),
    _escape(
        "net_unix_abstract",
        "s = socket.socket(socket.AF_UNIX)\ns.connect('\\0@ABSTRACT@')\n"
        "s.sendall(b'x')\nescaped = True",
    ),
    _escape(
        "net_unix_path",
        "s = socket.socket(socket.AF_UNIX)\ns.connect('@UNIXPATH@')\ns.sendall(b'x')\nescaped = True",
    ),
    _escape("net_dns", "socket.getaddrinfo('localhost', 80)\nescaped = True"),
    _escape(
        "net_raw_syscall",
        "fd = libc.syscall(41, 2, 1, 0)  # socket(AF_INET, SOCK_STREAM)\nescaped = fd >= 0",
        CTYPES,
    ),
    _escape(
        "net_inet_at_import_caught",
        "escaped = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) is not None",
    ),
    # --- filesystem ------------------------------------------------------------
    _escape("write_host_dir", "open('@CANARY@/escape.txt', 'w').write('x')\nescaped = True"),
    _escape("write_etc", "open('/etc/tapd-escape', 'w').write('x')\nescaped = True"),
    _escape("write_usr", "open('/usr/tapd-escape', 'w').write('x')\nescaped = True"),
    _escape("write_root", "open('/tapd-escape', 'w').write('x')\nescaped = True"),
    _escape("write_tmp", "open('/tmp/tapd-escape', 'w').write('x')\nescaped = True"),
    _escape(
        "write_os_open",
        "fd = os.open('@CANARY@/escape2.txt', os.O_WRONLY | os.O_CREAT)\nescaped = fd >= 0",
    ),
    _escape(
        "write_proc_sys",
        "open('/proc/sys/kernel/hostname', 'w').write('pwned')\nescaped = True",
    ),
    _escape(
        "symlink_out",
        "os.symlink('@CANARY@', 'out')\nopen('out/escape3.txt', 'w').write('x')\nescaped = True",
    ),
    _escape("dev_mem", "open('/dev/mem', 'rb').read(1)\nescaped = True"),
    _escape("dev_kmsg", "open('/dev/kmsg', 'rb').read(1)\nescaped = True"),
    # --- processes ---------------------------------------------------------------
    _escape(
        "run_bin_sh",
        "import subprocess\n"
        "subprocess.run(['/bin/sh', '-c', 'echo pwned > @CANARY@/sh.txt'], check=True)\n"
        "escaped = True",
    ),
    _escape("os_system", "escaped = os.system('echo pwned > @CANARY@/sh2.txt') == 0"),
    _escape(
        "ctypes_system", "escaped = libc.system(b'echo pwned > @CANARY@/sh3.txt') == 0", CTYPES
    ),
    _escape("posix_spawn", "os.posix_spawn('/bin/true', ['true'], {})\nescaped = True"),
    _escape("execv", "os.execv('/bin/sh', ['sh', '-c', 'echo pwned > @CANARY@/sh4.txt'])"),
    _escape("kill_victim", "os.kill(@VICTIM@, 9)\nescaped = True"),
    _escape("kill_everything", "os.kill(-1, 9)\nescaped = True"),
    _escape("kill_parent", "os.kill(@PARENT@, 9)\nescaped = True"),
    _escape("killpg_parent", "os.killpg(@PARENT_PGID@, 9)\nescaped = True"),
    _escape(
        "setsid_daemon",
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    import time\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "escaped = True",
    ),
    _escape(
        "fork_syscall_daemon",
        "pid = libc.syscall(57)  # fork(2), not glibc's clone\n"
        "if pid == 0:\n"
        "    import time\n"
        "    time.sleep(60)\n"
        "escaped = pid > 0",
        CTYPES,
    ),
    Attempt(
        "thread_outlives",
        "escape",
        "import threading, time\n"
        "def spin():\n    while True:\n        time.sleep(0.01)\n"
        "threading.Thread(target=spin).start()\n"
        "def add(a, b):\n    return a - b\n",
    ),
    # --- secrets -----------------------------------------------------------------
    _leak("read_parent_environ", "return open('/proc/@PARENT@/environ').read()"),
    _leak(
        "scan_all_environ",
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        for kv in open(p).read().split('\\0'):\n"
        "            if kv.startswith('TAPD_SERVICE__ADMIN_TOKEN='):\n"
        "                return kv.split('=', 1)[1]\n"
        "    except OSError:\n"
        "        pass\n"
        "return None",
    ),
    _leak("os_environ", "return os.environ.get('TAPD_SERVICE__ADMIN_TOKEN')"),
    _leak("read_shadow", "return open('/etc/shadow').readline().strip()", "@SHADOW@"),
    _leak("read_secret_file", "return open('@SECRET_PATH@').read()", "@SECRET@"),
    _leak("read_parent_cwd", "return os.readlink('/proc/@PARENT@/cwd')", "@PARENT_CWD@"),
    # --- resources -----------------------------------------------------------------
    _escape("fork_bomb", "while True:\n    os.fork()"),
    _escape("fork_bomb_ctypes", "while True:\n    libc.fork()", CTYPES),
    Attempt(
        "disk_fill",
        "escape",
        "import os\nn = 0\ntry:\n"
        "    with open('fill', 'wb') as f:\n"
        "        while n < 2 << 30:\n            f.write(b'x' * (1 << 20))\n            n += 1 << 20\n"
        "except OSError:\n    pass\n"
        "def add(a, b):\n    return a + b if n >= 1 << 30 else a - b\n",
    ),
    Attempt(
        "many_files",
        "escape",
        "import os\nn = 0\ntry:\n    while n < 10**6:\n"
        "        open(f'f{n}', 'w').write('x' * 4096)\n        n += 1\n"
        "except OSError:\n    pass\n"
        "def add(a, b):\n    return a + b if n >= 10**6 else a - b\n",
    ),
    Attempt(
        "memory_bomb",
        "escape",
        "a = []\nwhile True:\n    a.append(bytearray(10**7))\ndef add(a, b):\n    return a + b\n",
    ),
    Attempt("infinite_loop", "escape", "while True:\n    pass\ndef add(a, b):\n    return a + b\n"),
    Attempt(
        "sleep_forever",
        "escape",
        "import time\ndef add(a, b):\n    time.sleep(3600)\n    return a + b\n",
    ),
    Attempt(
        "open_file_flood",
        "escape",
        "fs = []\ntry:\n    while len(fs) < 100000:\n        fs.append(open('/dev/null'))\n"
        "except OSError:\n    pass\n"
        "def add(a, b):\n    return a + b if len(fs) >= 100000 else a - b\n",
    ),
    # --- switching the isolation off from inside ---------------------------------
    _escape(
        "drop_seccomp",
        "libc.prctl(22, 0, 0, 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_DISABLED\n"
        "import socket\nsocket.socket(socket.AF_INET)\nescaped = True",
        CTYPES,
    ),
    _escape("unshare_userns", "escaped = libc.unshare(0x10000000) == 0", CTYPES),
    _escape("unshare_netns", "escaped = libc.unshare(0x40000000) == 0", CTYPES),
    _escape("setuid_root", "os.setuid(0)\nescaped = True"),
    _escape(
        "raise_rlimits",
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NPROC, (100000, 100000))\nescaped = True",
    ),
    _escape("mount_tmpfs", "escaped = libc.mount(b'x', b'/usr', b'tmpfs', 0, None) == 0", CTYPES),
    _escape("chroot", "os.chroot('/')\nescaped = True"),
    _escape("ptrace_pid1", "escaped = libc.ptrace(16, 1, 0, 0) == 0  # PTRACE_ATTACH", CTYPES),
    _escape("io_uring", "escaped = libc.syscall(425, 8, 0) >= 0  # io_uring_setup", CTYPES),
    _escape("keyctl", "escaped = libc.syscall(250, 0, 0, 0, 0, 0) >= 0  # keyctl", CTYPES),
    _escape("bpf_syscall", "escaped = libc.syscall(321, 0, 0, 0) >= 0  # bpf", CTYPES),
    # --- gaming the grader ----------------------------------------------------------
    Attempt(
        "eq_always_true",
        "gaming",
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "    def __ne__(self, other):\n        return False\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Any()\n",
    ),
    Attempt(
        "int_subclass_eq",
        "gaming",
        "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)\n",
    ),
    Attempt(
        "list_subclass_repr",
        "gaming",
        "class L(list):\n    def __repr__(self):\n        return '5'\n"
        "def add(a, b):\n    return L()\n",
    ),
    Attempt(
        "excepthook_swallow",
        "gaming",
        "import sys\nsys.excepthook = lambda *a: None\n"
        "def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n",
    ),
    Attempt(
        "exit0_at_import",
        "gaming",
        "import os\ndef add(a, b):\n    return a - b\nos._exit(0)\n",
    ),
    Attempt(
        "exit0_in_function",
        "gaming",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
    ),
    Attempt(
        "sys_exit0_at_import",
        "gaming",
        "import sys\ndef add(a, b):\n    return a - b\nsys.exit(0)\n",
    ),
    Attempt(
        "print_fake_success",
        "gaming",
        "print('completed')\nprint('3 passed, 0 failed')\nprint('OK')\n"
        "def add(a, b):\n    return a - b\n",
    ),
    Attempt(
        "forge_protocol_stdout",
        "gaming",
        "import os, sys\n"
        "for i in range(3):\n"
        '    print(\'{"h": %d, "v": "5"}\' % i)\n'
        "    sys.stdout.flush()\n"
        'os.write(1, b\'{"load": "ok"}\\n\')\n'
        "def add(a, b):\n    return a - b\n",
    ),
    Attempt(
        "forge_protocol_all_fds",
        "gaming",
        "import os\n"
        'lines = b\'\'.join(b\'{"h": %d, "v": "%d"}\\n\' % (i, v) for i, v in enumerate((5, 0, 30)))\n'
        "for fd in range(64):\n"
        '    try:\n        os.write(fd, b\'{"load": "ok"}\\ncompleted\\n\' + lines)\n'
        "    except OSError:\n        pass\n"
        "os._exit(0)\n",
    ),
    Attempt(
        "monkeypatch_builtins",
        "gaming",
        "import builtins\n"
        "builtins.abs = lambda x: 0\nbuiltins.len = lambda x: 3\n"
        "builtins.sorted = lambda x, **k: [1, 2, 3]\nbuiltins.isinstance = lambda *a: True\n"
        "def add(a, b):\n    return [a - b]\n",
        (
            "assert abs(add(0.1, 0.2)[0] - 0.3) < 1e-9",
            "assert len(add(1, 2)) == 3",
            "assert sorted(add(3, 1)) == [1, 2, 3]",
        ),
    ),
    Attempt(
        "patch_harness_serializer",
        "gaming",
        "import sys\nh = sys.modules['__main__']\n"
        "h.plain = lambda v, b, d=0: '5'\n"
        'h.json.dumps = lambda o: \'{"h": 0, "v": "5"}\'\n'
        "def add(a, b):\n    return a - b\n",
    ),
    Attempt(
        "read_tests_from_disk",
        "gaming",
        "import os, re\n"
        "found = {}\n"
        "for root in ('.', '/', '/work', '/tmp'):\n"
        "    try:\n        names = os.listdir(root)\n    except OSError:\n        continue\n"
        "    for n in names:\n"
        "        try:\n            text = open(os.path.join(root, n)).read()\n"
        "        except OSError:\n            continue\n"
        "        for a, b, v in re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', text):\n"
        "            found[(int(a), int(b))] = int(v)\n"
        "def add(a, b):\n    return found.get((a, b), a - b)\n",
    ),
    Attempt(
        "read_tests_from_memory",
        "gaming",
        "import gc, re, sys\n"
        "found = {}\n"
        "f = sys._getframe()\n"
        "texts = []\n"
        "while f is not None:\n    texts.append(repr(f.f_locals))\n    f = f.f_back\n"
        "texts += [o for o in gc.get_objects() if isinstance(o, str)]\n"
        "texts += [repr(o) for o in gc.get_objects() if isinstance(o, (dict, list))][:2000]\n"
        "for t in texts:\n"
        "    for a, b, v in re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', t):\n"
        "        found[(int(a), int(b))] = int(v)\n"
        "def add(a, b):\n    return found.get((a, b), a - b)\n",
    ),
    Attempt(
        "read_tests_from_proc",
        "gaming",
        "import glob, re\nfound = {}\n"
        "for p in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ'):\n"
        "    try:\n        t = open(p, 'rb').read().decode('utf-8', 'replace')\n"
        "    except OSError:\n        continue\n"
        "    for a, b, v in re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', t):\n"
        "        found[(int(a), int(b))] = int(v)\n"
        "def add(a, b):\n    return found.get((a, b), a - b)\n",
    ),
    Attempt("nan_result", "gaming", "def add(a, b):\n    return float('nan')\n"),
    Attempt("generator_result", "gaming", "def add(a, b):\n    yield a + b\n"),
    Attempt(
        "systemexit_in_function",
        "gaming",
        "def add(a, b):\n    raise SystemExit(0)\n",
    ),
    Attempt(
        "truthy_object",
        "gaming",
        "class T:\n    def __bool__(self):\n        return True\ndef is_pos(x):\n    return T()\n",
        ("assert is_pos(3)", "assert not is_pos(-3)"),
    ),
    Attempt(
        "string_for_number",
        "gaming",
        "def add(a, b):\n    return str(a + b)\n",
    ),
    Attempt(
        "slow_until_timeout",
        "gaming",
        "import time\ndef add(a, b):\n    time.sleep(30)\n",
    ),
    # --- controls: correct code, odd but harmless behaviour ----------------------
    Attempt("plain", "control", "def add(a, b):\n    return a + b\n"),
    Attempt(
        "prints_assertionerror",
        "control",
        "import sys\nprint('AssertionError: this is just text')\n"
        "print('Traceback (most recent call last):', file=sys.stderr)\n"
        "def add(a, b):\n    print('AssertionError')\n    return a + b\n",
    ),
    Attempt(
        "scratch_file",
        "control",
        "open('scratch.txt', 'w').write('5')\n"
        "import tempfile\nwith tempfile.TemporaryFile() as t:\n    t.write(b'x')\n"
        "def add(a, b):\n    return a + b\n",
    ),
    Attempt(
        "uses_thread",
        "control",
        "import threading\nout = []\n"
        "def add(a, b):\n    t = threading.Thread(target=lambda: out.append(a + b))\n"
        "    t.start()\n    t.join()\n    return out.pop()\n",
    ),
    Attempt(
        "sets_excepthook",
        "control",
        "import sys\nsys.excepthook = lambda *a: None\ndef add(a, b):\n    return a + b\n",
    ),
    Attempt(
        "stdlib_imports",
        "control",
        "import math, json, itertools, functools, collections, re, fractions, decimal\n"
        "def add(a, b):\n"
        "    return int(fractions.Fraction(a) + fractions.Fraction(b)) + int(decimal.Decimal(0))\n",
    ),
    Attempt(
        "recursion_cache",
        "control",
        "from functools import lru_cache\n@lru_cache(None)\n"
        "def add(a, b):\n    return a if b == 0 else (add(a + 1, b - 1) if b > 0 else add(a - 1, b + 1))\n",
    ),
    Attempt(
        "float_tolerance",
        "control",
        "def add(a, b):\n    return a + b\n",
        (
            "import math",
            "assert abs(add(0.1, 0.2) - 0.3) < 1e-9",
            "assert math.isclose(add(1e-12, 1), 1)",
        ),
    ),
    Attempt(
        "containers",
        "control",
        "def stats(xs):\n    return {'n': len(xs), 'set': set(xs), 'pair': (min(xs), max(xs)), 'rev': xs[::-1]}\n",
        (
            "assert stats([3, 1, 3]) == {'n': 3, 'set': {1, 3}, 'pair': (1, 3), 'rev': [3, 1, 3]}",
            "assert sorted(stats([2, 1])['set']) == [1, 2]",
            "assert stats([5])['pair'][0] == 5",
        ),
    ),
    Attempt(
        "main_guard_with_input",
        "control",
        "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(int(input()), 1))\n",
    ),
    Attempt(
        "computes_a_while",
        "control",
        "def add(a, b):\n    return sum(range(200000)) * 0 + a + b\n",
    ),
    Attempt(
        "expected_from_expression",
        "control",
        "def add(a, b):\n    return a + b\n",
        (
            "assert add(2, 3) == sum(range(6)) - 10",
            "assert [add(i, i) for i in range(3)] == list(range(0, 6, 2))",
        ),
    ),
]


# --- the runner -----------------------------------------------------------------


class Listeners:
    """Endpoints on this host that an escaped process could reach; counts contacts."""

    def __init__(self, canary: Path) -> None:
        self.hits: dict[str, int] = {}
        self._sel = selectors.DefaultSelector()
        self._stop = False
        self.ports: dict[str, Any] = {}
        tcp = socket.create_server(("127.0.0.1", 0))
        self._add("tcp", tcp)
        self.ports["TCP"] = tcp.getsockname()[1]
        try:
            tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
            self._add("tcp6", tcp6)
            self.ports["TCP6"] = tcp6.getsockname()[1]
        except OSError:
            self.ports["TCP6"] = 9
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        self._add("udp", udp)
        self.ports["UDP"] = udp.getsockname()[1]
        name = "tapd-attack-" + secrets.token_hex(6)
        abstract = socket.socket(socket.AF_UNIX)
        abstract.bind("\0" + name)
        abstract.listen()
        self._add("abstract", abstract)
        self.ports["ABSTRACT"] = name
        path = str(canary / "sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(path)
        unix.listen()
        os.chmod(path, 0o777)
        self._add("unix", unix)
        self.ports["UNIXPATH"] = path
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _add(self, name: str, s: socket.socket) -> None:
        s.setblocking(False)
        self.hits[name] = 0
        self._sel.register(s, selectors.EVENT_READ, name)

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.1):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                self.hits[key.data] += 1
                with contextlib.suppress(OSError):
                    if s.type == socket.SOCK_DGRAM:
                        s.recvfrom(100)
                    else:
                        s.accept()[0].close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def _fill(text: str, subs: dict[str, str]) -> str:
    for k, v in subs.items():
        text = text.replace(f"@{k}@", v)
    return text


def run_corpus(ctx: dict[str, Any]) -> dict[str, Any]:
    """Run every attempt through the code verifier; report rewards and outside evidence.

    ``ctx``: ``shadow_line`` (what /etc/shadow starts with, or a stand-in),
    ``victim_uid`` (uid for the process the attempts try to kill: the uid
    the sandbox's processes have outside it).
    """
    from daemon.config import VerifySettings
    from daemon.verify.registry import CodeVerifier, configure
    from daemon.verify.sandbox import isolation, sandbox_pids
    from daemon.verify.settings import current

    before = current()
    configure(VerifySettings(max_concurrent=4))
    canary = Path(tempfile.mkdtemp(prefix="tapd-attack-"))
    os.chmod(canary, 0o755)  # visible to the sandbox's uid, if it could see it at all
    secret_path = canary / "secret"
    secret = secrets.token_hex(16)
    secret_path.write_text(secret)
    os.chmod(secret_path, 0o600)
    token = secrets.token_hex(16)
    # The canary token is in this process's environment for the run only: the
    # tests that run after it in this process read their settings from it.
    token_before = os.environ.get("TAPD_SERVICE__ADMIN_TOKEN")
    os.environ["TAPD_SERVICE__ADMIN_TOKEN"] = token
    listeners = Listeners(canary)
    victim_cmd = [sys.executable, "-c", "import time; time.sleep(600)"]
    if ctx.get("victim_uid") not in (None, os.geteuid()):
        uid = int(ctx["victim_uid"])
        victim_cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *victim_cmd]
    victim = subprocess.Popen(victim_cmd, start_new_session=True)
    subs = {
        "TOKEN": token,
        "SECRET": secret,
        "SECRET_PATH": str(secret_path),
        "SHADOW": str(ctx.get("shadow_line") or "no shadow"),
        "CANARY": str(canary),
        "VICTIM": str(victim.pid),
        "PARENT": str(os.getpid()),
        "PARENT_PGID": str(os.getpgid(0)),
        "PARENT_CWD": os.getcwd(),
        **{k: str(v) for k, v in listeners.ports.items()},
    }
    watched = [Path("/etc/tapd-escape"), Path("/usr/tapd-escape"), Path("/tapd-escape")]
    leftovers_before = set(os.listdir(tempfile.gettempdir()))
    pids_before = set(sandbox_pids())

    def one(a: Attempt) -> dict[str, Any]:
        v = CodeVerifier({"tests": [_fill(t, subs) for t in a.tests], "timeout_s": 1.0})
        t0 = time.monotonic()
        verdict = v.verdict(_fill(a.code, subs), "")
        return {
            "name": a.name,
            "kind": a.kind,
            "reward": verdict.reward,
            "reason": verdict.reason,
            "seconds": round(time.monotonic() - t0, 3),
        }

    try:
        iso = isolation()
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, ATTEMPTS))
        elapsed = time.monotonic() - t0
        time.sleep(0.5)  # anything that outlived its verdict would still be here
        survivors = sorted(set(sandbox_pids()) - pids_before)
        evidence = {
            "listener_hits": {k: v for k, v in listeners.hits.items() if v},
            "files_created": sorted(
                [p.name for p in canary.iterdir() if p.name not in ("sock", "secret")]
                + [str(p) for p in watched if p.exists()]
            ),
            "victim_killed": victim.poll() is not None,
            "sandbox_processes_left": survivors,
            "host_temp_leftovers": sorted(
                n
                for n in set(os.listdir(tempfile.gettempdir())) - leftovers_before
                if n.startswith("tapd-sbx")
            ),
        }
    finally:
        listeners.close()
        victim.kill()
        victim.wait()
        for pid in set(sandbox_pids()) - pids_before:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(canary, ignore_errors=True)
        configure(before)
        if token_before is None:
            os.environ.pop("TAPD_SERVICE__ADMIN_TOKEN", None)
        else:
            os.environ["TAPD_SERVICE__ADMIN_TOKEN"] = token_before
    return {
        "uid": os.geteuid(),
        "isolation": iso.describe(),
        "results": results,
        "evidence": evidence,
        "seconds": round(elapsed, 2),
    }


def main() -> None:
    """``[CTX.json] [--summary]``: the report as JSON (last line), or a summary."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        ctx = json.loads(Path(args[0]).read_text())
    else:
        try:
            shadow: str | None = Path("/etc/shadow").read_text().splitlines()[0]
        except (OSError, IndexError):
            shadow = None
        ctx = {"shadow_line": shadow, "victim_uid": 65534 if os.geteuid() == 0 else None}
    report = run_corpus(ctx)
    if "--summary" not in sys.argv:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    results = report["results"]
    for kind in ("escape", "gaming", "control"):
        mine = [r for r in results if r["kind"] == kind]
        print(f"{kind}: {len(mine)} attempts, rewarded {sum(r['reward'] == 1.0 for r in mine)}")
    ev = report["evidence"]
    print(f"evidence outside the sandbox: {ev}")
    print(f"uid {report['uid']}; {report['isolation']}")
    slowest = max(results, key=lambda r: r["seconds"])
    print(
        f"{len(results)} attempts in {report['seconds']} s (4 at a time); slowest "
        f"{slowest['name']} {slowest['seconds']} s"
    )


if __name__ == "__main__":
    main()
