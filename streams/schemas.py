"""Versioned JSON schemas for every message that crosses a process.

Each message names its schema in a ``schema`` field (``tapd.trace/1``, ...).
All metadata lives in the JSON payload: the 0.9 test broker has no record
headers. Validation never raises anything but :class:`SchemaError`, whose
``field`` and ``reason`` say exactly what is wrong, so that a rejected message
can be routed to the dead-letter topic with that reason.

Unknown extra fields are tolerated (ignored); unknown schema versions are
rejected, because a newer producer may have changed a field's meaning.

Decoding is one validated parse (pydantic-core's Rust JSON parser and
validator, in strict mode) with every limit enforced there, once: message
size and nesting depth before parsing; JSON numbers only in numeric fields
(no booleans, no numeric strings); finite, bounded numbers; integers of at
most :data:`MAX_INT_DIGITS` digits in the free-form parts (the parser itself
refuses an integer of more than 4,300 digits, Python's own limit, and that
refusal names the field too). The parts of a message tapd does not type
(``verifier_args``) are walked once after parsing; ignored extra fields are
parsed (bounded by size and depth) and dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streams.rejection import Rejection

# Limits. Kafka 0.9's default message.max.bytes is 1,000,012; stay under it
# so that anything we accept can also be forwarded, and so that a dead letter
# (which wraps the original bytes in base64: 4/3 growth) of any message up to
# this size still fits the broker whole.
MAX_MESSAGE_BYTES = 700_000
# A dead letter carries an original of up to MAX_MESSAGE_BYTES in base64
# (933,336 bytes) plus its envelope (field and reason are clipped).
MAX_DEAD_LETTER_BYTES = 990_000
MAX_TEXT_CHARS = 32_768
MAX_ID_CHARS = 128
MAX_ATTEMPTS = 64
MAX_TOKENS_PER_ATTEMPT = 8_192
MAX_TAGS = 16
MAX_ITEMS = 256
MAX_FEATURES = 128
MAX_JSON_DEPTH = 32
# Integers in the untyped parts of a message (verifier arguments): int64 range.
MAX_INT_DIGITS = 19
# A sampled token's log-prob under its own distribution, and an entropy, in
# nats, are far inside this; -1e308 is an attack that overflows every sum.
MAX_NATS = 1e4
# Event times: after the epoch (0 is the "unset" value of many producers) and
# before 2100-01-01 (1e308, or milliseconds sent as seconds, are refused).
MAX_TS = 4_102_444_800.0
# What a dispatch needs besides its items (ids, slice key, features): the
# cohort builder keeps a cohort's items under MAX_MESSAGE_BYTES minus this.
DISPATCH_ENVELOPE_BYTES = 16_384

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
Timestamp = Annotated[float, Field(ge=0.0, le=MAX_TS)]
LogProb = Annotated[float, Field(ge=-MAX_NATS, le=1e-6)]
Nats = Annotated[float, Field(ge=0.0, le=MAX_NATS)]


class _Message(BaseModel):
    # NaN and infinities are rejected everywhere: a NaN reward silently
    # poisons every mean, and JSON has no NaN anyway.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class TokenStats(_Message):
    """Summary of an attempt's per-token log-probs, when full arrays are not shipped."""

    logprob_mean: LogProb
    logprob_min: LogProb
    logprob_p10: LogProb
    logprob_p50: LogProb
    logprob_p90: LogProb
    prob_mean: float = Field(ge=0.0, le=1.0)
    # Mean log-prob over the first and the second half of the tokens: their
    # difference is the confidence slope.
    logprob_early: LogProb
    logprob_late: LogProb
    entropy_mean: Nats | None = None


