"""The per-tenant counters through the scorer's own poll loop, in process (no subprocess).

The service on an embedded log reads a small trace file of three tenants
with ``metrics.max_tenants`` = 2 and ``metrics.tenants`` pinning one: the
counters the settings configure move per tenant and stay bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.config import CohortingSettings, GRPOParams, MetricsSettings, TapdSettings
from daemon.core.pipeline import Scorer
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.thresholds import ThresholdsHolder
from daemon.service.scorer import ScorerService, build_scorer, tenant_labels
from lab import tasks
from lab.reliability import trace_key
from streams.embedded import EmbeddedTransport
from streams.schemas import Attempt, encode

K = 4


def test_the_service_counts_traces_per_configured_tenant(tmp_path: Path) -> None:
    settings = TapdSettings(
        state_dir=tmp_path,
        cohorting=CohortingSettings(max_groups=4, min_groups=2, max_age_s=600.0),
        grpo=GRPOParams(num_generations=K),
        metrics=MetricsSettings(max_tenants=2, tenants=("vip",)),
    )
    settings = settings.model_copy(
        update={
            "transport": settings.transport.model_copy(
                update={"kind": "embedded", "embedded_path": tmp_path / "log.sqlite"}
            ),
            "thresholds": settings.thresholds.replace(shadow_mode=True),
        }
    )
    # Three tenants: "a" is read first, so it takes the one free slot; "b" is other.
    lines: list[bytes] = []
    for c, (subject, difficulty, tenant) in enumerate(
        [("add", "2d_carry", "a"), ("sub", "2d_borrow", "b"), ("mul", "2x1", "vip")]
    ):
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed=c)):
            attempts = [
                Attempt(
                    completion=task.reference if j < 2 else "0", reward=float(j < 2), n_tokens=3
                )
                for j in range(K)
            ]
            trace = tasks.to_trace(
                task, policy_version="v0", attempts=attempts, key=f"{c}:{i}", tenant=tenant
            )
            lines.append(encode(trace))
    lines.append(json.dumps({"schema": "tapd.trace/1", "tenant": "b"}).encode())  # b's, broken

    transport = EmbeddedTransport(tmp_path / "log.sqlite")
    producer = transport.producer()
    for line in lines:
        producer.send(settings.topics.traces, line, key=trace_key(line))
    producer.flush()
    producer.close()

    metrics = ScorerMetrics(tenant_labels=tenant_labels(settings))
    text = metrics.registry.get_sample_value
    assert text("tapd_tenant_traces_consumed_total", {"tenant": "vip"}) == 0  # pinned: at 0
    holder = ThresholdsHolder(settings.thresholds)
    service = ScorerService(
        settings,
        transport,
        build_scorer(settings, lambda: holder.current),
        metrics,
        holder,
        cohorts_per_poll=4,
        background_refits=False,
    )
    flushed = False

    def done(s: Scorer) -> bool:
        nonlocal flushed
        if not flushed and metrics.traces_consumed._value.get() >= len(lines):
            flushed = True
            service.end_of_stream()
        return flushed and not s.pending

    service.run(until=done)

    def by_tenant(name: str) -> dict[str, float | None]:
        return {
            t: text(f"tapd_tenant_traces_{name}_total", {"tenant": t})
            for t in ("vip", "a", "b", "other", "unknown")
        }

    assert by_tenant("consumed") == {"vip": 4, "a": 4, "b": None, "other": 5, "unknown": 0}
    assert by_tenant("dead_lettered") == {"vip": 0, "a": 0, "b": None, "other": 1, "unknown": 0}
    assert metrics.tenant_labels.tenants == ("vip", "a")
