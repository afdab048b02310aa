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

from streams.settings import TransportSettings


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
    # Where kept policy versions are stored (checkpoints v1, v2, ...); both
    # roles must reach it. Default: <state_dir>/trainer/checkpoints.
    store_path: Path | None = None


class TrainerSettings(_Frozen):
    mode: Literal["continual", "probe_revert"] = "continual"
    backend: str = Field(default="trl", description="daemon.trainer.backend.BACKENDS name")
    rollback_nll_worsening: float = Field(
        default=0.25, ge=0.0, description="nats of probe-NLL rise that roll back"
    )
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
    policy: PolicySettings = PolicySettings()
    grpo: GRPOParams = GRPOParams()
    trainer: TrainerSettings = TrainerSettings()
    thresholds: Thresholds = Thresholds()
    service: ServiceSettings = ServiceSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def policy_store_dir(self) -> Path:
        return self.policy.store_path or self.state_dir / "trainer" / "checkpoints"

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
