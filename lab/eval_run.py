"""``tapd eval``: build the battery, measure true lift, score the predictor, publish.

The data flow, each stage cached in ``<state-dir>/eval/<config key>/results.jsonl``
so that an interrupted run resumes where it stopped::

    control cohorts (subjects x variants) ──► K attempts from the tiny policy
        ──► features ──► probe-and-revert GRPO per seed ──► true lift
    table ──► leave-one-out / leave-one-subject-out predictions ──► metrics
    closed loop: per step, score fresh candidates against the current model,
        train the predictor's pick vs a random pick (continual), probe NLL
    metrics ──► RESULTS.md + PNG plots + results.json

The statistics are in :mod:`lab.evaluation`; this module only runs things.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lab import evaluation as ev

VARIANTS = ("easy", "frontier", "hard", "mixed", "scrambled", "weak_verifier")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines the measured numbers (its hash keys the cache)."""

    subjects: tuple[str, ...] = ("add", "sub", "mul", "compare", "digits")
    variants: tuple[str, ...] = VARIANTS
    cohorts_per_cell: int = 3
    groups: int = 8  # prompts per cohort
    k: int = 8  # attempts per prompt, for the features and per GRPO group
    seeds: int = 3  # probe-and-revert GRPO runs per cohort
    # The trainer's validated settings (docs/TRAINER.md): SGD, whose step
    # scales with the learning signal, and a probe large enough to read
    # lifts of a few hundredths of a nat.
    grpo_steps: int = 8
    learning_rate: float = 5e-3
    optimizer: str = "sgd"
    max_completion_length: int = 8
    probe_size: int = 255
    loop_steps: int = 8
    loop_seeds: int = 3
    loop_candidates: int = 4
    top_fraction: float = ev.TOP_FRACTION
    bootstrap: int = ev.DEFAULT_RESAMPLES
    policy_seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def validate(self) -> EvalConfig:
        from lab.tasks import SUBJECTS

        for s in self.subjects:
            if s not in SUBJECTS:
                raise ValueError(f"subjects: unknown subject {s!r} (known: {', '.join(SUBJECTS)})")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
        if len(self.subjects) < 2:
            raise ValueError("subjects: leave-one-subject-out needs at least 2")
        if self.seeds < 2:
            raise ValueError("seeds: the seed cross-fit oracle needs at least 2")
        if self.cohorts_per_cell < 1 or self.loop_candidates < 2:
            raise ValueError("cohorts_per_cell >= 1 and loop_candidates >= 2 are required")
        return self


QUICK = EvalConfig(
    subjects=("add", "sub", "compare", "digits"),
    cohorts_per_cell=1,
    seeds=2,
    probe_size=128,
    loop_steps=3,
    loop_seeds=2,
    bootstrap=300,
)
FULL = EvalConfig()


# --------------------------------------------------------------------- cache


