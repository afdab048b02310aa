"""The code verifier's harness. It runs INSIDE the sandbox; tapd never imports it.

:mod:`daemon.verify.sandbox` sends this file's text as
``python -I -S -B -c <text>``; the input arrives on stdin as one JSON object:

``source``   the candidate's code, run as module ``solution``;
``imports``  the tests' import statements, run after it in its namespace;
``holes``    expressions to evaluate there, e.g. ``add(2, 3)``;
``rlimits``  resource limits to set before anything else;
``seccomp``  a BPF program (hex) that kills the process on exec, fork,
             non-AF_UNIX sockets and other kernel surfaces, from here on.

It writes JSON lines to the result channel (its original stdout):
``{"ready": 1}`` once set up, ``{"load": "ok"}`` or ``{"load": "error", "type":
...}``, then ``{"h": i, "v": <repr of a plain value>}`` or ``{"h": i, "e":
<exception name>}`` per hole. The candidate's own prints go to stderr.

Nothing here is trusted by the parent. The candidate runs in this process and
can rewrite all of it (the result channel included); that is why the parent
sends no expected values, no tests and no verdict channel, only the
expressions whose values it needs, and compares the values itself. A
candidate that takes over this process can only choose the values of its own
expressions, which is what any function can do by returning them.
"""

import builtins
import contextlib
import ctypes
import json
import math
import os
import resource
import sys
from typing import Any

_MAX_DEPTH = 64


class _Budget:
    def __init__(self, chars: int) -> None:
        self.left = chars

    def take(self, s: str) -> str:
        self.left -= len(s)
        if self.left < 0:
            raise ValueError("value too large")
        return s


def plain(v: Any, budget: _Budget, depth: int = 0) -> str:
    """``repr`` of a plain value (exact builtin types only), for ``ast.literal_eval``.

    Subclasses are refused: an ``int`` subclass could claim any equality.
    """
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(v)
    if v is None or t is bool:
        return budget.take(repr(v))
    if t is int:
        return budget.take(int.__repr__(v))
    if t is float:
        if math.isnan(v):
            raise ValueError("nan equals nothing")
        if math.isinf(v):
            return budget.take("1e999" if v > 0 else "-1e999")
        return budget.take(float.__repr__(v))
    if t is complex:
        if not (math.isfinite(v.real) and math.isfinite(v.imag)):
            raise ValueError("complex value not finite")
        return budget.take(complex.__repr__(v))
    if t is str:
        return budget.take(str.__repr__(v))
    if t is bytes:
        return budget.take(bytes.__repr__(v))
    if t is list or t is tuple:
        items = [plain(x, budget, depth + 1) for x in (list if t is list else tuple).__iter__(v)]
        if t is list:
            return "[" + ", ".join(items) + "]"
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if t is set or t is frozenset:
        items = sorted(plain(x, budget, depth + 1) for x in t.__iter__(v))
        return "{" + ", ".join(items) + "}" if items else "set()"
    if t is dict:
        pairs = [
            plain(k, budget, depth + 1) + ": " + plain(x, budget, depth + 1)
            for k, x in dict.items(v)
        ]
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"not a plain value: {t.__name__}")


def _load_seccomp(program: bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    # PR_SET_NO_NEW_PRIVS = 38 (bwrap has set it already), PR_SET_SECCOMP = 22,
    # SECCOMP_MODE_FILTER = 2
    if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _name(e: BaseException) -> str:
    name = type.__dict__["__name__"].__get__(type(e))
    return name if type(name) is str else "?"


def _exit() -> None:
    # The candidate's prints, for diagnostics; then no atexit hook of its own.
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            f.flush()
    os._exit(0)


def main() -> None:
    data = json.loads(sys.stdin.buffer.read())
    for name, value in data["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if data.get("seccomp"):
        _load_seccomp(bytes.fromhex(data["seccomp"]))
    out = os.dup(1)
    os.dup2(2, 1)  # the candidate's prints are diagnostics, never results
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    budget = _Budget(int(data["max_chars"]))
    write = os.write
    dumps = json.dumps

    def emit(obj: object) -> None:
        line = (dumps(obj) + "\n").encode()
        while line:
            line = line[write(out, line) :]

    emit({"ready": 1})
    g = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(data["source"], "solution.py", "exec"), g)
        for stmt in data["imports"]:
            exec(compile(stmt, "<test>", "exec"), g)
    except BaseException as e:  # SystemExit too: the tests never ran
        emit({"load": "error", "type": _name(e)})
        _exit()
    emit({"load": "ok"})
    for i, src in enumerate(data["holes"]):
        try:
            text = plain(eval(compile(src, "<test>", "eval"), g), budget)
        except BaseException as e:
            emit({"h": i, "e": _name(e)})
            continue
        emit({"h": i, "v": text})
    _exit()


if __name__ == "__main__":
    main()
