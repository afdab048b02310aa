"""The lab's ``tapd`` subcommands: demo, eval, reliability, build-policy.

Registered through the ``tapd.commands`` entry point (:func:`register`), so
the product's command line never imports the lab. Each command imports its
heavy modules (torch, matplotlib, scipy) only when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

lab_app = typer.Typer()


@lab_app.command()
def demo(
    cohorts: Annotated[int, typer.Option("--cohorts", min=2, help="Cohorts to stream.")] = 16,
    out: Annotated[Path, typer.Option("--out", help="Folder for summary and plots.")] = Path(
        "out/demo"
    ),
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """The closed loop on a bare machine: embedded log, tiny policy, a trainer process."""
    from daemon.runtime.logging import configure_logging
    from lab.demo import format_summary, run_demo

    configure_logging("warning", role="demo")
    summary = run_demo(cohorts=cohorts, out=out, seed=seed)
    typer.echo(format_summary(summary))
    typer.echo(f"summary and plots written to {out}")


@lab_app.command("build-policy")
def build_policy(
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="where built policies are cached (default: TAPD_POLICY_CACHE or ~/.cache/tapd/policy)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="build seed")] = 0,
    competence: Annotated[
        bool, typer.Option(help="also print sampled accuracy per task family")
    ] = False,
    probe: Annotated[
        Path | None,
        typer.Option(help="also write the arithmetic probe file here (policy.probe_path)"),
    ] = None,
    probe_size: Annotated[int, typer.Option(help="items in the probe file")] = 255,
) -> None:
    """Build (or find in the cache) the lab's tiny policy and print its directory."""
    from daemon.policy.store import load_policy
    from lab.tasks import TIERS, write_probe
    from lab.tiny_policy import build_info, build_tiny_policy, competence_report

    path = build_tiny_policy(cache_dir, seed=seed)
    info = build_info(path)
    typer.echo(str(path))
    if probe is not None:
        write_probe(probe, probe_size, seed=0)
        typer.echo(f"probe={probe}")
    typer.echo(
        f"params={info['n_params']} build_seconds={info['build_seconds']} "
        f"weights_sha256={info['weights_sha256'][:16]}"
    )
    if competence:
        model, tok = load_policy(path)
        for (subject, difficulty), c in competence_report(model, tok, seed).items():
            typer.echo(
                f"{subject:8} {difficulty:12} {TIERS[(subject, difficulty)]:9} "
                f"greedy={c.greedy:.2f} sampled={c.sampled:.2f} disagree={c.disagree:.2f}"
            )


@lab_app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="small battery for CI")] = False,
    out: Annotated[Path, typer.Option(help="where RESULTS.md, results.json, img/ go")] = Path(
        "docs"
    ),
    seeds: Annotated[int | None, typer.Option(help="GRPO seeds per cohort")] = None,
    cohorts_per_cell: Annotated[
        int | None, typer.Option(help="cohorts per (subject, variant)")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="cache of measured lifts (default: settings state_dir)")
    ] = None,
    loop: Annotated[bool, typer.Option(help="also run the closed loop")] = True,
) -> None:
    """Measure the predictor against true GRPO lift and write RESULTS.md with plots."""
    from lab.eval_run import config_for, run

    try:
        cfg = config_for(quick, seeds, cohorts_per_cell)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    run(
        cfg,
        out_dir=out,
        state_dir=state_dir or _settings(ctx).state_dir,
        command="tapd " + " ".join(sys.argv[1:]),
        loop=loop,
        log=lambda m: typer.echo(m, err=True),
    )


@lab_app.command()
def reliability(
    short: Annotated[
        bool, typer.Option("--short", help="the CI form (minutes, not an hour)")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="report to write")] = Path(
        "docs/RELIABILITY.md"
    ),
    workdir: Annotated[Path, typer.Option(help="logs, state and broker data")] = Path(
        "out/reliability"
    ),
    replicas: Annotated[
        bool,
        typer.Option(
            "--replicas",
            help="only the replicas run (scorer replicas, a scale event with a deleted "
            "state dir, a rolling restart; needs the local Kafka broker): rewrites its "
            "section of the report, keeping the rest",
        ),
    ] = False,
) -> None:
    """Chaos run (SIGKILLs, broker restart), audit of every topic, figures to RELIABILITY.md."""
    command = "tapd " + " ".join(sys.argv[1:])
    if replicas:
        from lab.replicas import run_suite as run_replicas

        ok = run_replicas(short, out, workdir, command, lambda m: typer.echo(m, err=True))
        typer.echo(f"figures written to {out}")
        if not ok:
            raise typer.Exit(1)
        return
    from lab.reliability import run_suite

    ok = run_suite(short, out, workdir, command, lambda m: typer.echo(m, err=True))
    typer.echo(f"figures written to {out}")
    if not ok:
        raise typer.Exit(1)


def _settings(ctx: typer.Context) -> Any:
    # Imported when a command runs: daemon.cli imports this module to register it.
    from daemon.cli import settings_from_ctx

    return settings_from_ctx(ctx)


def register(app: typer.Typer) -> None:
    """Add the lab's commands to the ``tapd`` app."""
    for info in lab_app.registered_commands:
        app.registered_commands.append(info)
