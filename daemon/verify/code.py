"""The ``code`` verifier: the parent decides, from plain values, never from the child's word.

Tests are ``assert`` statements (and the imports they need), given in
``verifier_args.tests`` or as the reference. Each assertion is split, in the
parent, into

* the parts the parent evaluates itself over plain values: literals,
  comparisons, ``and``/``or``/``not``, arithmetic, indexing, and a short list
  of pure builtins (``abs``, ``len``, ``sorted``, ``set``, ``round``,
  ``math.isclose``, ...);
* **holes**: the smallest sub-expressions it cannot, e.g. ``add(2, 3)``.

Holes that use the candidate's names are evaluated in the candidate's run:
its code runs as module ``solution`` in the sandbox and the harness sends
back each hole's value as the ``repr`` of a *plain* value (exact builtin
types, so no custom ``__eq__``). Holes that use only builtins and the tests'
imports (``list(range(5))``) are evaluated once in a run without the
candidate's code. The parent parses the values with ``ast.literal_eval`` and
evaluates the assertions itself.

So the child never sees an expected value nor the test file, and nothing it
prints, writes or exits with is a verdict: an always-true ``__eq__``, an
excepthook, ``os._exit(0)``, printing "OK" or reading files earn nothing;
correct code that prints "AssertionError" passes. The reward is 1.0 when
every assertion holds, else 0.0.
"""

from __future__ import annotations

import ast
import builtins
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.verify.sandbox import SandboxLimits, SandboxRun, run_code

_MAX_DEPTH = 48
_BUILTIN_NAMES = frozenset(dir(builtins))


class SuiteError(ValueError):
    """Tests this verifier cannot run; the caller names the field (tests or reference)."""


# --- what the parent evaluates itself ------------------------------------------

