"""The `unprivileged` fixture: running tapd's verifier as an unprivileged user, from root.

The unprivileged user cannot be assumed to read the checkout or the virtual
environment (either may sit under a root-only directory), so the fixture
copies what the verifier imports (the product packages, the third-party
packages they load, this folder's corpus) into a world-readable temporary
tree and runs the system's interpreter of the same Python version on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The uid tapd's image runs as; any uid without a passwd entry works with setpriv.
UNPRIVILEGED_UID = 10001
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Unprivileged:
    uid: int
    python: str
    pythonpath: str
    tree: Path

    def command(self, *argv: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            "--clear-groups",
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            f"PYTHONPATH={self.pythonpath}",
            f"HOME={self.tree}",
            "LANG=C.UTF-8",
            self.python,
            *argv,
        ]


_ROOTS = """
import json, sys
from pathlib import Path
import daemon.verify.registry, daemon.verify.sandbox, sandbox_attacks
import pyseccomp, re2  # imported lazily by tapd
site = [Path(p) for p in sys.path if p.endswith("site-packages")]
roots = set()
for module in list(sys.modules.values()):
    f = getattr(module, "__file__", None)
    for s in site:
        if f and s in Path(f).parents:
            top = s / Path(f).relative_to(s).parts[0]
            if not top.name.startswith(("__editable__", "_distutils_hack")):
                roots.add(str(top))
print(json.dumps(sorted(roots)))
"""


def _third_party_roots() -> list[Path]:
    """Top-level files/folders of the non-stdlib modules the verifier loads, found in
    a fresh interpreter (the test process has loaded much more)."""
    out = subprocess.run(
        [sys.executable, "-c", _ROOTS],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{Path(__file__).parent}"},
        timeout=120,
    )
    return [Path(p) for p in json.loads(out.stdout)]


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the unprivileged sandbox run must happen)")
    pytest.skip(reason)


@contextlib.contextmanager
def unprivileged_tree() -> Iterator[Unprivileged]:
    """A world-readable copy of what the verifier needs; skips (fails in CI) if unusable."""
    if os.geteuid() != 0:
        pytest.skip("not root: the tests already run unprivileged")
    if shutil.which("setpriv") is None:
        _missing("setpriv (util-linux) not found")
    major, minor = sys.version_info[:2]
    python = shutil.which(f"python{major}.{minor}", path="/usr/bin:/usr/local/bin")
    if python is None:
        _missing(f"no system python{major}.{minor} for the unprivileged user")
    assert python is not None
    # Under the system temp dir (world-traversable), not pytest's (root only).
    tree = Path(tempfile.mkdtemp(prefix="tapd-unprivileged-"))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for pkg in ("daemon", "streams"):
            shutil.copytree(ROOT / pkg, tree / "src" / pkg, ignore=ignore)
        shutil.copy(Path(__file__).with_name("sandbox_attacks.py"), tree / "src")
        for top in _third_party_roots():
            dest = tree / "site" / top.name
            if top.is_dir():
                shutil.copytree(top, dest, ignore=ignore)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(top, dest)
        for dirpath, _, filenames in os.walk(tree):
            os.chmod(dirpath, 0o755)
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), 0o644)
        u = Unprivileged(UNPRIVILEGED_UID, python, f"{tree / 'src'}:{tree / 'site'}", tree)
        check = subprocess.run(
            u.command("-c", "import daemon.verify.registry, sandbox_attacks"),
            capture_output=True,
            text=True,
            cwd=tree,
            timeout=120,
        )
        if check.returncode != 0:
            _missing(f"uid {u.uid} cannot import tapd from {tree}: {check.stderr[-500:]}")
        yield u
    finally:
        shutil.rmtree(tree, ignore_errors=True)
