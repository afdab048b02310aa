"""Reward-trust probing runs a trace's prompt as code: contained, and its cost capped."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from daemon.config import VerifySettings
from daemon.core.features import bad_answers, reward_trust
from daemon.verify.registry import configure
from daemon.verify.sandbox import isolation, sandbox_pids
from daemon.verify.settings import current
from streams.schemas import Attempt, Trace


def _trace(tid: str, prompt: str, reference: str, **args: Any) -> Trace:
    return Trace(
        schema="tapd.trace/1",
        trace_id=tid,
        ts=0.0,
        subject="code",
        prompt=prompt,
        reference=reference,
        verifier="code",
        verifier_args=args,
        policy_version="p0",
        attempts=[Attempt(completion="x", reward=0.0, n_tokens=1)],
    )


@pytest.fixture
def probe_settings() -> Iterator[None]:
    before = current()
    configure(VerifySettings(probe_timeout_s=0.2, probe_max_runs=2))
    yield
    configure(before)


def test_hostile_prompts_are_probed_inside_the_sandbox(
    monkeypatch: pytest.MonkeyPatch, probe_settings: None
) -> None:
    token = "probe-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("TAPD_SERVICE__ADMIN_TOKEN", token)
    me = os.getpid()
    steal = (
        "import os, glob\n"
        "def leak():\n"
        "    for p in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ', *glob.glob('/proc/*/environ')]:\n"
        "        try:\n"
        "            for kv in open(p).read().split('\\0'):\n"
        "                if kv.startswith('TAPD_SERVICE__ADMIN_TOKEN='):\n"
        "                    return kv.split('=', 1)[1]\n"
        "        except OSError:\n"
        "            pass\n"
        "    return os.environ.get('TAPD_SERVICE__ADMIN_TOKEN')\n"
    )
    kill = f"import os, signal\nos.kill({me}, signal.SIGKILL)\nos.kill(os.getppid(), 9)\n"
    traces = [
        # If the echoed prompt could read the token, its probe would be rewarded.
        _trace("a", steal, f"assert leak() == {token!r}"),
        _trace("b", kill + "def f():\n    return 1\n", "assert f() == 2"),
        # A prompt that is its own solution: its echo is rewarded (proof that
        # the prompts did run).
        _trace("c", "def g():\n    return 7\n", "assert g() == 7"),
    ]
    configure(VerifySettings(probe_timeout_s=0.5, probe_max_runs=3))
    before = set(sandbox_pids())
    total = sum(len(bad_answers(t.prompt, t.reference)) for t in traces)
    assert reward_trust(traces) == pytest.approx(1 - 1 / total)
    assert set(sandbox_pids()) <= before


def test_probing_cost_is_capped_per_cohort(probe_settings: None) -> None:
    # 16 prompts that spin forever, each with its own tests: without a cap,
    # 16 runs at the trace's own time limit (timeout_s=10 here).
    traces = [
        _trace(f"t{i:02d}", "while True:\n    pass\n", f"assert f({i}) == {i}", timeout_s=10)
        for i in range(16)
    ]
    isolation()  # the once-per-process probe is not the cohort's cost
    t0 = time.monotonic()
    trust = reward_trust(traces)
    elapsed = time.monotonic() - t0
    # 2 runs of 0.2 CPU s (1.4 s wall clock at most each), then skipped;
    # uncapped, 16 runs of 10 CPU s.
    assert elapsed < 2 * 1.4 + 4.0, elapsed
    assert trust == 1.0