_TYPES: Mapping[str, type] = {
    t.__name__: t
    for t in (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)
}
_SAFE: Mapping[str, Callable[..., Any]] = {
    "abs": abs,
    "all": all,
    "any": any,
    "bool": bool,
    "chr": chr,
    "dict": dict,
    "divmod": divmod,
    "enumerate": enumerate,
    "float": float,
    "frozenset": frozenset,
    "int": int,
    "isinstance": isinstance,
    "len": len,
    "list": list,
    "max": max,
    "min": min,
    "ord": ord,
    "reversed": reversed,
    "round": round,
    "set": set,
    "sorted": sorted,
    "str": str,
    "sum": sum,
    "tuple": tuple,
    "type": type,
    "zip": zip,
}
_MATH: Mapping[str, Any] = {
    name: getattr(math, name)
    for name in (
        "isclose",
        "fabs",
        "sqrt",
        "floor",
        "ceil",
        "trunc",
        "isnan",
        "isinf",
        "isfinite",
        "log",
        "log2",
        "log10",
        "exp",
        "sin",
        "cos",
        "tan",
        "pi",
        "e",
        "inf",
        "nan",
        "tau",
    )
}
_KWARGS = frozenset({"reverse", "ndigits", "rel_tol", "abs_tol", "default", "start", "strict"})
_BINOPS: Mapping[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS: Mapping[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: operator.contains(b, a),
    ast.NotIn: lambda a, b: not operator.contains(b, a),
}
_NUMBER = (int, float, complex)


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    """Arithmetic on plain values with bounded cost (no sequence repetition, small powers)."""
    if type(op) is ast.Add and type(a) is type(b) and isinstance(a, str | bytes | list | tuple):
        return a + b
    if not (isinstance(a, _NUMBER) and isinstance(b, _NUMBER)):
        raise TypeError("arithmetic needs numbers")
    if type(op) is ast.Pow:
        if isinstance(b, int) and (abs(b) > 64 or (isinstance(a, int) and a.bit_length() > 4096)):
            raise OverflowError("power too large")
        if isinstance(a, int) and isinstance(b, float) and a.bit_length() > 1024:
            raise OverflowError("power too large")
    return _BINOPS[type(op)](a, b)


class _Hole:
    """Marks a sub-expression whose value comes from a sandbox run."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Missing(Exception):
    """A hole without a value (the run raised, timed out or lied): the check fails."""


def _evaluate(node: ast.expr, values: Mapping[int, Any]) -> Any:
    """Evaluate a check (holes already marked) over plain values; raises on failure."""
    if isinstance(node, ast.Name) and node.id.startswith("__tapd_hole_"):
        i = int(node.id.removeprefix("__tapd_hole_"))
        if i not in values:
            raise _Missing(i)
        return values[i]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _TYPES[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(e, values) for e in node.elts)
    if isinstance(node, ast.List):
        return [_evaluate(e, values) for e in node.elts]
    if isinstance(node, ast.Set):
        return {_evaluate(e, values) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {
            _evaluate(k, values): _evaluate(v, values)
            for k, v in zip(node.keys, node.values, strict=True)
            if k is not None
        }
    if isinstance(node, ast.UnaryOp):
        v = _evaluate(node.operand, values)
        if isinstance(node.op, ast.Not):
            return not v
        if not isinstance(v, _NUMBER):
            raise TypeError("unary operator needs a number")
        if isinstance(node.op, ast.USub):
            return -v
        if isinstance(node.op, ast.UAdd):
            return +v
        return ~v  # type: ignore[operator]
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.BoolOp):
        result: Any = None
        for e in node.values:
            result = _evaluate(e, values)
            if isinstance(node.op, ast.And) and not result:
                return result
            if isinstance(node.op, ast.Or) and result:
                return result
        return result
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(comparator, values)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        chosen = node.body if _evaluate(node.test, values) else node.orelse
        return _evaluate(chosen, values)
    if isinstance(node, ast.Subscript):
        container = _evaluate(node.value, values)
        if isinstance(node.slice, ast.Slice):
            s = node.slice
            parts = [
                None if p is None else _evaluate(p, values) for p in (s.lower, s.upper, s.step)
            ]
            return container[slice(*parts)]
        return container[_evaluate(node.slice, values)]
    if isinstance(node, ast.Attribute):  # math.pi and friends
        return _MATH[node.attr]
    if isinstance(node, ast.Call):
        fn = _MATH[node.func.attr] if isinstance(node.func, ast.Attribute) else None
        if fn is None and isinstance(node.func, ast.Name):
            fn = _SAFE[node.func.id]
        args = [_evaluate(a, values) for a in node.args]
        kwargs = {k.arg: _evaluate(k.value, values) for k in node.keywords if k.arg}
        if fn is str and args and isinstance(args[0], int) and abs(args[0]).bit_length() > 14000:
            raise ValueError("integer too large to format")
        if fn is round:
            # round(n, -10**9) would compute 10**(10**9) in the parent.
            digits = args[1] if len(args) > 1 else kwargs.get("ndigits", 0)
            if not isinstance(digits, int) or abs(digits) > 64:
                raise ValueError("ndigits out of range")
        assert fn is not None
        out = fn(*args, **kwargs)
        # Iterators (zip, enumerate, reversed) are consumed by an enclosing call.
        return out
    raise TypeError(f"cannot evaluate {type(node).__name__}")


def _parent_evaluable(node: ast.expr) -> bool:
    """Whether the parent can evaluate ``node`` itself, given its children."""
    if isinstance(node, ast.Constant):
        return not isinstance(node.value, type(...))
    if isinstance(node, ast.Name):
        return node.id in _TYPES
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in _MATH
    if isinstance(node, ast.Call):
        f = node.func
        known = (isinstance(f, ast.Name) and f.id in _SAFE) or (
            isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name)
            and f.value.id == "math"
            and f.attr in _MATH
        )
        return (
            known
            and not any(isinstance(a, ast.Starred) for a in node.args)
            and all(k.arg in _KWARGS for k in node.keywords)
        )
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return not any(isinstance(e, ast.Starred) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None for k in node.keys)
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINOPS
    if isinstance(node, ast.Compare):
        return all(type(op) in _CMPOPS for op in node.ops)
    return isinstance(node, ast.UnaryOp | ast.BoolOp | ast.IfExp | ast.Subscript)


def _map_children(node: ast.expr, f: Callable[[ast.expr], ast.expr]) -> None:
    """Replace the evaluated children of a parent-evaluable node by ``f(child)``."""
    if isinstance(node, ast.Call):
        node.args = [f(a) for a in node.args]
        for k in node.keywords:
            k.value = f(k.value)
    elif isinstance(node, ast.Subscript):
        node.value = f(node.value)
        if isinstance(node.slice, ast.Slice):
            for part in ("lower", "upper", "step"):
                if getattr(node.slice, part) is not None:
                    setattr(node.slice, part, f(getattr(node.slice, part)))
        else:
            node.slice = f(node.slice)
    elif isinstance(node, ast.Tuple | ast.List | ast.Set):
        node.elts = [f(e) for e in node.elts]
    elif isinstance(node, ast.Dict):
        node.keys = [None if k is None else f(k) for k in node.keys]
        node.values = [f(v) for v in node.values]
    elif isinstance(node, ast.UnaryOp):
        node.operand = f(node.operand)
    elif isinstance(node, ast.BinOp):
        node.left, node.right = f(node.left), f(node.right)
    elif isinstance(node, ast.BoolOp):
        node.values = [f(v) for v in node.values]
    elif isinstance(node, ast.Compare):
        node.left = f(node.left)
        node.comparators = [f(c) for c in node.comparators]
    elif isinstance(node, ast.IfExp):
        node.test, node.body, node.orelse = f(node.test), f(node.body), f(node.orelse)


def _fully_evaluable(node: ast.expr) -> bool:
    """Whether the parent can evaluate the whole subtree (no hole in it)."""
    ok = _parent_evaluable(node)
    if ok:

        def visit(child: ast.expr) -> ast.expr:
            nonlocal ok
            ok = ok and _fully_evaluable(child)
            return child

        _map_children(node, visit)
    return ok


def _depth(node: ast.AST) -> int:
    todo = [(node, 1)]
    deepest = 0
    while todo:
        n, d = todo.pop()
        deepest = max(deepest, d)
        if deepest > _MAX_DEPTH:
            return deepest
        todo += [(c, d + 1) for c in ast.iter_child_nodes(n)]
    return deepest


def _free_names(node: ast.AST) -> set[str]:
    loaded: set[str] = set()
    bound: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (loaded if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
    return loaded - bound


# --- the suite -----------------------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """Tests split into parent-evaluated checks and sandbox-evaluated holes."""

    imports: tuple[str, ...]
    checks: tuple[ast.expr, ...]  # holes replaced by names ``__tapd_hole_<i>``
    holes: tuple[str, ...]  # expression sources
    candidate_side: frozenset[int]  # holes that use the candidate's names

    @property
    def expected_side(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.holes)) if i not in self.candidate_side)


def parse_tests(text: str, *, max_tests: int, max_chars: int) -> Suite:
    """Split test source into checks and holes; :class:`SuiteError` says what is wrong."""
    if len(text) > max_chars:
        raise SuiteError(f"{len(text)} characters of tests, over the cap of {max_chars}")
    try:
        module = ast.parse(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise SuiteError(f"tests do not parse: {e}") from None
    if _depth(module) > _MAX_DEPTH:
        raise SuiteError(f"tests nest deeper than {_MAX_DEPTH}")
    imports: list[str] = []
    asserts: list[ast.expr] = []
    imported: set[str] = set()
    for stmt in module.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            if any(a.name == "*" for a in stmt.names):
                raise SuiteError(f"line {stmt.lineno}: `import *` hides which names are imported")
            imported |= {(a.asname or a.name).split(".")[0] for a in stmt.names}
            imports.append(ast.unparse(stmt))
        elif isinstance(stmt, ast.Assert):
            asserts.append(stmt.test)
        elif isinstance(stmt, ast.Pass) or (
            isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
        ):
            continue
        else:
            raise SuiteError(
                f"line {stmt.lineno}: only assert statements and imports can be tests "
                f"(got {type(stmt).__name__}; helpers would run beside the candidate's code)"
            )
    if not asserts:
        raise SuiteError("no assert statements")
    if len(asserts) > max_tests:
        raise SuiteError(f"{len(asserts)} assertions, over the cap of {max_tests}")

    holes: list[str] = []
    index: dict[str, int] = {}
    candidate: set[int] = set()
    known = _BUILTIN_NAMES | imported

    def hole(node: ast.expr) -> ast.expr:
        src = ast.unparse(node)
        if src not in index:
            index[src] = len(holes)
            holes.append(src)
            if _free_names(node) - known:
                candidate.add(index[src])
        return ast.copy_location(ast.Name(id=f"__tapd_hole_{index[src]}", ctx=ast.Load()), node)

    def mark(node: ast.expr) -> ast.expr:
        if not _free_names(node) - known and not _fully_evaluable(node):
            # Test-side only (``sum(range(5))``): one hole, run without the candidate.
            return hole(node)
        if not _parent_evaluable(node):
            return hole(node)
        _map_children(node, mark)
        return node

    checks = tuple(mark(a) for a in asserts)
    if not candidate:
        raise SuiteError(
            "no assertion uses the candidate's code (every expression uses only builtins "
            "and imports), so any completion would pass"
        )
    return Suite(tuple(imports), checks, tuple(holes), frozenset(candidate))


# --- judging -------------------------------------------------------------------


def _plain_values(run: SandboxRun, wanted: Sequence[int]) -> dict[int, Any]:
    """Values of holes ``wanted`` (sent in that order) parsed as literals; anything
    else (an error, no value, not a literal) is left out, and its checks fail."""
    out: dict[int, Any] = {}
    if run.violation or run.load_error is not None:
        return out
    for j, i in enumerate(wanted):
        text = run.values.get(j)
        if text is None:
            continue
        try:
            out[i] = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
    return out


def _holds(check: ast.expr, values: Mapping[int, Any]) -> bool:
    try:
        return bool(_evaluate(check, values))
    except (_Missing, Exception):
        return False


@dataclass(frozen=True)
class Verdict:
    passed: int
    total: int
    reason: str  # "ok", "syntax error", "load error: X", "timeout", "protocol: ...", "failed"
    run: SandboxRun | None

    @property
    def reward(self) -> float:
        return 1.0 if self.total and self.passed == self.total else 0.0


_BINDING = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Import,
    ast.ImportFrom,
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.For,
    ast.AsyncFor,
    ast.With,
    ast.AsyncWith,
    ast.Try,
    ast.TryStar,
    ast.ExceptHandler,
    ast.Global,
    ast.Nonlocal,
    ast.Delete,
    ast.NamedExpr,
    ast.Lambda,
    ast.comprehension,
    ast.Match,
)


def inert(source: str) -> bool:
    """Whether the code cannot define anything, so every candidate hole fails.

    True when it does not parse, or binds no name (no def, class, import,
    assignment, loop target, ...) and calls nothing but unbound non-builtin
    names, which raise NameError before their arguments are evaluated (so
    ``exec``/``globals()`` cannot sneak a definition in). Most known-bad
    answers in reward-trust probing ("", "B", "not 82", "assert f() == 8")
    are inert: they fail without a sandbox run.
    """
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return True
    for node in ast.walk(module):
        if isinstance(node, _BINDING):
            return False
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            return False
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id not in _BUILTIN_NAMES
        ):
            return False
    return True


class ExpectedValues:
    """Values of the test-side holes, computed once per suite in a run without
    the candidate's code."""

    def __init__(self, suite: Suite, limits: SandboxLimits) -> None:
        self.suite = suite
        self.limits = limits
        self._values: dict[int, Any] | None = None

    @property
    def known(self) -> bool:
        """Whether no sandbox run is needed to :meth:`get` them."""
        return self._values is not None or not self.suite.expected_side

    def get(self) -> dict[int, Any]:
        if self._values is None:
            wanted = self.suite.expected_side
            values: dict[int, Any] = {}
            if wanted:
                holes = [self.suite.holes[i] for i in wanted]
                run = run_code("", holes, self.limits, imports=self.suite.imports)
                values = _plain_values(run, wanted)
                for j, i in enumerate(wanted):
                    if i not in values:
                        why = (
                            "timed out"
                            if run.timed_out
                            else run.load_error or run.errors.get(j) or "not a plain value"
                        )
                        raise SuiteError(f"the tests' expression {holes[j]!r} failed: {why}")
            self._values = values
        return self._values


def judge(source: str, suite: Suite, expected: ExpectedValues, limits: SandboxLimits) -> Verdict:
    """Run ``source`` against ``suite`` in the sandbox; the parent decides."""
    n = len(suite.checks)
    if inert(source):
        return Verdict(0, n, "defines nothing", None)
    base = expected.get()
    wanted = sorted(suite.candidate_side)
    run = run_code(source, [suite.holes[i] for i in wanted], limits, imports=suite.imports)
    values = {**_plain_values(run, wanted), **base}
    passed = sum(_holds(c, values) for c in suite.checks)
    if run.violation:
        return Verdict(0, n, f"protocol: {run.violation}", run)
    if run.load_error is not None:
        return Verdict(0, n, f"load error: {run.load_error}", run)
    if passed == n:
        return Verdict(passed, n, "ok", run)
    return Verdict(passed, n, "timeout" if run.timed_out else "failed", run)


def extract_code(completion: str) -> str:
    """The code of a completion: its first markdown fence if it has one (no regex)."""
    start = completion.find("```")
    if start < 0:
        return completion
    nl = completion.find("\n", start)
    if nl < 0:
        return completion
    tag = completion[start + 3 : nl].strip()
    if tag not in ("", "python", "py", "python3"):
        return completion
    end = completion.find("```", nl + 1)
    return completion[nl + 1 : end if end >= 0 else len(completion)]
