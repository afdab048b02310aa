"""Health, readiness, metrics, thresholds and inspection over HTTP (uvicorn + Starlette).

:func:`build_app` is the behaviour (a Starlette app over :class:`AdminApi`);
:class:`HttpServer` runs it on uvicorn in a background thread, so the poll
loop never waits on a client.

Routes (``HEAD`` answers wherever ``GET`` does):

* ``GET /healthz``: the process is alive (200).
* ``GET /readyz``: 200 when the broker is reachable and the predictor loaded,
  else 503 naming what is missing; also kept current every few seconds in
  ``tapd_ready`` whether or not anyone asks (:class:`ReadinessMonitor`).
* ``GET /metrics``: Prometheus text format.
* ``GET /admin/thresholds``: every layer (effective values, their source,
  overrides with who/when/why/expiry, the file's values).
* ``PATCH|PUT /admin/thresholds``: ``{"set": {...}, "why": "...",
  "expires_in_s": 3600}`` (or a bare object of changes) sets overrides;
  ``DELETE /admin/thresholds/overrides/NAME`` (``*``: all) clears them;
  ``POST /admin/thresholds/reload``: re-read the file now.
* ``GET /admin/status``, ``/admin/cohorts[?state=open|pending|in_flight]``,
  ``/admin/cohorts/ID`` (explain), ``/admin/models``, ``/admin/policies``;
  ``POST /admin/models/rollback`` ``{"version": ...}``: the scorer restarts
  on that predictor snapshot.

Security (the port is the knob that stops training):

* Every ``/admin`` route needs ``Authorization: Bearer <token>``, checked
  from the headers alone, before any body byte is read, in constant time.
  The admin token may change things; the read token (optional) may only
  ``GET``. There is no default token: without a configured one the scorer
  generates one (:func:`ensure_admin_token`).
* Bodies are capped (``Content-Length`` over the limit: 413 before reading;
  a chunked body is cut off at the limit), must arrive within the request
  timeout (408), and are parsed with any parse failure answered 422.
  Request headers must arrive within the same timeout, idle keep-alive
  connections close after 5 s, open connections are capped and the listen
  backlog is deep enough for a burst of probes and scrapes.
* ``X-Tapd-User`` is a claim, not an identity: it is recorded next to the
  token's non-secret identity (``principal``), never instead of it, and only
  a bounded, printable form of it is kept.
* Every admin request is logged with its outcome, who, the principal and
  the client address.
* TLS: give ``service.tls_certfile`` and ``service.tls_keyfile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.runtime.logging import get_logger, register_secret
from daemon.runtime.metrics import ScorerMetrics
from daemon.runtime.thresholds import AuditRecord, ThresholdError

log = get_logger("tapd.http")

ADMIN_TOKEN_FILE = "admin-token"
READY_EVERY_S = 5.0
# The most of a refused request's body read (and dropped) before the refusal.
REFUSED_BODY_BYTES = 64 * 2**10
_USER = re.compile(r"[^A-Za-z0-9._@+:-]")


class ThresholdsAdmin(Protocol):
    """What the API needs of :class:`daemon.runtime.thresholds.ThresholdsHolder`."""

    @property
    def current(self) -> Any: ...

    def view(self) -> dict[str, Any]: ...

    def apply(
        self,
        changes: Mapping[str, Any],
        who: str,
        source: str = ...,
        *,
        why: str | None = ...,
        expires_at: float | None = ...,
        principal: str | None = ...,
    ) -> AuditRecord | None: ...

    def clear(
        self,
        names: Any,
        who: str,
        source: str = ...,
        *,
        why: str | None = ...,
        principal: str | None = ...,
    ) -> AuditRecord | None: ...

    def reload_from_file(
        self, path: Path | str, who: str = ..., source: str = ...
    ) -> AuditRecord | None: ...


class Inspector(Protocol):
    """Read access to the scorer's state (daemon.runtime.inspect.ScorerInspector)."""

    def status(self) -> dict[str, Any]: ...

    def cohorts(self, state: str | None, limit: int) -> list[dict[str, Any]]: ...

    def explain(self, cohort_id: str) -> dict[str, Any] | None: ...

    def models(self) -> dict[str, Any]: ...

    def policies(self) -> dict[str, Any]: ...

    def rollback(self, version: str | None, who: str) -> dict[str, Any]: ...


# --- thresholds: metrics and audit ----------------------------------------------------


