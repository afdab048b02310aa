"""Health, readiness, metrics and the thresholds admin API over HTTP.

``AdminApi.handle`` is the whole behaviour as a function of a request
(method, path, headers, body) to a response; ``HttpServer`` is the thin stdlib
server that feeds it from a background thread, so the poll loop never waits
on a client.

Routes:

* ``GET /healthz``: the process is alive (200).
* ``GET /readyz``: 200 only when the broker is reachable and the predictor
  loaded, else 503 naming what is missing.
* ``GET /metrics``: Prometheus text format.
* ``GET /admin/thresholds``: the current thresholds.
* ``PUT|PATCH /admin/thresholds``: JSON object of changes; ``POST
  /admin/thresholds/reload``: re-read the thresholds file.

Changes need ``Authorization: Bearer <token>``, compared in constant time.
Without a configured token every change is refused (403), because an
unauthenticated knob that stops training is worse than no knob. Who changed
what is ``X-Tapd-User`` when given, else the token's identity.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from daemon.config import Thresholds
from daemon.runtime.logging import get_logger
from daemon.runtime.metrics import ScorerMetrics

log = get_logger("tapd.http")

MAX_BODY_BYTES = 64 * 1024
JSON = "application/json"


class ThresholdsAdmin(Protocol):
    """What the admin API needs of the thresholds holder (daemon.core.decision.ThresholdsHolder).

    ``apply`` and ``reload_from_file`` raise a ``ValueError`` with ``field``
    and ``reason`` attributes (``ThresholdError``) and keep the old values.
    """

    current: Thresholds

    def apply(self, changes: Mapping[str, Any], who: str, source: str) -> Any: ...

    def reload_from_file(self, path: Path | str, who: str = ...) -> Any: ...


def publish_thresholds(metrics: ScorerMetrics, th: Thresholds) -> None:
    """Every threshold as ``tapd_threshold{name}`` (booleans as 0/1)."""
    for name, value in th.model_dump().items():
        metrics.threshold.labels(name=name).set(float(value))


def audit(metrics: ScorerMetrics, record: Any, source: str, current: Thresholds) -> None:
    """Log who changed what (before, after, when), count it by source, export the new values."""
    rec = _as_dict(record)
    log.warning(
        "thresholds_changed",
        who=rec.get("who"),
        source=source,
        what=rec.get("what"),
        before=rec.get("before"),
        after=rec.get("after"),
        when=rec.get("when"),
    )
    metrics.threshold_changes.labels(source=source).inc()
    publish_thresholds(metrics, current)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON

    @staticmethod
    def json(status: int, obj: Any) -> Response:
        return Response(status, json.dumps(obj, default=str).encode() + b"\n")


def _as_dict(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _as_dict(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {k: _as_dict(v) for k, v in obj.items()}
    return obj


def validation_problem(e: ValidationError) -> dict[str, str]:
    """The first error of a thresholds change as ``{field, reason}``."""
    err = e.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"]) or "$"
    reason = str(err["msg"])
    if err["type"] == "extra_forbidden":
        reason = f"unknown threshold (known: {', '.join(Thresholds.model_fields)})"
    return {"field": field, "reason": reason}


def token_identity(token: str) -> str:
    """A stable, non-secret name for a token: who changed something when no user is given."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


