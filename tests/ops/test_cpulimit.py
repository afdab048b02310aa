"""The replica benchmark's CPU allotment really caps a process (bench/cpulimit.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.bench_replicas import cpu_seconds
from bench.cpulimit import CpuLimit, unavailable

WHY_NOT = unavailable()

# A busy loop that reports nothing: its CPU time is read from /proc.
_SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


def _spin_for(seconds: float, cpus: float | None) -> float:
    """CPU-seconds a busy child gets in ``seconds`` of wall time, capped or not."""
    proc = subprocess.Popen([sys.executable, "-c", _SPIN])
    limit = CpuLimit(cpus, "tapd-test") if cpus is not None else None
    try:
        if limit is not None:
            limit.add(proc.pid)
        c0 = cpu_seconds(proc.pid)
        time.sleep(seconds)
        return cpu_seconds(proc.pid) - c0
    finally:
        proc.kill()
        proc.wait()
        if limit is not None:
            limit.close()
            assert not limit.path.exists()


@pytest.mark.skipif(WHY_NOT is not None, reason=f"no CPU allotment here: {WHY_NOT}")
def test_allotment_caps_a_busy_process_and_is_removed() -> None:
    capped = _spin_for(2.0, 0.2)
    free = _spin_for(2.0, None)
    # 0.2 CPU over 2 s is 0.4 CPU-s; the kernel enforces it per 100 ms period,
    # so the margin only absorbs the clock tick and the first period.
    assert capped <= 0.55, capped
    # The same loop uncapped gets far more (here 2 cores; even a busy CI
    # runner gives it over a third of one): the cap, not the machine, held it.
    assert free >= 0.7, free
