"""The ``tapd`` command line.

Each command is a thin function: it reads the settings (``--config`` file,
then ``TAPD_...`` environment variables), imports the module that does the
work lazily, so that ``tapd --help`` stays fast, and maps its result to exit
codes and output. Every error is one line on stderr (``tapd <command>:
...``), never a traceback; exit 2 for a usage or configuration error, 1 for
anything else.

Inspection (``status``, ``cohorts``, ``explain``, ``models``, ``policies``)
asks the running scorer's admin API first and, when no scorer answers at
its address, reads the state directory directly, read-only (a note on
stderr says so). The admin token comes from ``TAPD_ADMIN_TOKEN``, a file
named by ``TAPD_ADMIN_TOKEN_FILE``, the configured ``service.admin_token``
(``TAPD_SERVICE__ADMIN_TOKEN``) or token file, or the token the scorer
generated in ``<state_dir>/admin-token``; never from the command line,
where any local user could read it in the process list.

Add a command as::

    @app.command()
    def mycommand(ctx: typer.Context, ...) -> None:
        from daemon.mymodule import run
        run(settings_from_ctx(ctx), ...)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, NoReturn

import typer

if TYPE_CHECKING:
    import httpx

    from daemon.config import TapdSettings
    from daemon.runtime.inspect import ScorerInspector
    from streams.transport import Producer

app = typer.Typer(
    name="tapd",
    help="Continual-RL data scout: score production-trace cohorts by predicted GRPO lift.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML settings file (also TAPD_CONFIG); TAPD_* env variables override it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    ctx.obj = {"config": config}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _config_problem(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"]) or "$"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        more = f" [and {e.error_count() - 1} more]" if e.error_count() > 1 else ""
        return f"{loc}: {err['msg']}{shown}{more}"
    return _one_line(str(e))


def settings_from_ctx(ctx: typer.Context) -> TapdSettings:
    """The settings for this invocation, loaded once per command."""
    from daemon.config import UnknownVariable, load_settings

    root = ctx.find_root()
    obj: dict[str, Any] = root.obj if isinstance(root.obj, dict) else {}
    if obj.get("settings") is None:
        try:
            obj["settings"] = load_settings(obj.get("config"))
        except UnknownVariable as e:
            typer.echo(f"tapd: bad environment: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:  # pydantic ValidationError, YAML and file errors
            typer.echo(f"tapd: bad configuration: {_config_problem(e)}", err=True)
            raise typer.Exit(2) from None
        root.obj = obj
    settings: TapdSettings = obj["settings"]
    return settings


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _fail(ctx: typer.Context, msg: str, code: int = 1) -> NoReturn:
    """One line on stderr, ``tapd <command>: <why>``, and the exit code."""
    names: list[str] = []
    c: Any = ctx
    while c is not None and c.parent is not None:
        names.insert(0, c.info_name or "")
        c = c.parent
    command = " ".join(["tapd", *names])
    _err(f"{command}: {_one_line(msg)}")
    raise typer.Exit(code)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _transport_settings(ctx: typer.Context) -> TapdSettings:
    """The settings, refusing to touch a log nobody chose (no ./var/ out of nowhere)."""
    settings = settings_from_ctx(ctx)
    if not settings.transport_configured():
        _fail(
            ctx,
            "no transport configured: set TAPD_TRANSPORT__KIND=kafka and "
            "TAPD_TRANSPORT__BOOTSTRAP_SERVERS, or TAPD_TRANSPORT__KIND=embedded and "
            "TAPD_TRANSPORT__EMBEDDED_PATH (or transport: in --config)",
            2,
        )
    return settings


# --- robust decoding: whatever a line holds, the answer is a message or a reason ----------


def _decode(raw: bytes, model: Any = None) -> tuple[Any, tuple[str, str] | None]:
    """``(message, None)`` or ``(None, (field, reason))``; never raises.

    ``streams.schemas`` raises ``SchemaError`` for what it foresees; anything
    else (a 5,000-digit integer, a recursion limit) is still a refusal here.
    """
    from streams.schemas import SchemaError, decode, decode_any

    try:
        return (decode_any(raw) if model is None else decode(raw, model)), None
    except SchemaError as e:
        return None, (e.field, e.reason)
    except Exception as e:
        return None, ("$", f"undecodable: {type(e).__name__}: {_one_line(str(e))[:500]}")


def _schema_for_topic(settings: TapdSettings, topic: str) -> str | None:
    from streams.schemas import DEAD_LETTER_SCHEMA, DISPATCH_SCHEMA, LIFT_SCHEMA, TRACE_SCHEMA

    t = settings.topics
    return {
        t.traces: TRACE_SCHEMA,
        t.dispatch: DISPATCH_SCHEMA,
        t.lift: LIFT_SCHEMA,
        t.dlq: DEAD_LETTER_SCHEMA,
    }.get(topic)


# --- streams I/O -------------------------------------------------------------


def _lines(fh: BinaryIO) -> Any:
    """Non-blank lines of a JSONL stream with their 1-based line numbers."""
    for n, line in enumerate(fh, start=1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield n, line


def _source_id(file: Path) -> str:
    """A name for an input that differs between inputs: the content's hash for a
    file (producing the same file twice gives the same dead-letter keys), a
    random one for stdin."""
    if str(file) == "-":
        return "stdin-" + uuid.uuid4().hex[:16]
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@app.command()
def produce(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL file, one message per line ('-': stdin).")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic to send to.")],
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate",
            help="Check each line against its schema, and that the schema belongs on the topic; "
            "bad lines go to the DLQ topic.",
        ),
    ] = True,
) -> None:
    """Send a JSONL file to a topic; with --validate, bad lines go to the dead-letter topic.

    Dead letters name the line (``offset`` is the line number, ``partition``
    -1: not on a log yet) and are keyed ``<topic>/produce/<source>:<line>``,
    where the source is the file's content hash, so letters from different
    files never share a key. Traces are keyed by their slice key (the producer
    contract: every trace of a slice in one partition, so one scorer replica
    owns the slice's cohorts).
    """
    from daemon.core.cohorting import slice_key_of, validate_slice_key
    from streams.deadletter import dead_letter
    from streams.factory import open_transport
    from streams.schemas import Trace, encode

    settings = _transport_settings(ctx)
    if str(file) != "-" and not file.is_file():
        _fail(ctx, f"{file}: no such file", 2)
    expected = _schema_for_topic(settings, topic)
    source = _source_id(file)
    fields = validate_slice_key(settings.cohorting.slice_key)
    transport = open_transport(settings.transport)
    producer: Producer = transport.producer()
    sent = rejected = 0
    fh: BinaryIO = sys.stdin.buffer if str(file) == "-" else file.open("rb")
    try:
        for n, line in _lines(fh):
            message: Any = None
            if validate:
                message, problem = _decode(line)
                got = getattr(message, "schema_", None)
                if problem is None and expected is not None and got != expected:
                    problem = ("schema", f"{got} does not belong on {topic} (it takes {expected})")
                if problem is not None:
                    letter = dead_letter(
                        line,
                        topic=topic,
                        partition=-1,
                        offset=n,
                        stage="produce",
                        field=problem[0],
                        reason=problem[1],
                    )
                    key = f"{topic}/produce/{source}:{n}".encode()
                    producer.send(settings.topics.dlq, encode(letter), key=key)
                    rejected += 1
                    _err(f"line {n}: {problem[0]}: {problem[1]}")
                    continue
            else:
                # Sent as is; a line that is no trace goes unkeyed (the scorer dead-letters it).
                message, _ = _decode(line, Trace)
            record_key = (
                slice_key_of(message, fields).encode() if isinstance(message, Trace) else None
            )
            producer.send(topic, line, key=record_key)
            sent += 1
    finally:
        # What was read is sent even when reading stops early.
        try:
            producer.flush()
        finally:
            if fh is not sys.stdin.buffer:
                fh.close()
            producer.close()
            transport.close()
    summary = {"topic": topic, "sent": sent, "rejected": rejected, "dlq": settings.topics.dlq}
    typer.echo(json.dumps(summary))


def _record_json(r: Any) -> dict[str, Any]:
    try:
        value: Any = r.value.decode("utf-8")
        enc = "utf-8"
    except UnicodeDecodeError:
        value, enc = base64.b64encode(r.value).decode(), "base64"
    return {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp_ms": r.timestamp_ms,
        "key": r.key.decode("utf-8", "replace") if r.key is not None else None,
        "value": value,
        "encoding": enc,
    }


@app.command()
def consume(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    group: Annotated[
        str | None,
        typer.Option("--group", "-g", help="Consumer group: resume from and commit its offsets."),
    ] = None,
    from_beginning: Annotated[
        bool,
        typer.Option(
            "--from-beginning",
            help="With no committed offset, start at the oldest record (default: newest).",
        ),
    ] = False,
    partition: Annotated[
        list[int] | None,
        typer.Option("--partition", "-p", min=0, help="Read only this partition (repeatable)."),
    ] = None,
    offset: Annotated[
        int | None,
        typer.Option("--offset", "-o", min=0, help="Start at this offset (no group, no commit)."),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option("--last", min=1, help="Only the last N records of each partition."),
    ] = None,
    max_records: Annotated[
        int | None,
        typer.Option("--max", "-n", min=1, help="Stop after reading this many records."),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Stop after this many idle seconds.")
    ] = 10.0,
    validate: Annotated[
        str | None,
        typer.Option(
            "--validate",
            help="Schema to check records against (trace, dispatch, lift); bad ones go to the DLQ.",
        ),
    ] = None,
    meta: Annotated[
        bool,
        typer.Option(
            "--meta", help="Print each record as JSON with partition, offset, key and value."
        ),
    ] = False,
) -> None:
    """Print a topic's records as JSONL on stdout (counts on stderr).

    With --partition, --offset or --last, read by position like ``kcat -C -e``:
    no group, nothing committed, up to the end offsets at the start.
    """
    from streams.schemas import Dispatch, LiftResult, Trace

    models: dict[str, Any] = {"trace": Trace, "dispatch": Dispatch, "lift": LiftResult}
    if validate is not None and validate not in models:
        _err(f"tapd consume: --validate must be one of {sorted(models)}, got {validate!r}")
        raise typer.Exit(2)
    if offset is not None and last is not None:
        _fail(ctx, "--offset and --last: give one of them", 2)
    positional = partition is not None or offset is not None or last is not None
    if positional and group is not None:
        _fail(
            ctx, "--group reads from the group's offsets: not with --partition/--offset/--last", 2
        )
    settings = _transport_settings(ctx)
    if positional:
        _consume_positions(
            ctx, settings, topic, partition, offset, last, max_records, timeout, validate, meta
        )
        return
    _consume_group(
        settings,
        topic,
        group,
        from_beginning,
        max_records,
        timeout,
        models.get(validate or ""),
        meta,
    )


def _emit_records(
    settings: TapdSettings, records: list[Any], model: Any, meta: bool, dlq: Any
) -> tuple[int, int]:
    """Print the good records; send the bad ones (with --validate) to the DLQ."""
    from streams.deadletter import dead_letter
    from streams.schemas import encode

    out = sys.stdout.buffer
    printed = rejected = 0
    for r in records:
        if model is not None:
            _, problem = _decode(r.value, model)
            if problem is not None:
                letter = dead_letter(
                    r.value,
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    stage="consume",
                    field=problem[0],
                    reason=problem[1],
                )
                dlq.send(
                    settings.topics.dlq,
                    encode(letter),
                    key=f"{r.topic}/{r.partition}/{r.offset}".encode(),
                )
                _err(f"{r.topic}[{r.partition}]@{r.offset}: {problem[0]}: {problem[1]}")
                rejected += 1
                continue
        out.write((json.dumps(_record_json(r)).encode() if meta else r.value) + b"\n")
        printed += 1
    if model is not None and dlq is not None:
        dlq.flush()
    out.flush()
    return printed, rejected


def _consume_group(
    settings: TapdSettings,
    topic: str,
    group: str | None,
    from_beginning: bool,
    max_records: int | None,
    timeout: float,
    model: Any,
    meta: bool,
) -> None:
    from streams.factory import open_transport
    from streams.transport import next_offsets

    transport = open_transport(settings.transport, settings.service.max_poll_records)
    # Without a group, read on a throwaway one and commit nothing.
    consumer = transport.consumer(
        [topic], group or f"tapd-consume-{uuid.uuid4().hex[:12]}", from_beginning=from_beginning
    )
    dlq: Producer | None = transport.producer() if model is not None else None
    read = printed = rejected = 0
    idle_since = time.monotonic()
    try:
        while max_records is None or read < max_records:
            want = settings.service.max_poll_records
            if max_records is not None:
                want = min(want, max_records - read)
            records = consumer.poll(min(0.5, timeout), want)
            if not records:
                if time.monotonic() - idle_since >= timeout:
                    break
                continue
            idle_since = time.monotonic()
            read += len(records)
            p, r = _emit_records(settings, records, model, meta, dlq)
            printed += p
            rejected += r
            # Commit only once the output (and the dead letters) are out.
            if group is not None:
                consumer.commit(next_offsets(records))
    finally:
        consumer.close()
        if dlq is not None:
            dlq.close()
        transport.close()
    _err(json.dumps({"topic": topic, "consumed": printed, "rejected": rejected}))


def _consume_positions(
    ctx: typer.Context,
    settings: TapdSettings,
    topic: str,
    partitions: list[int] | None,
    offset: int | None,
    last: int | None,
    max_records: int | None,
    timeout: float,
    validate: str | None,
    meta: bool,
) -> None:
    from daemon.runtime.logread import NoSuchTopic, read
    from streams.factory import open_transport
    from streams.schemas import Dispatch, LiftResult, Trace

    model = {"trace": Trace, "dispatch": Dispatch, "lift": LiftResult}.get(validate or "")
    transport = open_transport(settings.transport) if model is not None else None
    dlq = transport.producer() if transport is not None else None
    printed = rejected = 0
    try:
        batch: list[Any] = []
        for rec in read(
            settings.transport,
            topic,
            partitions=partitions,
            offset=offset,
            last=last,
            limit=max_records,
            timeout_s=timeout,
        ):
            batch.append(rec)
            if len(batch) >= 500:
                p, r = _emit_records(settings, batch, model, meta, dlq)
                printed, rejected, batch = printed + p, rejected + r, []
        p, r = _emit_records(settings, batch, model, meta, dlq)
        printed, rejected = printed + p, rejected + r
    except NoSuchTopic as e:
        _fail(ctx, str(e))
    finally:
        if dlq is not None:
            dlq.close()
        if transport is not None:
            transport.close()
    _err(json.dumps({"topic": topic, "consumed": printed, "rejected": rejected}))


@app.command()
def generate(
    ctx: typer.Context,
    n: Annotated[int, typer.Option("--n", min=1, help="Traces to generate.")] = 64,
    k: Annotated[int, typer.Option("--k", min=1, max=64, help="Attempts per trace.")] = 8,
    slices: Annotated[
        int, typer.Option("--slices", min=1, max=4, help="Capability slices (operations).")
    ] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    topic: Annotated[
        str | None,
        typer.Option("--topic", "-t", help="Send to this topic instead of printing JSONL."),
    ] = None,
) -> None:
    """Synthetic traces (arithmetic slices with K scored attempts each) to try tapd on a broker."""
    from daemon.runtime.synth import synthetic_traces

    traces = synthetic_traces(n, k=k, slices=slices, seed=seed)
    if topic is None:
        for t in traces:
            typer.echo(json.dumps(t, separators=(",", ":")))
        return
    from daemon.core.cohorting import slice_key_of, validate_slice_key
    from streams.factory import open_transport
    from streams.schemas import Trace

    settings = _transport_settings(ctx)
    fields = validate_slice_key(settings.cohorting.slice_key)
    transport = open_transport(settings.transport)
    producer = transport.producer()
    sent = 0
    try:
        for t in traces:
            # Keyed by slice key, as every producer of traces must (one
            # partition per slice: one scorer replica owns its cohorts).
            key = slice_key_of(Trace.model_validate(t), fields).encode()
            producer.send(topic, json.dumps(t, separators=(",", ":")).encode(), key=key)
            sent += 1
        producer.flush()
    finally:
        producer.close()
        transport.close()
    typer.echo(json.dumps({"topic": topic, "sent": sent}))


# --- the services -------------------------------------------------------------------


def _service_settings(ctx: typer.Context, role: str, embedded: bool) -> TapdSettings:
    """Settings for a long-running role: a transport chosen on purpose, JSON logs, one
    start-up line with the effective configuration (secrets masked)."""
    from daemon.runtime.logging import configure_logging, get_logger

    settings = settings_from_ctx(ctx)
    if not settings.transport_configured() and not embedded:
        _fail(
            ctx,
            "no transport configured: set TAPD_TRANSPORT__KIND=kafka and "
            "TAPD_TRANSPORT__BOOTSTRAP_SERVERS (or transport: in --config); "
            "--embedded runs on the local SQLite log "
            f"({settings.transport.embedded_path}) instead",
            2,
        )
    settings = settings.for_role(role)
    configure_logging(
        settings.log_level, role=role, service=True, replica=settings.service.replica_name()
    )
    log = get_logger("tapd.start")
    if not settings.transport_configured():
        log.warning(
            "transport_embedded",
            reason="no transport configured; --embedded given: the local SQLite log, not a broker",
            path=str(settings.transport.embedded_path),
        )
    t = settings.transport
    log.info(
        "config",
        transport=t.kind,
        bootstrap_servers=t.bootstrap_servers if t.kind == "kafka" else None,
        client_id=t.client_id,
        settings=settings.effective(),
    )
    return settings


_Embedded = Annotated[
    bool,
    typer.Option(
        "--embedded",
        help="Run on the embedded SQLite log when no transport is configured (local trials).",
    ),
]


@app.command()
def run(ctx: typer.Context, embedded: _Embedded = False) -> None:
    """Run the scorer service (traces -> cohorts -> score -> dispatch; lift -> learn)."""
    from daemon.service.scorer import RESTART, run_scorer

    settings = _service_settings(ctx, "scorer", embedded)
    if run_scorer(settings) == RESTART:
        # A predictor rollback: start again, the same way, on the pinned snapshot.
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@app.command()
def trainer(ctx: typer.Context, embedded: _Embedded = False) -> None:
    """Run the GRPO trainer (dispatch -> train on the cohort -> measure lift -> lift topic)."""
    from daemon.service.trainer import run_trainer

    run_trainer(_service_settings(ctx, "trainer", embedded))


@app.command()
def replay(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL trace file.", exists=True, dir_okay=False)],
) -> None:
    """Score a trace file (shadow mode, embedded log) and print each decision as JSONL.

    A dry run of the scoring path on a temporary log with a fresh predictor:
    it publishes nothing. To re-send dead letters to their topics, use
    ``tapd dlq redrive``.
    """
    from daemon.runtime.logging import configure_logging
    from daemon.service.scorer import replay_file

    settings = settings_from_ctx(ctx)
    configure_logging("warning", role="replay")
    n = replay_file(settings, file, sys.stdout)
    _err(json.dumps({"file": str(file), "decisions": n}))


# --- talking to the running scorer ------------------------------------------------


class Unreachable(Exception):
    pass


@dataclass
class _Admin:
    url: str
    token: str | None
    verify: Any  # True or an ssl.SSLContext trusting the scorer's certificate
    explicit: bool

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        headers = dict(kw.pop("headers", {}))
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            return httpx.request(
                method, f"{self.url}{path}", headers=headers, timeout=15.0, verify=self.verify, **kw
            )
        except httpx.TransportError as e:
            raise Unreachable(
                f"cannot reach the scorer at {self.url}: {_one_line(str(e))}"
            ) from None


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _admin(ctx: typer.Context, url: str | None) -> _Admin:
    settings = settings_from_ctx(ctx)
    s = settings.service
    token = os.environ.get("TAPD_ADMIN_TOKEN") or None
    if token is None and os.environ.get("TAPD_ADMIN_TOKEN_FILE"):
        token = _read_token(Path(os.environ["TAPD_ADMIN_TOKEN_FILE"]))
    if token is None and s.admin_token is not None:
        token = s.admin_token.get_secret_value() or None
    if token is None and s.admin_token_file is not None:
        token = _read_token(s.admin_token_file)
    if token is None:
        token = _read_token(Path(settings.state_dir) / "admin-token")
    if token is None and s.read_token is not None:
        token = s.read_token.get_secret_value() or None
    explicit = url is not None
    if url is None:
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        scheme = "https" if s.tls_certfile else "http"
        url = f"{scheme}://{host}:{s.port}"
    ca = os.environ.get("TAPD_ADMIN_CACERT") or (str(s.tls_certfile) if s.tls_certfile else None)
    verify: Any = True
    if ca:
        import ssl

        try:
            verify = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            _fail(ctx, f"TAPD_ADMIN_CACERT {ca}: {e}", 2)
    return _Admin(url.rstrip("/"), token, verify, explicit)


def _problem(r: httpx.Response) -> str:
    try:
        err = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {_one_line(r.text)[:300]}"
    if isinstance(err, dict) and "field" in err:
        return f"HTTP {r.status_code}: {err['field']}: {err.get('reason', '')}"
    if isinstance(err, dict) and "error" in err:
        hint = ""
        if r.status_code == 401:
            hint = (
                " (set TAPD_ADMIN_TOKEN or TAPD_ADMIN_TOKEN_FILE; a scorer without a configured "
                "token writes one to <state_dir>/admin-token)"
            )
        return f"HTTP {r.status_code}: {err['error']}{hint}"
    return f"HTTP {r.status_code}"


def _api(ctx: typer.Context, admin: _Admin, method: str, path: str, **kw: Any) -> Any:
    try:
        r = admin.call(method, path, **kw)
    except Unreachable as e:
        _fail(ctx, str(e))
    if r.status_code >= 300:
        _fail(ctx, _problem(r))
    return r.json()


def _inspect(
    ctx: typer.Context,
    url: str | None,
    offline: bool,
    path: str,
    local: Callable[[ScorerInspector], Any],
    params: dict[str, Any] | None = None,
) -> Any:
    """The answer from the running scorer, else from the state directory."""
    from daemon.runtime.inspect import ScorerInspector

    admin = _admin(ctx, url)
    if not offline:
        try:
            r = admin.call("GET", path, params=params)
        except Unreachable as e:
            if admin.explicit:
                _fail(ctx, str(e))
        else:
            if r.status_code == 404 and "not known" in r.text:
                _fail(ctx, _problem(r))
            if r.status_code >= 300:
                _fail(ctx, _problem(r))
            return r.json()
        _err(
            f"tapd: no scorer answers at {admin.url}: reading {settings_from_ctx(ctx).state_dir} "
            "directly (as last persisted)"
        )
    try:
        return local(ScorerInspector(settings_from_ctx(ctx)))
    except LookupError as e:
        _fail(ctx, str(e.args[0] if e.args else e))
    except ValueError as e:
        _fail(ctx, str(e), 2)


_Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="TAPD_URL", help="Scorer admin URL (default: service host and port)."
    ),
]
_Offline = Annotated[
    bool,
    typer.Option("--offline", help="Read the state directory even if a scorer answers."),
]


@app.command()
def status(ctx: typer.Context, url: _Url = None, offline: _Offline = False) -> None:
    """The scorer at a glance: lag, cohorts open/pending/in flight, pause, predictor, policy."""
    _echo_json(_inspect(ctx, url, offline, "/admin/status", lambda i: i.status()))


@app.command()
def cohorts(
    ctx: typer.Context,
    open_: Annotated[bool, typer.Option("--open", help="Open cohorts only.")] = False,
    pending: Annotated[
        bool, typer.Option("--pending", help="Closed, waiting to be scored.")
    ] = False,
    in_flight: Annotated[
        bool, typer.Option("--in-flight", help="Dispatched, awaiting their lift.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 1000,
    ids: Annotated[
        bool, typer.Option("--ids", help="Only the cohort ids, one per line (closed cohorts).")
    ] = False,
    url: _Url = None,
    offline: _Offline = False,
) -> None:
    """List cohorts (JSONL): open, pending and in flight (or the one state asked for)."""
    chosen = [
        s for s, on in (("open", open_), ("pending", pending), ("in_flight", in_flight)) if on
    ]
    if len(chosen) > 1:
        _fail(ctx, "give at most one of --open, --pending, --in-flight", 2)
    state = chosen[0] if chosen else None
    params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
    rows = _inspect(
        ctx, url, offline, "/admin/cohorts", lambda i: i.cohorts(state, limit), params=params
    )
    for row in rows:
        if ids:
            if row.get("cohort_id"):
                typer.echo(row["cohort_id"])
        else:
            typer.echo(json.dumps(row))


@app.command()
def explain(
    ctx: typer.Context,
    cohort_id: Annotated[str, typer.Argument(help="The cohort id (as in logs and dispatches).")],
    url: _Url = None,
    offline: _Offline = False,
) -> None:
    """One cohort: its state, features, prediction and uncertainty, the decision and why, its lift."""

    def local(i: ScorerInspector) -> Any:
        found = i.explain(cohort_id)
        if found is None:
            raise LookupError(f"cohort {cohort_id}: not known to this scorer")
        return found

    _echo_json(_inspect(ctx, url, offline, f"/admin/cohorts/{cohort_id}", local))


models_app = typer.Typer(help="The lift predictor's snapshots: list, roll back.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(ctx: typer.Context, url: _Url = None, offline: _Offline = False) -> None:
    """Predictor snapshots (oldest first) and which one a start loads."""
    _echo_json(_inspect(ctx, url, offline, "/admin/models", lambda i: i.models()))


@models_app.command("rollback")
def models_rollback(
    ctx: typer.Context,
    version: Annotated[
        str | None,
        typer.Argument(help="Snapshot name or version (default: the one before the latest)."),
    ] = None,
    url: _Url = None,
    user: Annotated[str | None, typer.Option("--user", envvar="USER", help="Who (audit).")] = None,
    wait_s: Annotated[
        float,
        typer.Option(
            "--wait-s",
            min=0.0,
            help="How long to wait for the restarted scorer to be ready (0: do not wait).",
        ),
    ] = 300.0,
) -> None:
    """Make the scorer use an earlier predictor snapshot.

    A running scorer restarts onto it (labels learned since are replayed into
    its online stages); without one, the next start loads it. By default the
    command returns once the restarted scorer serves the snapshot and is ready,
    so the next command an operator types reaches it.
    """
    from daemon.runtime.inspect import ScorerInspector

    admin = _admin(ctx, url)
    before = _instance(admin)
    try:
        r = admin.call(
            "POST",
            "/admin/models/rollback",
            json={"version": version},
            headers={"X-Tapd-User": user} if user else {},
        )
    except Unreachable as e:
        if admin.explicit:
            _fail(ctx, str(e))
        try:
            out = ScorerInspector(settings_from_ctx(ctx)).rollback(version, user or "cli")
        except ValueError as err:
            _fail(ctx, str(err))
        _echo_json(out)
        return
    if r.status_code >= 300:
        _fail(ctx, _problem(r))
    out = r.json()
    if out.get("restarting") and wait_s > 0:
        _wait_restarted(ctx, admin, before, wait_s)
        out = {**out, "restarted": True}
    _echo_json(out)


def _instance(admin: _Admin) -> str | None:
    """The serving process's id, as its /readyz gives it (None when none answers)."""
    try:
        r = admin.call("GET", "/readyz")
    except Unreachable:
        return None
    try:
        got = r.json().get("instance")
    except ValueError:
        return None
    return got if isinstance(got, str) else None


def _wait_restarted(ctx: typer.Context, admin: _Admin, before: str | None, wait_s: float) -> None:
    """Return once a scorer process other than ``before`` answers ready.

    The process that took the rollback keeps answering until it stops, so
    readiness alone could come from it; a new process has a new instance id.
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            r = admin.call("GET", "/readyz")
            if r.status_code == 200 and r.json().get("instance") != before:
                return
        except (Unreachable, ValueError):
            pass  # restarting: the port is closed for a moment
        time.sleep(0.3)
    _fail(ctx, f"the scorer did not come back ready within {wait_s:.0f}s of the rollback")


policies_app = typer.Typer(help="Policy versions kept by the trainer.")
app.add_typer(policies_app, name="policies")


@policies_app.command("list")
def policies_list(ctx: typer.Context, url: _Url = None, offline: _Offline = False) -> None:
    """Policy versions (v0 is the configured base), the cohort each came from and its lift."""
    _echo_json(_inspect(ctx, url, offline, "/admin/policies", lambda i: i.policies()))


# --- dead letters ------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")


def parse_since(text: str, now: float | None = None) -> float:
    """``30m``, ``2h``, ``1d`` ago, unix seconds, or an ISO 8601 time -> unix seconds."""
    now = time.time() if now is None else now
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {text!r} is not 30m/2h/1d, unix seconds or ISO 8601") from None
    if dt.tzinfo is None:
        return dt.astimezone().timestamp()
    return dt.timestamp()


dlq_app = typer.Typer(help="Dead letters: list, show, re-send their originals.")
app.add_typer(dlq_app, name="dlq")

_Stage = Annotated[str | None, typer.Option("--stage", help="Only letters of this stage.")]
_Since = Annotated[
    str | None, typer.Option("--since", help="Only letters since: 30m, 2h, 1d, ISO time.")
]
_From = Annotated[str | None, typer.Option("--source-topic", help="Only letters from this topic.")]


@dataclass
class _Letter:
    partition: int
    offset: int
    letter: Any  # DeadLetter


def _letters(
    ctx: typer.Context,
    settings: TapdSettings,
    stage: str | None,
    since: str | None,
    source_topic: str | None,
    last: int | None = None,
) -> Iterator[_Letter]:
    from daemon.runtime.logread import NoSuchTopic, read
    from streams.schemas import DeadLetter

    try:
        cutoff = parse_since(since) if since else None
    except ValueError as e:
        _fail(ctx, str(e), 2)
    try:
        for rec in read(settings.transport, settings.topics.dlq, last=last):
            letter, problem = _decode(rec.value, DeadLetter)
            if problem is not None:
                _err(f"{rec.topic}[{rec.partition}]@{rec.offset}: not a dead letter: {problem[1]}")
                continue
            if stage is not None and letter.stage != stage:
                continue
            if cutoff is not None and letter.ts < cutoff:
                continue
            if source_topic is not None and letter.source_topic != source_topic:
                continue
            yield _Letter(rec.partition, rec.offset, letter)
    except NoSuchTopic:
        return


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    stage: _Stage = None,
    since: _Since = None,
    source_topic: _From = None,
    last: Annotated[
        int | None, typer.Option("--last", min=1, help="Only the last N letters per partition.")
    ] = None,
    ids: Annotated[
        bool, typer.Option("--ids", help="Only PARTITION:OFFSET of each letter (for dlq show).")
    ] = False,
) -> None:
    """One JSON line per dead letter: where it is, why it was refused, where it came from."""
    settings = _transport_settings(ctx)
    n = 0
    for d in _letters(ctx, settings, stage, since, source_topic, last):
        x = d.letter
        n += 1
        if ids:
            typer.echo(f"{d.partition}:{d.offset}")
            continue
        typer.echo(
            json.dumps(
                {
                    "partition": d.partition,
                    "offset": d.offset,
                    "ts": x.ts,
                    "stage": x.stage,
                    "field": x.field,
                    "reason": x.reason,
                    "source_topic": x.source_topic,
                    "source_partition": x.partition,
                    "source_offset": x.offset,
                    "bytes": len(base64.b64decode(x.original_b64)),
                }
            )
        )
    _err(json.dumps({"topic": settings.topics.dlq, "letters": n}))


@dlq_app.command("show")
def dlq_show(
    ctx: typer.Context,
    position: Annotated[str, typer.Argument(help="PARTITION:OFFSET of the letter (or OFFSET).")],
) -> None:
    """A dead letter in full, with its original message."""
    from daemon.runtime.logread import NoSuchTopic, read
    from streams.schemas import DeadLetter

    settings = _transport_settings(ctx)
    part, _, off = position.rpartition(":")
    if not off.isdigit() or (part and not part.isdigit()):
        _fail(ctx, f"{position!r}: expected PARTITION:OFFSET or OFFSET", 2)
    p, o = int(part or 0), int(off)
    try:
        found = next(
            read(settings.transport, settings.topics.dlq, partitions=[p], offset=o, limit=1), None
        )
    except NoSuchTopic as e:
        _fail(ctx, str(e))
    if found is None or found.offset != o:
        _fail(ctx, f"{settings.topics.dlq}[{p}]@{o}: no such record")
    letter, problem = _decode(found.value, DeadLetter)
    if problem is not None:
        _fail(ctx, f"{settings.topics.dlq}[{p}]@{o}: not a dead letter: {problem[1]}")
    body = letter.model_dump(mode="json", by_alias=True)
    raw = base64.b64decode(letter.original_b64)
    try:
        body["original"] = raw.decode("utf-8")
        del body["original_b64"]
    except UnicodeDecodeError:
        pass
    _echo_json({"partition": p, "offset": o, **body})


@dlq_app.command("redrive")
def dlq_redrive(
    ctx: typer.Context,
    stage: _Stage = None,
    since: _Since = None,
    source_topic: _From = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Re-send at most N.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be sent.")] = False,
) -> None:
    """Re-send dead letters' original bytes to their source topic, each at most once.

    Only letters whose source is one of tapd's input topics (traces, lift,
    dispatch) are re-sent, byte for byte. A ledger in the state directory
    (``dlq-redrive.sqlite``) remembers every letter re-sent, so running the
    command again sends nothing twice; the scorer's trace-id dedup is a
    second guard. Fix the cause first (the producer, a missing verifier):
    a letter refused again comes back as a new dead letter.
    """
    from streams.factory import open_transport

    settings = _transport_settings(ctx)
    topics = settings.topics
    allowed = {topics.traces, topics.lift, topics.dispatch}
    ledger = _RedriveLedger(Path(settings.state_dir) / "dlq-redrive.sqlite", dry_run)
    transport = None if dry_run else open_transport(settings.transport)
    producer = transport.producer() if transport is not None else None
    counts = {"redriven": 0, "already": 0, "not_an_input_topic": 0, "truncated": 0}
    batch: list[tuple[int, int, str]] = []
    try:
        for d in _letters(ctx, settings, stage, since, source_topic):
            if limit is not None and counts["redriven"] >= limit:
                break
            x = d.letter
            if x.source_topic not in allowed:
                counts["not_an_input_topic"] += 1
                continue
            if "[original truncated" in x.reason:
                counts["truncated"] += 1
                continue
            if ledger.seen(topics.dlq, d.partition, d.offset):
                counts["already"] += 1
                continue
            if producer is not None:
                producer.send(x.source_topic, base64.b64decode(x.original_b64))
            else:
                typer.echo(
                    json.dumps({"partition": d.partition, "offset": d.offset, "to": x.source_topic})
                )
            batch.append((d.partition, d.offset, x.source_topic))
            counts["redriven"] += 1
            if producer is not None and len(batch) >= 500:
                producer.flush()
                ledger.record(topics.dlq, batch)
                batch = []
        if producer is not None and batch:
            producer.flush()
            ledger.record(topics.dlq, batch)
    finally:
        if producer is not None:
            producer.close()
        if transport is not None:
            transport.close()
        ledger.close()
    typer.echo(json.dumps({"dlq": topics.dlq, "dry_run": dry_run, **counts}))


class _RedriveLedger:
    """The dead letters already re-sent (by their position on the DLQ topic)."""

    def __init__(self, path: Path, read_only: bool) -> None:
        import sqlite3

        self._db: Any = None
        if read_only:
            if path.exists():
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
            return
        from streams.durable import connect_durable

        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect_durable(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS redriven (topic TEXT NOT NULL, part INTEGER NOT NULL, "
            "off INTEGER NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, "
            "PRIMARY KEY (topic, part, off))"
        )

    def seen(self, topic: str, partition: int, offset: int) -> bool:
        if self._db is None:
            return False
        try:
            row = self._db.execute(
                "SELECT 1 FROM redriven WHERE topic = ? AND part = ? AND off = ?",
                (topic, partition, offset),
            ).fetchone()
        except Exception:
            return False
        return row is not None

    def record(self, topic: str, items: list[tuple[int, int, str]]) -> None:
        now = time.time()
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO redriven (topic, part, off, target, ts) VALUES (?, ?, ?, ?, ?)",
                [(topic, p, o, t, now) for p, o, t in items],
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


# --- thresholds ---------------------------------------------------------------------------

probe_app = typer.Typer(help="The probe file (policy.probe_path): held-out items per target.")
app.add_typer(probe_app, name="probe")


@probe_app.command("answers")
def probe_answers(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="The probe file to read.", dir_okay=False)],
    out: Annotated[Path, typer.Argument(help="Where to write it with answers.", dir_okay=False)],
    attempts: Annotated[
        int, typer.Option(min=1, max=1024, help="Attempts per item at grpo.temperature.")
    ] = 16,
    low_temperature_attempts: Annotated[
        int,
        typer.Option(min=0, max=1024, help="More attempts per item at temperature 0.3 (0: none)."),
    ] = 8,
    seed: int = 0,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(min=1, max=4096, help="Default: the trainer's grpo.max_completion_length."),
    ] = None,
) -> None:
    """Give each item the configured policy's own words for its right answer.

    For a chat model, whose answers are sentences: the lift is measured on
    each item's answer, and a bare reference is one it almost never writes
    (docs/REAL_MODEL.md, "The probe in the model's own words"). Items it
    never answers right are kept as they were. Prints how many items were
    answered.
    """
    from daemon.policy.answers import own_answers
    from daemon.policy.rollout import make_rollout_engine
    from daemon.verify.settings import configure
    from streams.probes import ProbeFileError, read_probe_file, write_probe_file

    settings = settings_from_ctx(ctx)
    if settings.policy.model_path is None:
        _fail(ctx, "policy.model_path: not set; the answers come from the policy", 2)
    try:
        items = read_probe_file(source)
    except (ProbeFileError, OSError) as e:
        _fail(ctx, str(e), 2)
    configure(settings.verify)  # caps on verifier_args, the code sandbox
    try:
        engine = make_rollout_engine(settings.policy)
    except (OSError, ValueError) as e:  # a missing or unreadable model directory
        _fail(ctx, f"policy.model_path: cannot load the policy ({e})", 2)
    try:
        got, report = own_answers(
            items,
            engine,
            attempts,
            seed,
            # An answer the policy gives within what the trainer lets it write.
            max_new_tokens=max_new_tokens or settings.grpo.max_completion_length,
            temperature=settings.grpo.temperature,
            low_temperature_attempts=low_temperature_attempts,
        )
    except ValueError as e:
        _fail(ctx, str(e), 2)
    write_probe_file(out, got)
    _echo_json(
        {
            "items": report.items,
            "answered": report.answered,
            "attempts": attempts,
            "low_temperature_attempts": low_temperature_attempts,
            "out": str(out),
        }
    )


@probe_app.command("targets")
def probe_targets(
    ctx: typer.Context,
    source: Annotated[
        Path | None,
        typer.Argument(help="The probe file (default: policy.probe_path).", dir_okay=False),
    ] = None,
) -> None:
    """The probe's targets: items, and how many give an answer in the policy's own words.

    A cohort's target is the one its dispatch names, else its traces'
    ``subject``: a subject that names none of these has no target lift
    (``tapd_trainer_lift_without_target_total``, docs/RUNBOOK.md). Prints a
    line for the file, then one per target (JSONL).
    """
    from streams.probes import ProbeFileError, read_probe_file, targets

    settings = settings_from_ctx(ctx)
    path = source or settings.policy.probe_path
    if path is None:
        typer.echo(json.dumps({"probe_path": None, "targets": 0}))
        return
    try:
        by_target = targets(read_probe_file(path))
    except (ProbeFileError, OSError) as e:
        _fail(ctx, str(e), 2)
    typer.echo(json.dumps({"probe_path": str(path), "targets": len(by_target)}))
    for name, items in sorted(by_target.items()):
        answered = sum(it.answer is not None for it in items)
        typer.echo(json.dumps({"target": name, "items": len(items), "answered": answered}))


thresholds_app = typer.Typer(help="Read or change the running scorer's thresholds.")
app.add_typer(thresholds_app, name="thresholds")

_User = Annotated[
    str | None, typer.Option("--user", envvar="USER", help="Who is changing it (audit).")
]


def _value(raw: str) -> Any:
    """A NAME=VALUE value as JSON when it is JSON (``8``, ``true``, ``0.05``), else the string
    (refused by the server with the field named); ``NaN`` and ``Infinity`` stay strings."""

    def keep(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(raw, parse_constant=keep)
    except ValueError:
        return raw


def _duration_s(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r}: expected a duration such as 30m, 2h or 1d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@thresholds_app.command("get")
def thresholds_get(ctx: typer.Context, url: _Url = None) -> None:
    """Every layer: effective values and their source, overrides (who, when, why, expiry), file."""
    _echo_json(_api(ctx, _admin(ctx, url), "GET", "/admin/thresholds"))


@thresholds_app.command("set")
def thresholds_set(
    ctx: typer.Context,
    changes: Annotated[list[str], typer.Argument(help="NAME=VALUE pairs.")],
    why: Annotated[str | None, typer.Option("--why", help="Why (kept with the override).")] = None,
    for_: Annotated[
        str | None,
        typer.Option("--for", help="Expire the override after this long: 30m, 2h, 1d."),
    ] = None,
    url: _Url = None,
    user: _User = None,
) -> None:
    """Override thresholds at run time (audited, kept across restarts, until cleared or
    expired; the thresholds file never silently undoes them): tapd thresholds set
    shadow_mode=true --why "lift negative" --for 2h"""
    body: dict[str, Any] = {}
    for item in changes:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            _fail(ctx, f"{item!r}: expected NAME=VALUE", 2)
        body[name] = _value(raw)
    request: dict[str, Any] = {"set": body}
    if why:
        request["why"] = why
    if for_:
        try:
            request["expires_in_s"] = _duration_s(for_)
        except ValueError as e:
            _fail(ctx, f"--for: {e}", 2)
    admin = _admin(ctx, url)
    if not admin.token:
        _fail(
            ctx,
            "no admin token (TAPD_ADMIN_TOKEN, TAPD_ADMIN_TOKEN_FILE or <state_dir>/admin-token)",
            2,
        )
    out = _api(
        ctx,
        admin,
        "PATCH",
        "/admin/thresholds",
        json=request,
        headers={"X-Tapd-User": user} if user else {},
    )
    if out.get("noop"):
        _err("tapd thresholds set: nothing changed (already in effect)")
    _echo_json(out)


@thresholds_app.command("clear")
def thresholds_clear(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None, typer.Argument(help="Overrides to clear (none: all).")
    ] = None,
    why: Annotated[str | None, typer.Option("--why")] = None,
    url: _Url = None,
    user: _User = None,
) -> None:
    """Remove run-time overrides: the file (or configuration) value applies again."""
    admin = _admin(ctx, url)
    out: Any = None
    for name in names or ["*"]:
        out = _api(
            ctx,
            admin,
            "DELETE",
            f"/admin/thresholds/overrides/{name}",
            params={"why": why} if why else None,
            headers={"X-Tapd-User": user} if user else {},
        )
    _echo_json(out)


@thresholds_app.command("reload")
def thresholds_reload(ctx: typer.Context, url: _Url = None, user: _User = None) -> None:
    """Re-read the thresholds file now (overrides stay in force)."""
    _echo_json(
        _api(
            ctx,
            _admin(ctx, url),
            "POST",
            "/admin/thresholds/reload",
            headers={"X-Tapd-User": user} if user else {},
        )
    )


def _add_plugin_commands() -> None:
    """Subcommands from installed packages (``tapd.commands`` entry points).

    The lab adds ``demo``, ``eval``, ``reliability`` and ``policy`` this
    way: the product's command line never imports it.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="tapd.commands"):
        try:
            register = ep.load()
        except ImportError as e:
            # An installation without the lab (a service image) simply has no lab commands.
            if getattr(e, "name", None) != ep.value.partition(".")[0]:
                _err(f"tapd: commands from {ep.value!r} unavailable: {e}")
            continue
        register(app)