def publish_thresholds(metrics: ScorerMetrics, holder: Any) -> None:
    """``tapd_threshold{name}`` (effective; booleans as 0/1) and ``tapd_threshold_override{name}``."""
    current = holder.current if hasattr(holder, "current") else holder
    overrides = getattr(holder, "overrides", {})
    for name, value in current.model_dump().items():
        metrics.threshold.labels(name=name).set(float(value))
        metrics.threshold_override.labels(name=name).set(1 if name in overrides else 0)


def audit(metrics: ScorerMetrics, record: AuditRecord, holder: Any) -> None:
    """Log a recorded change (who, what, before, after, why), count it, export the values."""
    fields = record.to_json()
    if record.shadowed:
        log.warning(
            "thresholds_file_shadowed",
            reason="the thresholds file changed values that run-time overrides hold; "
            "the overrides stay in force until cleared or expired",
            shadowed=record.shadowed,
        )
    log.warning("thresholds_changed", **fields)
    metrics.threshold_changes.labels(source=record.source).inc()
    publish_thresholds(metrics, holder)


# --- tokens --------------------------------------------------------------------------


def token_identity(token: str, role: str = "admin") -> str:
    """A stable, non-secret name for a token (recorded as the acting principal)."""
    return f"{role}:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def ensure_admin_token(state_dir: Path, configured: str | None, token_file: Path | None) -> str:
    """The admin token: configured, read from ``token_file``, or generated.

    A generated token is written to ``<state_dir>/admin-token`` with mode 0600
    (kept across restarts): the CLI on the same host (or ``kubectl exec``)
    reads it from there; no default token exists anywhere.
    """
    if configured:
        return configured
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        if len(token) < 16:
            raise ValueError(f"{token_file}: an admin token must be at least 16 characters")
        return token
    path = Path(state_dir) / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    log.warning("admin_token_generated", path=str(path), reason="no admin token was configured")
    return token


@dataclass(frozen=True, slots=True)
class Principal:
    role: str  # admin | read
    identity: str


def _header_user(request: Request) -> str | None:
    raw = request.headers.get("x-tapd-user")
    if not raw:
        return None
    user = _USER.sub("_", raw.strip())[:64]
    return user or None


