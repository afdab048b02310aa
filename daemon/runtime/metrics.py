"""The Prometheus metric catalog: one name for one thing.

Every metric tapd exports is declared here, so the dashboard, the alert rules
and the runbook have a single list to agree with. Conventions: ``tapd_``
prefix, base units (seconds, bytes, ratios 0-1, nats for lift and NLL),
counters end in ``_total``, and label values are bounded (never a cohort or
trace id).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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



class ScorerMetrics:
    """Metrics of the scorer role (``tapd run``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        # Throughput and rejection
        self.traces_consumed = Counter(
            "tapd_traces_consumed", "Trace messages read from the traces topic.", registry=r
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
            "Wall time per stage of the scoring pipeline.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Cohorts and decisions
        self.cohorts_open = Gauge("tapd_cohorts_open", "Open (not yet closed) cohorts.", registry=r)
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
        self.admin_requests = Counter(
            "tapd_admin_requests",
            "Admin endpoint requests, by outcome (ok, unauthorized, invalid, disabled).",
            ["outcome"],
            registry=r,
        )
        self.up_ready = Gauge("tapd_ready", "1 when the service is ready.", registry=r)

    def watch(self, scorer: Any) -> None:
        """Read the scorer's open cohorts and in-flight dispatches at scrape time."""
        self.cohorts_open.set_function(lambda: float(scorer.cohorts.n_open))
        self.dispatches_in_flight.set_function(lambda: float(len(scorer.in_flight)))


class TrainerMetrics:
    """Metrics of the trainer role (``tapd trainer``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
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