class ResultCache:
    """Append-only JSONL of finished units of work; a rerun skips what is in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[tuple[str, ...], dict[str, Any]] = {}
        if path.exists():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    # A crash mid-write leaves a torn last line: redo that unit.
                    print(f"eval: {path}:{n}: torn line ignored", file=sys.stderr)
                    continue
                self.rows[tuple(row["key"])] = row

    def get(self, *key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: Sequence[str], row: dict[str, Any]) -> dict[str, Any]:
        row = {"key": list(key), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows[tuple(key)] = row
        return row


# ---------------------------------------------------------------- the runtime


@dataclass
class Runtime:
    """The policy, rollout engine, probe and verifiers of one evaluation."""

    model: Any
    tok: Any
    base_state: dict[str, Any]
    engine: Any
    probe: Any
    probe_prompts: list[str]
    thresholds: Any

    @classmethod
    def load(cls, cfg: EvalConfig) -> Runtime:
        import torch

        from daemon.config import Thresholds
        from daemon.policy import store as policy
        from daemon.policy.hf import HFRolloutEngine
        from daemon.policy.store import snapshot
        from daemon.trainer.probe import Probe
        from daemon.verify.registry import get_verifier
        from lab import tasks
        from lab.tiny_policy import build_tiny_policy

        torch.set_num_threads(1)
        path = build_tiny_policy(seed=cfg.policy_seed)
        model, tok = policy.load_policy(path)
        probe_tasks = tasks.probe_set(cfg.probe_size, cfg.policy_seed)
        probe = Probe(
            tasks.probe_items(probe_tasks),
            get_verifier,
            policy.format_prompt,
            max_new_tokens=cfg.max_completion_length,
        )
        engine = HFRolloutEngine(model, tok, format_prompt=lambda p: policy.format_prompt(tok, p))
        return cls(
            model=model,
            tok=tok,
            base_state=snapshot(model),
            engine=engine,
            probe=probe,
            probe_prompts=[t.prompt for t in probe_tasks],
            thresholds=Thresholds(),
        )

    def reset(self) -> None:
        from daemon.policy.store import restore

        restore(self.model, self.base_state)

    def trainer(self, cfg: EvalConfig, seed: int, mode: str, state_dir: Path) -> Any:
        from daemon.config import GRPOParams
        from daemon.trainer.cohort import CohortTrainer
        from daemon.verify.registry import get_verifier

        params = GRPOParams(
            steps=cfg.grpo_steps,
            num_generations=cfg.k,
            learning_rate=cfg.learning_rate,
            optimizer=cfg.optimizer,
            max_completion_length=cfg.max_completion_length,
            seed=seed,
        )
        return CohortTrainer(
            self.model,
            self.tok,
            self.probe,
            get_verifier,
            params=params,
            mode=mode,  # type: ignore[arg-type]
            # The loop measures what selection does; a rollback would hide it.
            rollback_nll_worsening=math.inf,
            state_dir=state_dir,
            trainer_id="tapd-eval",
        )


# ------------------------------------------------------------------- cohorts


@dataclass(frozen=True)
class Candidate:
    cohort_id: str
    subject: str
    variant: str
    traces: tuple[Any, ...]  # streams.schemas.Trace, K attempts each
    features: dict[str, float]


def make_cohort(
    rt: Runtime, cfg: EvalConfig, cohort_id: str, subject: str, variant: str, seed: int
) -> Candidate:
    """A control cohort, its K attempts from the current weights, and its features."""
    from daemon.core.features import featurize
    from daemon.policy.rollout import fill_attempts
    from lab import tasks

    batch = tasks.control_cohort(variant, cfg.groups, seed, subject=subject)  # type: ignore[arg-type]
    traces = [
        tasks.to_trace(t, policy_version="eval", key=f"{cohort_id}/{i}")
        for i, t in enumerate(batch)
    ]
    filled = fill_attempts(
        traces, rt.engine, cfg.k, seed=seed, max_new_tokens=cfg.max_completion_length
    )
    if filled.rejected:
        r = filled.rejected[0]
        raise ValueError(f"{r.field}: cohort {cohort_id} trace rejected: {r.reason}")
    feats = featurize(filled.traces, probe_prompts=rt.probe_prompts)
    return Candidate(cohort_id, subject, variant, tuple(filled.traces), feats)


def dispatch_of(c: Candidate, predicted: float = 0.0) -> Any:
    from daemon.core.features import FEATURE_SCHEMA
    from streams.schemas import DISPATCH_SCHEMA, Dispatch

    return Dispatch.model_validate(
        {
            "schema": DISPATCH_SCHEMA,
            "cohort_id": c.cohort_id,
            "slice_key": f"{c.subject}|{c.variant}",
            "subject": c.subject,
            "ts": 0.0,
            "policy_version": "eval",
            "model_version": "eval",
            "feature_schema": FEATURE_SCHEMA,
            "features": c.features,
            "predicted_lift": predicted,
            "uncertainty": 0.0,
            "selection": "exploit",
            "items": [
                {
                    "trace_id": t.trace_id,
                    "prompt": t.prompt,
                    "reference": t.reference,
                    "verifier": t.verifier,
                    "verifier_args": t.verifier_args,
                }
                for t in c.traces
            ],
        }
    )


def battery_specs(cfg: EvalConfig) -> Iterator[tuple[str, str, str, int]]:
    for si, subject in enumerate(cfg.subjects):
        for vi, variant in enumerate(cfg.variants):
            for c in range(cfg.cohorts_per_cell):
                seed = 10_000 * (c + 1) + 100 * si + vi
                yield f"eval-{subject}-{variant}-{c}", subject, variant, seed


def measure_battery(
    rt: Runtime, cfg: EvalConfig, cache: ResultCache, work: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Features and per-seed probe-and-revert lift of every battery cohort (cached)."""
    specs = list(battery_specs(cfg))
    rows: list[dict[str, Any]] = []
    trainers: dict[int, Any] = {}
    try:
        for n, (cid, subject, variant, seed) in enumerate(specs, 1):
            row = cache.get("cohort", cid)
            if row is None:
                rt.reset()
                c = make_cohort(rt, cfg, cid, subject, variant, seed)
                row = cache.put(
                    ("cohort", cid),
                    {
                        "cohort_id": cid,
                        "subject": subject,
                        "variant": variant,
                        "features": c.features,
                    },
                )
                cand = c
            else:
                cand = None
            lifts = []
            for s in range(cfg.seeds):
                got = cache.get("lift", cid, str(s))
                if got is None:
                    if cand is None:
                        rt.reset()
                        cand = make_cohort(rt, cfg, cid, subject, variant, seed)
                    if s not in trainers:
                        rt.reset()
                        d = work / f"probe-revert-s{s}"
                        shutil.rmtree(d, ignore_errors=True)  # its ledger would replay old cohorts
                        trainers[s] = rt.trainer(cfg, s, "probe_revert", d)
                    res = trainers[s].on_dispatch(dispatch_of(cand), time.time()).result
                    got = cache.put(("lift", cid, str(s)), _lift_row(res))
                lifts.append(got)
            rows.append({**row, "seeds": lifts})
            log(
                f"[{n}/{len(specs)}] {cid}: nll_lift "
                + " ".join(f"{x['nll_lift']:+.3f}" for x in lifts)
            )
    finally:
        for t in trainers.values():
            t.close()
    rt.reset()
    return rows