class TooLarge(Exception):
    pass


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused past ``limit`` bytes (before reading, when the length is
    declared) and past ``timeout_s`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge()
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge()
            chunks.append(chunk)

    await asyncio.wait_for(collect(), timeout_s)
    return b"".join(chunks)


def _json_body(raw: bytes) -> Any:
    """Parsed JSON; ``ValueError`` for anything that is not (bad UTF-8, too deep, NaN)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"not valid JSON: {type(e).__name__}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None


class AdminApi:
    """The HTTP behaviour over the thresholds holder, the metrics and the inspector."""

    def __init__(
        self,
        thresholds: ThresholdsAdmin,
        metrics: ScorerMetrics,
        admin_token: str,
        ready: Callable[[], dict[str, bool]],
        thresholds_file: Path | None = None,
        *,
        read_token: str | None = None,
        inspector: Inspector | None = None,
        max_body_bytes: int = 64 * 1024,
        timeout_s: float = 10.0,
    ) -> None:
        if not admin_token:
            raise ValueError("admin_token: the admin API needs a token (ensure_admin_token)")
        self.thresholds = thresholds
        self.metrics = metrics
        self.ready = ready
        self.thresholds_file = thresholds_file
        self.inspector = inspector
        # Which serving process answers (/readyz): a client that asked for a
        # restart (a model rollback) knows the new one by a different value.
        self.instance = uuid.uuid4().hex
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self._tokens: list[tuple[bytes, Principal]] = [
            (admin_token.encode(), Principal("admin", token_identity(admin_token)))
        ]
        register_secret(admin_token)
        if read_token:
            self._tokens.append(
                (read_token.encode(), Principal("read", token_identity(read_token, "read")))
            )
            register_secret(read_token)

    # --- auth ------------------------------------------------------------------------

    def identify(self, request: Request) -> Principal | None:
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        got = given.strip().encode()
        found = None
        for token, principal in self._tokens:
            # compare_digest on every token: the time does not say which matched.
            if hmac.compare_digest(got, token) and found is None:
                found = principal
        return found

    def _log(
        self,
        request: Request,
        outcome: str,
        status: int,
        principal: Principal | None,
        **extra: Any,
    ) -> None:
        self.metrics.admin_requests.labels(outcome=outcome).inc()
        fields = {
            "method": request.method,
            "path": request.url.path,
            "outcome": outcome,
            "status": status,
            "client": request.client.host if request.client else None,
            "principal": principal.identity if principal else None,
            "who": _header_user(request) or (principal.identity if principal else None),
            **extra,
        }
        if outcome in ("ok", "noop"):
            log.info("admin_request", **fields)
        else:
            log.warning("admin_request", **fields)

    def _refuse(
        self, request: Request, outcome: str, status: int, error: str, principal: Principal | None
    ) -> JSONResponse:
        self._log(request, outcome, status, principal, error=error)
        # The body (if any) was not read: close rather than wait for it.
        return JSONResponse({"error": error}, status_code=status, headers={"Connection": "close"})

    def _invalid(
        self, request: Request, principal: Principal | None, field: str, reason: str
    ) -> JSONResponse:
        self._log(request, "invalid", 422, principal, field=field, reason=reason)
        return JSONResponse(
            {"error": "invalid request", "field": field, "reason": reason}, status_code=422
        )

    async def _authorized(
        self, request: Request, need: str
    ) -> tuple[Principal | None, JSONResponse | None]:
        principal = self.identify(request)
        if principal is None:
            await self._discard_body(request)
            return None, self._refuse(
                request, "unauthorized", 401, "missing or wrong bearer credential", None
            )
        if need == "admin" and principal.role != "admin":
            await self._discard_body(request)
            return principal, self._refuse(
                request, "forbidden", 403, "the read token cannot change anything", principal
            )
        return principal, None

    async def _discard_body(self, request: Request) -> None:
        """Read a refused request's small body before answering: a socket closed with
        unread bytes is reset, and the reset can reach the client before the refusal
        does (it then sees "connection reset", not 401 or 403). A body larger than
        REFUSED_BODY_BYTES, or slower than a second, is left unread."""
        with contextlib.suppress(TooLarge, TimeoutError, ClientDisconnect):
            await read_body(request, REFUSED_BODY_BYTES, 1.0)

    async def _body(
        self, request: Request, principal: Principal
    ) -> tuple[Any, JSONResponse | None]:
        try:
            raw = await read_body(request, self.max_body_bytes, self.timeout_s)
        except TooLarge:
            return None, self._refuse(
                request, "too_large", 413, f"body over {self.max_body_bytes} bytes", principal
            )
        except TimeoutError:
            return None, self._refuse(
                request, "invalid", 408, f"body not received within {self.timeout_s:g} s", principal
            )
        if not raw.strip():
            return {}, None
        try:
            return _json_body(raw), None
        except ValueError as e:
            return None, self._invalid(request, principal, "$", str(e))

    def _who(self, request: Request, principal: Principal) -> str:
        return _header_user(request) or principal.identity

    # --- routes ----------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks = await run_in_threadpool(self.ready)
        ok = all(checks.values())
        self.metrics.up_ready.set(1 if ok else 0)
        return JSONResponse(
            {"ready": ok, "checks": checks, "instance": self.instance},
            status_code=200 if ok else 503,
        )

    async def metrics_text(self, request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, self.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def get_thresholds(self, request: Request) -> Response:
        principal, refusal = await self._authorized(request, "read")
        if refusal is not None:
            return refusal
        self._log(request, "ok", 200, principal)
        return JSONResponse(self.thresholds.view())

    async def change_thresholds(self, request: Request) -> Response:
        principal, refusal = await self._authorized(request, "admin")
        if refusal is not None or principal is None:
            return refusal or JSONResponse({}, status_code=401)
        body, refusal = await self._body(request, principal)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict) or not body:
            return self._invalid(request, principal, "$", "expected a JSON object of changes")
        why: Any = None
        expires_at: float | None = None
        if "set" in body:
            changes = body["set"]
            why = body.get("why")
            ttl = body.get("expires_in_s")
            extra = set(body) - {"set", "why", "expires_in_s"}
            if extra:
                return self._invalid(request, principal, sorted(extra)[0], "unknown key")
            if not isinstance(changes, dict) or not changes:
                return self._invalid(request, principal, "set", "expected a non-empty object")
            if why is not None and (not isinstance(why, str) or len(why) > 1024):
                return self._invalid(request, principal, "why", "a string of at most 1024 chars")
            if ttl is not None:
                if (
                    isinstance(ttl, bool)
                    or not isinstance(ttl, int | float)
                    or not 0 < ttl <= 30 * 86400
                ):
                    return self._invalid(
                        request, principal, "expires_in_s", "a number of seconds in (0, 30 days]"
                    )
                expires_at = time.time() + float(ttl)
        else:
            changes = body
        who = self._who(request, principal)
        try:
            record = self.thresholds.apply(
                changes,
                who=who,
                source="admin",
                why=why,
                expires_at=expires_at,
                principal=principal.identity,
            )
        except ThresholdError as e:
            return self._invalid(request, principal, e.field, e.reason)
        return self._applied(request, principal, record)

    async def clear_override(self, request: Request) -> Response:
        principal, refusal = await self._authorized(request, "admin")
        if refusal is not None or principal is None:
            return refusal or JSONResponse({}, status_code=401)
        name = request.path_params["name"]
        names = [] if name == "*" else [name]
        why = request.query_params.get("why")
        try:
            record = self.thresholds.clear(
                names,
                who=self._who(request, principal),
                why=why[:1024] if why else None,
                principal=principal.identity,
            )
        except ThresholdError as e:
            return self._invalid(request, principal, e.field, e.reason)
        return self._applied(request, principal, record)

    async def reload(self, request: Request) -> Response:
        principal, refusal = await self._authorized(request, "admin")
        if refusal is not None or principal is None:
            return refusal or JSONResponse({}, status_code=401)
        if self.thresholds_file is None:
            return self._invalid(
                request, principal, "thresholds_file", "no thresholds file is configured"
            )
        try:
            record = self.thresholds.reload_from_file(
                self.thresholds_file, who=self._who(request, principal), source="admin"
            )
        except ThresholdError as e:
            return self._invalid(request, principal, e.field, e.reason)
        except OSError as e:
            return self._invalid(
                request, principal, "thresholds_file", f"cannot read {self.thresholds_file}: {e}"
            )
        return self._applied(request, principal, record)

    def _applied(
        self, request: Request, principal: Principal, record: AuditRecord | None
    ) -> Response:
        # The holder's on_change hook has logged and counted a recorded change.
        self._log(request, "ok" if record else "noop", 200, principal)
        return JSONResponse(
            {
                "thresholds": self.thresholds.current.model_dump(mode="json"),
                "overrides": self.thresholds.view()["overrides"],
                "audit": record.to_json() if record else None,
                "noop": record is None,
            }
        )

    async def _inspect(
        self, request: Request, fn: Callable[[], Any], need: str = "read"
    ) -> Response:
        principal, refusal = await self._authorized(request, need)
        if refusal is not None:
            return refusal
        if self.inspector is None:
            return self._refuse(request, "invalid", 404, "no inspector on this process", principal)
        try:
            result = await run_in_threadpool(fn)
        except LookupError as e:
            return self._refuse(request, "invalid", 404, str(e.args[0] if e.args else e), principal)
        except ValueError as e:
            return self._invalid(
                request, principal, getattr(e, "field", "$"), str(getattr(e, "reason", e))
            )
        self._log(request, "ok", 200, principal)
        return JSONResponse(result)

    async def status(self, request: Request) -> Response:
        return await self._inspect(request, lambda: self._require().status())

    async def cohorts(self, request: Request) -> Response:
        state = request.query_params.get("state")
        try:
            limit = int(request.query_params.get("limit", "1000"))
        except ValueError:
            limit = 1000
        return await self._inspect(
            request, lambda: self._require().cohorts(state, max(1, min(limit, 100_000)))
        )

    async def explain(self, request: Request) -> Response:
        cohort_id = request.path_params["cohort_id"]

        def run() -> Any:
            found = self._require().explain(cohort_id)
            if found is None:
                raise LookupError(f"cohort {cohort_id}: not known to this scorer")
            return found

        return await self._inspect(request, run)

    async def models(self, request: Request) -> Response:
        return await self._inspect(request, lambda: self._require().models())

    async def policies(self, request: Request) -> Response:
        return await self._inspect(request, lambda: self._require().policies())

    async def rollback(self, request: Request) -> Response:
        principal, refusal = await self._authorized(request, "admin")
        if refusal is not None or principal is None:
            return refusal or JSONResponse({}, status_code=401)
        body, refusal = await self._body(request, principal)
        if refusal is not None:
            return refusal
        version = body.get("version") if isinstance(body, dict) else None
        if version is not None and not isinstance(version, str):
            return self._invalid(request, principal, "version", "a model version name")
        who = self._who(request, principal)
        return await self._inspect(
            request, lambda: self._require().rollback(version, who), need="admin"
        )

    def _require(self) -> Inspector:
        assert self.inspector is not None
        return self.inspector


def build_app(api: AdminApi) -> Starlette:
    get = ["GET", "HEAD"]

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no route {request.url.path}"}, status_code=404)

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            {"error": f"method {request.method} not allowed on {request.url.path}"},
            status_code=405,
        )

    async def failed(request: Request, exc: Exception) -> Response:
        # A bug in one request must not take the server down, nor show a traceback.
        log.error("http_handler_failed", path=request.url.path, error=type(exc).__name__)
        return JSONResponse({"error": type(exc).__name__}, status_code=500)

    routes = [
        Route("/healthz", api.healthz, methods=get),
        Route("/readyz", api.readyz, methods=get),
        Route("/metrics", api.metrics_text, methods=get),
        Route("/admin/thresholds", api.get_thresholds, methods=get),
        Route("/admin/thresholds", api.change_thresholds, methods=["PATCH", "PUT"]),
        Route("/admin/thresholds/reload", api.reload, methods=["POST"]),
        Route("/admin/thresholds/overrides/{name}", api.clear_override, methods=["DELETE"]),
        Route("/admin/status", api.status, methods=get),
        Route("/admin/cohorts", api.cohorts, methods=get),
        Route("/admin/cohorts/{cohort_id}", api.explain, methods=get),
        Route("/admin/models", api.models, methods=get),
        Route("/admin/models/rollback", api.rollback, methods=["POST"]),
        Route("/admin/policies", api.policies, methods=get),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: not_allowed, Exception: failed},
    )


def metrics_app(registry: Any, ready: Callable[[], dict[str, bool]], ready_gauge: Any) -> Starlette:
    """``/healthz``, ``/readyz`` and ``/metrics`` only (the trainer's port)."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(ready)
        ok = all(checks.values())
        ready_gauge.set(1 if ok else 0)
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    get = ["GET", "HEAD"]
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=get),
            Route("/readyz", readyz, methods=get),
            Route("/metrics", metrics, methods=get),
        ]
    )


# --- the server ------------------------------------------------------------------------


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn closes idle keep-alive connections but waits forever for the
    headers of a request that is being sent slowly; here a connection whose
    next request has not fully arrived ``header_timeout_s`` after the
    connection (or the previous response) is closed.
    """

    header_timeout_s = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self.loop.call_later(self.header_timeout_s, self._overdue, self.cycle)

    def _overdue(self, armed: Any) -> None:
        if self.cycle is armed and not self.transport.is_closing():
            self.transport.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class HttpServer:
    """An ASGI app on uvicorn in a background thread; ``port`` 0 picks a free port."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        max_connections: int = 256,
        backlog: int = 1024,
        tls_certfile: Path | None = None,
        tls_keyfile: Path | None = None,
    ) -> None:
        if isinstance(app, AdminApi):
            app = build_app(app)
        protocol = type("Protocol", (_Protocol,), {"header_timeout_s": timeout_s})
        self.tls = tls_certfile is not None
        self._sock = _bind(host, port)
        config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
            limit_concurrency=max_connections,
            backlog=backlog,
            ssl_certfile=str(tls_certfile) if tls_certfile else None,
            ssl_keyfile=str(tls_keyfile) if tls_keyfile else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="tapd-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self._sock.getsockname()[0]
        name = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{name}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server failed to start (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {timeout_s:g} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


class ReadinessMonitor:
    """Keeps a readiness gauge current every ``every_s`` seconds, asked or not."""

    def __init__(
        self,
        check: Callable[[], Mapping[str, bool]],
        gauge: Any,
        every_s: float = READY_EVERY_S,
    ) -> None:
        self.check = check
        self.gauge = gauge
        self.every_s = every_s
        self.last: dict[str, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tapd-ready", daemon=True)

    def start(self) -> ReadinessMonitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last = dict(self.check())
                self.gauge.set(1 if self.last and all(self.last.values()) else 0)
            except Exception as e:  # a failing check is "not ready", never a dead thread
                self.gauge.set(0)
                log.warning("readiness_check_failed", error=type(e).__name__, reason=str(e))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
