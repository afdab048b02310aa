"""The Prometheus metric catalog: one name for one thing.

Every metric tapd exports is declared here, so the dashboard, the alert rules
and the runbook have a single list to agree with. Conventions: ``tapd_``
prefix, base units (seconds, bytes, ratios 0-1, nats for lift and NLL),
counters end in ``_total``, and label values are bounded (never a cohort or
trace id).

Every labelled counter starts at zero for every known label value (the
bounded words of :mod:`daemon.core.vocabulary`), so that ``increase()`` sees
the first event rather than a series that appears at 1. The ``tenant``
label is bounded by :class:`daemon.core.tenants.TenantLabels` (at most
``metrics.max_tenants`` tenants, the rest as ``other``); ``other``,
``unknown`` and the pinned tenants start at zero, a tenant given a label
later starts with the event that admitted it. Each registry also
carries ``tapd_build_info`` and the process, platform and GC collectors
(``process_*``, ``python_*``).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.gc_collector import GCCollector

from daemon.core.tenants import TenantLabels
from daemon.core.vocabulary import (
    ADMIN_OUTCOMES,
    CLOSE_CAUSES,
    DEAD_LETTER_STAGES,
    NO_TARGET_REASONS,
    PIPELINE_STAGES,
    PREDICTOR_STAGES,
    RECOMMENDATIONS,
    REFIT_OUTCOMES,
    RELEASE_CAUSES,
    REWARD_PHASES,
    SELECTIONS,
    SERVICE_STAGES,
    STATE_RECORD_CAUSES,
    THRESHOLD_SOURCES,
    TRAINER_OUTCOMES,
)

# Lift is a drop in mean token NLL (nats). Symmetric buckets: harmful
# updates (negative lift) must be as visible as helpful ones.
LIFT_BUCKETS = (-1.0, -0.5, -0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

del GC_COLLECTOR  # the default registry's; each tapd registry gets its own below


def tapd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tapd")
    except PackageNotFoundError:
        return "0+unknown"


def standard_collectors(registry: CollectorRegistry, role: str) -> Gauge:
    """Process, platform and GC collectors, and ``tapd_build_info{version,role,python}``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    build = Gauge(
        "tapd_build_info",
        "Always 1; the labels say which tapd build and role this process is.",
        ["version", "role", "python"],
        registry=registry,
    )
    build.labels(version=tapd_version(), role=role, python=platform.python_version()).set(1)
    return build


def preinit(metric: Any, label: str, values: Iterable[str]) -> None:
    """Create ``metric{label=v}`` at zero for every ``v``."""
    for v in values:
        metric.labels(**{label: v})