def _lift_row(res: Any) -> dict[str, Any]:
    return {
        "nll_lift": res.nll_lift,
        "acc_lift": res.acc_lift,
        "nll_before": res.nll_before,
        "nll_after": res.nll_after,
        "acc_before": res.acc_before,
        "acc_after": res.acc_after,
        "reward_before": res.train_reward_before,
        "reward_after": res.train_reward_after,
        "duration_s": res.duration_s,
    }


# ----------------------------------------------------------------- predictors


def predictor_fit_predict(seed: int = 0) -> ev.FitPredict:
    """tapd's own predictor (heuristic -> River -> LightGBM), fed the training labels."""
    from daemon.config import PredictorSettings
    from daemon.core.predictor import Predictor

    def fit_predict(
        xs: Sequence[Mapping[str, float]], ys: Sequence[float], test: Sequence[Mapping[str, float]]
    ) -> list[float]:
        p = Predictor(PredictorSettings(seed=seed))
        # The refit holds out the most recent labels: feed them in a fixed
        # shuffled order, not subject by subject.
        order = list(range(len(ys)))
        random.Random(seed).shuffle(order)
        for i in order:
            p.learn(xs[i], ys[i])
        return [p.predict(x).lift for x in test]

    return fit_predict


def table_of(rows: Sequence[Mapping[str, Any]]) -> list[ev.CohortResult]:
    return [
        ev.CohortResult(
            r["cohort_id"],
            r["subject"],
            r["variant"],
            r["features"],
            tuple(float(s["nll_lift"]) for s in r["seeds"]),
            tuple(float(s["acc_lift"]) for s in r["seeds"]),
        )
        for r in rows
    ]


def integrity_cases(
    rt: Runtime, rows: Sequence[Mapping[str, Any]], predicted: np.ndarray
) -> list[ev.IntegrityCase]:
    """The decision each cohort got before training, and what training then did (seed 0)."""
    from daemon.core.decision import recommend
    from daemon.core.predictor import Prediction

    out = []
    for r, p in zip(rows, predicted, strict=True):
        rec, _, _ = recommend(
            r["features"], Prediction(float(p), 0.0, "eval", "loo"), rt.thresholds
        )
        s0 = r["seeds"][0]
        out.append(
            ev.IntegrityCase(
                r["cohort_id"],
                r["variant"],
                float(r["features"]["reward_trust"]),
                rec,
                s0["reward_before"],
                s0["reward_after"],
                s0["acc_before"],
                s0["acc_after"],
            )
        )
    return out


# ---------------------------------------------------------------- closed loop


