"""Versioned JSON schemas for every message that crosses a process.

Each message names its schema in a ``schema`` field (``tapd.trace/1``, ...).
All metadata lives in the JSON payload: the 0.9 test broker has no record
headers. Validation never raises anything but :class:`SchemaError`, whose
``field`` and ``reason`` say exactly what is wrong, so that a rejected message
can be routed to the dead-letter topic with that reason.

Unknown extra fields are tolerated (ignored); unknown schema versions are
rejected, because a newer producer may have changed a field's meaning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from streams.rejection import Rejection

# Limits. Kafka 0.9's default message.max.bytes is 1,000,012; stay under it
# so that anything we accept can also be forwarded (e.g. to the DLQ, which
# wraps the original bytes in base64: 4/3 growth, hence the margin).
MAX_MESSAGE_BYTES = 700_000
MAX_TEXT_CHARS = 32_768
MAX_ID_CHARS = 128
MAX_ATTEMPTS = 64
MAX_TOKENS_PER_ATTEMPT = 8_192
MAX_TAGS = 16
MAX_ITEMS = 256
MAX_FEATURES = 128
MAX_JSON_DEPTH = 32

TRACE_SCHEMA = "tapd.trace/1"
DISPATCH_SCHEMA = "tapd.dispatch/1"
LIFT_SCHEMA = "tapd.lift/1"
DEAD_LETTER_SCHEMA = "tapd.dlq/1"


class SchemaError(Rejection):
    """A message that does not satisfy its schema: ``field`` and ``reason`` say why."""


Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Tag = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]


class _Message(BaseModel):
    # NaN and infinities are rejected everywhere: a NaN reward silently
    # poisons every mean, and JSON has no NaN anyway.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class TokenStats(_Message):
    """Summary of an attempt's per-token log-probs, when full arrays are not shipped."""

    logprob_mean: float = Field(le=0.0)
    logprob_min: float = Field(le=0.0)
    logprob_p10: float = Field(le=0.0)
    logprob_p50: float = Field(le=0.0)
    logprob_p90: float = Field(le=0.0)
    prob_mean: float = Field(ge=0.0, le=1.0)
    # Mean log-prob over the first and the second half of the tokens: their
    # difference is the confidence slope.
    logprob_early: float = Field(le=0.0)
    logprob_late: float = Field(le=0.0)
    entropy_mean: float | None = Field(default=None, ge=0.0)


class Attempt(_Message):
    completion: Text
    reward: float = Field(ge=-1e6, le=1e6)
    n_tokens: int = Field(ge=0, le=MAX_TOKENS_PER_ATTEMPT)
    token_logprobs: list[float] | None = Field(default=None, max_length=MAX_TOKENS_PER_ATTEMPT)
    token_entropies: list[float] | None = Field(default=None, max_length=MAX_TOKENS_PER_ATTEMPT)
    stats: TokenStats | None = None

    @field_validator("token_logprobs")
    @classmethod
    def _logprobs_nonpositive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            for i, lp in enumerate(v):
                if lp > 1e-6:
                    raise ValueError(f"element {i} is {lp}: a log-prob must be <= 0")
        return v

    @model_validator(mode="after")
    def _arrays_match(self) -> Attempt:
        if (
            self.token_logprobs is not None
            and self.token_entropies is not None
            and len(self.token_logprobs) != len(self.token_entropies)
        ):
            raise ValueError("token_entropies must have as many elements as token_logprobs")
        return self


class Trace(_Message):
    """One prompt with one or more sampled attempts, as production serving saw it."""

    schema_: Literal["tapd.trace/1"] = Field(alias="schema")
    trace_id: Id  # the idempotency key: a trace seen twice counts once
    ts: float = Field(ge=0.0, description="event time, unix seconds")
    tenant: Name = "default"
    source: Name = "default"
    subject: Name
    # Capability-slice tags (task_type, operation, output_constraint,
    # background, ...): free-form, but bounded.
    tags: dict[Name, Tag] = Field(default_factory=dict, max_length=MAX_TAGS)
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
    reference: Text
    verifier: Name
    verifier_args: dict[Name, Any] = Field(default_factory=dict, max_length=MAX_TAGS)
    policy_version: Name
    attempts: list[Attempt] = Field(default_factory=list, max_length=MAX_ATTEMPTS)

    model_config = ConfigDict(
        extra="ignore", frozen=True, allow_inf_nan=False, populate_by_name=True
    )


