"""``tapd demo``: the whole closed loop on a bare machine, no broker, no GPU.

    synthetic production traces ──► embedded log ──► scorer (this process)
                                                        │ dispatch
                                                        ▼
                        lift ◄── ``tapd trainer`` (a separate process, same log)

The traces come from the task families (several subjects and difficulties,
plus scrambled-reward and weak-verifier slices), each carrying ONE attempt
sampled from the tiny policy, as production traffic would; the scorer's
rollout engine fills in the rest. The demo ends with a summary and plots
in the folder it names.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import TapdSettings, Thresholds, load_settings
from daemon.core.cohorting import slice_key_of, validate_slice_key
from daemon.runtime.logging import get_logger
from lab import tasks as tasklib
from streams.schemas import Trace, encode

log = get_logger("tapd.demo")

# (variant, tier) mix of the stream: mostly learnable traffic, some that
# teaches nothing (easy, hard) and some that must be caught before training.
VARIANTS: tuple[tasklib.Variant, ...] = (
    "frontier",
    "easy",
    "frontier",
    "hard",
    "weak_verifier",
    "frontier",
    "scrambled",
    "mixed",
)
# The difficulty is part of the slice: a cohort is one capability slice.
DEMO_SLICE_KEY = ("subject", "tags.difficulty", "tags.operation", "verifier")
DEMO_PROBE_SIZE = 16


@dataclass(frozen=True)
class Slice:
    variant: str
    subject: str
    tasks: tuple[tasklib.Task, ...]


def plan_slices(n_cohorts: int, groups: int, seed: int, model: str = "tiny") -> list[Slice]:
    """The cohorts the stream will contain, deterministic for the seed."""
    rng = random.Random(f"tapd.demo|{seed}")
    out: list[Slice] = []
    for i in range(n_cohorts):
        variant = VARIANTS[i % len(VARIANTS)]
        if model == "smollm2":
            from lab import rg_tasks

            real = rg_tasks.control_cohort(variant, groups, seed * 1000 + i)
            out.append(Slice(variant, real[0].subject, tuple(real)))
            continue
        subject = rng.choice(tasklib.SUBJECTS)
        # Mixed cohorts span difficulties; keep them one slice by difficulty tag.
        tasks = tasklib.control_cohort(variant, groups, seed * 1000 + i, subject=subject)
        if variant == "mixed":
            tasks = [
                tasklib.Task(
                    t.prompt, t.reference, t.subject, t.tags, t.verifier, t.verifier_args, "mixed"
                )
                for t in tasks
            ]
        out.append(Slice(variant, subject, tuple(tasks)))
    return out


def production_traces(
    slices: Sequence[Slice], engine: Any, policy_version: str, seed: int, t0: float
) -> Iterator[Trace]:
    """One trace per task with ONE attempt sampled from the policy and scored by its verifier."""
    from daemon.policy.rollout import fill_attempts

    for i, sl in enumerate(slices):
        bare = [
            tasklib.to_trace(task, policy_version=policy_version, key=f"{seed}:{i}:{j}", ts=t0 + i)
            for j, task in enumerate(sl.tasks)
        ]
        filled = fill_attempts(bare, engine, 1, seed=seed * 7919 + i)
        yield from filled.traces


# GRPO on SmolLM2 on a CPU: LoRA, few prompts and samples, room for a short
# prose answer (docs/REAL_MODEL.md has the measured cost).
SMOLLM2_GRPO: dict[str, Any] = {
    "num_generations": 4,
    "steps": 2,
    "max_completion_length": 32,
    "max_prompts_per_step": 4,
    "learning_rate": 1e-4,
    "optimizer": "adamw_torch",
    "lora_rank": 8,
}


def demo_settings(
    out: Path,
    seed: int,
    groups: int,
    policy: Path | None = None,
    probe: Path | None = None,
    model: str = "tiny",
) -> TapdSettings:
    """The demo's settings: the lab's policy and its probe, passed in explicitly."""
    base = load_settings()
    state = out / "state"
    grpo = {**base.grpo.model_dump(), "num_generations": 6, "steps": 4}
    if model == "smollm2":
        grpo = {**base.grpo.model_dump(), **SMOLLM2_GRPO}
    return load_settings(
        state_dir=str(state),
        policy={
            **base.policy.model_dump(mode="json"),
            "model_path": str(policy) if policy else None,
            "probe_path": str(probe) if probe else None,
            # On a CPU, 128 fresh attempts per prompt from SmolLM2 cost ~30x
            # the rest of scoring a cohort (docs/REAL_MODEL.md): the cohort's own.
            **({"update_alignment_attempts": 0} if model == "smollm2" else {}),
        },
        grpo=grpo,
        transport={"kind": "embedded", "embedded_path": str(state / "log.sqlite")},
        cohorting={
            **base.cohorting.model_dump(),
            "slice_key": list(DEMO_SLICE_KEY),
            "max_groups": groups,
            "min_groups": 2,
            "max_age_s": 3600.0,
        },
        predictor={**base.predictor.model_dump(), "river_after": 4, "seed": seed},
        thresholds={
            **base.thresholds.model_dump(),
            "max_in_flight": 2,
            "exploration_share": 0.3,
        },
        service={**base.service.model_dump(mode="json"), "port": 0, "poll_timeout_s": 0.2},
    )


def _settings_env(settings: TapdSettings) -> dict[str, str]:
    """The trainer process's configuration, passed as TAPD_ environment variables."""
    env = dict(os.environ)
    env["TAPD_STATE_DIR"] = str(settings.state_dir)
    env["TAPD_TRANSPORT__KIND"] = "embedded"
    env["TAPD_TRANSPORT__EMBEDDED_PATH"] = str(settings.transport.embedded_path)
    env["TAPD_POLICY__MODEL_PATH"] = str(settings.policy.model_path)
    env["TAPD_POLICY__PROBE_PATH"] = str(settings.policy.probe_path)
    # Every GRPO knob: the trainer must train with what the scorer sampled with.
    for name, value in settings.grpo.model_dump().items():
        env[f"TAPD_GRPO__{name.upper()}"] = str(value)
    env.setdefault("TAPD_TRAINER__METRICS_PORT", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def trainer_command() -> list[str]:
    """``tapd trainer``, with this interpreter (so it runs in the same environment)."""
    return [sys.executable, "-m", "daemon.cli", "trainer"]


def start_trainer(settings: TapdSettings, log_path: Path) -> subprocess.Popen[bytes]:
    """The trainer as a real separate process on the same embedded log."""
    log_file = log_path.open("ab")
    return subprocess.Popen(
        trainer_command(), env=_settings_env(settings), stdout=log_file, stderr=subprocess.STDOUT
    )


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode or 0)