class ScorerMetrics:
    """Metrics of the scorer role (``tapd run``)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        topics: Iterable[str] = (),
        thresholds: Iterable[str] = (),
        tenant_labels: TenantLabels | None = None,
    ) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.tenant_labels = tenant_labels if tenant_labels is not None else TenantLabels()
        standard_collectors(r, "scorer")
        # Throughput and rejection
        self.traces_consumed = Counter(
            "tapd_traces_consumed", "Trace messages read from the traces topic.", registry=r
        )
        self.traces_misrouted = Counter(
            "tapd_traces_misrouted",
            "Traces whose record key is not their slice key (the producer contract): "
            "a resent copy on another partition is not deduplicated.",
            registry=r,
        )
        self.traces_duplicate = Counter(
            "tapd_traces_duplicate",
            "Traces ignored because their trace id was already seen.",
            registry=r,
        )
        self.dead_letters = Counter(
            "tapd_dead_letters",
            "Messages sent to the dead-letter topic, by the stage that rejected them.",
            ["stage"],
            registry=r,
        )
        # Per tenant (bounded: daemon.core.tenants), all in traces. Consumed
        # sums over tenant to tapd_traces_consumed_total; dead-lettered to the
        # traces' part of tapd_dead_letters_total (which counts lift results
        # too); dispatched counts the traces of dispatched cohorts, not cohorts.
        self.tenant_traces_consumed = Counter(
            "tapd_tenant_traces_consumed",
            "Trace messages read from the traces topic, by tenant "
            "(the first metrics.max_tenants seen; other: the rest; unknown: unreadable).",
            ["tenant"],
            registry=r,
        )
        self.tenant_traces_dead_lettered = Counter(
            "tapd_tenant_traces_dead_lettered",
            "Traces sent to the dead-letter topic, by tenant.",
            ["tenant"],
            registry=r,
        )
        self.tenant_traces_dispatched = Counter(
            "tapd_tenant_traces_dispatched",
            "Traces in cohorts dispatched to the trainer, by tenant "
            "(a cohort mixes tenants unless tenant is in the slice key).",
            ["tenant"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "tapd_consumer_lag_messages",
            "Messages between the group's committed offset and the log end.",
            ["topic"],
            registry=r,
        )
        self.consumption_paused = Gauge(
            "tapd_consumption_paused",
            "1 while trace consumption is paused by backpressure.",
            registry=r,
        )
        self.processing_seconds = Histogram(
            "tapd_processing_seconds",
            "Wall time per stage of the scoring pipeline: per poll batch for decode and "
            "cohorting, per cohort for the later stages, per send for dispatch; and of the "
            "scorer loop around it, per loop for poll, persist and commit.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Cohorts and decisions
        self.cohorts_open = Gauge("tapd_cohorts_open", "Open (not yet closed) cohorts.", registry=r)
        self.open_state_bytes = Gauge(
            "tapd_open_state_bytes",
            "Estimated memory the traces of open cohorts hold, all partitions together "
            "(bounded by cohorting.max_open_bytes: the oldest cohorts are evicted to stay under).",
            registry=r,
        )
        # Replicas: partitions owned, how they changed hands, the policy in use
        self.partitions_owned = Gauge(
            "tapd_partitions_owned",
            "Traces partitions this replica owns (their cohorts are its to decide).",
            registry=r,
        )
        self.partition_handoffs = Counter(
            "tapd_partition_handoffs",
            "Traces partitions taken on, by how their state came back "
            "(kept: this replica's own; rebuilt: from the changelog; fresh: none).",
            ["how"],
            registry=r,
        )
        self.state_records = Counter(
            "tapd_partition_state_records",
            "Partition state records written to the changelog, by cause (changed: the batch "
            "closed, evicted, scored or dead-lettered something of the partition; interval: "
            "only traces joined open cohorts, and service.state_record_interval_s passed; "
            "handback: a revocation or shutdown).",
            ["cause"],
            registry=r,
        )
        self.state_record_bytes = Counter(
            "tapd_partition_state_record_bytes",
            "Bytes of the partition state records written to the changelog (each lists "
            "every open cohort of its partition).",
            registry=r,
        )
        self.rollout_policy_version = Gauge(
            "tapd_rollout_policy_version",
            "Version number of the policy the rollout engine samples from.",
            registry=r,
        )
        self.policy_version_announced = Gauge(
            "tapd_policy_version_announced",
            "Newest policy version the trainer has announced on the policies topic.",
            registry=r,
        )
        self.cohorts_closed = Counter(
            "tapd_cohorts_closed",
            "Cohorts closed, by cause (size, age, evicted).",
            ["cause"],
            registry=r,
        )
        self.cohorts_scored = Counter(
            "tapd_cohorts_scored",
            "Cohorts scored, by the decision policy's recommendation.",
            ["recommendation"],
            registry=r,
        )
        self.dispatches = Counter(
            "tapd_dispatches",
            "Cohorts dispatched to the trainer, by selection (exploit or exploration).",
            ["selection"],
            registry=r,
        )
        self.dispatches_released = Counter(
            "tapd_dispatches_released",
            "In-flight dispatches freed without a lift, by cause (rejected by the trainer, expired).",
            ["cause"],
            registry=r,
        )
        self.dispatches_in_flight = Gauge(
            "tapd_dispatches_in_flight", "Dispatched cohorts awaiting a lift result.", registry=r
        )
        # Lift and predictor quality
        self.predicted_lift = Histogram(
            "tapd_predicted_lift_nats",
            "Predicted NLL-lift of scored cohorts.",
            buckets=LIFT_BUCKETS,
            registry=r,
        )
        self.realized_lift = Histogram(
            "tapd_realized_lift_nats",
            "Realized NLL-lift reported by the trainer, by selection.",
            ["selection"],
            buckets=LIFT_BUCKETS,
            registry=r,
        )
        self.lift_labels = Counter(
            "tapd_lift_labels", "Lift labels learned by the predictor.", registry=r
        )
        self.realized_lift_mean = Gauge(
            "tapd_realized_lift_mean_nats",
            "Rolling mean realized lift, by selection.",
            ["selection"],
            registry=r,
        )
        self.selection_gain = Gauge(
            "tapd_selection_gain_nats",
            "Rolling mean realized lift of exploit dispatches minus that of random exploration.",
            registry=r,
        )
        self.predictor_spearman = Gauge(
            "tapd_predictor_spearman",
            "Rolling Spearman correlation of predicted vs realized lift.",
            registry=r,
        )
        self.predictor_pairwise_accuracy = Gauge(
            "tapd_predictor_pairwise_accuracy_ratio",
            "Rolling share of label pairs the predictor orders correctly.",
            registry=r,
        )
        self.predictor_labels = Gauge(
            "tapd_predictor_labels", "Labels the current predictor has learned from.", registry=r
        )
        self.predictor_model_version = Gauge(
            "tapd_predictor_model_version", "Version number of the promoted predictor.", registry=r
        )
        self.predictor_stage = Gauge(
            "tapd_predictor_stage",
            "1 for the predictor stage in use (heuristic, river, lightgbm).",
            ["stage"],
            registry=r,
        )
        self.predictor_refits = Counter(
            "tapd_predictor_refits",
            "LightGBM refits, by outcome (promoted, rejected, failed).",
            ["outcome"],
            registry=r,
        )
        self.predictor_drift = Counter(
            "tapd_predictor_drift",
            "Drift detections on the predictor's residuals.",
            registry=r,
        )
        # Thresholds and administration
        self.threshold = Gauge(
            "tapd_threshold", "Current value of each decision threshold.", ["name"], registry=r
        )
        self.threshold_changes = Counter(
            "tapd_threshold_changes",
            "Threshold changes applied, by source (admin, file, signal).",
            ["source"],
            registry=r,
        )
        self.threshold_override = Gauge(
            "tapd_threshold_override",
            "1 while a run-time override (admin API) sets this threshold instead of the file.",
            ["name"],
            registry=r,
        )
        self.admin_requests = Counter(
            "tapd_admin_requests",
            "Admin endpoint requests, by outcome (ok, noop, unauthorized, forbidden, invalid, too_large).",
            ["outcome"],
            registry=r,
        )
        self.up_ready = Gauge(
            "tapd_ready", "1 when the service is ready (checked every few seconds).", registry=r
        )
        self._preinit(topics, thresholds)

    def _preinit(self, topics: Iterable[str], thresholds: Iterable[str]) -> None:
        preinit(self.dead_letters, "stage", DEAD_LETTER_STAGES)
        preinit(self.processing_seconds, "stage", (*PIPELINE_STAGES, *SERVICE_STAGES))
        preinit(self.cohorts_closed, "cause", CLOSE_CAUSES)
        preinit(self.cohorts_scored, "recommendation", RECOMMENDATIONS)
        preinit(self.dispatches, "selection", SELECTIONS)
        preinit(self.dispatches_released, "cause", RELEASE_CAUSES)
        preinit(self.state_records, "cause", STATE_RECORD_CAUSES)
        preinit(self.realized_lift, "selection", SELECTIONS)
        preinit(self.realized_lift_mean, "selection", SELECTIONS)
        preinit(self.predictor_stage, "stage", PREDICTOR_STAGES)
        preinit(self.predictor_refits, "outcome", REFIT_OUTCOMES)
        preinit(self.threshold_changes, "source", THRESHOLD_SOURCES)
        preinit(self.admin_requests, "outcome", ADMIN_OUTCOMES)
        preinit(self.consumer_lag, "topic", topics)
        preinit(self.threshold_override, "name", thresholds)
        for label in self.tenant_labels.values():
            self._preinit_tenant(label)

    def _preinit_tenant(self, label: str) -> None:
        for metric in (
            self.tenant_traces_consumed,
            self.tenant_traces_dead_lettered,
            self.tenant_traces_dispatched,
        ):
            metric.labels(tenant=label)

    def tenant(self, tenant: str) -> str:
        """The ``tenant`` label value for ``tenant`` (bounded); a newly labelled
        tenant's series are created in all three per-tenant counters at once."""
        n = len(self.tenant_labels)
        label = self.tenant_labels.label(tenant)
        if len(self.tenant_labels) != n:
            self._preinit_tenant(label)
        return label

    def watch(self, scorer: Any) -> None:
        """Read the scorer's open cohorts and in-flight dispatches at scrape time."""
        self.cohorts_open.set_function(lambda: float(scorer.cohorts.n_open))
        self.open_state_bytes.set_function(lambda: float(scorer.cohorts.open_bytes))
        self.dispatches_in_flight.set_function(lambda: float(len(scorer.in_flight)))


