"""All of tapd's configuration in one typed place.

Settings come from (highest first) environment variables ``TAPD_...`` with
``__`` as the nested delimiter (``TAPD_TOPICS__TRACES=prod.traces``), a YAML
file (``--config`` / ``TAPD_CONFIG``), and the defaults below. Objects are
frozen: a change builds and validates a new object and swaps it in one
assignment, so a bad value never replaces a good one.

``Thresholds`` is the part an on-call engineer tunes at run time; it is
reloadable without restart (file watch, SIGHUP, admin endpoint). Values that
arrive as JSON or YAML (the admin API, the thresholds file) are validated
strictly: no booleans for numbers, no numeric strings, no string booleans.

A ``TAPD_*`` variable that names no setting is refused with the closest valid
name (:func:`check_environment`): a misspelt ``TAPD_TRANSPORT_KIND`` must not
silently leave the default in place.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streams.schemas import MAX_ID_CHARS
from streams.settings import TransportSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Topics(_Frozen):
    traces: str = "tap.traces"
    dispatch: str = "tap.dispatch"
    lift: str = "tap.lift"
    dlq: str = "tap.dlq"
    # Compacted by cohort id: the labels learned (one per lift, the same on
    # every replica). The predictor's source is the lift topic itself.
    labels: str = "tap.labels"
    decisions: str = "tap.decisions"
    # Compacted by version: every kept policy version (version, URI, checksum).
    policies: str = "tap.policies"
    # Compacted, one record per traces partition, in the partition of the same
    # number: the open and queued cohorts (member offsets) of that partition,
    # which the replica given the partition rebuilds from.
    changelog: str = "tap.scorer-state"


class CohortingSettings(_Frozen):
    # The capability-slice key: which trace fields (or ``tags.<name>``) a
    # cohort's members share. Tenants are pooled by default (the decision,
    # docs/ARCHITECTURE.md "Tenants"): a capability is the policy's, whoever
    # asked, and pooling fills cohorts sooner. Add "tenant" to make cohorts
    # (and so training and its lift) per tenant; producers must then key
    # traces by the new slice key too.
    slice_key: tuple[str, ...] = ("subject", "tags.task_type", "tags.operation", "verifier")
    max_groups: int = Field(
        default=8, ge=1, le=256, description="prompt groups that close a cohort"
    )
    max_age_s: float = Field(
        default=300.0, gt=0.0, description="age at which an open cohort closes"
    )
    min_groups: int = Field(
        default=2, ge=1, description="smaller cohorts closed by age are dropped to the DLQ"
    )
    max_open: int = Field(default=10_000, ge=1, description="open cohorts held in memory")
    # The byte bound on open state that max_open (a count) is not: traces
    # differ a hundredfold in what they hold (token arrays). Shared by every
    # partition a scorer owns; the oldest open cohort is evicted to make room,
    # as for max_open. The measure is daemon.core.cohorting.held_bytes, an
    # estimate of a held trace's memory (tapd_open_state_bytes).
    max_open_bytes: int = Field(
        default=512 * 2**20,
        ge=1,
        description="bytes the open traces may hold in memory (estimated), all partitions together",
    )
    stale_policy: Literal["reprobe", "drop"] = "reprobe"
    max_policy_lag: int = Field(
        default=0, ge=0, description="policy versions a trace may lag before it is stale"
    )
    dedup_window: int = Field(
        default=100_000,
        ge=0,
        description=(
            "ids of closed or rejected traces remembered for dedup, all partitions "
            "together (each owned partition remembers an even share)"
        ),
    )


class PredictorSettings(_Frozen):
    river_after: int = Field(
        default=8, ge=1, description="labels before River replaces the heuristic"
    )
    lgbm_after: int = Field(default=40, ge=10, description="labels before the first LightGBM refit")
    # Refits are due by label count (or drift), never by the clock: replicas
    # that learn the same labels then refit at the same label, to the same model.
    refit_every_labels: int = Field(default=20, ge=1)
    holdout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    seed: int = 0


class GRPOParams(_Frozen):
    """One set of GRPO knobs for both roles.

    The scorer's rollouts sample what the trainer trains on: the same K
    (``num_generations``, also the attempts per prompt the features need),
    completion length and temperature.
    """

    num_generations: int = Field(
        default=8, ge=2, le=64, description="K: attempts per prompt (features and GRPO groups)"
    )
    max_completion_length: int = Field(default=12, ge=1, le=4096)
    temperature: float = Field(default=1.0, gt=0.0)
    steps: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=5e-3, gt=0.0)
    optimizer: str = Field(default="sgd", description="a transformers optim name")
    beta: float = Field(default=0.0, ge=0.0, description="KL penalty to the reference policy")
    max_prompts_per_step: int = Field(default=8, ge=1)
    seed: int = 0
    # Trainer-side cost levers for a real model on CPU (off by default: the
    # tiny policy trains fully, in float32). LoRA adapters (peft) are merged
    # into the weights after each cohort, so versions, checkpoints, the probe
    # and reverts see an ordinary full state dict.
    lora_rank: int = Field(
        default=0, ge=0, le=1024, description="0: full fine-tuning; >0: LoRA of this rank"
    )
    lora_alpha: int = Field(default=16, ge=1, description="LoRA scale numerator")
    bf16_autocast: bool = Field(
        default=False, description="bf16 autocast on CPU too (always on with a GPU)"
    )

    def replace(self, **changes: Any) -> GRPOParams:
        return GRPOParams.model_validate({**self.model_dump(), **changes})


class PolicySettings(_Frozen):
    """The policy both roles use and the probe its lift is measured on."""

    # A Hugging Face causal-LM directory, or a GGUF file (dequantised once
    # into ``cache_dir``): version v0. No default: the product never builds a
    # policy behind the user's back.
    model_path: Path | None = None
    # Where a GGUF policy's safetensors copy is cached, keyed by the file's
    # checksum. Default: TAPD_POLICY_CACHE, else ~/.cache/tapd/policy.
    cache_dir: Path | None = None
    # JSONL of probe items (target, prompt, reference, verifier, verifier_args):
    # the platform's own evaluation items per capability slice.
    probe_path: Path | None = None
    device: str = "auto"
    rollout_engine: Literal["hf", "vllm"] = "hf"
    # The update_alignment feature (daemon.policy.alignment): one backward
    # pass of the policy per cohort, where the scorer holds the weights (the
    # hf engine) and a probe file names the targets. Off, or without either,
    # the feature is 0 ("not measured").
    update_alignment: bool = True
    # Its gradient is estimated from this many fresh attempts per prompt,
    # sampled from the loaded policy (0: from the cohort's own K attempts, no
    # sampling): daemon.policy.alignment.DEFAULT_ATTEMPTS, kept equal by a test.
    update_alignment_attempts: int = Field(
        default=128,
        ge=0,
        le=1024,
        description="fresh attempts per prompt the update_alignment gradient is estimated "
        "from (0: the cohort's own attempts)",
    )
    # Where the trainer stores kept policy versions (checkpoints v1, v2, ...).
    # The scorer never derives paths: it loads the URI (and checks the
    # checksum) that the policies topic announces, so the store must be
    # reachable from both roles at that URI (a shared volume mounted at the
    # same path today). Default: <state_dir>/trainer/checkpoints.
    store_path: Path | None = None
    keep_versions: int = Field(
        default=5, ge=2, description="kept policy versions the trainer retains on disk"
    )


class TrainerSettings(_Frozen):
    mode: Literal["continual", "probe_revert"] = "continual"
    backend: str = Field(default="trl", description="daemon.trainer.backend.BACKENDS name")
    rollback_nll_worsening: float = Field(
        default=0.25, ge=0.0, description="nats of probe-NLL rise that roll back"
    )
    foothold_probability: float = Field(
        default=1.0 / 64.0,
        gt=0.0,
        lt=1.0,
        description="probe items the policy produces with less probability have no foothold "
        "(their lift is reported as collateral, not as the target's)",
    )
    group: str = "tapd-trainer"
    trainer_id: str = "tapd-trainer"
    metrics_port: int = Field(default=9401, ge=0, le=65535, description="0: ephemeral")


class VerifySettings(_Frozen):
    """Caps on what a trace may ask of its verifier, and how code is sandboxed.

    ``verifier_args`` come from traces, i.e. from whoever can produce to the
    traces topic: every value is checked against these caps (a trace over a
    cap is dead-lettered with the argument as field), never trusted.
    docs/SECURITY.md describes the sandbox.
    """

    # code verifier: per-run limits a trace may choose, up to these caps
    default_timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    max_timeout_s: float = Field(default=10.0, gt=0.0, le=60.0)
    default_memory_mb: int = Field(default=256, ge=64, le=16_384)
    max_memory_mb: int = Field(default=1024, ge=64, le=16_384)
    max_tests: int = Field(default=64, ge=1, le=10_000, description="test statements per task")
    max_test_chars: int = Field(default=20_000, ge=100, le=1_000_000)
    max_code_chars: int = Field(default=100_000, ge=100, le=10_000_000)
    # regex verifier (linear-time engine; these bound its memory and time)
    max_pattern_chars: int = Field(default=1_000, ge=1, le=100_000)
    max_subject_chars: int = Field(default=100_000, ge=1, le=10_000_000)
    # the sandbox itself
    sandbox_uid: int = Field(
        default=65534, ge=1, description="uid code runs as when tapd runs as root (never 0)"
    )
    sandbox_gid: int = Field(default=65534, ge=1)
    bwrap: str = "bwrap"
    setpriv: str = "setpriv"
    python: Path | None = Field(
        default=None, description="interpreter inside the sandbox; None: probe for one"
    )
    disk_mb: int = Field(default=16, ge=1, le=4096, description="tmpfs quota for /work and /tmp")
    file_mb: int = Field(default=8, ge=1, le=4096)
    max_procs: int = Field(default=16, ge=1, le=4096)
    max_output_kb: int = Field(
        default=64, ge=4, le=65_536, description="result values and diagnostics read back"
    )
    max_concurrent: int = Field(default=2, ge=1, le=256, description="sandboxes at once")
    # reward-trust probing runs trace-supplied code too: its own, smaller budget
    probe_timeout_s: float = Field(default=1.0, gt=0.0, le=60.0)
    probe_max_runs: int = Field(default=4, ge=0, le=1_000, description="sandbox runs per cohort")
    probe_cache_mib: float = Field(
        default=8.0,
        ge=0.0,
        le=4096.0,
        description="memory the remembered probe results of pure verifiers may hold (estimated)",
    )


# The shortest dispatch lease accepted whatever the trainer: a lease shorter
# than one cohort's training frees slots of dispatches still being trained,
# which turns the in-flight cap off. The scorer also refuses a lease under
# twice the slowest recently observed dispatch-to-lift round trip
# (daemon.runtime.thresholds).
MIN_DISPATCH_TIMEOUT_S = 10.0


class Thresholds(_Frozen):
    """The knobs an on-call engineer turns; each with its bounds.

    Cross-field rules: ``no_foothold_pass_rate`` < ``known_pass_rate`` (else a
    cohort could be both known and without foothold).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    min_predicted_lift: float = Field(default=0.0, ge=-10.0, le=10.0)
    top_k_per_window: int = Field(default=4, ge=1, le=1_000)
    max_in_flight: int = Field(default=4, ge=1, le=1_000)
    exploration_share: float = Field(default=0.25, ge=0.0, le=1.0)
    reward_trust_floor: float = Field(default=0.8, ge=0.0, le=1.0)
    redundancy_ceiling: float = Field(
        default=0.5, ge=0.0, le=1.0, description="near-duplicate prompt share over which: diversify"
    )
    template_ceiling: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="template repetition over which: diversify (1.0: off; slices share a template)",
    )
    known_pass_rate: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="mean pass rate over which a cohort is already known",
    )
    no_foothold_pass_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="mean pass rate under which a cohort has no foothold",
    )
    curriculum_similarity: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="target similarity over which an all-wrong cohort is curriculum",
    )
    dead_end_share: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="share of all-correct (all-wrong) prompt groups over which a cohort is known (has no foothold)",
    )
    explore_uncertain_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="share of exploration dispatches chosen by uncertainty rather than at random",
    )
    # A dispatch whose lift has not come back within this time frees its
    # in-flight slot (the trainer died or lost it): without a lease one lost
    # result would hold the cap, and the stream, forever.
    dispatch_timeout_s: float = Field(default=3600.0, ge=MIN_DISPATCH_TIMEOUT_S, le=7 * 86400.0)
    shadow_mode: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Thresholds:
        if self.no_foothold_pass_rate >= self.known_pass_rate:
            raise ValueError(
                f"no_foothold_pass_rate ({self.no_foothold_pass_rate}) must be under "
                f"known_pass_rate ({self.known_pass_rate})"
            )
        return self

    def replace(self, **changes: Any) -> Thresholds:
        """A validated copy with ``changes`` (strict types); raises
        ``pydantic.ValidationError`` on a bad value."""
        return Thresholds.strict({**self.model_dump(), **changes})

    @classmethod
    def strict(cls, values: Mapping[str, Any]) -> Thresholds:
        """Validate JSON/YAML values strictly: ``true`` is not 1, ``"5"`` is not 5."""
        return cls.model_validate(dict(values), strict=True)


class ServiceSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535)
    # The admin API's bearer tokens. No default exists anywhere: without a
    # configured admin token (or token file) the scorer generates one at
    # start into <state_dir>/admin-token (mode 0600), where the CLI on the
    # same host finds it. The read token only reads (GET /admin/...).
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    read_token: SecretStr | None = None
    # TLS for the admin/metrics port: both files or neither.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # HTTP hardening: time to send a request's headers and body, the largest
    # body, open connections at once, and the listen backlog.
    http_timeout_s: float = Field(default=10.0, gt=0.0, le=300.0)
    http_max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    http_max_connections: int = Field(default=256, ge=8, le=65_535)
    http_backlog: int = Field(default=1024, ge=16, le=65_535)
    # This process's name among replicas (Kafka client ids, logs); default:
    # the host name (a pod's name in Kubernetes).
    replica: str | None = None
    group: str = "tapd-scorer"
    # Records of a traces partition re-read before its state record's
    # position when a replica takes the partition over, to rebuild the
    # duplicate filter (bounded by cohorting.dedup_window too).
    handoff_dedup_records: int = Field(default=20_000, ge=0)
    # How often a traces partition's state record is written when all that
    # changed is traces added to open cohorts: a new owner rebuilding from an
    # older record re-reads those traces and builds the same cohorts, so the
    # record (all open cohorts of the partition, O(open cohorts) bytes) need
    # not go out per batch. A batch that closes, evicts, scores or
    # dead-letters anything in the partition writes it at once, as do a
    # hand-back and shutdown; a quiet loop writes what is still unrecorded once
    # the interval has passed. 0: every batch. The traces offset is committed
    # with each record, so the committed offset lags by up to this much too.
    state_record_interval_s: float = Field(default=1.0, ge=0.0, le=300.0)
    # How long start-up waits to have read the lift and policy topics to their
    # end (a new replica learns every label before it scores a trace).
    catch_up_timeout_s: float = Field(default=300.0, gt=0.0)
    poll_timeout_s: float = Field(default=0.5, gt=0.0)
    # While traces are arriving (or cohorts wait to be scored), the lift,
    # dead-letter and policy topics are polled at most this often: polling
    # the three Kafka consumers in every loop took about 3 % of the loop's
    # time, and lifts come minutes apart (a GRPO run each). An idle loop polls
    # them at once, as does a loop that has read a lift. 0: every loop.
    side_poll_interval_s: float = Field(default=0.5, ge=0.0, le=60.0)
    max_poll_records: int = Field(default=500, ge=1)
    grace_period_s: float = Field(default=20.0, gt=0.0)
    thresholds_file: Path | None = None  # watched: edits are applied at run time

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile: set both for TLS, or neither")
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("admin_token and admin_token_file: set one, not both")
        return self

    def replica_name(self) -> str:
        return self.replica or os.environ.get("HOSTNAME") or socket.gethostname() or "local"