def read_topic(settings: TapdSettings, topic: str) -> list[dict[str, Any]]:
    """Every message of a topic, from the beginning, without joining any real group."""
    from streams.embedded import EmbeddedTransport

    transport = EmbeddedTransport(settings.transport.embedded_path)
    consumer = transport.consumer([topic], f"tapd-demo-reader-{time.time_ns()}")
    out: list[dict[str, Any]] = []
    try:
        while batch := consumer.poll(0.0, 1000):
            out += [json.loads(r.value) for r in batch]
    finally:
        consumer.close()
    return out


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _label(lift: dict[str, Any]) -> float:
    """What the predictor learns from a lift message (``LiftResult.label``): the
    lift on the cohort's target, else on the whole probe."""
    from streams.schemas import LiftResult

    return LiftResult.model_validate(lift).label


def summarize(settings: TapdSettings, traces: int) -> dict[str, Any]:
    topics = settings.topics
    decisions = {d["cohort_id"]: d for d in read_topic(settings, topics.decisions)}
    lifts = {x["cohort_id"]: x for x in read_topic(settings, topics.lift)}
    dlq = read_topic(settings, topics.dlq)
    from daemon.core.ranking import pairwise_accuracy, spearman

    pairs = [(x["predicted_lift"], _label(x)) for x in lifts.values()]
    by_sel: dict[str, list[float]] = {}
    for cid, x in lifts.items():
        sel = decisions.get(cid, {}).get("selection") or x["selection"]
        by_sel.setdefault(sel, []).append(_label(x))
    exploit = _mean(by_sel.get("exploit", []))
    explore = _mean(by_sel.get("explore_random", []) + by_sel.get("explore_uncertain", []))
    return {
        "traces": traces,
        "dead_letters": len(dlq),
        "dead_letters_by_stage": dict(Counter(d["stage"] for d in dlq)),
        "cohorts_scored": len(decisions),
        "recommendations": dict(Counter(d["recommendation"] for d in decisions.values())),
        "dispatched": sum(1 for d in decisions.values() if d["dispatched"]),
        "lift_results": len(lifts),
        "spearman": spearman([p for p, _ in pairs], [r for _, r in pairs])
        if len(pairs) >= 3
        else math.nan,
        "pairwise_accuracy": pairwise_accuracy([p for p, _ in pairs], [r for _, r in pairs])
        if len(pairs) >= 2
        else math.nan,
        "mean_lift_selected": exploit,
        "mean_lift_exploration": explore,
        "selection_gain": exploit - explore,
        "mean_lift_by_selection": {k: _mean(v) for k, v in by_sel.items()},
    }