# At import, so that every way of running the app (console script, tests'
# CliRunner, ``python -m daemon.cli``) has the same commands.
_add_plugin_commands()


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _err("tapd: interrupted")
        raise SystemExit(130) from None
    except typer.Abort:
        _err("tapd: aborted")
        raise SystemExit(1) from None
    except typer.TyperException as e:  # usage errors: one line, click's message and code
        fmt = getattr(e, "format_message", None)
        message = _one_line(fmt()) if fmt is not None else ""
        if not message and hasattr(e, "show"):
            e.show()  # no arguments at all: the help
        else:
            _err(f"tapd: {message or type(e).__name__} (tapd --help lists the commands)")
        raise SystemExit(int(getattr(e, "exit_code", 2))) from None
    except Exception as e:  # the last line of defence: one line, never a traceback
        from daemon.runtime.logging import JsonLines, get_logger

        if isinstance(sys.stderr, JsonLines):
            # A service: the one line is a JSON log line, with the traceback
            # as a field of it, for whoever debugs the crash.
            get_logger("tapd.cli").error(
                "crashed", error=f"{type(e).__name__}: {_one_line(str(e))[:1000]}", exc_info=True
            )
        else:
            _err(f"tapd: {type(e).__name__}: {_one_line(str(e))[:1000]}")
        raise SystemExit(1) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    # ``python -m daemon.cli``: run the imported module's app (the one plug-ins registered on).
    from daemon.cli import main as _main

    _main()