class DispatchItem(_Message):
    trace_id: Id
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
    reference: Text
    verifier: Name
    verifier_args: dict[Name, Any] = Field(default_factory=dict, max_length=MAX_TAGS)


Selection = Literal["exploit", "explore_random", "explore_uncertain"]


class Dispatch(_Message):
    """A cohort sent to the trainer, with what the scorer believed about it."""

    schema_: Literal["tapd.dispatch/1"] = Field(alias="schema")
    cohort_id: Id  # deterministic from members: a replayed dispatch is harmless
    slice_key: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    subject: Name
    ts: float = Field(ge=0.0)
    policy_version: Name
    model_version: Name  # the predictor version that scored it
    feature_schema: Name
    features: dict[Name, float] = Field(max_length=MAX_FEATURES)
    predicted_lift: float
    uncertainty: float = Field(ge=0.0)
    selection: Selection
    recommendation: Name = "train"
    items: list[DispatchItem] = Field(min_length=1, max_length=MAX_ITEMS)
    # Added in revision 2 of tapd.dispatch/1 (optional: older producers omit
    # it). The probe target (capability slice) this cohort is meant to
    # teach; when absent, the trainer uses ``subject`` if the probe has a
    # target of that name (streams.probes.cohort_target).
    target: Name | None = None

    model_config = ConfigDict(
        extra="ignore", frozen=True, allow_inf_nan=False, populate_by_name=True
    )


class Plasticity(_Message):
    dormant_fraction: float = Field(ge=0.0, le=1.0)
    effective_rank: float = Field(ge=0.0)
    weight_norm: float = Field(ge=0.0)
    grad_norm: float = Field(ge=0.0)
    policy_entropy: float = Field(ge=0.0)
    probe_nll: float = Field(ge=0.0)


class ProbeLift(_Message):
    """NLL (nats per answer token) and greedy accuracy over one part of the probe."""

    items: int = Field(ge=1)
    tokens: int = Field(ge=0)
    nll_before: float = Field(ge=0.0)
    nll_after: float = Field(ge=0.0)
    nll_lift: float
    acc_before: float = Field(ge=0.0, le=1.0)
    acc_after: float = Field(ge=0.0, le=1.0)
    acc_lift: float = Field(ge=-1.0, le=1.0)


class LiftResult(_Message):
    """What training on a cohort did, measured on the held-out probe.

    ``nll_lift`` is probe NLL before minus after over every probe item, so a
    positive lift means the model got better. Revision 2 of ``tapd.lift/1``
    adds optional fields (absent from older trainers' messages): the cohort's
    ``target`` and the lift on three parts of the probe, ``target_lift``
    (items of the target on which the policy had a foothold: the primary
    label), ``transfer_lift`` (other targets' items with a foothold) and
    ``collateral_lift`` (items without a foothold). :attr:`label` is what the
    predictor learns.
    """

    schema_: Literal["tapd.lift/1"] = Field(alias="schema")
    cohort_id: Id
    ts: float = Field(ge=0.0)
    trainer_id: Name
    mode: Literal["continual", "probe_revert"]
    feature_schema: Name
    features: dict[Name, float] = Field(max_length=MAX_FEATURES)
    model_version: Name
    predicted_lift: float
    selection: Selection
    nll_before: float = Field(ge=0.0)
    nll_after: float = Field(ge=0.0)
    nll_lift: float
    acc_before: float = Field(ge=0.0, le=1.0)
    acc_after: float = Field(ge=0.0, le=1.0)
    acc_lift: float = Field(ge=-1.0, le=1.0)
    train_reward_before: float
    train_reward_after: float
    policy_version_before: Name
    policy_version_after: Name
    rolled_back: bool = False
    steps: int = Field(ge=0)
    duration_s: float = Field(ge=0.0)
    plasticity: Plasticity
    # Revision 2 (optional).
    target: Name | None = None
    target_lift: ProbeLift | None = None
    transfer_lift: ProbeLift | None = None
    collateral_lift: ProbeLift | None = None

    model_config = ConfigDict(
        extra="ignore", frozen=True, allow_inf_nan=False, populate_by_name=True
    )

    @property
    def label(self) -> float:
        """The primary label: NLL-lift on the target's items, else on the whole probe."""
        return self.target_lift.nll_lift if self.target_lift is not None else self.nll_lift


