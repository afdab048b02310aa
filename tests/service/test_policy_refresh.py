"""A rollout samples from the newest kept version the policies topic holds, even
when the service's consumer of that topic has not delivered it yet (after a group
join, or during a long scoring run, the consumer can be seconds behind)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.config import TapdSettings
from daemon.policy.store import PolicyVersion
from daemon.service import scorer as scorer_mod
from daemon.service.scorer import PolicyRollout
from streams.embedded import EmbeddedTransport


def _announce(transport: EmbeddedTransport, topic: str, n: int) -> None:
    sha = hashlib.sha256(f"policy-{n}".encode()).hexdigest()
    record = PolicyVersion(f"v{n}", f"file:///policies/policy-{n}.pt", sha, 10, float(n))
    producer = transport.producer()
    producer.send(topic, record.encode(), key=record.version.encode())
    producer.flush()
    producer.close()


def test_a_rollout_reads_versions_the_consumer_has_not_delivered(
    in_process: Callable[..., Any],
) -> None:
    got = in_process()  # tests/service/conftest.py
    service, rollout, transport = got.service, got.rollout, got.transport
    topic = service.settings.topics.policies
    _announce(transport, topic, 1)
    service.start()
    try:
        assert rollout.target == "v1"  # read whole at start
        assert rollout.refresh is not None and service._policies is not None
        # A consumer that delivers nothing (behind, or mid group join): the
        # topic itself is read to its end.
        service._policies.pause()
        _announce(transport, topic, 2)
        _announce(transport, topic, 3)
        assert rollout.target == "v1"
        service._policies_checked = -scorer_mod.POLICY_RECHECK_S  # as if time passed
        rollout.refresh()
        assert rollout.target == "v3" and set(rollout.catalog) == {"v1", "v2", "v3"}
        assert service.metrics.policy_version_announced._value.get() == 3
        # Within the recheck interval the topic is not read again...
        _announce(transport, topic, 4)
        rollout.refresh()
        assert rollout.target == "v3"
        # ...but what the consumer delivers is applied at every refresh, and
        # records already read through the topic are not applied twice.
        service._policies.resume()
        seen: list[str] = []
        announce = rollout.announce

        def counted(v: PolicyVersion) -> None:
            seen.append(v.version)
            announce(v)

        rollout.announce = counted  # type: ignore[method-assign,assignment]
        for _ in range(20):
            rollout.refresh()
            if rollout.target == "v4":
                break
            time.sleep(0.05)
        assert rollout.target == "v4" and seen == ["v4"]
    finally:
        service.shutdown()


def test_sample_refreshes_before_it_loads_and_samples(tmp_path: Path) -> None:
    rollout = PolicyRollout(TapdSettings(state_dir=tmp_path))
    calls: list[str] = []

    class Engine:  # a stand-in for the policy: only the call order is under test
        model = None

        def sample(self, prompts: Any, k: int, **kw: Any) -> list[str]:
            calls.append("sample")
            return []

    rollout._engine = Engine()
    rollout.refresh = lambda: calls.append("refresh")
    rollout.sample(["p"], 2)
    assert calls == ["refresh", "sample"]
