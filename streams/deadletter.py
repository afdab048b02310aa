"""Rejected input as data: every bad record becomes a :class:`DeadLetter`.

Validation errors are values, not exceptions (Bytewax's ``oks``/``errs``).
This module is tapd's one poison-message mechanism: every consumer (the
scorer's traces, lift and dead-letter topics, the trainer's dispatch topic,
``tapd produce`` and ``tapd consume --validate``) decodes through
:func:`decode_or_dead_letter` (or :func:`decode_record` / :func:`route`),
which turns *any* failure into a dead letter: a schema violation with its
stage, field and reason, and an exception nobody foresaw with stage
``internal`` and the exception as the reason. One bad record never stops a
consumer, and is never retried into a crash loop.

A dead letter keeps the original bytes whole (base64; any message up to the
schemas' size limit fits), where they came from, which stage rejected them
and the field and reason, so nothing is lost and an operator can fix and
replay it. Its key (:func:`dead_letter_key`) is unique per source record:
topic, partition and offset for a log; a file identity and the line number
for a file (:func:`file_source`).
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from streams.schemas import (
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_TS,
    DeadLetter,
    M,
    Message,
    SchemaError,
    decode,
    decode_any,
)
from streams.transport import Record

# Originals up to the largest message tapd accepts are kept whole (base64:
# 933,336 bytes, inside the dead-letter size limit). A larger original (it
# can only have been refused for its size) keeps its first bytes, and the
# reason says so.
MAX_ORIGINAL_BYTES = MAX_MESSAGE_BYTES
# The stage of a failure the code did not foresee (a bug, not bad input).
INTERNAL = "internal"
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
    # Whatever the caller passes, the letter itself must be valid: building it never fails.
    ts = time.time() if ts is None else ts
    return DeadLetter(
        schema="tapd.dlq/1",
        ts=min(max(ts, 0.0), MAX_TS) if math.isfinite(ts) else 0.0,
        stage=_clip(stage or "unknown", MAX_ID_CHARS),
        field=_clip(field, _MAX_FIELD),
        reason=_clip(reason, _MAX_REASON),
        source_topic=_clip(topic or "unknown", MAX_ID_CHARS),
        partition=partition,
        offset=offset,
        original_b64=base64.b64encode(kept).decode("ascii"),
    )


def original(letter: DeadLetter) -> bytes:
    """The rejected bytes a dead letter carries (for inspection and replay)."""
    return base64.b64decode(letter.original_b64)


def dead_letter_key(letter: DeadLetter) -> bytes:
    """The letter's record key: where its original came from, unique per source record.

    A replayed rejection of the same record has the same key (a compacted
    dead-letter topic keeps one); two different records never share one.
    """
    return f"{letter.source_topic}/{letter.partition}/{letter.offset}".encode()


def content_digest(raw: bytes) -> str:
    """Short content hash of a message's bytes (``sha256:`` + 16 hex digits)."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def file_source(path: Path | str | None) -> str:
    """A source name for records read from a file (``-`` or None: stdin).

    The file's name and a digest of its identity (resolved path, device,
    inode, size, modification time): two files, or one file changed, never
    share a name, so their dead letters (partition -1, the line as offset)
    never share a key; the same unchanged file gives the same name. Standard
    input is a new source at each read.
    """
    if path is None or str(path) == "-":
        return f"stdin@{uuid.uuid4().hex[:16]}"
    p = Path(path)
    try:
        st = os.stat(p)
        ident = f"{p.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        ident = f"{p.absolute()}|{uuid.uuid4().hex}"
    digest = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return _clip(f"file:{p.name}", MAX_ID_CHARS - 17) + f"@{digest}"


@dataclass(frozen=True, slots=True)
class Poison:
    """A record that could not be decoded, as the dead letter to send for it."""

    letter: DeadLetter

    @property
    def stage(self) -> str:
        return self.letter.stage

    @property
    def field(self) -> str:
        return self.letter.field

    @property
    def reason(self) -> str:
        return self.letter.reason


@overload
def decode_or_dead_letter(
    raw: bytes,
    model: type[M],
    *,
    topic: str,
    partition: int,
    offset: int,
    stage: str = ...,
    ts: float | None = ...,
) -> M | Poison: ...


@overload
def decode_or_dead_letter(
    raw: bytes,
    model: None,
    *,
    topic: str,
    partition: int,
    offset: int,
    stage: str = ...,
    ts: float | None = ...,
) -> Message | Poison: ...


def decode_or_dead_letter(
    raw: bytes,
    model: type[M] | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    stage: str = "decode",
    ts: float | None = None,
) -> M | Message | Poison:
    """Decode ``raw`` as ``model`` (None: whichever schema it names), or its :class:`Poison`.

    Never raises: a schema violation is a letter of ``stage`` naming the
    field; anything else (a bug, an exhausted resource) is a letter of stage
    ``internal`` with the exception as the reason, so that the consumer
    moves on and a metric counts it.
    """
    try:
        return decode(raw, model) if model is not None else decode_any(raw)
    except SchemaError as e:
        error, why = e, None
    except Exception as e:  # anything at all: the record must not stop the consumer
        error, why = None, e
    return Poison(
        dead_letter(
            bytes(raw),
            topic=topic,
            partition=partition,
            offset=offset,
            stage=stage if why is None else INTERNAL,
            error=error,
            field=None if why is None else "$",
            reason=None if why is None else f"{stage} failed unexpectedly: {why!r}",
            ts=ts,
        )
    )


def decode_record(
    rec: Record, model: type[M], stage: str = "decode", ts: float | None = None
) -> M | Poison:
    """:func:`decode_or_dead_letter` for a record read from a log."""
    return decode_or_dead_letter(
        rec.value,
        model,
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        stage=stage,
        ts=ts,
    )


def route(
    records: Iterable[Record], model: type[M], stage: str = "decode"
) -> tuple[list[tuple[Record, M]], list[DeadLetter]]:
    """Decode each record as ``model``: ``(oks, errs)``, in input order."""
    oks: list[tuple[Record, M]] = []
    errs: list[DeadLetter] = []
    for rec in records:
        out = decode_record(rec, model, stage)
        if isinstance(out, Poison):
            errs.append(out.letter)
        else:
            oks.append((rec, out))
    return oks, errs
