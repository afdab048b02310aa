"""The shell's side of the core's events: one log line and the metric updates each implies.

The pure pipeline (:mod:`daemon.core.pipeline`) returns typed events; this
module is the only place that turns them into structured JSON logs (with the
cohort or trace id bound) and Prometheus updates, so a new event is one
dataclass in :mod:`daemon.core.events` and one branch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from daemon.core import events as ev
from daemon.runtime.logging import get_logger
from daemon.runtime.metrics import ScorerMetrics

log = get_logger("tapd.scorer")


def observe(events: Iterable[ev.Event], metrics: ScorerMetrics | None, logger: Any = log) -> None:
    """Log and count every event, in order."""
    m = metrics
    for e in events:
        if isinstance(e, ev.StageTimed):
            if m:
                m.processing_seconds.labels(stage=e.stage).observe(e.seconds)
        elif isinstance(e, ev.TracesConsumed):
            if m:
                m.traces_consumed.inc(e.n)
                if e.misrouted:
                    m.traces_misrouted.inc(e.misrouted)
                for tenant, n in e.tenants:
                    m.tenant_traces_consumed.labels(tenant=m.tenant(tenant)).inc(n)
        elif isinstance(e, ev.TraceRejected):
            if m:
                m.dead_letters.labels(stage=e.stage).inc()
                if e.tenant is not None:
                    m.tenant_traces_dead_lettered.labels(tenant=m.tenant(e.tenant)).inc()
            logger.info(
                "trace_rejected",
                stage=e.stage,
                field=e.field,
                reason=e.reason,
                **({"trace_id": e.trace_id} if e.trace_id else {}),
                **({"offset": e.offset} if e.offset is not None else {}),
                **({"tenant": e.tenant} if e.tenant is not None else {}),
            )
        elif isinstance(e, ev.TraceDuplicate):
            if m:
                m.traces_duplicate.inc()
            logger.info("trace_duplicate", trace_id=e.trace_id)
        elif isinstance(e, ev.TraceStale):
            logger.info(
                "trace_stale",
                trace_id=e.trace_id,
                action=e.action,
                policy_version=e.policy_version,
            )
        elif isinstance(e, ev.CohortClosed):
            if m:
                m.cohorts_closed.labels(cause=e.cause).inc()
            logger.info("cohort_closed", cohort_id=e.cohort_id, cause=e.cause, n_groups=e.n_groups)
        elif isinstance(e, ev.CohortRejected):
            logger.warning("cohort_rejected", cohort_id=e.cohort_id, stage=e.stage, reason=e.reason)
        elif isinstance(e, ev.CohortScored):
            if m:
                m.predicted_lift.observe(e.predicted_lift)
                m.cohorts_scored.labels(recommendation=e.recommendation).inc()
            logger.info(
                "cohort_scored",
                cohort_id=e.cohort_id,
                model_version=e.model_version,
                predicted_lift=e.predicted_lift,
                uncertainty=e.uncertainty,
                recommendation=e.recommendation,
                selection=e.selection,
                dispatched=e.dispatched,
                reason=e.reason,
            )
        elif isinstance(e, ev.Dispatched):
            if m:
                m.dispatches.labels(selection=e.selection).inc()
                for tenant, n in e.tenants:
                    m.tenant_traces_dispatched.labels(tenant=m.tenant(tenant)).inc(n)
        elif isinstance(e, ev.DispatchReleased):
            if m:
                m.dispatches_released.labels(cause=e.cause).inc()
            logger.warning(
                "dispatch_released",
                cohort_id=e.cohort_id,
                cause=e.cause,
                **({"reason": e.reason} if e.reason else {}),
            )
        elif isinstance(e, ev.LiftLearned):
            if m:
                m.lift_labels.inc()
                m.realized_lift.labels(selection=e.selection).observe(e.nll_lift)
            logger.info(
                "lift_learned",
                cohort_id=e.cohort_id,
                model_version=e.model_version,
                nll_lift=e.nll_lift,
                predicted_lift=e.predicted_lift,
                selection=e.selection,
            )
        elif isinstance(e, ev.LiftDuplicate):
            logger.info("lift_duplicate", cohort_id=e.cohort_id)