class Attempt(_Message):
    completion: Text
    reward: float = Field(ge=-1e6, le=1e6)
    n_tokens: int = Field(ge=0, le=MAX_TOKENS_PER_ATTEMPT)
    # Log-probs must be <= 0 (1e-6 of rounding slack) and not absurdly small.
    token_logprobs: list[LogProb] | None = Field(default=None, max_length=MAX_TOKENS_PER_ATTEMPT)
    token_entropies: list[Nats] | None = Field(default=None, max_length=MAX_TOKENS_PER_ATTEMPT)
    stats: TokenStats | None = None

    @field_validator("token_logprobs")
    @classmethod
    def _one_per_token(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        n = info.data.get("n_tokens")
        if v and n is not None and len(v) != n:
            raise ValueError(f"has {len(v)} elements but n_tokens is {n}: one log-prob per token")
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
    ts: Timestamp = Field(description="event time, unix seconds")
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
    ts: Timestamp
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
    ts: Timestamp
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
    # Optional: tapd's trainer measures it; a custom trainer need not
    # (docs/TRAINER_CONTRACT.md). The scorer does not learn from it.
    plasticity: Plasticity | None = None
    # Revision 2 (optional): lift on the cohort's target, on other targets
    # (transfer) and on items the policy has no foothold on (collateral).
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
    ts: Timestamp
    stage: Name  # which part rejected it: "decode", "cohorting", "verifier", ...
    field: Annotated[str, StringConstraints(max_length=1024)]
    reason: Annotated[str, StringConstraints(max_length=4096)]
    # A log's topic, or for records not read from a log (a file given to
    # ``tapd produce``) the file's identity, with partition -1 and the line
    # number as the offset: (source_topic, partition, offset) is unique per source.
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
_SCHEMA_OF: dict[type[BaseModel], str] = {v: k for k, v in _BY_SCHEMA.items()}
# Any of them, chosen by the ``schema`` field (one parse, no peeking).
_ANY: TypeAdapter[Message] = TypeAdapter(
    Annotated[Trace | Dispatch | LiftResult | DeadLetter, Field(discriminator="schema_")]
)


# --- limits checked before parsing ------------------------------------------------

# A JSON string, escapes included (the unrolled form: no backtracking per character).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text nests containers deeper than ``limit``.

    Counting brackets bounds the depth from above (brackets inside strings
    only add to the count), so almost every message is settled by two
    ``bytes.count`` calls. Otherwise the strings are cut out and the
    remaining brackets peeled, innermost pairs first, ``limit`` times: all C
    loops, no per-element Python walk.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    # Anything left is nested deeper (or unbalanced, which the parser refuses anyway).
    return bool(brackets)


def _size_limit(model: type[BaseModel] | None) -> int:
    return MAX_DEAD_LETTER_BYTES if model in (DeadLetter, None) else MAX_MESSAGE_BYTES


def _as_bytes(raw: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate in a str input
            raise SchemaError("$", f"not valid UTF-8 at character {e.start}") from None
    return bytes(raw)


def _check_size(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise SchemaError("$", f"message is {len(data)} bytes, over the {limit}-byte limit")


# --- errors --------------------------------------------------------------------------


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            name = "schema" if p == "schema_" else p
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "$"


class _LongInt:
    """Stands in for an over-long integer while looking for where it is."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _long_int(text: str) -> int | _LongInt:
    digits = len(text.lstrip("-"))
    return _LongInt(digits) if digits > MAX_INT_DIGITS else int(text)


def _find(obj: Any, pred: Any, path: str = "") -> tuple[str, Any] | None:
    """Path (and value) of the first value satisfying ``pred`` (error paths only)."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        o, p = stack.pop()
        if pred(o):
            return p or "$", o
        if isinstance(o, dict):
            stack.extend((v, f"{p}.{k}" if p else str(k)) for k, v in reversed(o.items()))
        elif isinstance(o, list):
            stack.extend((v, f"{p}[{i}]") for i, v in reversed(list(enumerate(o))))
    return None


def _json_error(data: bytes, message: str) -> SchemaError:
    """The parser refused the text: say where and why, as precisely as we can."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return SchemaError("$", f"not valid UTF-8 at byte {e.start}")
    message = message.removeprefix("Invalid JSON: ")
    if "number out of range" in message:
        # An integer of more than 4,300 digits: find its field for the reason.
        try:
            found = _find(json.loads(text, parse_int=_long_int), lambda o: isinstance(o, _LongInt))
        except (ValueError, RecursionError):
            found = None
        if found is not None:
            return SchemaError(
                found[0],
                f"an integer of {found[1].digits} digits: over the {MAX_INT_DIGITS}-digit limit",
            )
    return SchemaError("$", f"not valid JSON: {message}")


def _schema_error(value: Any, expected: str | None) -> SchemaError:
    """A missing, mistyped or unknown ``schema`` field."""
    if value is None:
        if expected is None:
            return SchemaError("schema", f"unknown schema None (supported: {sorted(_BY_SCHEMA)})")
        return SchemaError("schema", "missing: every message names its schema")
    if not isinstance(value, str):
        if expected is None:
            return SchemaError(
                "schema", f"unknown schema {value!r} (supported: {sorted(_BY_SCHEMA)})"
            )
        return SchemaError("schema", f"must be a string, got {type(value).__name__}")
    if expected is None:
        return SchemaError("schema", f"unknown schema {value!r} (supported: {sorted(_BY_SCHEMA)})")
    family, _, version = value.partition("/")
    if family == expected.partition("/")[0]:
        return SchemaError(
            "schema", f"unknown version {version!r} of {family} (supported: {expected})"
        )
    return SchemaError("schema", f"expected {expected}, got {value!r}")


def _from_validation_error(e: ValidationError, data: bytes, expected: str | None) -> SchemaError:
    errors = e.errors(include_url=False)
    err = errors[0]
    kind = err["type"]
    if kind == "json_invalid":
        return _json_error(data, str(err["msg"]))
    loc = tuple(err["loc"])
    inp = err.get("input")
    if not loc and kind in ("model_type", "dict_type", "model_attributes_type"):
        return SchemaError("$", f"expected a JSON object, got {type(inp).__name__}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _schema_error(inp.get("schema") if isinstance(inp, dict) else None, None)
    if expected is None and loc and loc[0] in _BY_SCHEMA:
        loc = loc[1:]  # the tagged union's branch
    if loc and loc[0] in ("schema_", "schema"):
        if kind == "missing":
            return _schema_error(None, expected)
        return _schema_error(inp, expected)
    reason = str(err["msg"])
    if kind == "finite_number":
        reason = "must be a finite number (NaN and infinities are rejected)"
    more = len(errors) - 1
    if more > 0:
        reason += f" (and {more} more error{'s' if more > 1 else ''})"
    return SchemaError(_field_path(loc), reason)


# --- after parsing: the untyped parts and the wire-only rules -------------------------


def _free_form_problem(value: Any) -> str | None:
    """Why a free-form JSON value (verifier arguments) is unusable, if it is."""
    if isinstance(value, float):
        return (
            None
            if math.isfinite(value)
            else "must be a finite number (NaN and infinities are rejected)"
        )
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_INT_DIGITS:
        return f"an integer of more than {MAX_INT_DIGITS} digits"
    return None


def _check_free_form(args: Mapping[str, Any], path: str) -> None:
    for k, v in args.items():
        if isinstance(v, dict | list):
            found = _find(v, lambda o: _free_form_problem(o) is not None, f"{path}.{k}")
            if found is not None:
                raise SchemaError(found[0], str(_free_form_problem(found[1])))
        else:
            problem = _free_form_problem(v)
            if problem is not None:
                raise SchemaError(f"{path}.{k}", problem)


def _check_parsed(msg: BaseModel) -> None:
    if isinstance(msg, Trace):
        if msg.ts <= 0.0:
            raise SchemaError("ts", "must be a unix time in seconds after the epoch (0 is unset)")
        if msg.verifier_args:
            _check_free_form(msg.verifier_args, "verifier_args")
    elif isinstance(msg, Dispatch):
        for i, it in enumerate(msg.items):
            if it.verifier_args:
                _check_free_form(it.verifier_args, f"items[{i}].verifier_args")


def decode(raw: bytes | str, model: type[M]) -> M:
    """Parse and validate one message; raise :class:`SchemaError` naming the field and reason."""
    data = _as_bytes(raw)
    _check_size(data, _size_limit(model))
    if _too_deep(data):
        raise SchemaError("$", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        # Strict: a number field takes JSON numbers only (not true, not "123").
        msg = model.model_validate_json(data, strict=True)
    except ValidationError as e:
        raise _from_validation_error(e, data, _SCHEMA_OF[model]) from None
    _check_parsed(msg)
    return msg


def decode_any(raw: bytes | str) -> Message:
    """Parse a message of whichever schema it names."""
    data = _as_bytes(raw)
    _check_size(data, _size_limit(None))
    if _too_deep(data):
        raise SchemaError("$", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        msg = _ANY.validate_json(data, strict=True)
    except ValidationError as e:
        raise _from_validation_error(e, data, None) from None
    _check_size(data, _size_limit(type(msg)))
    _check_parsed(msg)
    return msg


def encode(msg: BaseModel) -> bytes:
    """Serialize a message; the result always decodes back to an equal message.

    Raises :class:`SchemaError` (field ``$``) when the result would be over
    the size limit: a caller that builds messages from accepted input must
    bound them before (the cohort builder bounds dispatches), or route the
    error like any other rejection.
    """
    data = msg.model_dump(mode="json", by_alias=True, exclude_none=True)
    raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    limit = _size_limit(type(msg))
    if len(raw) > limit:
        raise SchemaError("$", f"encoded message is {len(raw)} bytes, over the {limit}-byte limit")
    return raw


# The string escaper json.dumps uses with ensure_ascii=False.
_json_string = json.encoder.encode_basestring


def dispatch_item_bytes(trace: Trace) -> int:
    """Bytes the trace adds to a dispatch's encoding (its item and a separator)."""
    if trace.verifier_args:
        item = {
            "trace_id": trace.trace_id,
            "prompt": trace.prompt,
            "reference": trace.reference,
            "verifier": trace.verifier,
            "verifier_args": trace.verifier_args,
        }
        text = json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return len(text.encode()) + 1
    # Without arguments (the common case) the item is five fixed keys and four
    # strings: each string escaped as json.dumps escapes it, no dict encoded.
    text = "".join(
        (
            '{"trace_id":',
            _json_string(trace.trace_id),
            ',"prompt":',
            _json_string(trace.prompt),
            ',"reference":',
            _json_string(trace.reference),
            ',"verifier":',
            _json_string(trace.verifier),
            ',"verifier_args":{}}',
        )
    )
    return len(text.encode()) + 1


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
