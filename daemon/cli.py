"""The ``tapd`` command line.

Each command is a thin function: it reads the settings (``--config`` file,
then ``TAPD_...`` environment variables), imports the module that does the
work lazily, so that ``tapd --help`` stays fast, and maps its result to exit
codes and output. Add a command as::

    @app.command()
    def mycommand(ctx: typer.Context, ...) -> None:
        from daemon.mymodule import run
        run(settings_from_ctx(ctx), ...)
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import typer

if TYPE_CHECKING:
    from daemon.config import TapdSettings
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


def settings_from_ctx(ctx: typer.Context) -> TapdSettings:
    """The settings for this invocation, loaded once per command."""
    from daemon.config import load_settings

    root = ctx.find_root()
    obj: dict[str, Any] = root.obj if isinstance(root.obj, dict) else {}
    if obj.get("settings") is None:
        try:
            obj["settings"] = load_settings(obj.get("config"))
        except Exception as e:  # pydantic ValidationError, YAML and file errors
            typer.echo(f"tapd: bad configuration: {e}", err=True)
            raise typer.Exit(2) from None
        root.obj = obj
    settings: TapdSettings = obj["settings"]
    return settings


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


# --- streams I/O -------------------------------------------------------------


def _lines(fh: BinaryIO) -> Any:
    """Non-blank lines of a JSONL stream with their 1-based line numbers."""
    for n, line in enumerate(fh, start=1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield n, line


@app.command()
def produce(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL file, one message per line ('-': stdin).")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic to send to.")],
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate",
            help="Check each line against the schema it names; bad lines go to the DLQ topic.",
        ),
    ] = True,
) -> None:
    """Send a JSONL file to a topic; with --validate, bad lines go to the dead-letter topic.

    Traces are keyed by their slice key (the producer contract: every trace of
    a slice in one partition, so one scorer replica owns the slice's cohorts).
    """
    from daemon.core.cohorting import slice_key_of, validate_slice_key
    from streams.deadletter import dead_letter
    from streams.factory import open_transport
    from streams.schemas import SchemaError, Trace, decode, decode_any, encode

    settings = settings_from_ctx(ctx)
    fields = validate_slice_key(settings.cohorting.slice_key)
    transport = open_transport(settings.transport)
    producer: Producer = transport.producer()
    sent = rejected = 0
    fh: BinaryIO = sys.stdin.buffer if str(file) == "-" else file.open("rb")
    try:
        for n, line in _lines(fh):
            message: Any = None
            if validate:
                try:
                    message = decode_any(line)
                except SchemaError as e:
                    letter = dead_letter(
                        line, topic=topic, partition=-1, offset=n, stage="produce", error=e
                    )
                    producer.send(settings.topics.dlq, encode(letter))
                    rejected += 1
                    _err(f"line {n}: {e.field}: {e.reason}")
                    continue
            else:
                try:
                    message = decode(line, Trace)
                except SchemaError:
                    message = None  # sent as is, unkeyed: the scorer dead-letters it
            key = slice_key_of(message, fields).encode() if isinstance(message, Trace) else None
            producer.send(topic, line, key=key)
            sent += 1
        producer.flush()
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()
        producer.close()
        transport.close()
    summary = {"topic": topic, "sent": sent, "rejected": rejected, "dlq": settings.topics.dlq}
    typer.echo(json.dumps(summary))


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
) -> None:
    """Print a topic's records as JSONL on stdout (counts on stderr)."""
    from streams.deadletter import route
    from streams.factory import open_transport
    from streams.schemas import Dispatch, LiftResult, Trace, encode
    from streams.transport import next_offsets

    models: dict[str, Any] = {
        "trace": Trace,
        "dispatch": Dispatch,
        "lift": LiftResult,
    }
    if validate is not None and validate not in models:
        _err(f"tapd consume: --validate must be one of {sorted(models)}, got {validate!r}")
        raise typer.Exit(2)
    settings = settings_from_ctx(ctx)
    transport = open_transport(settings.transport, settings.service.max_poll_records)
    # Without a group, read on a throwaway one and commit nothing.
    consumer = transport.consumer(
        [topic], group or f"tapd-consume-{uuid.uuid4().hex[:12]}", from_beginning=from_beginning
    )
    dlq: Producer | None = transport.producer() if validate else None
    out = sys.stdout.buffer
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
            good = records
            if validate is not None and dlq is not None:
                oks, errs = route(records, models[validate], stage="consume")
                good = [r for r, _ in oks]
                for letter in errs:
                    dlq.send(settings.topics.dlq, encode(letter))
                    _err(
                        f"{topic}[{letter.partition}]@{letter.offset}: {letter.field}: {letter.reason}"
                    )
                rejected += len(errs)
                dlq.flush()
            for r in good:
                out.write(r.value + b"\n")
            printed += len(good)
            out.flush()
            # Commit only once the output (and the dead letters) are out.
            if group is not None:
                consumer.commit(next_offsets(records))
    finally:
        consumer.close()
        if dlq is not None:
            dlq.close()
        transport.close()
    _err(json.dumps({"topic": topic, "consumed": printed, "rejected": rejected}))


# --- the scorer: run, demo, replay, thresholds ----------------------------------


@app.command()
def run(ctx: typer.Context) -> None:
    """Run the scorer service (traces -> cohorts -> score -> dispatch; lift -> learn)."""
    from daemon.runtime.logging import configure_logging
    from daemon.service.scorer import run_scorer

    settings = settings_from_ctx(ctx)
    configure_logging(settings.log_level, role="scorer")
    run_scorer(settings)


@app.command()
def trainer(ctx: typer.Context) -> None:
    """Run the GRPO trainer (dispatch -> train on the cohort -> measure lift -> lift topic)."""
    from daemon.runtime.logging import configure_logging
    from daemon.service.trainer import run_trainer

    settings = settings_from_ctx(ctx)
    configure_logging(settings.log_level, role="trainer")
    run_trainer(settings)


@app.command()
def replay(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL trace file.", exists=True, dir_okay=False)],
) -> None:
    """Score a trace file (shadow mode, embedded log) and print each decision as JSONL."""
    from daemon.runtime.logging import configure_logging
    from daemon.service.scorer import replay_file

    settings = settings_from_ctx(ctx)
    configure_logging("warning", role="replay")
    n = replay_file(settings, file, sys.stdout)
    _err(json.dumps({"file": str(file), "decisions": n}))


thresholds_app = typer.Typer(help="Read or change the running scorer's thresholds.")
app.add_typer(thresholds_app, name="thresholds")

_Url = Annotated[
    str | None, typer.Option("--url", help="Scorer base URL (default: service host and port).")
]


def _admin_url(ctx: typer.Context, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = settings_from_ctx(ctx).service
    return f"http://{s.host}:{s.port}"


@thresholds_app.command("get")
def thresholds_get(ctx: typer.Context, url: _Url = None) -> None:
    """Print the current thresholds as JSON."""
    import httpx

    r = httpx.get(f"{_admin_url(ctx, url)}/admin/thresholds", timeout=10.0)
    if r.status_code != 200:
        _err(f"tapd thresholds get: HTTP {r.status_code}: {r.text.strip()}")
        raise typer.Exit(1)
    typer.echo(json.dumps(r.json(), indent=2))


@thresholds_app.command("set")
def thresholds_set(
    ctx: typer.Context,
    changes: Annotated[list[str], typer.Argument(help="NAME=VALUE pairs.")],
    url: _Url = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="TAPD_ADMIN_TOKEN", help="Admin token.")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", envvar="USER", help="Who is changing it (audit).")
    ] = None,
) -> None:
    """Change thresholds at run time (audited): tapd thresholds set max_in_flight=8 ..."""
    import httpx

    body: dict[str, Any] = {}
    for item in changes:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            _err(f"tapd thresholds set: {item!r}: expected NAME=VALUE")
            raise typer.Exit(2)
        try:
            body[name] = json.loads(raw)
        except json.JSONDecodeError:
            body[name] = raw  # validated by the server, which names the field
    if not token:
        _err("tapd thresholds set: no admin token (--token or TAPD_ADMIN_TOKEN)")
        raise typer.Exit(2)
    headers = {"Authorization": f"Bearer {token}"}
    if user:
        headers["X-Tapd-User"] = user
    r = httpx.patch(
        f"{_admin_url(ctx, url)}/admin/thresholds", json=body, headers=headers, timeout=10.0
    )
    if r.status_code != 200:
        try:
            err = r.json()
        except ValueError:
            err = {"error": r.text.strip()}
        where = f"{err['field']}: {err.get('reason', '')}" if "field" in err else err.get("error")
        _err(f"tapd thresholds set: HTTP {r.status_code}: {where}")
        raise typer.Exit(1)
    typer.echo(json.dumps(r.json()["audit"], indent=2))


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
            _err(f"tapd: commands from {ep.value!r} unavailable: {e}")
            continue
        register(app)


def main() -> None:
    _add_plugin_commands()
    app()


if __name__ == "__main__":
    main()
