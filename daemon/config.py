"""All of tapd's configuration in one typed place.

Settings come from (highest first) environment variables ``TAPD_...`` with
``__`` as the nested delimiter (``TAPD_TOPICS__TRACES=prod.traces``), a YAML
file (``--config`` / ``TAPD_CONFIG``), and the defaults below. Objects are
frozen: a change builds and validates a new object and swaps it in one
assignment, so a bad value never replaces a good one.

``Thresholds`` is the part an on-call engineer tunes at run time; it is
reloadable without restart (file watch, SIGHUP, admin endpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Topics(_Frozen):
    traces: str = "tap.traces"
    dispatch: str = "tap.dispatch"
    lift: str = "tap.lift"
    dlq: str = "tap.dlq"
    # Compacted by cohort id: the label history a new replica replays to
    # rebuild the same predictor.
    labels: str = "tap.labels"
    decisions: str = "tap.decisions"


class TransportSettings(_Frozen):
    kind: Literal["embedded", "kafka"] = "embedded"
    # embedded: one SQLite file holds every topic and the group offsets
    embedded_path: Path = Path("var/tapd-log.sqlite")
    embedded_partitions: int = Field(default=1, ge=1, le=64)
    # kafka: passed through to kafka-python
    bootstrap_servers: str = "localhost:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    client_id: str = "tapd"
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    session_timeout_ms: int = Field(default=10_000, ge=6_000)
    metadata_max_age_ms: int = Field(default=5_000, ge=1_000)


class CohortingSettings(_Frozen):
    # The capability-slice key: which trace fields (or ``tags.<name>``) a
    # cohort's members share.
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
    attempts_k: int = Field(
        default=8, ge=2, le=64, description="attempts per prompt the features need"
    )
    stale_policy: Literal["reprobe", "drop"] = "reprobe"
    max_policy_lag: int = Field(
        default=0, ge=0, description="policy versions a trace may lag before it is stale"
    )
    dedup_window: int = Field(
        default=100_000, ge=0, description="ids of closed or rejected traces remembered for dedup"
    )


class PredictorSettings(_Frozen):
    river_after: int = Field(
        default=8, ge=1, description="labels before River replaces the heuristic"
    )
    lgbm_after: int = Field(default=40, ge=10, description="labels before the first LightGBM refit")
    refit_every_labels: int = Field(default=20, ge=1)
    refit_every_s: float = Field(default=600.0, gt=0.0)
    holdout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    seed: int = 0


class TrainerSettings(_Frozen):
    mode: Literal["continual", "probe_revert"] = "continual"
    model_path: Path | None = None  # None: the built-in tiny policy
    device: str = "auto"
    steps: int = Field(default=8, ge=1)
    num_generations: int = Field(default=8, ge=2)
    learning_rate: float = Field(default=5e-3, gt=0.0)
    optimizer: str = Field(default="sgd", description="a transformers optim name")
    probe_size: int = Field(default=255, ge=4)
    rollback_nll_worsening: float = Field(
        default=0.25, ge=0.0, description="nats of probe-NLL rise that roll back"
    )
    seed: int = 0
    # GRPO details (TRL GRPOConfig) and the trainer process itself.
    max_completion_length: int = Field(default=12, ge=1)
    beta: float = Field(default=0.0, ge=0.0, description="KL penalty to the reference policy")
    temperature: float = Field(default=1.0, gt=0.0)
    max_prompts_per_step: int = Field(default=8, ge=1)
    probe_seed: int = 0
    group: str = "tapd-trainer"
    trainer_id: str = "tapd-trainer"
    metrics_port: int = Field(default=9401, ge=0, le=65535, description="0: ephemeral")


class Thresholds(_Frozen):
    """The knobs an on-call engineer turns; each with its bounds."""

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
    dispatch_timeout_s: float = Field(default=3600.0, ge=1.0, le=7 * 86400.0)
    shadow_mode: bool = False

    def replace(self, **changes: Any) -> Thresholds:
        """A validated copy with ``changes``; raises ``pydantic.ValidationError`` on a bad value."""
        return Thresholds.model_validate({**self.model_dump(), **changes})


class ServiceSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535)
    admin_token: SecretStr | None = None  # None: changes through the admin endpoint are refused
    group: str = "tapd-scorer"
    poll_timeout_s: float = Field(default=0.5, gt=0.0)
    max_poll_records: int = Field(default=500, ge=1)
    grace_period_s: float = Field(default=20.0, gt=0.0)
    thresholds_file: Path | None = None  # watched: edits are applied at run time


class TapdSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TAPD_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    state_dir: Path = Path("var")
    transport: TransportSettings = TransportSettings()
    topics: Topics = Topics()
    cohorting: CohortingSettings = CohortingSettings()
    predictor: PredictorSettings = PredictorSettings()
    trainer: TrainerSettings = TrainerSettings()
    thresholds: Thresholds = Thresholds()
    service: ServiceSettings = ServiceSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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


def load_settings(path: Path | str | None = None, **overrides: Any) -> TapdSettings:
    """Settings from an optional YAML file, the environment and ``overrides``."""
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


def load_thresholds(path: Path) -> Thresholds:
    """Thresholds from a YAML file (a mapping of threshold names)."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: must be a mapping of threshold names to values")
    if "thresholds" in loaded and isinstance(loaded["thresholds"], dict):
        loaded = loaded["thresholds"]
    return Thresholds.model_validate(loaded)