class TrainerMetrics:
    """Metrics of the trainer role (``tapd trainer``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        standard_collectors(r, "trainer")
        self.up_ready = Gauge(
            "tapd_ready", "1 when the service is ready (checked every few seconds).", registry=r
        )
        self.cohorts = Counter(
            "tapd_trainer_cohorts",
            "Dispatched cohorts handled, by outcome (trained, duplicate, rolled_back, failed).",
            ["outcome"],
            registry=r,
        )
        self.cohort_seconds = Histogram(
            "tapd_trainer_cohort_seconds",
            "Wall time to train on one cohort and measure its lift.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.nll_lift = Histogram(
            "tapd_trainer_nll_lift_nats",
            "Measured probe NLL-lift per cohort.",
            buckets=LIFT_BUCKETS,
            registry=r,
        )
        self.accuracy_lift = Gauge(
            "tapd_trainer_accuracy_lift_ratio",
            "Probe accuracy lift of the last cohort.",
            registry=r,
        )
        # The lift per part of the probe: the target's is the label the
        # predictor learns; transfer and collateral are what an alert on
        # harm elsewhere watches.
        self.part_nll_lift = Histogram(
            "tapd_trainer_part_nll_lift_nats",
            "Measured NLL-lift per cohort on a part of the probe: the cohort's target, "
            "other targets (transfer), items without a foothold (collateral).",
            ["part"],
            buckets=LIFT_BUCKETS,
            registry=r,
        )
        self.part_accuracy_lift = Gauge(
            "tapd_trainer_part_accuracy_lift_ratio",
            "Greedy accuracy lift of the last cohort on a part of the probe.",
            ["part"],
            registry=r,
        )
        # A label without a target part is the pooled lift the target probe
        # replaced: a probe whose targets match no trace subject, or a chat
        # model's probe without answers in its own words, makes every label so.
        self.lift_without_target = Counter(
            "tapd_trainer_lift_without_target_total",
            "Cohorts trained whose lift has no target part (the label falls back to the whole "
            "probe), by reason: no_target (the probe names no target for the cohort's subject), "
            "no_foothold (the policy has a foothold on none of the target's items).",
            ["reason"],
            registry=r,
        )
        self.train_reward = Gauge(
            "tapd_trainer_train_reward",
            "Mean training reward of the last cohort, before and after its GRPO steps.",
            ["phase"],
            registry=r,
        )
        self.probe_nll = Gauge(
            "tapd_policy_probe_nll_nats",
            "Mean token NLL of the probe's reference answers.",
            registry=r,
        )
        self.probe_accuracy = Gauge(
            "tapd_policy_probe_accuracy_ratio", "Sampled accuracy on the probe.", registry=r
        )
        self.dormant_fraction = Gauge(
            "tapd_policy_dormant_fraction_ratio",
            "Share of dormant units (ReDo: activation over layer mean <= tau) on the probe.",
            registry=r,
        )
        self.effective_rank = Gauge(
            "tapd_policy_effective_rank",
            "Effective rank of the last hidden layer's features on the probe.",
            registry=r,
        )
        self.weight_norm = Gauge(
            "tapd_policy_weight_norm", "L2 norm of all policy weights.", registry=r
        )
        self.grad_norm = Gauge(
            "tapd_policy_grad_norm", "L2 norm of the last update's gradient.", registry=r
        )
        self.entropy = Gauge(
            "tapd_policy_entropy_nats", "Mean token entropy of the policy on the probe.", registry=r
        )
        self.policy_version = Gauge(
            "tapd_policy_version", "Version number of the policy checkpoint in use.", registry=r
        )
        self.rollbacks = Counter(
            "tapd_trainer_rollbacks",
            "Continual updates rolled back because probe NLL worsened past the threshold.",
            registry=r,
        )
        self.dead_letters = Counter(
            "tapd_trainer_dead_letters",
            "Dispatch messages the trainer sent to the dead-letter topic.",
            registry=r,
        )
        self.policy_store_bytes = Gauge(
            "tapd_policy_store_bytes",
            "Bytes the kept policy checkpoints take in the policy store.",
            registry=r,
        )
        self.policy_versions_stored = Gauge(
            "tapd_policy_versions_stored",
            "Policy versions whose checkpoint the store still holds (retention: the newest N).",
            registry=r,
        )
        preinit(self.cohorts, "outcome", TRAINER_OUTCOMES)
        preinit(self.train_reward, "phase", REWARD_PHASES)
        preinit(self.lift_without_target, "reason", NO_TARGET_REASONS)
