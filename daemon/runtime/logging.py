"""One logging pipeline for every tapd process: JSON lines on stderr.

Every line is one JSON object, whoever wrote it:

* tapd's own events go through structlog;
* every library that logs through the standard library (kafka-python,
  transformers, TRL, urllib3, uvicorn, httpx, Python warnings) is routed
  through the same processors by :class:`structlog.stdlib.ProcessorFormatter`
  on the one root handler, so a kafka-python "Heartbeat failed" is as
  greppable and alertable as a tapd event;
* in service mode, progress bars are switched off (tqdm, Hugging Face) and
  anything still written straight to ``sys.stderr`` as text (a library's own
  handler, a stray print) is wrapped into a JSON line (``event:
  "stderr_text"``) by :class:`JsonLines`, the last resort.

Fields: ``event``, ``level``, ``logger``, ``timestamp`` (ISO, UTC), the
process's ``role`` (scorer, trainer, cli...) and ``replica``, then context ids
(``trace_id``, ``cohort_id``, ``model_version``) bound with :func:`bind_ids`.
Role and replica are process-wide, not context variables, so that lines from
library threads (kafka-python's heartbeat, uvicorn's loop) carry them too.

Secrets never reach a line: values of secret-looking keys are masked, every
secret value registered with :func:`register_secret` (the admin tokens, the
SASL password) is masked wherever it appears, and so is the credential of an
``Authorization``-style ``Bearer <credential>``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "[REDACTED]"
# Keys whose values are secrets wherever they appear in an event: a word of
# the key (between underscores) names a secret. "known_pass_rate" is data.
_SECRET_KEY = re.compile(
    r"(^|[_-])(password|passwd|secret|token|authorization|api[_-]?key|credentials?)($|[_-])",
    re.IGNORECASE,
)
# A credential after the Bearer scheme (a header echoed in an error message).
# The scheme is spelt "Bearer" in headers; credentials are at least 8
# characters, so prose such as "bearer token" is left alone.
_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}")
ID_KEYS = ("trace_id", "cohort_id", "model_version")
# Libraries whose INFO lines are chatter: they log at WARNING and above
# whatever tapd's level (their warnings, such as kafka-python's rebalances,
# are kept).
NOISY_LIBRARIES = (
    "kafka",
    "urllib3",
    "transformers",
    "trl",
    "accelerate",
    "datasets",
    "httpx",
    "httpcore",
    "filelock",
    "uvicorn",
    "uvicorn.error",
    "asyncio",
    "torch",
)

_secrets: set[str] = set()
_static: dict[str, str] = {}


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears in any later log line."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _mask_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _BEARER.sub(r"\1" + REDACTED, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _is_secret_key(key: object) -> bool:
    # "token_count" or "n_tokens" are data; "admin_token_file" is where a secret is.
    if not isinstance(key, str) or key.startswith("n_"):
        return False
    if key.endswith(("_count", "s_total", "_file", "_path")):
        return False
    return bool(_SECRET_KEY.search(key))


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Mask secret-looking keys, registered secrets and bearer credentials in the event."""
    for key in list(event):
        if _is_secret_key(key):
            event[key] = REDACTED
        else:
            event[key] = _redact_value(event[key])
    return event


def add_static(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """The process-wide fields (role, replica), on every line of every thread."""
    for k, v in _static.items():
        event.setdefault(k, v)
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


class JsonLines(io.TextIOBase):
    """A text stream that passes JSON lines through and wraps any other line as JSON.

    Installed as ``sys.stderr`` in service mode, so that text a library
    writes directly (its own handler, a warning printed by C code through
    Python, a stray ``print(file=sys.stderr)``) still arrives as one JSON
    object per line, redacted.
    """

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self._buf = ""
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        # Progress bars redraw with carriage returns: keep the last state.
        line = line.rsplit("\r", 1)[-1].rstrip()
        if not line.strip():
            return
        if not (line.startswith("{") and line.endswith("}")):
            event = {
                "event": "stderr_text",
                "level": "warning",
                "logger": "stderr",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
                **_static,
                "text": _mask_text(line)[:8192],
            }
            line = json.dumps(event, default=str)
        self.target.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                line, self._buf = self._buf, ""
                self._emit(line)
            self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return False


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        add_static,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _quiet_progress_bars() -> None:
    """No progress bars in a service: they are not log lines."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("DATASETS_VERBOSITY", "warning")


def _route_hf_loggers() -> None:
    """transformers (and datasets) give their root logger a handler of their own
    and stop propagation; hand their records to the root handler instead."""
    for module in ("transformers.utils.logging", "datasets.utils.logging"):
        mod = sys.modules.get(module)
        if mod is None:
            continue
        try:
            mod.disable_default_handler()
            mod.enable_propagation()
            mod.disable_progress_bar()
        except Exception:  # an older or newer API: the stderr wrapper still catches it
            continue


def configure_logging(
    level: str = "info",
    stream: TextIO | None = None,
    role: str | None = None,
    *,
    service: bool = False,
    replica: str | None = None,
) -> None:
    """Configure structlog and the stdlib root logger to write JSON lines.

    ``service``: a long-running role (scorer, trainer): progress bars off,
    Hugging Face loggers routed here, and ``sys.stderr`` wrapped so that no
    text line gets out (:class:`JsonLines`).
    """
    if service:
        _quiet_progress_bars()
        if stream is None and not isinstance(sys.stderr, JsonLines):
            sys.stderr = JsonLines(sys.stderr)
    out: Any = stream if stream is not None else _CurrentStderr()
    lvl = getattr(logging, level.upper(), logging.INFO)
    _static.clear()
    if role:
        _static["role"] = role
    if replica:
        _static["replica"] = replica
    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            order_ids,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for name in NOISY_LIBRARIES:
        lib = logging.getLogger(name)
        lib.setLevel(max(lvl, logging.WARNING))
        lib.handlers[:] = []
        lib.propagate = True
    # Access lines would log every scrape; admin requests are logged by the API.
    logging.getLogger("uvicorn.access").disabled = True
    logging.captureWarnings(True)
    if service:
        _route_hf_loggers()


def route_library_loggers() -> None:
    """Call after importing transformers or datasets: their own handlers go."""
    _route_hf_loggers()


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
