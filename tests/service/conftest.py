"""A scorer service in this process, on an embedded log of its own, for tests that
drive its loop (``iterate``) and look at its consumers and producer directly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import TapdSettings
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.thresholds import ThresholdsHolder
from daemon.service.scorer import PolicyRollout, ScorerService, build_scorer
from streams.embedded import EmbeddedTransport


@dataclass
class InProcess:
    service: ScorerService
    rollout: PolicyRollout
    transport: EmbeddedTransport


@pytest.fixture
def in_process(tmp_path: Path) -> Callable[..., InProcess]:
    """``in_process(**service_settings)``: a shadow-mode scorer service (not started)."""

    def make(**service: Any) -> InProcess:
        settings = TapdSettings(state_dir=tmp_path)
        settings = settings.model_copy(
            update={
                "transport": settings.transport.model_copy(
                    update={"kind": "embedded", "embedded_path": tmp_path / "log.sqlite"}
                ),
                "thresholds": settings.thresholds.replace(shadow_mode=True),
                "service": settings.service.model_copy(update=service),
            }
        )
        transport = EmbeddedTransport(tmp_path / "log.sqlite")
        holder = ThresholdsHolder(settings.thresholds)
        rollout = PolicyRollout(settings)
        scorer = ScorerService(
            settings,
            transport,
            build_scorer(settings, lambda: holder.current, rollout),
            ScorerMetrics(),
            holder,
            rollout=rollout,
            background_refits=False,
        )
        return InProcess(scorer, rollout, transport)

    return make
