"""A CPU allotment per process, as a pod's ``resources.limits.cpu`` gives one.

On a machine with few cores, processes that a deployment would run on
separate nodes (each scorer replica, the broker) compete for the same cores,
and a scaling benchmark then measures the machine rather than the design.
Giving each replica its own CFS quota (a kernel cgroup, the mechanism the
kubelet uses for CPU limits) makes each one a fixed-size unit of compute, so
"does a second replica double the rate" becomes answerable.

Both cgroup layouts are handled: v1 (a ``cpu`` hierarchy with
``cpu.cfs_quota_us``) and v2 (``cpu.max``). Creating a group needs write
access to the hierarchy (root, or a delegated subtree); where that is missing,
:func:`unavailable` says why and the benchmark reports it instead of a figure.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


def _hierarchy() -> tuple[Path, str] | None:
    """The directory to create groups in and its layout ("v1" or "v2")."""
    v1 = _ROOT / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1, "v1"
    controllers = _ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _ROOT, "v2"
    return None


def unavailable() -> str | None:
    """Why per-process CPU quotas cannot be set here, or None when they can."""
    found = _hierarchy()
    if found is None:
        return "no cgroup cpu controller mounted"
    base, layout = found
    probe = base / f"tapd-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as e:
        return f"cannot create a {layout} cgroup under {base}: {e.strerror}"
    try:
        if layout == "v2" and not (probe / "cpu.max").exists():
            return "the cgroup v2 cpu controller is not enabled for child groups"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


class CpuLimit:
    """One cgroup with a quota of ``cpus`` cores; processes join with :meth:`add`."""

    def __init__(self, cpus: float, name: str) -> None:
        found = _hierarchy()
        if found is None:
            raise RuntimeError("no cgroup cpu controller mounted")
        base, self.layout = found
        self.cpus = cpus
        self.path = base / f"{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        quota = max(1000, int(cpus * _PERIOD_US))
        if self.layout == "v1":
            (self.path / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {_PERIOD_US}")

    def add(self, pid: int) -> None:
        """Move a process (all its threads; its later children follow) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_seconds(self) -> float:
        """Time the group's processes were held back by the quota (``cpu.stat``)."""
        stat = dict(
            line.split()
            for line in (self.path / "cpu.stat").read_text().splitlines()
            if len(line.split()) == 2
        )
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def close(self) -> None:
        """Remove the group; any process still in it goes back to the parent group."""
        parent = self.path.parent / "cgroup.procs"
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(pid)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)

    def __enter__(self) -> CpuLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
