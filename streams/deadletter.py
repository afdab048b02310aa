"""Rejected input as data: every bad record becomes a :class:`DeadLetter`.

Validation errors are values, not exceptions (Bytewax's ``oks``/``errs``):
:func:`route` splits a batch into the messages that decoded and the dead
letters for the rest, so one bad record never stops a consumer. A dead
letter keeps the original bytes (base64), where they came from, which stage
rejected them and the field and reason, so nothing is lost and an operator
can fix and replay it.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable

from streams.schemas import (
    MAX_ID_CHARS,
    DeadLetter,
    M,
    SchemaError,
    decode,
)
from streams.transport import Record

# The dead letter itself must fit under the schemas' 700 kB message limit
# after base64 (4/3 growth): a larger original (only an oversize message can
# be) keeps its first bytes, and the reason says so.
MAX_ORIGINAL_BYTES = 500_000
_MAX_FIELD = 1024
_MAX_REASON = 4096


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def dead_letter(
    raw: bytes,
    *,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
    error: SchemaError | None = None,
    field: str | None = None,
    reason: str | None = None,
    ts: float | None = None,
) -> DeadLetter:
    """The dead letter for ``raw``, rejected by ``stage`` because of ``error``
    (or an explicit ``field`` and ``reason``, for rejections that are not
    schema errors: a failed verifier, a cohort too small to train on)."""
    if error is not None:
        field, reason = error.field, error.reason
    if field is None or reason is None:
        raise ValueError("a dead letter needs an error, or a field and a reason")
    kept = raw[:MAX_ORIGINAL_BYTES]
    if len(kept) < len(raw):
        reason = f"{reason} [original truncated to its first {len(kept)} of {len(raw)} bytes]"
    return DeadLetter(
        schema="tapd.dlq/1",
        ts=time.time() if ts is None else ts,
        stage=_clip(stage, MAX_ID_CHARS),
        field=_clip(field, _MAX_FIELD),
        reason=_clip(reason, _MAX_REASON),
        source_topic=_clip(topic, MAX_ID_CHARS),
        partition=partition,
        offset=offset,
        original_b64=base64.b64encode(kept).decode("ascii"),
    )


def original(letter: DeadLetter) -> bytes:
    """The rejected bytes a dead letter carries (for inspection and replay)."""
    return base64.b64decode(letter.original_b64)


def route(
    records: Iterable[Record], model: type[M], stage: str = "decode"
) -> tuple[list[tuple[Record, M]], list[DeadLetter]]:
    """Decode each record as ``model``: ``(oks, errs)``, in input order."""
    oks: list[tuple[Record, M]] = []
    errs: list[DeadLetter] = []
    for rec in records:
        try:
            oks.append((rec, decode(rec.value, model)))
        except SchemaError as e:
            errs.append(
                dead_letter(
                    rec.value,
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    stage=stage,
                    error=e,
                )
            )
    return oks, errs
