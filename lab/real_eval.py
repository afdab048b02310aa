"""``tapd eval --model smollm2``: true GRPO lift on SmolLM2 over the reasoning-gym battery.

Resumable and cached like the tiny-policy evaluation (every finished unit of
work is one line of ``<state-dir>/real-eval/<config key>/results.jsonl``; a
rerun skips what is there, an interrupted run continues where it stopped)::

    cells = measured slices (lab.rg_tasks.TIERS) + broken-verifier controls
    per cohort: K attempts from SmolLM2 ──► features (cached)
    per (cohort, seed): probe-and-revert GRPO (LoRA) ──► lift on the cohort's
        target probe (the held-out items of its own slice), NLL and accuracy (cached)
    summary: lift per tier, Spearman of the cheap signals against the lift

Lift is measured on the cohort's own target slice (the target-lift
definition); the full table of the tiny-policy evaluation (LOCO/LOSO,
baselines, top-10 % gain, the loop) is not computed here yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROLS = ("scrambled", "weak_verifier")


@dataclass(frozen=True)
class RealEvalConfig:
    """Everything that determines the measured numbers (its hash keys the cache)."""

    cells: tuple[str, ...] = ()  # slice targets and control variants; () = all measured + controls
    cohorts_per_cell: int = 3
    seeds: int = 2
    groups: int = 4  # prompts per cohort
    k: int = 4
    grpo_steps: int = 2
    learning_rate: float = 1e-4
    optimizer: str = "adamw_torch"
    lora_rank: int = 8
    max_completion_length: int = 32
    probe_per_target: int = 8
    # Attempts per probe item for its answer in SmolLM2's own words (tapd
    # probe answers): a bare reference is not what a chat model writes, and
    # no item would count for the target's lift (docs/REAL_MODEL.md). 0: bare.
    probe_answers: int = 16

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def all_cells(self) -> tuple[str, ...]:
        from lab.rg_tasks import TIERS

        return self.cells or (*TIERS, *CONTROLS)


FULL = RealEvalConfig()
SMOKE = RealEvalConfig(
    cells=("basic_arithmetic/add_1d", "basic_arithmetic/addsub_2d"),
    cohorts_per_cell=1,
    seeds=1,
    probe_per_target=4,
)


def specs(cfg: RealEvalConfig) -> Iterator[tuple[str, str, int]]:
    """(cohort id, cell, seed) of every battery cohort, in run order."""
    cells = cfg.all_cells()
    for c in range(cfg.cohorts_per_cell):
        for i, cell in enumerate(cells):
            yield f"real-{cell.replace('/', '-')}-{c}", cell, 10_000 * (c + 1) + i


def cohort_tasks(cell: str, n: int, seed: int) -> list[Any]:
    from lab import rg_tasks

    if cell in CONTROLS:
        return rg_tasks.control_cohort(cell, n, seed)
    return rg_tasks.make_tasks(rg_tasks.get_slice(cell), n, seed)


def run(
    cfg: RealEvalConfig,
    state_dir: Path,
    out: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import torch

    from daemon.config import GRPOParams
    from daemon.core.features import featurize
    from daemon.policy.alignment import UpdateAlignment
    from daemon.policy.answers import own_answers
    from daemon.policy.hf import HFRolloutEngine
    from daemon.policy.rollout import fill_attempts
    from daemon.policy.store import format_prompt, load_policy, restore, snapshot
    from daemon.trainer.cohort import CohortTrainer
    from daemon.trainer.probe import DEFAULT_FOOTHOLD_PROBABILITY, Probe
    from daemon.verify.registry import get_verifier
    from lab import rg_tasks
    from lab.eval_run import Candidate, ResultCache, dispatch_of
    from lab.smollm2 import prepare_smollm2
    from lab.tasks import to_trace

    torch.set_num_threads(1)  # a shared CPU: spinning threads cost more than they give
    work = Path(state_dir) / "real-eval" / cfg.key()
    cache = ResultCache(work / "results.jsonl")
    model, tok = load_policy(prepare_smollm2())
    base = snapshot(model)
    engine = HFRolloutEngine(model, tok, batch_size=64)
    all_specs = list(specs(cfg))
    targets = sorted({_target(cell, seed) for _, cell, seed in all_specs})
    probe_items = rg_tasks.probe_items(
        [rg_tasks.get_slice(t) for t in targets], cfg.probe_per_target
    )
    if cfg.probe_answers:
        probe_items = own_answers(probe_items, engine, cfg.probe_answers, seed=0,
                                  max_new_tokens=cfg.max_completion_length)[0]  # fmt: skip
    by_target = {t: [it for it in probe_items if it.target == t] for t in targets}
    alignment = UpdateAlignment(
        model, tok, lambda p: format_prompt(tok, p), by_target, DEFAULT_FOOTHOLD_PROBABILITY
    )
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for n, (cid, cell, seed) in enumerate(all_specs, 1):
        tasks = cohort_tasks(cell, cfg.groups, seed)
        target = f"{tasks[0].subject}/{tasks[0].difficulty}"
        row = cache.get("cohort", cid)
        cand = None
        if row is None:
            restore(model, base)
            t0 = time.perf_counter()
            traces = [
                to_trace(t, policy_version="v0", key=f"{cid}/{i}") for i, t in enumerate(tasks)
            ]
            filled = fill_attempts(traces, engine, cfg.k, seed=seed,
                                   max_new_tokens=cfg.max_completion_length)  # fmt: skip
            # On the cohort's own K attempts (policy.update_alignment_attempts
            # = 0): sampling 128 more per prompt from SmolLM2 on CPU would cost
            # more than the cohort's GRPO runs. docs/REAL_MODEL.md says so.
            aligned = alignment(filled.traces, [target], "v0")[target]
            feats = featurize(filled.traces, probe_prompts=[it.prompt for it in by_target[target]],
                              update_alignment=aligned)  # fmt: skip
            cand = Candidate(cid, tasks[0].subject, cell, (cell,), tuple(filled.traces), feats,
                             {target: feats["target_similarity"]}, {target: aligned})  # fmt: skip
            row = cache.put(("cohort", cid), {"cohort_id": cid, "cell": cell, "target": target,
                                              "features": feats,
                                              "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        lifts = []
        for s in range(cfg.seeds):
            got = cache.get("lift", cid, str(s))
            if got is None:
                if cand is None:
                    restore(model, base)
                    traces = [to_trace(t, policy_version="v0", key=f"{cid}/{i}")
                              for i, t in enumerate(tasks)]  # fmt: skip
                    filled = fill_attempts(traces, engine, cfg.k, seed=seed,
                                           max_new_tokens=cfg.max_completion_length)  # fmt: skip
                    # A row cached before update_alignment (schema 2) has none: 0, not measured.
                    feats = {"update_alignment": 0.0, **row["features"]}
                    cand = Candidate(cid, tasks[0].subject, cell, (cell,), tuple(filled.traces),
                                     feats, {target: feats["target_similarity"]},
                                     {target: feats["update_alignment"]})  # fmt: skip
                restore(model, base)
                d = work / "ledgers" / f"{cid}-s{s}"
                shutil.rmtree(d, ignore_errors=True)  # an interrupted unit starts over
                probe = Probe(by_target[target], get_verifier, format_prompt,
                              max_new_tokens=cfg.max_completion_length)  # fmt: skip
                params = GRPOParams(
                    steps=cfg.grpo_steps, num_generations=cfg.k,
                    learning_rate=cfg.learning_rate, optimizer=cfg.optimizer,
                    max_completion_length=cfg.max_completion_length,
                    max_prompts_per_step=cfg.groups, lora_rank=cfg.lora_rank, seed=s,
                )  # fmt: skip
                trainer = CohortTrainer(model, tok, probe, get_verifier, params=params,
                                        mode="probe_revert", rollback_nll_worsening=math.inf,
                                        state_dir=d, trainer_id="tapd-real-eval")  # fmt: skip
                t0 = time.perf_counter()
                res = trainer.on_dispatch(dispatch_of(cand), time.time()).result
                trainer.close()
                got = cache.put(("lift", cid, str(s)), {
                    "nll_lift": res.nll_lift, "acc_lift": res.acc_lift,
                    "nll_before": res.nll_before, "acc_before": res.acc_before,
                    "train_reward_before": res.train_reward_before,
                    "train_reward_after": res.train_reward_after,
                    "seconds": round(time.perf_counter() - t0, 1),
                })  # fmt: skip
            lifts.append(got)
        rows.append({**row, "seeds": lifts})
        log(f"[{n}/{len(all_specs)}] {cid}: target {target} nll_lift "
            f"{statistics.fmean(x['nll_lift'] for x in lifts):+.4f} "
            f"({time.perf_counter() - t_start:.0f} s so far)")  # fmt: skip
    summary = summarize(cfg, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _target(cell: str, seed: int) -> str:
    t = cohort_tasks(cell, 1, seed)[0]
    return f"{t.subject}/{t.difficulty}"


def summarize(cfg: RealEvalConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from daemon.core.ranking import spearman
    from lab.rg_tasks import TIERS

    def tier(r: dict[str, Any]) -> str:
        return r["cell"] if r["cell"] in CONTROLS else TIERS.get(r["cell"], "?")

    lift = [statistics.fmean(s["nll_lift"] for s in r["seeds"]) for r in rows]
    by_tier: dict[str, list[float]] = {}
    for r, x in zip(rows, lift, strict=True):
        by_tier.setdefault(tier(r), []).append(x)
    signals = {}
    for name in ("adv_std", "frac_nondegenerate", "pass_rate"):
        xs = [float(r["features"].get(name, math.nan)) for r in rows]
        signals[name] = spearman(xs, lift) if len(rows) >= 3 else math.nan
    unit_s = [s["seconds"] for r in rows for s in r["seeds"]]
    return {
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "cohorts": len(rows),
        "runs": len(unit_s),
        "mean_nll_lift_by_tier": {k: statistics.fmean(v) for k, v in by_tier.items()},
        "spearman_signal_vs_lift": signals,
        "seconds_per_grpo_run": statistics.fmean(unit_s) if unit_s else math.nan,
        "seconds_per_cohort_features": statistics.fmean(r["seconds"] for r in rows)
        if rows
        else math.nan,
        "rows": rows,
    }
