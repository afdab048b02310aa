"""``tapd eval --model smollm2``: true GRPO lift on SmolLM2 over the reasoning-gym battery.

Resumable and cached like the tiny-policy evaluation (every finished unit of
work is one line of ``<state-dir>/real-eval/<config key>/results.jsonl``; a
rerun skips what is there, an interrupted run continues where it stopped)::

    cells = measured slices (lab.rg_tasks.TIERS) + broken-verifier controls
    per cohort: K attempts from SmolLM2 ──► features (cached)
    per (cohort, seed): probe-and-revert GRPO (LoRA) ──► lift on the cohort's
        target probe (the held-out items of its own slice), NLL and accuracy (cached)
    summary: lift per tier; the label's reliability over seeds; every score
        (tapd's predictor held out by cell and by family, plain ridge and
        3-NN, the single signals, ``update_alignment``) against the label on
        the same folds, with the tiny evaluation's own code (lab.evaluation)

The label is the product's: ``LiftResult.target_lift``, the NLL-lift on the
items of the cohort's own target slice on which SmolLM2 had a foothold. A
cohort whose target has no such item has no label and is counted, not
ranked (as in the tiny evaluation). The closed loop is not run here.
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

import numpy as np

CONTROLS = ("scrambled", "weak_verifier")
# What a cached unit depends on besides the config: a change to any of these
# modules makes a new cache, so a stale number is never published (as
# lab.eval_run's MEASURED_BY). ROWS is this module's own record format.
MEASURED_BY = (
    "lab.rg_tasks",
    "lab.tasks",
    "daemon.trainer.probe",
    "daemon.trainer.cohort",
    "daemon.trainer.trl",
    "daemon.verify.registry",
    "daemon.verify.reasoning_gym",
    "daemon.policy.teacher",
    "daemon.policy.answers",
    "daemon.policy.alignment",
    "daemon.policy.rollout",
    "daemon.policy.hf",
    "daemon.core.features",
    "streams.probes",
)
ROWS = 2  # 2: every seed records the product's label and its parts


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
    # And more at a low temperature, near its likeliest phrasing (the foothold
    # asks for the whole answer's probability; docs/REAL_MODEL.md).
    probe_low_temperature_answers: int = 8

    def key(self) -> str:
        from lab.eval_run import code_hash

        blob = json.dumps(
            {**dataclasses.asdict(self), "code": code_hash(MEASURED_BY), "rows": ROWS},
            sort_keys=True,
        )
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
    from daemon.policy.store import format_prompt, load_policy, snapshot
    from daemon.trainer.cohort import CohortTrainer
    from daemon.trainer.probe import DEFAULT_FOOTHOLD_PROBABILITY, Probe
    from daemon.verify.registry import get_verifier
    from lab import rg_tasks
    from lab.eval_run import Candidate, ResultCache, dispatch_of
    from lab.smollm2 import prepare_smollm2
    from lab.tasks import to_trace
    from streams.probes import read_probe_file, write_probe_file

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
    answered = work / "probe.jsonl"
    if cfg.probe_answers and answered.exists():
        # The answers every cached label was measured against (one draw per cache).
        probe_items = read_probe_file(answered)
    elif cfg.probe_answers:
        probe_items = own_answers(
            probe_items, engine, cfg.probe_answers, seed=0,
            max_new_tokens=cfg.max_completion_length,
            low_temperature_attempts=cfg.probe_low_temperature_answers,
        )[0]  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        write_probe_file(answered, probe_items)
    by_target = {t: [it for it in probe_items if it.target == t] for t in targets}
    alignment = UpdateAlignment(
        model, tok, lambda p: format_prompt(tok, p), by_target, DEFAULT_FOOTHOLD_PROBABILITY
    )
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for n, (cid, cell, seed) in enumerate(all_specs, 1):
        tasks = cohort_tasks(cell, cfg.groups, seed)
        target = tasks[0].subject  # the slice (lab.rg_tasks), the probe's target name
        row = cache.get("cohort", cid)
        cand = None
        if row is None:
            _reset(model, base)
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
                    _reset(model, base)
                    traces = [to_trace(t, policy_version="v0", key=f"{cid}/{i}")
                              for i, t in enumerate(tasks)]  # fmt: skip
                    filled = fill_attempts(traces, engine, cfg.k, seed=seed,
                                           max_new_tokens=cfg.max_completion_length)  # fmt: skip
                    # A row cached before update_alignment (schema 2) has none: 0, not measured.
                    feats = {"update_alignment": 0.0, **row["features"]}
                    cand = Candidate(cid, tasks[0].subject, cell, (cell,), tuple(filled.traces),
                                     feats, {target: feats["target_similarity"]},
                                     {target: feats["update_alignment"]})  # fmt: skip
                _reset(model, base)
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
                    "label": res.target_lift.nll_lift if res.target_lift is not None else None,
                    "target_lift": _part(res.target_lift),
                    "collateral_lift": _part(res.collateral_lift),
                    "nll_lift": res.nll_lift, "acc_lift": res.acc_lift,
                    "nll_before": res.nll_before, "acc_before": res.acc_before,
                    "train_reward_before": res.train_reward_before,
                    "train_reward_after": res.train_reward_after,
                    "seconds": round(time.perf_counter() - t0, 1),
                })  # fmt: skip
            lifts.append(got)
        rows.append({**row, "seeds": lifts})
        labels = [x["label"] for x in lifts if x.get("label") is not None]
        label = f"{statistics.fmean(labels):+.4f}" if labels else "none (no foothold)"
        log(f"[{n}/{len(all_specs)}] {cid}: target {target} label {label} nll_lift "
            f"{statistics.fmean(x['nll_lift'] for x in lifts):+.4f} "
            f"({time.perf_counter() - t_start:.0f} s so far)")  # fmt: skip
    counts = {
        t: {"items": len(v), "answered": sum(it.answer is not None for it in v)}
        for t, v in by_target.items()
    }
    summary = summarize(cfg, rows, counts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "REAL_EVAL.md").write_text(render(summary))
    return summary


def _reset(model: Any, base: Any) -> None:
    """The base weights, every parameter trainable again.

    One model object is trained and then measured here. A LoRA run leaves the
    base parameters frozen after its adapters are merged (peft), and
    ``update_alignment`` takes its gradient over trainable parameters: with
    none, the next cohort's could not be measured. The product's scorer never
    trains its model, and its trainer trains through LoRA only.
    """
    from daemon.policy.store import restore

    restore(model, base)
    for p in model.parameters():
        p.requires_grad_(True)


def _part(part: Any) -> dict[str, Any] | None:
    return None if part is None else part.model_dump()


def _tier(row: dict[str, Any]) -> str:
    """A battery row's tier: its control's name, else its slice's (lab.rg_tasks.TIERS)."""
    from lab.rg_tasks import TIERS

    return row["cell"] if row["cell"] in CONTROLS else TIERS.get(row["cell"], "?")