class DeadLetter(_Message):
    """A rejected message, kept with why and where it came from."""

    schema_: Literal["tapd.dlq/1"] = Field(alias="schema")
    ts: float
    stage: Name  # which part rejected it: "decode", "cohorting", "verifier", ...
    field: Annotated[str, StringConstraints(max_length=1024)]
    reason: Annotated[str, StringConstraints(max_length=4096)]
    source_topic: Name
    partition: int
    offset: int
    original_b64: str

    model_config = ConfigDict(
        extra="ignore", frozen=True, allow_inf_nan=False, populate_by_name=True
    )


Message = Trace | Dispatch | LiftResult | DeadLetter
M = TypeVar("M", Trace, Dispatch, LiftResult, DeadLetter)

_BY_SCHEMA: dict[str, type[BaseModel]] = {
    TRACE_SCHEMA: Trace,
    DISPATCH_SCHEMA: Dispatch,
    LIFT_SCHEMA: LiftResult,
    DEAD_LETTER_SCHEMA: DeadLetter,
}


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth, stopping early past ``limit`` (deep nesting is an attack, not data)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    worst = 0
    while stack:
        o, d = stack.pop()
        worst = max(worst, d)
        if worst > limit:
            return worst
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return worst


def _nonfinite_path(obj: Any, path: str = "") -> str | None:
    """Path of the first NaN/infinity in free-form parts of a message, if any."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "$"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _nonfinite_path(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _nonfinite_path(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _parse(raw: bytes | str) -> dict[str, Any]:
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_MESSAGE_BYTES:
        raise SchemaError("$", f"message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise SchemaError("$", f"not valid UTF-8 at byte {e.start}") from None
    try:
        # NaN/Infinity literals parse to floats so that validation can name
        # the field that carries them.
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise SchemaError("$", f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SchemaError("$", f"expected a JSON object, got {type(obj).__name__}")
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise SchemaError("$", f"nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            name = "schema" if p == "schema_" else p
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "$"


def _from_validation_error(e: ValidationError) -> SchemaError:
    err = e.errors(include_url=False)[0]
    reason = str(err["msg"])
    if err["type"] == "finite_number":
        reason = "must be a finite number (NaN and infinities are rejected)"
    more = e.error_count() - 1
    if more > 0:
        reason += f" (and {more} more error{'s' if more > 1 else ''})"
    return SchemaError(_field_path(tuple(err["loc"])), reason)


def _validate_obj(obj: Mapping[str, Any], model: type[M]) -> M:
    expected = next(k for k, v in _BY_SCHEMA.items() if v is model)
    schema = obj.get("schema")
    if schema is None:
        raise SchemaError("schema", "missing: every message names its schema")
    if not isinstance(schema, str):
        raise SchemaError("schema", f"must be a string, got {type(schema).__name__}")
    if schema != expected:
        family, _, version = schema.partition("/")
        exp_family = expected.partition("/")[0]
        if family == exp_family:
            raise SchemaError(
                "schema", f"unknown version {version!r} of {family} (supported: {expected})"
            )
        raise SchemaError("schema", f"expected {expected}, got {schema!r}")
    try:
        msg = model.model_validate(obj)
    except ValidationError as e:
        raise _from_validation_error(e) from None
    bad = _nonfinite_path(obj)
    if bad:
        raise SchemaError(bad, "must be a finite number (NaN and infinities are rejected)")
    return msg


def decode(raw: bytes | str, model: type[M]) -> M:
    """Parse and validate one message; raise :class:`SchemaError` naming the field and reason."""
    return _validate_obj(_parse(raw), model)


def decode_any(raw: bytes | str) -> Message:
    """Parse a message of whichever schema it names."""
    obj = _parse(raw)
    schema = obj.get("schema")
    model = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if model is None:
        raise SchemaError("schema", f"unknown schema {schema!r} (supported: {sorted(_BY_SCHEMA)})")
    return _validate_obj(obj, model)  # type: ignore[type-var,return-value]


def encode(msg: BaseModel) -> bytes:
    """Serialize a message; the result always decodes back to an equal message."""
    data = msg.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(raw) > MAX_MESSAGE_BYTES:
        raise SchemaError(
            "$", f"encoded message is {len(raw)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"
        )
    return raw


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