class AdminApi:
    """The HTTP behaviour, independent of any server."""

    def __init__(
        self,
        thresholds: ThresholdsAdmin,
        metrics: ScorerMetrics,
        admin_token: str | None,
        ready: Callable[[], dict[str, bool]],
        thresholds_file: Path | None = None,
    ) -> None:
        self.thresholds = thresholds
        self.metrics = metrics
        self._token = admin_token or None
        self.ready = ready
        self.thresholds_file = thresholds_file

    # --- routing -------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/healthz" and method == "GET":
            return Response.json(200, {"status": "ok"})
        if path == "/readyz" and method == "GET":
            checks = self.ready()
            ok = all(checks.values())
            self.metrics.up_ready.set(1 if ok else 0)
            return Response.json(200 if ok else 503, {"ready": ok, "checks": checks})
        if path == "/metrics" and method == "GET":
            return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/admin/thresholds":
            if method == "GET":
                return Response.json(200, self.thresholds.current.model_dump(mode="json"))
            if method in ("PUT", "PATCH"):
                return self._change(headers, body)
        if path == "/admin/thresholds/reload" and method == "POST":
            return self._reload(headers)
        if path in ("/healthz", "/readyz", "/metrics", "/admin/thresholds"):
            return Response.json(405, {"error": f"method {method} not allowed on {path}"})
        return Response.json(404, {"error": f"no route {path}"})

    # --- admin ---------------------------------------------------------------

    def _authorize(self, headers: Mapping[str, str]) -> tuple[str | None, Response | None]:
        """The acting identity, or the refusal to send."""
        if self._token is None:
            self.metrics.admin_requests.labels(outcome="disabled").inc()
            return None, Response.json(
                403,
                {
                    "error": "admin changes are disabled: no admin token is configured "
                    "(set TAPD_SERVICE__ADMIN_TOKEN)"
                },
            )
        auth = _header(headers, "authorization") or ""
        scheme, _, given = auth.partition(" ")
        # compare_digest on bytes of both: constant time whatever the input.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token.encode()
        ):
            self.metrics.admin_requests.labels(outcome="unauthorized").inc()
            log.warning("admin_unauthorized", reason="missing or wrong bearer token")
            return None, Response.json(401, {"error": "missing or wrong bearer token"})
        who = (_header(headers, "x-tapd-user") or "").strip()[:128] or token_identity(self._token)
        return who, None

    def _change(self, headers: Mapping[str, str], body: bytes) -> Response:
        who, refusal = self._authorize(headers)
        if refusal is not None or who is None:
            return refusal or Response.json(401, {"error": "unauthorized"})
        if len(body) > MAX_BODY_BYTES:
            return self._invalid("$", f"body over {MAX_BODY_BYTES} bytes")
        try:
            changes = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._invalid("$", f"not valid JSON: {e}")
        if not isinstance(changes, dict) or not changes:
            return self._invalid("$", "expected a non-empty JSON object of threshold changes")
        try:
            record = self.thresholds.apply(changes, who=who, source="admin")
        except ValidationError as e:
            problem = validation_problem(e)
            return self._invalid(problem["field"], problem["reason"])
        except ValueError as e:
            return self._invalid(getattr(e, "field", "$"), getattr(e, "reason", str(e)))
        return self._applied(record, "admin")

    def _reload(self, headers: Mapping[str, str]) -> Response:
        who, refusal = self._authorize(headers)
        if refusal is not None or who is None:
            return refusal or Response.json(401, {"error": "unauthorized"})
        if self.thresholds_file is None:
            return self._invalid("thresholds_file", "no thresholds file is configured")
        try:
            record = self.thresholds.reload_from_file(self.thresholds_file, who=who)
        except ValidationError as e:
            problem = validation_problem(e)
            return self._invalid(problem["field"], problem["reason"])
        except ValueError as e:
            return self._invalid(
                getattr(e, "field", "thresholds_file"), getattr(e, "reason", str(e))
            )
        except OSError as e:
            return self._invalid("thresholds_file", f"cannot read {self.thresholds_file}: {e}")
        return self._applied(record, "admin")

    def _applied(self, record: Any, source: str) -> Response:
        self.metrics.admin_requests.labels(outcome="ok").inc()
        current = self.thresholds.current
        audit(self.metrics, record, source, current)
        return Response.json(
            200, {"thresholds": current.model_dump(mode="json"), "audit": _as_dict(record)}
        )

    def _invalid(self, field: str, reason: str) -> Response:
        self.metrics.admin_requests.labels(outcome="invalid").inc()
        return Response.json(
            422, {"error": "invalid threshold change", "field": field, "reason": reason}
        )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


class _Handler(BaseHTTPRequestHandler):
    api: AdminApi  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY_BYTES + 1)) if length else b""
        try:
            resp = self.api.handle(self.command, self.path, dict(self.headers.items()), body)
        except Exception as e:  # a bug in one request must not kill the server thread
            log.exception("http_handler_failed", path=self.path)
            resp = Response.json(500, {"error": type(e).__name__})
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        self.wfile.write(resp.body)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        # Access logs would echo Authorization-free paths only; keep stderr JSON-only.
        return


class HttpServer:
    """The API on a background thread; ``port`` 0 picks a free port."""

    def __init__(self, api: AdminApi, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"api": api})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tapd-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{name}:{self.port}"

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
