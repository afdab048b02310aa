"""What the pure core reports: typed events, turned into logs and metrics by the shell.

The core never logs, counts or reads a clock; each call returns its events
in :attr:`daemon.core.pipeline.Effects.events`, and the runtime
(:mod:`daemon.runtime.observe`) turns each into one log line and the metric
updates it implies. An event names its cohort or trace, so every log line
carries the ids; metrics use only the bounded fields (stage, cause,
selection, recommendation), and tenants only through the bounded chooser
of :mod:`daemon.core.tenants`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TracesConsumed:
    """``n`` trace records read; ``tenants``: how many of them each tenant sent
    (first-seen order; ``unknown`` for a record whose tenant cannot be read);
    ``misrouted``: decoded traces whose record key is not their slice key."""

    n: int
    tenants: tuple[tuple[str, int], ...] = ()
    misrouted: int = 0


@dataclass(frozen=True, slots=True)
class TraceDuplicate:
    trace_id: str


@dataclass(frozen=True, slots=True)
class TraceStale:
    trace_id: str
    action: str
    policy_version: str


@dataclass(frozen=True, slots=True)
class TraceRejected:
    """A trace (or a lift/dead-letter record) dead-lettered at ``stage``."""

    stage: str
    field: str
    reason: str
    trace_id: str | None = None
    offset: int | None = None
    # The trace's tenant (``unknown`` when its bytes do not say); None for a
    # record that is not a trace (a lift result).
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class CohortClosed:
    cohort_id: str
    cause: str
    n_groups: int


@dataclass(frozen=True, slots=True)
class CohortRejected:
    cohort_id: str
    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class CohortScored:
    cohort_id: str
    model_version: str
    predicted_lift: float
    uncertainty: float
    recommendation: str
    selection: str | None
    dispatched: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Dispatched:
    cohort_id: str
    selection: str
    # How many of the dispatched traces each tenant sent (a cohort mixes
    # tenants unless ``tenant`` is in the slice key).
    tenants: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class DispatchReleased:
    cohort_id: str
    cause: str  # rejected (by the trainer), expired (lease)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LiftLearned:
    cohort_id: str
    model_version: str
    nll_lift: float
    predicted_lift: float
    selection: str


@dataclass(frozen=True, slots=True)
class LiftDuplicate:
    cohort_id: str


@dataclass(frozen=True, slots=True)
class StageTimed:
    """Seconds one pipeline stage took (measured by the shell's timer)."""

    stage: str
    seconds: float


Event = (
    TracesConsumed
    | TraceDuplicate
    | TraceStale
    | TraceRejected
    | CohortClosed
    | CohortRejected
    | CohortScored
    | Dispatched
    | DispatchReleased
    | LiftLearned
    | LiftDuplicate
    | StageTimed
)