def _target(cell: str, seed: int) -> str:
    return cohort_tasks(cell, 1, seed)[0].subject


def footing(
    rows: list[dict[str, Any]], probe: dict[str, dict[str, int]] | None = None
) -> dict[str, Any]:
    """Per target: probe items, items answered in SmolLM2's words, items with a foothold.

    The foothold count is the trainer's (``target_lift.items`` of a run on
    that target, measured before the update), 0 when no run found one.
    """
    out: dict[str, dict[str, int]] = {t: dict(v) for t, v in (probe or {}).items()}
    for r in rows:
        if "target" not in r:
            continue
        got = [s["target_lift"]["items"] for s in r["seeds"] if s.get("target_lift")]
        entry = out.setdefault(r["target"], {})
        entry["foothold"] = max(entry.get("foothold", 0), max(got, default=0))
    return out


def gate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The product's reward-trust gate on the battery's cohorts, from their cached features.

    Broken: the controls (a scrambled reward, a ``contains`` verifier);
    honest: every slice's own cohorts. What passes is what the decision
    policy would not refuse with ``fix_verifier`` at the default floor.
    """
    from daemon.config import Thresholds
    from daemon.core.decision import recommend
    from daemon.core.predictor import Prediction

    t = Thresholds()
    pred = Prediction(1.0, 1.0, "eval", "v0")  # the gate comes before any prediction counts

    def refused(r: dict[str, Any]) -> bool:
        return recommend(r["features"], pred, t)[0] == "fix_verifier"

    def trust(r: dict[str, Any]) -> float:
        return float(r["features"]["reward_trust"])

    broken = [r for r in rows if r["cell"] in CONTROLS]
    honest = [r for r in rows if r["cell"] not in CONTROLS]
    return {
        "floor": t.reward_trust_floor,
        "n_broken": len(broken),
        "broken_passing_gate": sum(not refused(r) for r in broken),
        "max_broken_trust": max(map(trust, broken), default=math.nan),
        "n_honest": len(honest),
        "honest_refused": sum(refused(r) for r in honest),
        "min_honest_trust": min(map(trust, honest), default=math.nan),
    }


def summarize(
    cfg: RealEvalConfig,
    rows: list[dict[str, Any]],
    probe: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    from daemon.core.ranking import spearman

    lift = [statistics.fmean(s["nll_lift"] for s in r["seeds"]) for r in rows]
    by_tier: dict[str, list[float]] = {}
    for r, x in zip(rows, lift, strict=True):
        by_tier.setdefault(_tier(r), []).append(x)
    signals = {}
    for name in ("adv_std", "frac_nondegenerate", "pass_rate"):
        xs = [float(r["features"].get(name, math.nan)) for r in rows]
        signals[name] = spearman(xs, lift) if len(rows) >= 3 else math.nan
    table, unlabeled = label_table(rows)
    tier_of = {r.get("cohort_id"): _tier(r) for r in rows}
    labels_by_tier: dict[str, list[float]] = {}
    for c in table:
        labels_by_tier.setdefault(tier_of[c.cohort_id], []).append(c.lift)
    unit_s = [s["seconds"] for r in rows for s in r["seeds"]]
    return {
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "cohorts": len(rows),
        "runs": len(unit_s),
        "mean_nll_lift_by_tier": {k: statistics.fmean(v) for k, v in by_tier.items()},
        "mean_label_by_tier": {k: statistics.fmean(v) for k, v in labels_by_tier.items()},
        "cohorts_with_label_by_tier": {k: len(v) for k, v in labels_by_tier.items()},
        "cohorts_without_label": unlabeled,
        "footing": footing(rows, probe),
        "gate": gate(rows),
        "spearman_signal_vs_lift": signals,
        "ranking": analyze(table),
        "seconds_per_grpo_run": statistics.fmean(unit_s) if unit_s else math.nan,
        "seconds_per_cohort_features": statistics.fmean(r["seconds"] for r in rows)
        if rows
        else math.nan,
        "rows": rows,
    }


def label_table(rows: list[dict[str, Any]]) -> tuple[list[Any], int]:
    """The battery as lab.evaluation reads it, and how many cohorts have no label.

    A cohort's label needs every seed's ``target_lift`` (SmolLM2 had a
    foothold on an item of its target); its subject is the reasoning-gym
    family, its variant the slice's difficulty or the control's name, so a
    cell is one slice (or one family's control cohorts).
    """
    from lab import evaluation as ev

    out: list[ev.CohortResult] = []
    unlabeled = 0
    for r in rows:
        seeds = r["seeds"]
        if not seeds or any(s.get("label") is None for s in seeds) or "target" not in r:
            unlabeled += 1
            continue
        family, difficulty = r["target"].split("/", 1)
        variant = r["cell"] if r["cell"] in CONTROLS else difficulty
        out.append(
            ev.CohortResult(
                r["cohort_id"],
                family,
                variant,
                {"update_alignment": 0.0, **r["features"]},
                tuple(float(s["label"]) for s in seeds),
                tuple(float(s["target_lift"]["acc_lift"]) for s in seeds),
            )
        )
    return out, unlabeled


def analyze(table: list[Any], fraction: float = 0.10, n_resamples: int = 1000) -> dict[str, Any]:
    """The tiny evaluation's ranking figures on the honest cohorts, where there are enough.

    Every scorer on the same folds, with cluster-bootstrap CIs over cells:
    tapd's predictor (the kind its router serves after these labels, fixed
    per fold, as in docs/RESULTS.md), plain ridge and 3-NN, each single
    signal and ``update_alignment`` as they are.
    """
    from lab import evaluation as ev
    from lab.eval_run import fit_predict_kind, plain_knn, plain_ridge, served_kind

    honest = [c for c in table if not c.broken]
    cells = {c.cell for c in honest}
    seeds = min((len(c.lifts) for c in honest), default=0)
    if len(cells) < 3 or len(honest) < 6 or seeds < 2:
        out: dict[str, Any] = {
            "ranked": False,
            "reason": f"{len(honest)} honest cohorts with a label in {len(cells)} cells "
            "(ranking needs >= 6 in >= 3 cells, each with >= 2 seeds)",
            "honest_cohorts": len(honest),
            "cells": len(cells),
        }
        if len(honest) >= 3 and seeds >= 2:
            # Too few to rank, enough to say whether the seeds agree.
            rel = ev.label_reliability(ev.seed_matrix(honest))
            out["reliability"] = dataclasses.asdict(rel)
        return out

    def est(e: Any) -> dict[str, float]:
        return {"value": e.value, "lo": e.lo, "hi": e.hi}

    def report(score: Any) -> dict[str, Any]:
        r = ev.score_report(honest, score, fraction=fraction, n_resamples=n_resamples)
        return {"spearman": est(r.spearman), "gain_nats": est(r.gain_nats)}

    kind = served_kind([c.features for c in honest], [c.lift for c in honest])
    scores: dict[str, Any] = {}
    fitted = {"tapd": fit_predict_kind(kind), "ridge_plain": plain_ridge, "knn_plain": plain_knn}
    for split, fn in (("loco", ev.leave_one_cell_out), ("loso", ev.leave_one_subject_out)):
        for name, fp in fitted.items():
            try:
                scores[f"{name}_{split}"] = report(fn(honest, fp))
            except ValueError as e:  # a fold too small to fit: said, not hidden
                scores[f"{name}_{split}"] = {"error": str(e)}
    signals = ev.signal_scores(honest)
    signals["update_alignment"] = np.array([float(c.features["update_alignment"]) for c in honest])
    for name, v in signals.items():
        scores[name] = report(v)
    rel = ev.label_reliability(ev.seed_matrix(honest))
    y = ev.actual_lifts(honest)
    return {
        "ranked": True,
        "honest_cohorts": len(honest),
        "cells": len(cells),
        "top_k": ev.top_k(len(honest), fraction),
        "served_kind": kind,
        "reliability": dataclasses.asdict(rel),
        "mean_label": float(y.mean()),
        "scores": scores,
        "oracle_gain_nats": ev.oracle_crossfit_gain(ev.seed_matrix(honest), fraction).absolute,
        "perfect_gain_nats": ev.selection_gain(y, y, fraction).absolute,
    }


SCORER_NAMES = {
    "tapd_loco": "**tapd** ({kind}), leave one cell out",
    "tapd_loso": "tapd ({kind}), leave one family out",
    "ridge_plain_loco": "baseline: plain ridge, leave one cell out",
    "ridge_plain_loso": "baseline: plain ridge, leave one family out",
    "knn_plain_loco": "baseline: plain 3-NN, leave one cell out",
    "knn_plain_loso": "baseline: plain 3-NN, leave one family out",
    "update_alignment": "feature: `update_alignment` (own K attempts)",
    "adv_std": "signal: `adv_std`",
    "adv_raw_std": "signal: `adv_raw_std`",
    "frac_nondegenerate": "signal: `frac_nondegenerate`",
    "pass_rate_middle": "signal: `pass_rate_middle`",
    "dapo_filter": "signal: `dapo_filter`",
}


def render(summary: dict[str, Any]) -> str:
    """docs/real/REAL_EVAL.md from the summary: every figure is the run's own."""
    import datetime

    from daemon.policy.answers import LOW_TEMPERATURE

    cfg = summary["config"]
    rk = summary["ranking"]
    lines = [
        "# SmolLM2-135M-Instruct: true GRPO lift on reasoning-gym",
        "",
        f"Generated by `tapd eval --model smollm2` on {datetime.date.today().isoformat()} "
        f"(config key `{summary['config_key']}`): {summary['cohorts']} cohorts of "
        f"{cfg['groups']} prompts x K = {cfg['k']}, {cfg['seeds']} probe-and-revert LoRA GRPO "
        f"runs each ({cfg['grpo_steps']} steps, {cfg['optimizer']}, lr {cfg['learning_rate']}), "
        f"{summary['runs']} runs in all, {summary['seconds_per_grpo_run']:.0f} s per run and "
        f"{summary['seconds_per_cohort_features']:.0f} s per cohort's attempts and features "
        "(one torch thread). Rerun the command to reproduce it; finished units are cached, "
        "so a rerun resumes. lab/real_eval.py says how each figure is made.",
        "",
        "**Label** = `LiftResult.target_lift`: the NLL-lift (nats per answer token, positive = "
        "better) on the held-out probe items of the cohort's own slice on which SmolLM2 had a "
        f"foothold ({cfg['probe_per_target']} items per slice, their answers in SmolLM2's own "
        "words), mean over seeds. A cohort whose slice has no such item has no label: "
        f"{summary['cohorts_without_label']} here.",
        "",
        "## Label by tier",
        "",
        "| tier | cohorts with a label | label, nats | NLL-lift on all the slice's items, nats |",
        "|---|---|---|---|",
    ]
    counts = summary["cohorts_with_label_by_tier"]
    for t, whole in summary["mean_nll_lift_by_tier"].items():
        label = summary["mean_label_by_tier"].get(t)
        shown = f"{label:+.4f}" if label is not None else "none"
        lines.append(f"| {t} | {counts.get(t, 0)} | {shown} | {whole:+.4f} |")
    lines += [
        "",
        "## Where SmolLM2 has a foothold",
        "",
        "Per slice: its probe items, those SmolLM2 answered right in its own words "
        f"(`tapd probe answers`, {cfg['probe_answers']} attempts at temperature 1 and "
        f"{cfg.get('probe_low_temperature_answers', 0)} at {LOW_TEMPERATURE}), and those it "
        "would write "
        "with probability 1/64 or more before training (the items the label is measured on; "
        "the probability of the whole answer).",
        "",
        "| slice | items | answered | with a foothold |",
        "|---|---|---|---|",
    ]
    for t, f in sorted(summary.get("footing", {}).items()):
        lines.append(
            f"| {t} | {f.get('items', '?')} | {f.get('answered', '?')} | {f.get('foothold', 0)} |"
        )
    lines.append("")
    g = summary.get("gate")
    if g:
        lines += [
            "## The reward-trust gate on this battery",
            "",
            "What the product's decision policy does with each cohort's `reward_trust` at the "
            f"default floor {g['floor']:.2f} (the cohorts above are trained without it):",
            "",
            "| cohorts | n | refused (`fix_verifier`) | passing | reward_trust |",
            "|---|---|---|---|---|",
            f"| broken verifier (scrambled, `contains`) | {g['n_broken']} | "
            f"{g['n_broken'] - g['broken_passing_gate']} | **{g['broken_passing_gate']}** | "
            f"highest {g['max_broken_trust']:.3f} |",
            f"| honest (each slice's own verifier) | {g['n_honest']} | **{g['honest_refused']}** | "
            f"{g['n_honest'] - g['honest_refused']} | lowest {g['min_honest_trust']:.3f} |",
            "",
        ]
    if not rk["ranked"]:
        lines += ["## Ranking", "", f"Not computed: {rk['reason']}.", ""]
        rel = rk.get("reliability")
        if rel is not None:
            lines += [
                f"Label reliability over those {rk['honest_cohorts']} cohorts: single-seed "
                f"test-retest Spearman {rel['test_retest']:.3f}, Spearman-Brown reliability of "
                f"the {rel['seeds']}-seed mean {rel['reliability']:.3f}.",
                "",
            ]
        return "\n".join(lines)
    rel = rk["reliability"]
    lines += [
        "## Label reliability",
        "",
        f"Single-seed test-retest Spearman over the {rk['honest_cohorts']} honest cohorts: "
        f"{rel['test_retest']:.3f}; Spearman-Brown reliability of the {rel['seeds']}-seed mean: "
        f"**{rel['reliability']:.3f}** (noise ceiling of any predictor's Spearman: "
        f"{rel['ceiling']:.3f}).",
        "",
        *(
            [
                f"The seeds do not agree (reliability {rel['reliability']:.2f} < 0.5): at this "
                "GRPO budget a cohort's lift is mostly seed noise, and the figures below rank "
                "that noise as much as the cohorts.",
                "",
            ]
            if not rel["reliability"] >= 0.5
            else []
        ),
        "## Scores against the label (honest cohorts)",
        "",
        f"{rk['honest_cohorts']} cohorts in {rk['cells']} cells (a cell: one slice); 95 % "
        "cluster-bootstrap CIs over cells. tapd is the model kind its router serves after "
        f"learning these labels (**{rk['served_kind']}**), fixed for every fold. Top-10 % gain: "
        f"the mean label of the top {rk['top_k']} by the score minus the mean label "
        f"({rk['mean_label']:+.4f}).",
        "",
        "| scorer | Spearman | top-10 % gain, nats |",
        "|---|---|---|",
    ]

    def ci(e: dict[str, float], fmt: str) -> str:
        return f"{e['value']:{fmt}} [{e['lo']:{fmt}}, {e['hi']:{fmt}}]"

    for key, name in SCORER_NAMES.items():
        got = rk["scores"].get(key)
        if got is None:
            continue
        name = name.format(kind=rk["served_kind"])
        if "error" in got:
            lines.append(f"| {name} | not computed: {got['error']} | |")
            continue
        lines.append(f"| {name} | {ci(got['spearman'], '.2f')} | {ci(got['gain_nats'], '+.4f')} |")
    lines += [
        f"| oracle (seed cross-fit) | (ceiling {rel['ceiling']:.2f}) | "
        f"{rk['oracle_gain_nats']:+.4f} |",
        f"| perfect ranking of the seed-mean labels | 1 | {rk['perfect_gain_nats']:+.4f} |",
        "",
    ]
    return "\n".join(lines)
