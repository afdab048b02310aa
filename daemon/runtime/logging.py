"""Structured JSON logs (structlog) for every tapd process.

One JSON object per line on stderr. Context ids (``trace_id``, ``cohort_id``,
``model_version``) are bound with :func:`bind_ids` (contextvars), so every
line written while a cohort is scored carries its ids without threading them
through each call. Secrets never reach a log line: the redaction processor
masks values of secret-looking keys and bearer tokens inside messages.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "[REDACTED]"
# Keys whose values are secrets wherever they appear in an event.
_SECRET_KEY = re.compile(
    r"(pass(word)?|secret|token|authorization|api[_-]?key|sasl_plain_password|credential)",
    re.IGNORECASE,
)
# Secrets embedded in free text (a header echoed in an error message).
_SECRET_TEXT = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
ID_KEYS = ("trace_id", "cohort_id", "model_version")


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _SECRET_TEXT.sub(r"\1" + REDACTED, value)
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _is_secret_key(key: object) -> bool:
    # "token_count" or "n_tokens" are data, not secrets.
    if not isinstance(key, str) or key.startswith("n_") or key.endswith(("_count", "s_total")):
        return False
    return bool(_SECRET_KEY.search(key))


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Mask secret-looking keys and bearer tokens in any value of the event."""
    for key in list(event):
        if _is_secret_key(key):
            event[key] = REDACTED
        else:
            event[key] = _redact_value(event[key])
    return event


def order_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Put the correlation ids first so that a line is greppable at a glance."""
    ids = {k: event.pop(k) for k in ID_KEYS if k in event}
    if not ids:
        return event
    rest = dict(event)
    event.clear()
    event.update(ids)
    event.update(rest)
    return event


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write.

    Binding the object current at configuration time breaks when it is
    later replaced and closed (test runners capturing output, daemonizing).
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    level: str = "info", stream: TextIO | None = None, role: str | None = None
) -> None:
    """Configure structlog (and the stdlib root logger) to write JSON lines."""
    out: Any = stream if stream is not None else _CurrentStderr()
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
        order_ids,
        structlog.processors.JSONRenderer(sort_keys=False, default=str),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if role:
        structlog.contextvars.bind_contextvars(role=role)
    # Third-party libraries (kafka-python, transformers) log through stdlib.
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(out)]
    root.setLevel(max(lvl, logging.WARNING))


@contextmanager
def bind_ids(**ids: str | None) -> Iterator[None]:
    """Bind correlation ids (trace_id, cohort_id, model_version) for the block."""
    present = {k: v for k, v in ids.items() if v is not None}
    tokens = structlog.contextvars.bind_contextvars(**present)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    log = structlog.get_logger(name)
    return log.bind(**initial) if initial else log


def redact_mapping(values: MutableMapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` fit for a log line (used for settings dumps)."""
    return {k: REDACTED if _is_secret_key(k) else _redact_value(v) for k, v in values.items()}