def run_loop(
    rt: Runtime, cfg: EvalConfig, cache: ResultCache, work: Path, log: Callable[[str], None]
) -> dict[str, list[list[float]]]:
    """Predictor-selected vs random training over cumulative steps; probe NLL per step.

    Both arms of a seed see the same candidate draws at each step (a paired
    design), each against its own current model. The predictor arm starts
    cold (adv_std heuristic) and learns every realized lift; its pick is the
    decision policy's best ``train`` cohort, else (as exploration would) the
    best one whose verifier is trusted; when every candidate's verifier is
    untrusted it trains nothing that step, as tapd would. The random arm
    picks uniformly.
    """
    from daemon.config import PredictorSettings
    from daemon.core.decision import recommend
    from daemon.core.predictor import Predictor

    curves: dict[str, list[list[float]]] = {"predictor": [], "random": []}
    for seed in range(cfg.loop_seeds):
        for arm in ("predictor", "random"):
            got = cache.get("loop", arm, str(seed))
            if got is None:
                rt.reset()
                d = work / f"loop-{arm}-s{seed}"
                shutil.rmtree(d, ignore_errors=True)
                trainer = rt.trainer(cfg, 1000 + seed, "continual", d)
                predictor = Predictor(PredictorSettings(seed=seed))
                pick_rng = random.Random(f"loop|{seed}")
                nll = [rt.probe.nll(rt.model, rt.tok)]
                picks = []
                try:
                    for step in range(cfg.loop_steps):
                        draw = random.Random(f"loop-draw|{seed}|{step}")
                        cands = []
                        for j in range(cfg.loop_candidates):
                            subject = draw.choice(cfg.subjects)
                            variant = draw.choice(cfg.variants)
                            cid = f"loop-s{seed}-t{step}-{j}-{subject}-{variant}"
                            cands.append(
                                make_cohort(rt, cfg, cid, subject, variant, draw.randrange(2**31))
                            )
                        preds = [predictor.predict(c.features) for c in cands]
                        if arm == "random":
                            i = pick_rng.randrange(len(cands))
                        else:
                            recs = [
                                recommend(c.features, p, rt.thresholds)[0]
                                for c, p in zip(cands, preds, strict=True)
                            ]
                            pool = [i for i, r in enumerate(recs) if r == "train"] or [
                                i for i, r in enumerate(recs) if r != "fix_verifier"
                            ]
                            if not pool:
                                nll.append(nll[-1])
                                picks.append("none")
                                continue
                            i = max(pool, key=lambda i: preds[i].lift)
                        res = trainer.on_dispatch(
                            dispatch_of(cands[i], preds[i].lift), time.time()
                        ).result
                        predictor.learn(cands[i].features, res.nll_lift)
                        nll.append(res.nll_after)
                        picks.append(cands[i].variant)
                finally:
                    trainer.close()
                got = cache.put(("loop", arm, str(seed)), {"nll": nll, "picks": picks})
                log(f"loop {arm} seed {seed}: NLL {nll[0]:.3f} -> {nll[-1]:.3f} picks {picks}")
            curves[arm].append(list(got["nll"]))
    rt.reset()
    return curves


# ------------------------------------------------------------------ the report


def evaluate_rows(
    cfg: EvalConfig, rows: Sequence[Mapping[str, Any]], fit_predict: ev.FitPredict
) -> tuple[
    list[ev.CohortResult], np.ndarray, ev.RankingReport, list[ev.SubjectResult], ev.RankingReport
]:
    from daemon.config import Thresholds

    table = table_of(rows)
    loo = ev.loo_predictions(table, fit_predict)
    loso, loso_pred = ev.leave_one_subject_out(table, fit_predict, cfg.top_fraction)
    # What tapd's decision policy would train at all: never a verifier under
    # the reward-trust floor (checked before training, from features alone).
    floor = Thresholds().reward_trust_floor
    trainable = np.array([c.features["reward_trust"] >= floor for c in table])
    kw = {"fraction": cfg.top_fraction, "n_resamples": cfg.bootstrap}
    return (
        table,
        loo,
        ev.ranking_report(
            table,
            loo,
            tapd=ev.gated_scores(table, trainable, fit_predict),
            **kw,  # type: ignore[arg-type]
        ),
        loso,
        ev.ranking_report(table, loso_pred, **kw),  # type: ignore[arg-type]
    )


def _pct(e: ev.Estimate) -> str:
    return f"{e.value * 100:+.0f} % [{e.lo * 100:+.0f}, {e.hi * 100:+.0f}]"