def plot(settings: TapdSettings, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lifts = sorted(read_topic(settings, settings.topics.lift), key=lambda x: x["ts"])
    colors = {
        "exploit": "tab:blue",
        "explore_random": "tab:orange",
        "explore_uncertain": "tab:green",
    }
    paths = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for sel, color in colors.items():
        xs = [x["predicted_lift"] for x in lifts if x["selection"] == sel]
        ys = [_label(x) for x in lifts if x["selection"] == sel]
        if xs:
            ax.scatter(xs, ys, label=sel, color=color, s=18)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("predicted NLL-lift (nats)")
    ax.set_ylabel("realized label: NLL-lift on its target (nats)")
    ax.set_title("predicted vs realized lift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "predicted_vs_realized.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    nll = [x["nll_before"] for x in lifts[:1]] + [
        x["nll_before"] if x["rolled_back"] or x["mode"] != "continual" else x["nll_after"]
        for x in lifts
    ]
    ax.plot(range(len(nll)), nll, color="black", lw=1, label="policy probe NLL")
    for i, x in enumerate(lifts, start=1):
        ax.scatter([i], [nll[i]], color=colors.get(x["selection"], "grey"), s=14)
    for sel, color in colors.items():
        ax.scatter([], [], color=color, s=14, label=sel)
    ax.legend(fontsize=8)
    ax.set_xlabel("cohorts trained")
    ax.set_ylabel("probe NLL (nats)")
    ax.set_title("probe NLL over time (dots: selection of each cohort)")
    fig.tight_layout()
    paths.append(out / "probe_nll.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run_demo(
    cohorts: int = 16,
    out: Path = Path("out/demo"),
    seed: int = 0,
    groups: int = 6,
    timeout_s: float = 280.0,
    progress: bool = True,
    model: str = "tiny",
) -> dict[str, Any]:
    """Run the closed loop for ``cohorts`` cohorts; returns the summary (also written out)."""
    import torch
    from tqdm import tqdm

    from daemon.runtime.http import publish_thresholds
    from daemon.runtime.metrics import ScorerMetrics
    from daemon.runtime.thresholds import ThresholdsHolder
    from daemon.service.scorer import PolicyRollout, ScorerService, build_scorer
    from lab.tasks import write_probe
    from lab.tiny_policy import build_tiny_policy
    from streams.embedded import EmbeddedTransport

    torch.set_num_threads(1)
    out = Path(out)
    if (out / "state").exists():
        import shutil

        shutil.rmtree(out / "state")  # a demo is a fresh run, every time
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    if model == "smollm2":
        from lab import rg_tasks
        from lab.smollm2 import prepare_smollm2

        policy = prepare_smollm2()  # once, cached: both processes load the same copy
        probe = rg_tasks.write_probe(
            out / "probe.jsonl", [rg_tasks.get_slice(t) for t in rg_tasks.TIERS], 4, seed=0
        )
    else:
        policy = build_tiny_policy()  # once, cached: both processes load the same build
        probe = write_probe(out / "probe.jsonl", DEMO_PROBE_SIZE, seed=0)
    settings = demo_settings(out, seed, groups, policy, probe, model)
    if model == "smollm2":
        # In SmolLM2's own words, as `tapd probe answers` writes them: a chat
        # model's lift is measured on the answers it gives (streams.probes).
        rg_tasks.answer_probe(probe, policy, max_new_tokens=settings.grpo.max_completion_length)
    trainer = start_trainer(settings, out / "trainer.log")
    try:
        rollout = PolicyRollout(settings)
        slices = plan_slices(cohorts, groups, seed, model)
        transport = EmbeddedTransport(settings.transport.embedded_path)
        producer = transport.producer()
        n = 0
        fields = validate_slice_key(settings.cohorting.slice_key)
        for trace in production_traces(slices, rollout.engine, rollout.version, seed, time.time()):
            # keyed by slice key, as the producer contract asks
            key = slice_key_of(trace, fields).encode()
            producer.send(settings.topics.traces, encode(trace), key=key)
            n += 1
        producer.flush()
        producer.close()

        metrics = ScorerMetrics()
        holder = ThresholdsHolder(settings.thresholds)
        publish_thresholds(metrics, settings.thresholds)
        scorer = build_scorer(settings, lambda: holder.current, rollout)
        service = ScorerService(
            settings, transport, scorer, metrics, holder, background_refits=False, rollout=rollout
        )
        bar = tqdm(
            total=cohorts, desc="cohorts", file=sys.stderr, disable=not progress, unit="cohort"
        )
        decided: set[str] = set()
        flushed = False

        def on_batch(fx: Any) -> None:
            for d in fx.decisions:
                if d.cohort_id not in decided:
                    decided.add(d.cohort_id)
                    # Slices can split (an operation tag differs): more cohorts than planned.
                    bar.total = max(bar.total or 0, len(decided))
                    bar.update(1)

        service.on_batch = on_batch

        def done(s: Any) -> bool:
            nonlocal flushed
            consumed = metrics.traces_consumed._value.get()
            if not flushed and consumed >= n and not s.pending:
                # The stream is finite: close what is still open.
                flushed = True
                service.end_of_stream()
            if trainer.poll() is not None:
                raise RuntimeError(
                    f"the trainer exited with {trainer.returncode}; see {out / 'trainer.log'}"
                )
            if time.monotonic() - t_start > timeout_s:
                log.warning("demo_timeout", seconds=timeout_s)
                return True
            return flushed and not s.pending and not s.in_flight

        service.run(until=done)
        bar.close()
    finally:
        stop_process(trainer)
    summary = summarize(settings, n)
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    summary["plots"] = [str(p) for p in plot(settings, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return f"{x:+.4f}" if isinstance(x, float) and math.isfinite(x) else str(x)

    lines = [
        f"traces            {s['traces']}  (dead letters {s['dead_letters']}: "
        f"{s['dead_letters_by_stage']})",
        f"cohorts scored    {s['cohorts_scored']}  dispatched {s['dispatched']}  "
        f"lift results {s['lift_results']}",
        f"recommendations   {s['recommendations']}",
        f"predictor         spearman {f(s['spearman'])}  pairwise {f(s['pairwise_accuracy'])}",
        f"mean label        selected {f(s['mean_lift_selected'])}  exploration "
        f"{f(s['mean_lift_exploration'])}  gain {f(s['selection_gain'])} nats",
        f"plots             {', '.join(s['plots'])}",
        f"took              {s['seconds']} s",
    ]
    return "\n".join(lines)


__all__ = ["Thresholds", "format_summary", "plan_slices", "production_traces", "run_demo"]