class MetricsSettings(_Frozen):
    """What the scorer's per-tenant metrics label (daemon/core/tenants.py).

    At most ``max_tenants`` tenants get a ``tenant`` label of their own: the
    pinned ``tenants`` first, then the first others the process sees; the
    rest count as ``other``. Not persisted: a restart chooses again.
    """

    max_tenants: int = Field(
        default=20, ge=0, le=1_000, description="tenant label values besides other and unknown"
    )
    tenants: tuple[str, ...] = Field(
        default=(), description="tenants that always get their own label (pinned)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MetricsSettings:
        if len(set(self.tenants)) != len(self.tenants):
            raise ValueError(f"metrics.tenants: a tenant is named twice in {list(self.tenants)}")
        if any(not t or len(t) > MAX_ID_CHARS for t in self.tenants):
            raise ValueError(f"metrics.tenants: each tenant is 1 to {MAX_ID_CHARS} characters")
        if len(self.tenants) > self.max_tenants:
            raise ValueError(
                f"metrics.tenants: {len(self.tenants)} pinned tenants, "
                f"more than metrics.max_tenants ({self.max_tenants})"
            )
        return self


class TapdSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TAPD_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    state_dir: Path = Path("var")
    transport: TransportSettings = TransportSettings()
    topics: Topics = Topics()
    cohorting: CohortingSettings = CohortingSettings()
    predictor: PredictorSettings = PredictorSettings()
    policy: PolicySettings = PolicySettings()
    grpo: GRPOParams = GRPOParams()
    trainer: TrainerSettings = TrainerSettings()
    thresholds: Thresholds = Thresholds()
    verify: VerifySettings = VerifySettings()
    service: ServiceSettings = ServiceSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def policy_store_dir(self) -> Path:
        return self.policy.store_path or self.state_dir / "trainer" / "checkpoints"

    def transport_configured(self) -> bool:
        """Whether the transport kind was chosen (config file or environment), not defaulted."""
        return "kind" in self.transport.model_fields_set

    def for_role(self, role: str) -> TapdSettings:
        """These settings for one process: a Kafka client id per role and replica
        (``tapd-scorer-<replica>``) unless one is configured, so that the broker's
        logs, quotas and group listings tell the processes apart."""
        if "client_id" in self.transport.model_fields_set:
            return self
        client_id = f"tapd-{role}-{self.service.replica_name()}"[:200]
        transport = self.transport.model_copy(update={"client_id": client_id})
        return self.model_copy(update={"transport": transport})

    def effective(self) -> dict[str, Any]:
        """The configuration in force, as JSON values with every secret masked."""
        return self.model_dump(mode="json")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment over explicit (file) values, so a deployment can
        # override one key of a mounted config file.
        return env_settings, init_settings, file_secret_settings


# TAPD_* variables that are not settings: the CLI's own, and the lab's.
NON_SETTING_VARIABLES = frozenset(
    {
        "TAPD_CONFIG",
        "TAPD_URL",
        "TAPD_ADMIN_TOKEN",
        "TAPD_ADMIN_TOKEN_FILE",
        "TAPD_ADMIN_CACERT",
        "TAPD_KAFKA_HOME",
        "TAPD_POLICY_CACHE",
    }
)


class UnknownVariable(ValueError):
    """A ``TAPD_*`` environment variable that names no setting."""

    def __init__(self, name: str, closest: str | None) -> None:
        self.name, self.closest = name, closest
        hint = f"; did you mean {closest}?" if closest else ""
        super().__init__(f"{name}: not a tapd setting{hint}")


def _env_names(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, info in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        yield env
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _env_names(ann, env + "__")


def setting_variables() -> frozenset[str]:
    """Every ``TAPD_*`` variable that sets something."""
    return frozenset(_env_names(TapdSettings, "TAPD_")) | NON_SETTING_VARIABLES


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse the first ``TAPD_*`` variable that names no setting (``UnknownVariable``)."""
    env = os.environ if environ is None else environ
    known = setting_variables()
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith("TAPD_") and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
            raise UnknownVariable(name, close[0] if close else None)


def load_settings(path: Path | str | None = None, **overrides: Any) -> TapdSettings:
    """Settings from an optional YAML file, the environment and ``overrides``.

    Raises :class:`UnknownVariable` for a ``TAPD_*`` variable that names no
    setting, and ``pydantic.ValidationError`` for a bad value.
    """
    check_environment()
    data: dict[str, Any] = {}
    path = path or os.environ.get("TAPD_CONFIG")
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data.update(loaded)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return TapdSettings(**data)


def read_thresholds_file(path: Path) -> dict[str, Any]:
    """The threshold values a YAML file sets (a mapping of threshold names).

    Only structure is checked here (a mapping; every key a threshold, else a
    ``ValueError`` naming the closest one); values are validated strictly
    when layered (:meth:`Thresholds.strict`).
    """
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: must be a mapping of threshold names to values")
    if "thresholds" in loaded and isinstance(loaded["thresholds"], dict):
        loaded = loaded["thresholds"]
    for key in loaded:
        if key not in Thresholds.model_fields:
            close = difflib.get_close_matches(str(key), list(Thresholds.model_fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"{key}: not a threshold{hint}")
    return {str(k): v for k, v in loaded.items()}


def load_thresholds(path: Path) -> Thresholds:
    """Thresholds from a YAML file over the defaults, validated strictly."""
    return Thresholds.strict({**Thresholds().model_dump(), **read_thresholds_file(path)})