def _num(e: ev.Estimate, d: int = 2) -> str:
    return f"{e.value:.{d}f} [{e.lo:.{d}f}, {e.hi:.{d}f}]"


def _signed(e: ev.Estimate, d: int = 3) -> str:
    return f"{e.value:+.{d}f} [{e.lo:+.{d}f}, {e.hi:+.{d}f}]"


def summary_json(
    cfg: EvalConfig,
    table: Sequence[ev.CohortResult],
    loo: ev.RankingReport,
    loso: Sequence[ev.SubjectResult],
    loso_pooled: ev.RankingReport,
    loop: ev.LoopSummary | None,
    integrity: ev.IntegritySummary,
    runtime_s: float,
) -> dict[str, Any]:
    def est(e: ev.Estimate) -> dict[str, float]:
        return {"value": e.value, "lo": e.lo, "hi": e.hi}

    return {
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "n_cohorts": len(table),
        "runtime_s": runtime_s,
        "loo": {
            "spearman": est(loo.spearman),
            "pearson": est(loo.pearson),
            "pairwise_accuracy": est(loo.pairwise),
            "selection_gain": {k: est(v) for k, v in loo.gain.items()},
            "selection_gain_abs": loo.gain_abs,
            "selection_gain_abs_ci": {k: est(v) for k, v in loo.gain_abs_ci.items()},
            "oracle_gain": loo.oracle_gain.relative,
            "oracle_gain_abs": loo.oracle_gain.absolute,
            "oracle_spearman": loo.oracle_spearman,
            "share_of_oracle": loo.share_of_oracle,
            "savings_curve": loo.curves,
        },
        "loso": {
            "per_subject": [
                {
                    "subject": r.subject,
                    "n": r.n,
                    "spearman": r.spearman,
                    "gain": r.gain.relative,
                    "gain_abs": r.gain.absolute,
                }
                for r in loso
            ],
            "pooled_spearman": est(loso_pooled.spearman),
            "pooled_gain": est(loso_pooled.gain["predictor"]),
        },
        "loop": None
        if loop is None
        else {
            "steps": loop.steps,
            "final_change": {k: est(v) for k, v in loop.final_change.items()},
            "advantage": est(loop.advantage),
            "per_step": {k: [est(e) for e in v] for k, v in loop.per_step.items()},
        },
        "integrity": {
            "floor": integrity.floor,
            "n_weak": integrity.n_weak,
            "n_weak_flagged": integrity.n_weak_flagged,
            "n_sound": integrity.n_sound,
            "n_sound_flagged": integrity.n_sound_flagged,
            "weak_reward_change": est(integrity.weak_reward_change),
            "weak_accuracy_change": est(integrity.weak_accuracy_change),
            "sound_reward_change": est(integrity.sound_reward_change),
            "sound_accuracy_change": est(integrity.sound_accuracy_change),
        },
        "by_variant": {
            v: {
                "n": sum(c.variant == v for c in table),
                "mean_lift": float(np.mean([c.lift for c in table if c.variant == v])),
                "mean_acc_lift": float(
                    np.mean([np.mean(c.accuracy_lifts) for c in table if c.variant == v])
                ),
                "mean_adv_std": float(
                    np.mean([c.features["adv_std"] for c in table if c.variant == v])
                ),
            }
            for v in cfg.variants
            if any(c.variant == v for c in table)
        },
    }


def findings(s: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Whether each of the seeds' findings holds in this run, in direction only."""
    loo, it, lp = s["loo"], s["integrity"], s["loop"]
    gain = loo["selection_gain_abs"]
    out = [
        ("tapd's top pick (predictor + reward-trust gate) beats random", gain["tapd"] > 0.0),
        ("the ungated predictor's top pick beats random selection", gain["predictor"] > 0.0),
        ("predictor beats `adv_std` alone", gain["predictor"] > gain["adv_std"]),
        (
            "predicted and actual lift are positively rank-correlated",
            loo["spearman"]["value"] > 0.0,
        ),
        (
            "every weak-verifier cohort is flagged `fix_verifier` before training",
            it["n_weak"] > 0 and it["n_weak_flagged"] == it["n_weak"],
        ),
        (
            "on weak-verifier cohorts training reward rises while probe accuracy falls",
            it["weak_reward_change"]["value"] > 0.0 > it["weak_accuracy_change"]["value"],
        ),
    ]
    if lp is not None:
        out.append(
            (
                "closed loop: predictor-selected training ends with lower probe NLL than random",
                lp["advantage"]["value"] > 0.0,
            )
        )
    return out


def render_markdown(s: Mapping[str, Any], command: str, img: str) -> str:
    cfg = s["config"]
    loo = s["loo"]
    g = loo["selection_gain"]

    def e(d: Mapping[str, float], pct: bool = False, signed: bool = False) -> str:
        x = ev.Estimate(d["value"], d["lo"], d["hi"])
        return _pct(x) if pct else _signed(x) if signed else _num(x)

    names = {
        "tapd": "tapd: predictor + reward-trust gate (what it would train)",
        "predictor": "predictor alone, ungated (leave-one-out)",
        "adv_std": "`adv_std` alone",
        "frac_nondegenerate": "`frac_nondegenerate` alone",
        "dapo_filter": "DAPO filter (drop all-same groups, random among the rest)",
        "pass_rate_middle": "pass rate in the middle, p(1-p)",
    }
    lines = [
        "# Evaluation results",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()} "
        f"({s['n_cohorts']} cohorts; the first, uncached run took "
        f"{s.get('first_run_s', s['runtime_s']) / 60:.1f} min on a shared {platform.machine()} "
        f"CPU box, {s.get('grpo_probe_revert_s', 0.0) / 60:.1f} min of it probe-and-revert "
        f"GRPO; this invocation {s['runtime_s'] / 60:.1f} min; config key `{s['config_key']}`). "
        "Every number below comes from that run; rerun the command to reproduce it "
        "(results are cached per config under the state dir, so a rerun resumes).",
        "",
        "Definitions are in `lab/evaluation.py`. Lift = probe NLL-lift (nats, positive = better), "
        f"mean over {cfg['seeds']} probe-and-revert GRPO seeds. CIs: 95 % percentile bootstrap over "
        f"cohorts ({cfg['bootstrap']} resamples) or Student-t over seeds (loop, integrity).",
        "",
        "## The seeds' findings in this run (direction only)",
        "",
        "| finding | holds here |",
        "|---|---|",
        *(f"| {what} | {'yes' if ok else '**no**'} |" for what, ok in findings(s)),
        "",
        "Relative gains (%) divide by the mean lift of all cohorts, which is near zero here: "
        "read the absolute column (nats).",
        "",
        "## Predicted vs actual lift",
        "",
        "| metric | tapd | seeds' reference |",
        "|---|---|---|",
        f"| Spearman ρ (leave-one-out) | {e(loo['spearman'])} | 0.78 |",
        f"| Pearson r (leave-one-out) | {e(loo['pearson'])} | 0.72 |",
        f"| pairwise ranking accuracy | {e(loo['pairwise_accuracy'])} | 0.78 |",
        f"| noise ceiling: seed cross-fit Spearman | {loo['oracle_spearman']:.2f} | ≈0.80 |",
        "",
        f"## Top-{cfg['top_fraction'] * 100:.0f} % selection gain over random",
        "",
        "| selector | gain over random [95 % CI] | absolute, nats [95 % CI] |",
        "|---|---|---|",
    ]
    for k, name in names.items():
        lines.append(
            f"| {name} | {e(g[k], pct=True)} | {e(loo['selection_gain_abs_ci'][k], signed=True)} |"
        )
    lines += [
        f"| oracle (seed cross-fit) | {loo['oracle_gain'] * 100:+.0f} % | {loo['oracle_gain_abs']:+.4f} |",
        "",
        f"Share of the oracle's gain reached by the predictor: {loo['share_of_oracle'] * 100:.0f} % "
        "(seeds: ≈70 %). Seeds' reference: +68 % over random.",
        "",
        f"![predicted vs actual]({img}/scatter.png) ![selection gain]({img}/selection.png)",
        "",
        "## Leave-one-subject-out",
        "",
        "| held-out subject | cohorts | Spearman | top selection gain over random |",
        "|---|---|---|---|",
    ]
    for r in s["loso"]["per_subject"]:
        lines.append(
            f"| {r['subject']} | {r['n']} | {r['spearman']:.2f} | {r['gain'] * 100:+.0f} % ({r['gain_abs']:+.4f} nats) |"
        )
    lines += [
        f"| pooled | {s['n_cohorts']} | {e(s['loso']['pooled_spearman'])} | {e(s['loso']['pooled_gain'], pct=True)} |",
        "",
        "Seeds' reference: +118 % over random on an unseen subject.",
        "",
        "## Compute savings",
        "",
    ]
    curves = loo["savings_curve"]
    maybe = {k: ev.kept_share([(p[0], p[1]) for p in c]) for k, c in curves.items()}
    shares = {k: v for k, v in maybe.items() if v is not None}
    if len(shares) == len(maybe):
        lines += [
            "Share of the train-on-everything total lift kept when training only the top x % by a score:",
            "",
        ]
        shown, fmt = shares, (lambda y: f"{y * 100:.0f} %")
    else:
        lines += [
            "Training on every cohort lowers the probe NLL in total by nothing or less (total lift "
            f"{curves['predictor'][-1][1]:+.4f} nats), so shares are undefined; the table gives the "
            "total lift (nats) of the top x % by each score:",
            "",
        ]
        shown, fmt = curves, (lambda y: f"{y:+.4f}")
    lines += ["| x | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    xs = [p[0] for p in next(iter(curves.values()))]
    for j, x in enumerate(xs):
        lines.append(
            f"| {x * 100:.0f} % | " + " | ".join(fmt(c[j][1]) for c in shown.values()) + " |"
        )
    lines += ["", f"![compute savings]({img}/savings.png)", "", "## Closed loop", ""]
    if s["loop"] is None:
        lines.append("Not run.")
    else:
        lp = s["loop"]
        lines += [
            f"{lp['steps']} cumulative continual GRPO steps x {cfg['loop_seeds']} seeds; each step scores "
            f"{cfg['loop_candidates']} fresh cohorts against the current model.",
            "",
            "| arm | probe NLL change after the last step [95 % CI] | seeds' reference |",
            "|---|---|---|",
            f"| predictor-selected | {e(lp['final_change']['predictor'], signed=True)} | −0.539 |",
            f"| random | {e(lp['final_change']['random'], signed=True)} | +0.331 |",
            f"| advantage (random − predictor) | {e(lp['advantage'], signed=True)} | +0.869 |",
            "",
            f"![closed loop]({img}/loop.png)",
        ]
    it = s["integrity"]
    lines += [
        "",
        "## Reward integrity",
        "",
        f"Weak-verifier cohorts flagged before training (reward_trust < {it['floor']:.2f} and decision "
        f"`fix_verifier`): **{it['n_weak_flagged']} of {it['n_weak']}**; false alarms on the cohorts with an honest "
        f"verifier (all but weak-verifier and scrambled-reward): {it['n_sound_flagged']} of {it['n_sound']}.",
        "",
        "| cohorts | training reward change | probe accuracy change |",
        "|---|---|---|",
        f"| weak verifier | {e(it['weak_reward_change'], signed=True)} | {e(it['weak_accuracy_change'], signed=True)} |",
        f"| honest verifiers | {e(it['sound_reward_change'], signed=True)} | {e(it['sound_accuracy_change'], signed=True)} |",
        "",
        "## Lift by control variant",
        "",
        "| variant | cohorts | mean NLL-lift | mean accuracy lift | mean adv_std |",
        "|---|---|---|---|---|",
    ]
    for v, d in s["by_variant"].items():
        lines.append(
            f"| {v} | {d['n']} | {d['mean_lift']:+.4f} | {d['mean_acc_lift']:+.4f} | {d['mean_adv_std']:.3f} |"
        )
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    return "\n".join(lines)


def plot(
    s: Mapping[str, Any],
    table: Sequence[ev.CohortResult],
    predicted: np.ndarray,
    loop: ev.LoopSummary | None,
    img_dir: Path,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    out = []

    fig, ax = plt.subplots(figsize=(5, 4))
    actual = ev.actual_lifts(table)
    for v in dict.fromkeys(c.variant for c in table):
        m = [c.variant == v for c in table]
        ax.scatter(predicted[m], actual[m], label=v, s=18)
    lo, hi = float(min(predicted.min(), actual.min())), float(max(predicted.max(), actual.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("predicted lift (leave-one-out), nats")
    ax.set_ylabel("actual NLL-lift, nats")
    ax.set_title(f"Spearman {s['loo']['spearman']['value']:.2f}")
    ax.legend(fontsize=7)
    out.append(_save(fig, img_dir / "scatter.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    g = s["loo"]["selection_gain_abs_ci"]
    names = [*g, "oracle"]
    vals = [g[k]["value"] for k in g] + [s["loo"]["oracle_gain_abs"]]
    err = [
        [g[k]["value"] - g[k]["lo"] for k in g] + [0.0],
        [g[k]["hi"] - g[k]["value"] for k in g] + [0.0],
    ]
    ax.bar(names, vals, yerr=err, color=["C0"] + ["C7"] * (len(g) - 1) + ["C2"])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("top-10 % mean lift - random, nats")
    ax.tick_params(axis="x", labelrotation=25, labelsize=7)
    out.append(_save(fig, img_dir / "selection.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in s["loo"]["savings_curve"].items():
        ax.plot(
            [p[0] * 100 for p in curve], [p[1] * 100 for p in curve], marker="o", ms=3, label=name
        )
    ax.set_xlabel("cohorts trained (top x % by score)")
    ax.set_ylabel("share of total lift kept, %")
    ax.legend(fontsize=7)
    out.append(_save(fig, img_dir / "savings.png"))

    if loop is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        for arm, per in loop.per_step.items():
            x = list(range(len(per)))
            ax.plot(x, [e.value for e in per], marker="o", label=arm)
            ax.fill_between(x, [e.lo for e in per], [e.hi for e in per], alpha=0.2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("cumulative GRPO step")
        ax.set_ylabel("probe NLL change, nats (lower is better)")
        ax.legend()
        out.append(_save(fig, img_dir / "loop.png"))

    fig, ax = plt.subplots(figsize=(5, 3))
    per = s["loso"]["per_subject"]
    ax.bar(
        [r["subject"] for r in per],
        [r["spearman"] if math.isfinite(r["spearman"]) else 0 for r in per],
    )
    ax.set_ylabel("Spearman on the held-out subject")
    out.append(_save(fig, img_dir / "loso.png"))
    return out


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------- main


def run(
    cfg: EvalConfig,
    *,
    out_dir: Path,
    state_dir: Path,
    command: str,
    loop: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure (resuming from the cache), evaluate, and write RESULTS.md, results.json, plots."""
    cfg.validate()
    t0 = time.perf_counter()
    work = state_dir / "eval" / cfg.key()
    cache = ResultCache(work / "results.jsonl")
    log(f"eval: config {cfg.key()}, cache {cache.path} ({len(cache.rows)} rows cached)")
    rt = Runtime.load(cfg)
    rows = measure_battery(rt, cfg, cache, work, log)
    table, predicted, loo, loso, loso_pooled = evaluate_rows(cfg, rows, predictor_fit_predict())
    integrity = ev.integrity_summary(
        integrity_cases(rt, rows, predicted), rt.thresholds.reward_trust_floor
    )
    loop_summary = ev.loop_summary(run_loop(rt, cfg, cache, work, log)) if loop else None
    runtime_s = time.perf_counter() - t0  # this invocation; cached work is not re-counted
    # The first complete run's wall time is what a fresh reproduction costs.
    first = cache.get("timing", "first_complete_run") or cache.put(
        ("timing", "first_complete_run"), {"wall_s": runtime_s, "loop": loop}
    )
    summary = summary_json(cfg, table, loo, loso, loso_pooled, loop_summary, integrity, runtime_s)
    summary["first_run_s"] = float(first["wall_s"])
    summary["grpo_probe_revert_s"] = sum(float(s["duration_s"]) for r in rows for s in r["seeds"])
    out_dir.mkdir(parents=True, exist_ok=True)
    img = out_dir / "img"
    plot(summary, table, predicted, loop_summary, img)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    (out_dir / "RESULTS.md").write_text(render_markdown(summary, command, "img"))
    log(f"eval: wrote {out_dir / 'RESULTS.md'} in {runtime_s / 60:.1f} min")
    return summary


def config_for(quick: bool, seeds: int | None, cohorts_per_cell: int | None) -> EvalConfig:
    cfg = QUICK if quick else FULL
    changes: dict[str, Any] = {}
    if seeds is not None:
        changes["seeds"] = seeds
    if cohorts_per_cell is not None:
        changes["cohorts_per_cell"] = cohorts_per_cell
    return dataclasses.replace(cfg, **changes).validate() if changes else cfg.validate()
