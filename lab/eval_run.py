"""``tapd eval``: build the battery, measure true lift, score every predictor, run the loop.

The data flow, each unit of work cached in ``<state-dir>/eval/<key>/results.jsonl``
(the key covers this config and the policy build), so that an interrupted run
resumes where it stopped::

    control cohorts (subjects x variants) ──► K attempts from the tiny policy
        ──► features ──► probe-and-revert GRPO per seed ──► lift per probe part
    labels (the lift on the cohort's own target) ──► held-out predictions:
        leave-one-cell-out and leave-one-subject-out, one model kind per run
    closed loop: a fixed target per run; per step, every arm scores fresh
        candidates against its own current model and trains its pick
        (continual); target NLL per step
    metrics ──► RESULTS.md + PNG plots + results.json

The statistics are in :mod:`lab.evaluation`; this module only runs things.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
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
# The model kinds scored one at a time (a fixed kind per cross-validation run).
KINDS = ("heuristic", "river", "ridge", "knn", "lightgbm", "ensemble")
LOOP_ARMS = ("none", "random", "adv_std", "tapd", "oracle")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines the measured numbers (its hash keys the cache).

    ``loop_runs``, ``top_fraction`` and ``bootstrap`` are not in the key: a
    loop run's measurement depends on its index alone and the other two only
    on the analysis, so more runs or another analysis reuse every cached unit.
    """

    subjects: tuple[str, ...] = ("add", "sub", "mul", "compare", "digits")
    variants: tuple[str, ...] = VARIANTS
    # 8 per honest cell: 160 labelled cohorts, so the top 10 % is 16 cohorts
    # rather than 8 (with 8, which one cell's cohorts landed in it decided the
    # figure) and every cross-validation fold trains on about twice the labels.
    cohorts_per_cell: int = 8
    broken_cohorts_per_cell: int = 2  # scrambled and weak-verifier cells
    groups: int = 8  # prompts per cohort
    k: int = 8  # attempts per prompt, for the features and per GRPO group
    seeds: int = 3  # probe-and-revert GRPO runs per cohort
    # The trainer's settings (docs/TRAINER.md): SGD, whose step scales with
    # the learning signal.
    grpo_steps: int = 16
    learning_rate: float = 5e-3
    optimizer: str = "sgd"
    max_completion_length: int = 8
    probe_per_family: int = 48
    # 25 = 5 paired runs per target subject. A paired test on the target-NLL
    # AUC needs about 21 runs for the advantages over random the loop has
    # shown; 8 runs (targets 2, 2, 2, 1, 1 times) could not tell them from zero.
    loop_runs: int = 25
    loop_steps: int = 4
    loop_candidates: int = 8
    top_fraction: float = ev.TOP_FRACTION
    bootstrap: int = ev.DEFAULT_RESAMPLES
    policy_seed: int = 0

    NOT_MEASURED = ("loop_runs", "top_fraction", "bootstrap")

    def key(self, policy_key: str = "") -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_MEASURED}
        blob = json.dumps(
            {**fields, "policy": policy_key, "code": code_hash(MEASURED_BY)}, sort_keys=True
        )
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
            raise ValueError("seeds: test-retest reliability needs at least 2")
        if self.cohorts_per_cell < 1 or self.broken_cohorts_per_cell < 1:
            raise ValueError("cohorts_per_cell and broken_cohorts_per_cell must be >= 1")
        if self.loop_runs and (self.loop_runs < 2 or self.loop_candidates < 4):
            raise ValueError("loop_runs >= 2 (paired test) and loop_candidates >= 4 are required")
        return self


# The code a cached measurement depends on: a change to any of these modules
# makes a new cache (a stale number can never be published). A lift (the
# cohort's rollouts, its GRPO runs and probes) depends on MEASURED_BY; a
# cohort's features also on FEATURED_BY, which is in the key of its feature
# row and of every loop run, so a feature change recomputes the features and
# the loop and keeps the lifts, which it cannot change. The loop also depends
# on the predictor and the decision policy.
MEASURED_BY = (
    "lab.tasks",
    "lab.verifiers",
    "daemon.trainer.probe",
    "daemon.trainer.cohort",
    "daemon.trainer.trl",
    "daemon.verify.registry",
    "daemon.policy.teacher",
    "streams.probes",
)
FEATURED_BY = (
    "daemon.core.features",
    "daemon.core.similarity",
    "daemon.policy.alignment",
    "daemon.policy.teacher",
    "streams.probes",
)
DECIDED_BY = ("daemon.core.predictor", "daemon.core.decision")
# The closed loop's own protocol, which lives in this module and so is not in
# the code hashes: bumped when what a loop run does changes. 2: the warm-start
# labels are built in a canonical order (before, a run after a fresh battery
# saw the targets in measurement order and one after a cached battery in
# sorted order, and the router's online stages learn order-dependently).
LOOP_PROTOCOL = "2"


def code_hash(modules: Sequence[str]) -> str:
    import importlib
    import inspect

    h = hashlib.sha256()
    for name in modules:
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:12]


QUICK = EvalConfig(
    subjects=("add", "sub", "compare", "digits"),
    cohorts_per_cell=1,
    broken_cohorts_per_cell=1,
    seeds=2,
    grpo_steps=8,
    probe_per_family=16,
    loop_runs=2,
    loop_steps=2,
    loop_candidates=4,
    bootstrap=200,
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
        """Append a finished unit; returns it exactly as a later run will read it back.

        The caller gets the decoded line, not its own dict: a fresh unit and a
        cached one must be indistinguishable (key order, tuples, float types),
        or a run that measures and a run that resumes could compute different
        numbers from the same measurements.
        """
        line = json.dumps({"key": list(key), **row}, sort_keys=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
        stored: dict[str, Any] = json.loads(line)
        self.rows[tuple(key)] = stored
        return stored


class Clock:
    """Wall and CPU seconds of the work done in this invocation."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    def seconds(self) -> dict[str, float]:
        wall, cpu = self.lap()
        return {"wall_s": wall, "cpu_s": cpu}


# ---------------------------------------------------------------- the runtime


@dataclass
class Runtime:
    """The policy, rollout engine, probe and verifiers of one evaluation."""

    model: Any
    tok: Any
    base_state: dict[str, Any]
    engine: Any
    probe: Any
    items: list[Any]  # ProbeItem, in probe order
    families: list[str]  # "subject/difficulty" of each probe item
    probe_by_target: dict[str, tuple[str, ...]]
    thresholds: Any
    policy_key: str
    alignment: Any  # daemon.policy.alignment.UpdateAlignment on ``model``

    @classmethod
    def load(cls, cfg: EvalConfig) -> Runtime:
        import torch

        from daemon.config import Thresholds
        from daemon.policy import store as policy
        from daemon.policy.alignment import UpdateAlignment
        from daemon.policy.hf import HFRolloutEngine
        from daemon.policy.store import snapshot
        from daemon.trainer.probe import DEFAULT_FOOTHOLD_PROBABILITY, Probe
        from daemon.verify.registry import get_verifier
        from lab import tasks
        from lab.tiny_policy import build_info, build_tiny_policy

        torch.set_num_threads(1)  # CPU results depend on the thread count
        path = build_tiny_policy(seed=cfg.policy_seed)
        model, tok = policy.load_policy(path, "cpu")
        probe_tasks = [
            t for t in tasks.target_probe(cfg.probe_per_family, 0) if t.subject in cfg.subjects
        ]
        items = tasks.probe_items(probe_tasks)
        probe = Probe(
            items, get_verifier, policy.format_prompt, max_new_tokens=cfg.max_completion_length
        )
        engine = HFRolloutEngine(model, tok, format_prompt=lambda p: policy.format_prompt(tok, p))
        by_target: dict[str, list[str]] = {}
        items_by_target: dict[str, list[Any]] = {}
        for it in items:
            by_target.setdefault(it.target, []).append(it.prompt)
            items_by_target.setdefault(it.target, []).append(it)
        # The trainer's default foothold: the items the labels are measured on.
        alignment = UpdateAlignment(
            model,
            tok,
            lambda p: policy.format_prompt(tok, p),
            items_by_target,
            DEFAULT_FOOTHOLD_PROBABILITY,
        )
        return cls(
            model=model,
            tok=tok,
            base_state=snapshot(model),
            engine=engine,
            probe=probe,
            items=items,
            families=[f"{t.subject}/{t.difficulty}" for t in probe_tasks],
            probe_by_target={k: tuple(v) for k, v in by_target.items()},
            thresholds=Thresholds(),
            policy_key=str(build_info(path)["weights_sha256"])[:12],
            alignment=alignment,
        )

    def weights_key(self) -> float:
        """A fingerprint of the current weights (they change in place as the loop trains)."""
        return float(sum(float(p.detach().double().sum()) for p in self.model.parameters()))

    def reset(self) -> None:
        from daemon.policy.store import restore

        restore(self.model, self.base_state)

    def params(self, cfg: EvalConfig, seed: int) -> Any:
        from daemon.config import GRPOParams

        return GRPOParams(
            steps=cfg.grpo_steps,
            num_generations=cfg.k,
            learning_rate=cfg.learning_rate,
            optimizer=cfg.optimizer,
            max_completion_length=cfg.max_completion_length,
            seed=seed,
        )

    def trainer(
        self, cfg: EvalConfig, seed: int, mode: str, state_dir: Path, probe: Any = None
    ) -> Any:
        from daemon.trainer.cohort import CohortTrainer
        from daemon.verify.registry import get_verifier

        return CohortTrainer(
            self.model,
            self.tok,
            probe or self.probe,
            get_verifier,
            params=self.params(cfg, seed),
            mode=mode,  # type: ignore[arg-type]
            # The loop measures what selection does; a rollback would hide it.
            rollback_nll_worsening=math.inf,
            state_dir=state_dir,
            trainer_id="tapd-eval",
        )

    def target_probe(self, target: str, cfg: EvalConfig) -> Any:
        """A probe of one target's items alone (cheap look-aheads)."""
        from daemon.policy import store as policy
        from daemon.trainer.probe import Probe
        from daemon.verify.registry import get_verifier

        return Probe(
            [it for it in self.items if it.target == target],
            get_verifier,
            policy.format_prompt,
            max_new_tokens=cfg.max_completion_length,
        )


# ------------------------------------------------------------------- cohorts


@dataclass(frozen=True)
class Candidate:
    cohort_id: str
    subject: str
    variant: str
    families: tuple[str, ...]
    traces: tuple[Any, ...]  # streams.schemas.Trace, K attempts each
    features: dict[str, float]  # the relevance features against the cohort's own target
    similarity: dict[str, float]  # target_similarity against each target
    alignment: dict[str, float]  # update_alignment against each target

    def features_for(self, target: str) -> dict[str, float]:
        """The features as a scorer whose target is ``target`` computes them."""
        return {
            **self.features,
            "target_similarity": self.similarity[target],
            "update_alignment": self.alignment[target],
        }


def make_cohort(
    rt: Runtime,
    cfg: EvalConfig,
    cohort_id: str,
    subject: str,
    variant: str,
    seed: int,
    *,
    align: bool = True,
) -> Candidate:
    """A control cohort, its K attempts from the current weights, and its features.

    ``update_alignment`` is measured as the scorer measures it, from
    ``DEFAULT_ATTEMPTS`` fresh attempts per prompt; ``align=False`` (a loop
    arm that never reads it) leaves it 0 and spares the sampling.
    """
    from daemon.core.features import featurize, target_similarity
    from daemon.policy.alignment import DEFAULT_ATTEMPTS
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
    wanted = sorted(rt.probe_by_target)
    if align:
        alignment = rt.alignment.measure(
            filled.traces,
            wanted,
            rt.weights_key(),
            rt.engine,
            DEFAULT_ATTEMPTS,
            seed + 1,
            max_new_tokens=cfg.max_completion_length,
        )
    else:
        alignment = dict.fromkeys(wanted, 0.0)
    feats = featurize(
        filled.traces, probe_prompts=rt.probe_by_target, update_alignment=alignment[subject]
    )
    prompts = [t.prompt for t in batch]
    sims = {t: target_similarity(prompts, ps) for t, ps in rt.probe_by_target.items()}
    fams = tuple(dict.fromkeys(f"{t.subject}/{t.difficulty}" for t in batch))
    return Candidate(
        cohort_id, subject, variant, fams, tuple(filled.traces), feats, sims, alignment
    )


def dispatch_of(c: Candidate, predicted: float = 0.0, target: str | None = None) -> Any:
    from daemon.core.features import FEATURE_SCHEMA
    from streams.schemas import DISPATCH_SCHEMA, Dispatch

    return Dispatch.model_validate(
        {
            "schema": DISPATCH_SCHEMA,
            "cohort_id": c.cohort_id,
            "slice_key": f"{c.subject}|{c.variant}",
            "subject": c.subject,
            "target": target,
            "ts": 0.0,
            "policy_version": "eval",
            "model_version": "eval",
            "feature_schema": FEATURE_SCHEMA,
            "features": c.features if target is None else c.features_for(target),
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
            n = (
                cfg.broken_cohorts_per_cell
                if variant in ev.BROKEN_VARIANTS
                else cfg.cohorts_per_cell
            )
            for c in range(n):
                seed = 10_000 * (c + 1) + 100 * si + vi
                yield f"eval-{subject}-{variant}-{c}", subject, variant, seed


def per_target_lifts(rt: Runtime, trainer: Any) -> dict[str, Any]:
    """The last update's lift on every target's foothold items, per family and collateral."""
    from daemon.trainer.probe import part_lift, probe_parts

    before, after = trainer.last_measures
    out: dict[str, Any] = {"by_target": {}, "by_family": {}}
    for target in rt.probe_by_target:
        parts = probe_parts(rt.items, before, target, trainer.foothold_probability)
        pl = part_lift(before, after, parts.target)
        if pl is not None:
            out["by_target"][target] = _part_json(pl)
    parts = probe_parts(rt.items, before, None, trainer.foothold_probability)
    foothold = set(parts.transfer)
    for fam in dict.fromkeys(rt.families):
        idx = [i for i, f in enumerate(rt.families) if f == fam and i in foothold]
        pl = part_lift(before, after, idx)
        out["by_family"][fam] = None if pl is None else _part_json(pl)
    return out


def _part_json(p: Any) -> dict[str, float]:
    return {"items": p.items, "nll_lift": p.nll_lift, "acc_lift": p.acc_lift}


def _lift_row(res: Any) -> dict[str, Any]:
    def part(p: Any) -> dict[str, float] | None:
        return None if p is None else p.model_dump()

    return {
        "label": res.label,
        "target": res.target,
        "nll_lift": res.nll_lift,
        "acc_lift": res.acc_lift,
        "acc_before": res.acc_before,
        "acc_after": res.acc_after,
        "target_lift": part(res.target_lift),
        "transfer_lift": part(res.transfer_lift),
        "collateral_lift": part(res.collateral_lift),
        "reward_before": res.train_reward_before,
        "reward_after": res.train_reward_after,
        "duration_s": res.duration_s,
    }


def measure_battery(
    rt: Runtime, cfg: EvalConfig, cache: ResultCache, work: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Features and per-seed probe-and-revert lift of every battery cohort (cached)."""
    specs = list(battery_specs(cfg))
    rows: list[dict[str, Any]] = []
    trainers: dict[int, Any] = {}
    featured_by = code_hash(FEATURED_BY)
    try:
        for n, (cid, subject, variant, seed) in enumerate(specs, 1):
            row = cache.get("cohort", cid, featured_by)
            cand = None
            if row is None:
                rt.reset()
                clock = Clock()
                cand = make_cohort(rt, cfg, cid, subject, variant, seed)
                row = cache.put(
                    ("cohort", cid, featured_by),
                    {
                        "cohort_id": cid,
                        "subject": subject,
                        "variant": variant,
                        "families": list(cand.families),
                        "features": cand.features,
                        "similarity": cand.similarity,
                        "alignment": cand.alignment,
                        **clock.seconds(),
                    },
                )
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
                    clock = Clock()
                    res = trainers[s].on_dispatch(dispatch_of(cand), time.time()).result
                    got = cache.put(
                        ("lift", cid, str(s)),
                        {
                            **_lift_row(res),
                            **per_target_lifts(rt, trainers[s]),
                            **clock.seconds(),
                        },
                    )
                lifts.append(got)
            rows.append({**row, "seeds": lifts})
            log(f"[{n}/{len(specs)}] {cid}: label " + " ".join(f"{x['label']:+.4f}" for x in lifts))
    finally:
        for t in trainers.values():
            t.close()
    rt.reset()
    return rows


def table_of(rows: Sequence[Mapping[str, Any]], target: str | None = None) -> list[ev.CohortResult]:
    """The battery as labelled cohorts: the lift on their own target, or on ``target``."""
    out = []
    for r in rows:
        t = target or r["subject"]
        feats = (
            dict(r["features"])
            if target is None
            else {
                **r["features"],
                "target_similarity": r["similarity"][t],
                "update_alignment": r["alignment"][t],
            }
        )
        seeds = r["seeds"]
        if target is None:
            lifts = tuple(float(s["label"]) for s in seeds)
            accs = tuple(
                float(s["target_lift"]["acc_lift"]) if s["target_lift"] else 0.0 for s in seeds
            )
        else:
            got = [s["by_target"].get(t) for s in seeds]
            if any(g is None for g in got):
                continue
            lifts = tuple(float(g["nll_lift"]) for g in got)
            accs = tuple(float(g["acc_lift"]) for g in got)
        out.append(ev.CohortResult(r["cohort_id"], r["subject"], r["variant"], feats, lifts, accs))
    return out


# ----------------------------------------------------------------- predictors


def fit_predict_kind(kind: str, seed: int = 0) -> ev.FitPredict:
    """One model kind of tapd's predictor, fitted on the training labels of a fold.

    As the product serves it: zero for a cohort without a learning signal
    (``daemon.core.predictor.has_learning_signal``), batch kinds fitted on the
    cohorts with one.
    """
    from daemon.core.features import feature_vector
    from daemon.core.predictor import (
        AdvStdHeuristic,
        RiverStage,
        fit_batch,
        has_learning_signal,
        predict_rows,
    )

    def fit_predict(
        xs: Sequence[Mapping[str, float]], ys: Sequence[float], test: Sequence[Mapping[str, float]]
    ) -> list[float]:
        def served(stage: Any) -> list[float]:
            return [stage.predict(x).lift if has_learning_signal(x) else 0.0 for x in test]

        if kind == "heuristic":
            h = AdvStdHeuristic()
            for x, y in zip(xs, ys, strict=True):
                h.learn(x, y)
            return served(h)
        if kind == "river":
            r = RiverStage(seed=seed)
            order = list(range(len(ys)))
            random.Random(seed).shuffle(order)
            for i in order:
                r.learn(xs[i], ys[i])
            return served(r)
        X = np.asarray([feature_vector(x) for x in xs])
        stage = fit_batch(kind, X, np.asarray(ys, dtype=np.float64), seed=seed)
        return [
            float(v) for v in predict_rows(stage, np.asarray([feature_vector(x) for x in test]))
        ]

    return fit_predict


def _standardized(
    xs: Sequence[Mapping[str, float]], test: Sequence[Mapping[str, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Training and test features standardized on the training rows (the baselines' input)."""
    from daemon.core.features import feature_vector

    X = np.asarray([feature_vector(x) for x in xs])
    T = np.asarray([feature_vector(x) for x in test])
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (X - mu) / sd, (T - mu) / sd


def plain_knn(
    xs: Sequence[Mapping[str, float]], ys: Sequence[float], test: Sequence[Mapping[str, float]]
) -> list[float]:
    """The baseline: 3 nearest neighbours on every standardized feature, nothing else."""
    Z, ZT = _standardized(xs, test)
    y = np.asarray(ys, dtype=np.float64)
    d = ((ZT[:, None, :] - Z[None, :, :]) ** 2).sum(axis=2)
    near = np.argsort(d, axis=1, kind="stable")[:, : min(3, len(y))]
    return [float(v) for v in y[near].mean(axis=1)]


def plain_ridge(
    xs: Sequence[Mapping[str, float]], ys: Sequence[float], test: Sequence[Mapping[str, float]]
) -> list[float]:
    """The baseline: ridge with a fixed penalty (1.0) on every standardized feature."""
    Z, ZT = _standardized(xs, test)
    y = np.asarray(ys, dtype=np.float64)
    coef = np.linalg.solve(Z.T @ Z + np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
    return [float(v) for v in ZT @ coef + y.mean()]


def router(seed: int = 0) -> Any:
    """tapd's predictor as the product builds it (heuristic -> River -> refits)."""
    from daemon.config import PredictorSettings
    from daemon.core.predictor import Predictor

    return Predictor(PredictorSettings(seed=seed))


def served_kind(xs: Sequence[Mapping[str, float]], ys: Sequence[float], seed: int = 0) -> str:
    """The stage tapd's router serves after learning these labels (in a shuffled order)."""
    p = router(seed)
    order = list(range(len(ys)))
    random.Random(seed).shuffle(order)
    for i in order:
        p.learn(xs[i], ys[i])
    return str(p.stage)


def nested_router(seed: int = 0) -> ev.FitPredict:
    """The router per fold, fed the fold's training labels: its kind may differ by fold."""

    def fit_predict(
        xs: Sequence[Mapping[str, float]], ys: Sequence[float], test: Sequence[Mapping[str, float]]
    ) -> list[float]:
        p = router(seed)
        order = list(range(len(ys)))
        random.Random(seed).shuffle(order)
        for i in order:
            p.learn(xs[i], ys[i])
        return [p.predict(x).lift for x in test]

    return fit_predict


# ------------------------------------------------------------------ analysis


def evaluate_battery(cfg: EvalConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every ranking number of the report, from the cached battery."""
    full = table_of(rows)
    honest = [c for c in full if not c.broken]
    out: dict[str, Any] = {"n_cohorts": len(full), "n_honest": len(honest)}
    rel = ev.label_reliability(ev.seed_matrix(honest))
    rel_all = ev.label_reliability(ev.seed_matrix(full))
    out["reliability"] = dataclasses.asdict(rel)
    out["reliability_all"] = dataclasses.asdict(rel_all)
    kind = served_kind([c.features for c in honest], [c.lift for c in honest])
    out["served_kind"] = kind
    kw = {"fraction": cfg.top_fraction, "n_resamples": cfg.bootstrap}

    def est(e: ev.Estimate) -> dict[str, float]:
        return {"value": e.value, "lo": e.lo, "hi": e.hi}

    def report(table: Sequence[ev.CohortResult], score: np.ndarray) -> dict[str, Any]:
        r = ev.score_report(table, score, **kw)  # type: ignore[arg-type]
        return {
            "spearman": est(r.spearman),
            "pairwise": est(r.pairwise),
            "gain_nats": est(r.gain_nats),
            "gain_relative": r.gain_relative,
        }

    fitted: dict[str, ev.FitPredict] = {k: fit_predict_kind(k) for k in KINDS}
    fitted["tapd"] = fit_predict_kind(kind)
    fitted["tapd_nested"] = nested_router()
    fitted["ridge_plain"] = plain_ridge
    fitted["knn_plain"] = plain_knn
    for name, table in (("honest", honest), ("all", full)):
        sec: dict[str, Any] = {}
        y = ev.actual_lifts(table)
        for split, fn in (("loco", ev.leave_one_cell_out), ("loso", ev.leave_one_subject_out)):
            sec[split] = {}
            for m, fp in fitted.items():
                pred = fn(table, fp)
                sec[split][m] = report(table, pred)
                if name == "honest" and split == "loco" and m == "tapd":
                    out["loco_predictions"] = pred.tolist()
            per_subject = {}
            pred = fn(table, fitted["tapd"])
            for s in cfg.subjects:
                idx = [i for i, c in enumerate(table) if c.subject == s]
                if len(idx) >= 3:
                    per_subject[s] = {
                        "n": len(idx),
                        "spearman": ev.spearman(pred[idx], y[idx]),
                        "gain_nats": ev.selection_gain(
                            pred[idx], y[idx], cfg.top_fraction
                        ).absolute,
                    }
            sec[split + "_per_subject"] = per_subject
        sec["signals"] = {k: report(table, v) for k, v in ev.signal_scores(table).items()}
        sec["random"] = {"spearman": 0.0, "gain_nats": 0.0}
        seeds_matrix = ev.seed_matrix(table)
        oracle = ev.oracle_crossfit_gain(seeds_matrix, cfg.top_fraction)
        sec["oracle"] = {
            "gain_nats": oracle.absolute,
            "perfect_gain_nats": ev.selection_gain(y, y, cfg.top_fraction).absolute,
        }
        sec["mean_label"] = float(y.mean())
        # What knowing each held-out cell's own mean label exactly, and nothing
        # within a cell, would reach: the most a model that ranks cells can.
        cell_mean = {
            cell: float(np.mean([v for c, v in zip(table, y, strict=True) if c.cell == cell]))
            for cell in {c.cell for c in table}
        }
        cell_score = np.array([cell_mean[c.cell] for c in table])
        sec["cell_mean_spearman"] = ev.spearman(cell_score, y)
        sec["cell_mean_gain_nats"] = ev.selection_gain(cell_score, y, cfg.top_fraction).absolute
        sec["savings"] = {
            "tapd": ev.savings_curve(out["loco_predictions"] if name == "honest" else y, y)
            if name == "honest"
            else [],
        }
        out[name] = sec
    out["halves"] = battery_halves(cfg, honest, fitted["tapd"])
    out["within_cell"] = within_cell(honest, np.asarray(out["loco_predictions"]))
    out["by_variant"] = {
        v: {
            "n": sum(c.variant == v for c in full),
            "label": float(np.mean([c.lift for c in full if c.variant == v])),
            "acc_lift": float(np.mean([np.mean(c.accuracy_lifts) for c in full if c.variant == v])),
            "pass_rate": float(np.mean([c.features["pass_rate"] for c in full if c.variant == v])),
            "adv_std": float(np.mean([c.features["adv_std"] for c in full if c.variant == v])),
            "transfer": _mean_part(rows, v, "transfer_lift"),
            "collateral": _mean_part(rows, v, "collateral_lift"),
            "pooled": float(
                np.mean([s["nll_lift"] for r in rows if r["variant"] == v for s in r["seeds"]])
            ),
        }
        for v in cfg.variants
        if any(c.variant == v for c in full)
    }
    out["integrity"] = integrity(cfg, rows)
    return out


def battery_halves(
    cfg: EvalConfig, honest: Sequence[ev.CohortResult], tapd: ev.FitPredict
) -> list[dict[str, Any]]:
    """LOCO figures on each half of every cell's cohorts (0..n/2-1 and n/2..n-1), alone.

    The second half was added after the first (with fresh seeds): a figure
    that holds on both halves separately does not come from one draw.
    """
    n = cfg.cohorts_per_cell
    if n < 4:
        return []
    out = []
    for lo, hi in ((0, n // 2), (n // 2, n)):
        half = [c for c in honest if lo <= int(c.cohort_id.rsplit("-", 1)[1]) < hi]
        y = ev.actual_lifts(half)
        row: dict[str, Any] = {"cohorts": f"{lo}-{hi - 1}", "n": len(half)}
        for name, fp in (("tapd", tapd), ("knn_plain", plain_knn), ("ridge_plain", plain_ridge)):
            pred = ev.leave_one_cell_out(half, fp)
            row[name] = {
                "spearman": ev.spearman(pred, y),
                "gain_nats": ev.selection_gain(pred, y, cfg.top_fraction).absolute,
            }
        signals = {
            k: ev.selection_gain(v, y, cfg.top_fraction).absolute
            for k, v in ev.signal_scores(half).items()
        }
        row["best_signal_gain_nats"] = max(signals.values())
        row["oracle_gain_nats"] = ev.oracle_crossfit_gain(
            ev.seed_matrix(half), cfg.top_fraction
        ).absolute
        out.append(row)
    return out


# The features reported on their own beside the baselines: tapd's two that
# rank by what the cohort would teach its target.
OWN_SIGNALS = ("update_alignment", "pass_var_per_token")


def within_cell(honest: Sequence[ev.CohortResult], loco: np.ndarray) -> dict[str, Any]:
    """How well each scorer ranks the cohorts *inside* a (subject, variant) cell.

    Leave-one-cell-out cannot go beyond the cell-mean ceiling without this.
    The mean over the cells whose labels vary (a no-foothold cell's are all 0)
    of the Spearman between score and label; tapd's score is its
    leave-one-cell-out prediction, the others are features used as they are.
    Each signal's Spearman over all honest cohorts is given beside it.
    """
    y = ev.actual_lifts(honest)
    scores: dict[str, np.ndarray] = {"tapd": loco}
    for name in OWN_SIGNALS:
        scores[name] = np.array([float(c.features[name]) for c in honest], dtype=np.float64)
    scores.update(ev.signal_scores(honest))
    cells: dict[str, list[int]] = {}
    for i, c in enumerate(honest):
        cells.setdefault(c.cell, []).append(i)
    varying = [idx for idx in cells.values() if float(np.ptp(y[idx])) > 1e-6]
    out: dict[str, Any] = {"cells": len(varying)}
    for name, sc in scores.items():
        per = [ev.spearman(sc[idx], y[idx]) for idx in varying]
        per = [r for r in per if math.isfinite(r)]
        out[name] = {
            "within": float(np.mean(per)) if per else math.nan,
            "overall": ev.spearman(sc, y),
        }
    return out


def _mean_part(rows: Sequence[Mapping[str, Any]], variant: str, part: str) -> float:
    xs = [
        s[part]["nll_lift"] for r in rows if r["variant"] == variant for s in r["seeds"] if s[part]
    ]
    return float(np.mean(xs)) if xs else math.nan


def integrity(cfg: EvalConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The gate on the battery: what it lets through, and what streaming the battery trains."""
    from daemon.config import Thresholds
    from daemon.core.decision import ScoredCohort, decide, recommend
    from daemon.core.predictor import Prediction

    t = Thresholds()
    broken = [r for r in rows if r["variant"] in ev.BROKEN_VARIANTS]
    sound = [r for r in rows if r["variant"] not in ev.BROKEN_VARIANTS]
    passing = [r for r in broken if r["features"]["reward_trust"] >= t.reward_trust_floor]
    false_alarms = [r for r in sound if r["features"]["reward_trust"] < t.reward_trust_floor]
    # Stream the battery through the decision policy in windows, exploration
    # included: which broken-verifier cohorts would be dispatched for training?
    order = list(rows)
    random.Random(0).shuffle(order)
    rng = random.Random(0)
    trained = 0
    for i in range(0, len(order), 8):
        window = order[i : i + 8]
        scored = [
            ScoredCohort(r["cohort_id"], r["features"], Prediction(1.0, 1.0, "eval", "v0"))
            for r in window
        ]
        for r, d in zip(window, decide(scored, t, 0, rng), strict=True):
            trained += d.dispatch and r["variant"] in ev.BROKEN_VARIANTS
    weak = [r for r in rows if r["variant"] == "weak_verifier"]

    def change(rs: Sequence[Mapping[str, Any]], a: str, b: str) -> dict[str, float]:
        e = ev.t_interval([s[b] - s[a] for r in rs for s in r["seeds"]])
        return {"value": e.value, "lo": e.lo, "hi": e.hi}

    return {
        "floor": t.reward_trust_floor,
        "n_broken": len(broken),
        "broken_passing_gate": len(passing),
        "broken_trained": trained,
        "n_sound": len(sound),
        "sound_flagged": len(false_alarms),
        "max_broken_trust": max((r["features"]["reward_trust"] for r in broken), default=math.nan),
        "fix_verifier": sum(
            recommend(r["features"], Prediction(1.0, 1.0, "eval", "v0"), t)[0] == "fix_verifier"
            for r in broken
        ),
        "weak_reward_change": change(weak, "reward_before", "reward_after"),
        "weak_accuracy_change": change(weak, "acc_before", "acc_after"),
        "sound_reward_change": change(sound, "reward_before", "reward_after"),
    }


# ---------------------------------------------------------------- closed loop


def loop_candidates(
    cfg: EvalConfig, run: int, step: int, target: str
) -> list[tuple[str, str, str, int]]:
    """Stratified candidates: learnable and not, on the target and off it; honest verifiers."""
    draw = random.Random(f"loop-draw|{run}|{step}")
    others = [s for s in cfg.subjects if s != target]
    spec = [(target, "frontier"), (target, "mixed"), (target, "easy"), (target, "hard")]
    spec += [(draw.choice(others), "frontier") for _ in range(2)]
    spec += [(draw.choice(others), draw.choice(("mixed", "easy", "frontier")))]
    spec += [(draw.choice(others), "frontier")]
    while len(spec) < cfg.loop_candidates:
        spec.append((draw.choice(cfg.subjects), draw.choice(("frontier", "mixed", "easy", "hard"))))
    spec = spec[: cfg.loop_candidates]
    draw.shuffle(spec)
    return [
        (f"loop-r{run}-t{step}-{j}-{s}-{v}", s, v, draw.randrange(2**31))
        for j, (s, v) in enumerate(spec)
    ]


def warm_labels(
    rows: Sequence[Mapping[str, Any]], target: str
) -> tuple[list[dict[str, float]], list[float]]:
    """Labels of a probe-and-revert battery that leaves the target subject out entirely.

    Every honest cohort of another subject, labelled with its lift on every
    other target (its own and the others'), its target_similarity computed
    against that target: the predictor learns what on- and off-target look like.
    """
    xs: list[dict[str, float]] = []
    ys: list[float] = []
    for r in rows:
        if r["subject"] == target or r["variant"] in ev.BROKEN_VARIANTS:
            continue
        for t in sorted(r["similarity"]):
            if t == target:
                continue
            got = [s["by_target"].get(t) for s in r["seeds"]]
            if any(g is None for g in got):
                continue
            xs.append(
                {
                    **r["features"],
                    "target_similarity": r["similarity"][t],
                    "update_alignment": r["alignment"][t],
                }
            )
            ys.append(float(np.mean([g["nll_lift"] for g in got])))
    return xs, ys


def run_loop(
    rt: Runtime,
    cfg: EvalConfig,
    rows: Sequence[Mapping[str, Any]],
    cache: ResultCache,
    work: Path,
    log: Callable[[str], None],
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """The closed loop: per run a fixed target, per step each arm trains its pick.

    Arms: ``none`` (no training), ``random`` (a uniform pick), ``adv_std``
    (the highest adv_std among the candidates the decision policy would
    train), ``tapd`` (the decision policy and its predictor, warm-started on
    the battery without the target subject and learning every realized
    label), ``oracle`` (probe-and-revert every candidate, train the best if it
    helps). Every arm starts from the base policy and sees the same candidate
    cohorts, rolled out against its own current weights.

    With ``jobs`` > 1 the uncached runs go to that many worker processes, each
    with a runtime of its own. A run's numbers do not depend on where it runs:
    every seed in it derives from the run index, and torch is single-threaded
    in each process; each run's CPU seconds are its worker's own.
    """
    decided_by = f"{code_hash(FEATURED_BY)}.{code_hash(DECIDED_BY)}.p{LOOP_PROTOCOL}"
    todo = [r for r in range(cfg.loop_runs) if cache.get("loop", str(r), decided_by) is None]
    if jobs > 1 and len(todo) > 1:
        import concurrent.futures as cf
        import multiprocessing

        # spawn, not fork: the parent holds torch's thread pools and a loaded model.
        with cf.ProcessPoolExecutor(
            max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {pool.submit(_loop_run_in_worker, cfg, r, list(rows), work): r for r in todo}
            for fut in cf.as_completed(futures):
                done = fut.result()
                _log_run(done, log)
                cache.put(("loop", str(futures[fut]), decided_by), done)
    runs = []
    for run in range(cfg.loop_runs):
        got = cache.get("loop", str(run), decided_by)
        if got is None:
            fresh = _loop_run(rt, cfg, run, rows, work)
            _log_run(fresh, log)
            got = cache.put(("loop", str(run), decided_by), fresh)
        runs.append(got)
    rt.reset()
    return runs


def _log_run(got: Mapping[str, Any], log: Callable[[str], None]) -> None:
    for arm, a in got["arms"].items():
        log(
            f"loop run {got['run']} ({got['target']}) {arm}: target NLL "
            + " ".join(f"{v:.4f}" for v in a["target_nll"])
            + f" picks {a['picks']}"
        )


def _loop_run(
    rt: Runtime, cfg: EvalConfig, run: int, rows: Sequence[Mapping[str, Any]], work: Path
) -> dict[str, Any]:
    """Every arm of one paired run, each from the base policy."""
    from daemon.core.decision import recommend
    from daemon.core.predictor import Prediction

    target = cfg.subjects[run % len(cfg.subjects)]
    clock = Clock()
    arms: dict[str, Any] = {}
    xs, ys = warm_labels(rows, target)
    for arm in LOOP_ARMS:
        rt.reset()
        arms[arm] = _loop_arm(rt, cfg, run, target, arm, xs, ys, work, recommend, Prediction)
    return {"run": run, "target": target, "arms": arms, **clock.seconds()}


_WORKER_RUNTIME: Runtime | None = None


def _loop_run_in_worker(
    cfg: EvalConfig, run: int, rows: list[Mapping[str, Any]], work: Path
) -> dict[str, Any]:
    """One run in a worker process; the runtime is loaded once per worker."""
    global _WORKER_RUNTIME
    if _WORKER_RUNTIME is None:
        _WORKER_RUNTIME = Runtime.load(cfg)
    return _loop_run(_WORKER_RUNTIME, cfg, run, rows, work)


def _loop_arm(
    rt: Runtime,
    cfg: EvalConfig,
    run: int,
    target: str,
    arm: str,
    xs: Sequence[Mapping[str, float]],
    ys: Sequence[float],
    work: Path,
    recommend: Any,
    Prediction: Any,
) -> dict[str, Any]:
    from daemon.trainer.probe import part_lift, probe_parts

    base = rt.probe.measure(rt.model, rt.tok)
    # The items the curve follows: the target's items with a foothold at the start.
    parts = probe_parts(rt.items, base, target)
    fixed_target = parts.target

    def target_nll(report: Any) -> float:
        pl = part_lift(base, report, fixed_target)
        return pl.nll_after if pl is not None else math.nan

    curve = [target_nll(base)]
    picks: list[str] = []
    if arm == "none":
        return {
            "target_nll": curve * (cfg.loop_steps + 1),
            "picks": ["none"] * cfg.loop_steps,
            "transfer_change": 0.0,
            "collateral_change": 0.0,
            "predicted": [],
            "realized": [],
        }
    d = work / f"loop-{run}-{arm}"
    shutil.rmtree(d, ignore_errors=True)
    trainer = rt.trainer(cfg, 1000 + run, "continual", d)
    predictor = None
    if arm == "tapd":
        predictor = router(seed=run)
        order = list(range(len(ys)))
        random.Random(run).shuffle(order)
        for i in order:
            predictor.learn(xs[i], ys[i])
    pick_rng = random.Random(f"loop-pick|{run}")
    predicted: list[float] = []
    realized: list[float] = []
    last = base
    try:
        for step in range(cfg.loop_steps):
            cands = [
                make_cohort(rt, cfg, cid, s, v, seed, align=arm == "tapd")
                for cid, s, v, seed in loop_candidates(cfg, run, step, target)
            ]
            feats = [c.features_for(target) for c in cands]
            choice: int | None
            if arm == "random":
                choice = pick_rng.randrange(len(cands))
            elif arm == "adv_std":
                pool = [
                    i
                    for i, f in enumerate(feats)
                    if recommend(
                        f, Prediction(f["adv_std"], 0.0, "heuristic", "v0"), rt.thresholds
                    )[0]
                    == "train"
                ]
                choice = max(pool, key=lambda i: feats[i]["adv_std"]) if pool else None
            elif arm == "tapd":
                assert predictor is not None
                preds = [predictor.predict(f) for f in feats]
                pool = [
                    i
                    for i, (f, p) in enumerate(zip(feats, preds, strict=True))
                    if recommend(f, p, rt.thresholds)[0] == "train"
                ]
                choice = max(pool, key=lambda i: preds[i].lift) if pool else None
                if choice is not None:
                    predicted.append(preds[choice].lift)
            else:  # oracle: look ahead at every candidate, train the best
                look = rt.trainer(
                    cfg,
                    1000 + run,
                    "probe_revert",
                    d / f"look-{step}",
                    rt.target_probe(target, cfg),
                )
                gains = [
                    look.on_dispatch(dispatch_of(c, target=target), 0.0).result.label for c in cands
                ]
                look.close()
                best = int(np.argmax(gains))
                choice = best if gains[best] > 0 else None
            if choice is None:
                picks.append("none")
                curve.append(curve[-1])
                continue
            c = cands[choice]
            res = trainer.on_dispatch(dispatch_of(c, target=target), 0.0).result
            last = trainer.last_measures[1]
            realized.append(res.label)
            if predictor is not None:
                predictor.learn(feats[choice], res.label)
            picks.append(f"{c.subject}/{c.variant}")
            curve.append(target_nll(last))
    finally:
        trainer.close()
    transfer = part_lift(base, last, parts.transfer)
    collateral = part_lift(base, last, parts.collateral)
    return {
        "target_nll": curve,
        "picks": picks,
        # NLL *change* (after - before; lower is better) off the target.
        "transfer_change": -transfer.nll_lift if transfer is not None else 0.0,
        "collateral_change": -collateral.nll_lift if collateral is not None else 0.0,
        "predicted": predicted,
        "realized": realized,
    }


def evaluate_loop(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    auc = {a: [ev.loop_auc(r["arms"][a]["target_nll"]) for r in runs] for a in LOOP_ARMS}
    out: dict[str, Any] = {"runs": len(runs), "auc": auc}

    def pc(arm: str, other: str) -> dict[str, Any]:
        return _paired_json(ev.paired(auc, arm, other))

    out["tapd_vs"] = {o: pc("tapd", o) for o in ("random", "adv_std", "none", "oracle")}
    out["oracle_vs_random"] = pc("oracle", "random")
    out["adv_std_vs_random"] = pc("adv_std", "random")
    out["mean_auc"] = {a: float(np.mean(v)) for a, v in auc.items()}
    out["transfer_change"] = {
        a: float(np.mean([r["arms"][a]["transfer_change"] for r in runs])) for a in LOOP_ARMS
    }
    out["collateral_change"] = {
        a: float(np.mean([r["arms"][a]["collateral_change"] for r in runs])) for a in LOOP_ARMS
    }
    out["trained_steps"] = {
        a: int(sum(p != "none" for r in runs for p in r["arms"][a]["picks"])) for a in LOOP_ARMS
    }
    out["on_target_picks"] = {
        a: int(
            sum(
                p.split("/")[0] == r["target"]
                for r in runs
                for p in r["arms"][a]["picks"]
                if p != "none"
            )
        )
        for a in LOOP_ARMS
    }
    pr = [
        (p, y)
        for r in runs
        for p, y in zip(r["arms"]["tapd"]["predicted"], r["arms"]["tapd"]["realized"], strict=False)
    ]
    out["tapd_online_spearman"] = (
        ev.spearman([p for p, _ in pr], [y for _, y in pr]) if len(pr) >= 3 else math.nan
    )
    # The AUC weighs early steps most; the final level and the steps that go
    # back to a target already trained show what it hides (diminishing or
    # negative returns of training one subject again and again).
    final = {
        a: [r["arms"][a]["target_nll"][0] - r["arms"][a]["target_nll"][-1] for r in runs]
        for a in LOOP_ARMS
    }
    out["final_gain"] = {a: float(np.mean(v)) for a, v in final.items()}
    out["final_vs"] = {
        f"{arm} - {other}": _paired_json(ev.paired(final, arm, other))
        for arm, other in (("tapd", "random"), ("tapd", "adv_std"), ("adv_std", "random"))
    }
    out["on_target_steps"] = {a: _on_target_steps(runs, a) for a in LOOP_ARMS if a != "none"}
    out["tapd_by_step"] = _tapd_by_step(runs)
    out["per_step"] = {
        a: [
            float(
                np.mean(
                    [r["arms"][a]["target_nll"][j] - r["arms"][a]["target_nll"][0] for r in runs]
                )
            )
            for j in range(len(runs[0]["arms"][a]["target_nll"]))
        ]
        for a in LOOP_ARMS
    }
    return out


def _tapd_by_step(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Per step, tapd's picks on the run's target and off it: count, mean predicted
    lift and mean realized label (the lift its trainer measured on the target).

    What the predictor expected next to what it got, step by step: whether the
    labels it learns in the loop change what it expects of the next pick.
    """
    steps = len(runs[0]["arms"]["tapd"]["picks"]) if runs else 0
    got: list[dict[str, list[tuple[float, float]]]] = [{"on": [], "off": []} for _ in range(steps)]
    for r in runs:
        a = r["arms"]["tapd"]
        trained = iter(zip(a["predicted"], a["realized"], strict=True))
        for j, pick in enumerate(a["picks"]):
            if pick == "none":
                continue
            got[j]["on" if pick.split("/")[0] == r["target"] else "off"].append(next(trained))
    return [
        {
            side: {
                "n": float(len(v)),
                "predicted": float(np.mean([p for p, _ in v])) if v else math.nan,
                "realized": float(np.mean([y for _, y in v])) if v else math.nan,
            }
            for side, v in step.items()
        }
        for step in got
    ]


def _paired_json(c: Any) -> dict[str, Any]:
    return {
        "mean": {"value": c.mean.value, "lo": c.mean.lo, "hi": c.mean.hi},
        "wins": c.wins,
        "n": c.n,
        "p_value": c.p_value,
        "p_wilcoxon": c.p_wilcoxon,
    }


def _on_target_steps(runs: Sequence[Mapping[str, Any]], arm: str) -> dict[str, Any]:
    """The arm's steps trained on the run's target: the first one, and the later ones.

    Each step's gain is its own drop in target NLL (nats, positive = better).
    """
    first: list[float] = []
    again: list[float] = []
    for r in runs:
        a = r["arms"][arm]
        nll = a["target_nll"]
        seen = False
        for j, pick in enumerate(a["picks"]):
            if pick == "none" or pick.split("/")[0] != r["target"]:
                continue
            (again if seen else first).append(float(nll[j] - nll[j + 1]))
            seen = True
    return {
        "first": len(first),
        "first_gain": float(np.mean(first)) if first else math.nan,
        "again": len(again),
        "again_gain": float(np.mean(again)) if again else math.nan,
    }


# ------------------------------------------------------------------ the report


def headline(
    battery: Mapping[str, Any], loop: Mapping[str, Any] | None, cpu_s: float
) -> dict[str, float]:
    """The keys issue readers and CI look for, each a number (NaN where not measured).

    ``cpu_s``: the CPU seconds of every unit the report uses (a fresh reproduction's cost).
    """
    h = battery["honest"]
    loco, loso = h["loco"], h["loso"]
    baselines_loco = {
        **{k: loco[k]["spearman"]["value"] for k in ("ridge_plain", "knn_plain")},
        **{k: v["spearman"]["value"] for k, v in h["signals"].items()},
        "random": 0.0,
    }
    signal_gain = {k: v["gain_nats"]["value"] for k, v in h["signals"].items()}
    signal_gain["random"] = 0.0
    it = battery["integrity"]
    out = {
        "label_reliability": battery["reliability"]["reliability"],
        "label_noise_ceiling": battery["reliability"]["ceiling"],
        "loco_spearman": loco["tapd"]["spearman"]["value"],
        "loso_spearman": loso["tapd"]["spearman"]["value"],
        "loco_spearman_best_baseline": max(baselines_loco.values()),
        "loco_spearman_cell_mean_ceiling": h["cell_mean_spearman"],
        "top10_gain_nats_cell_mean_ceiling": h.get("cell_mean_gain_nats", math.nan),
        "top10_gain_nats": loco["tapd"]["gain_nats"]["value"],
        "top10_gain_nats_best_baseline": max(signal_gain.values()),
        "top10_gain_nats_oracle": h["oracle"]["gain_nats"],
        "broken_verifier_cohorts_trained": float(it["broken_trained"]),
        "broken_verifier_cohorts_passing_gate": float(it["broken_passing_gate"]),
        "loop_paired_runs": float(loop["runs"]) if loop else 0.0,
        "loop_advantage_vs_random": loop["tapd_vs"]["random"]["mean"]["value"]
        if loop
        else math.nan,
        "loop_p_value_vs_random": loop["tapd_vs"]["random"]["p_value"] if loop else math.nan,
        "loop_advantage_vs_adv_std": loop["tapd_vs"]["adv_std"]["mean"]["value"]
        if loop
        else math.nan,
        "loop_p_value_vs_adv_std": loop["tapd_vs"]["adv_std"]["p_value"] if loop else math.nan,
        # Secondary: the target-NLL drop after the last step, tapd's arm minus the other's.
        "loop_final_advantage_vs_random": loop["final_vs"]["tapd - random"]["mean"]["value"]
        if loop
        else math.nan,
        "loop_final_advantage_vs_adv_std": loop["final_vs"]["tapd - adv_std"]["mean"]["value"]
        if loop
        else math.nan,
        "eval_cpu_minutes": cpu_s / 60,
    }
    return {k: float(v) for k, v in out.items()}


def best_name(d: Mapping[str, float]) -> str:
    return max(d, key=lambda k: d[k])


# The documented cost of a fresh `tapd eval` on a 2-core machine.
MAX_CPU_MINUTES = 60

TARGETS = (
    ("loco_spearman", ">= 0.80 and above the best baseline"),
    ("top10_gain_nats", ">= 70 % of the oracle's and >= 1.5x the best single signal's"),
    ("loop_p_value_vs_random", "< 0.05 over >= 8 paired runs, and tapd beats adv_std + gate"),
    ("broken_verifier_cohorts_passing_gate", "0 (and 0 trained)"),
    ("eval_cpu_minutes", f"<= {MAX_CPU_MINUTES} CPU-minutes for a fresh reproduction"),
)


def targets_met(h: Mapping[str, float]) -> dict[str, bool]:
    return {
        "loco_spearman": h["loco_spearman"] >= 0.80
        and h["loco_spearman"] > h["loco_spearman_best_baseline"],
        "top10_gain_nats": h["top10_gain_nats"] >= 0.7 * h["top10_gain_nats_oracle"]
        and h["top10_gain_nats"] >= 1.5 * h["top10_gain_nats_best_baseline"],
        "loop_p_value_vs_random": h["loop_paired_runs"] >= 8
        and h["loop_p_value_vs_random"] < 0.05
        and h["loop_advantage_vs_adv_std"] > 0.0,
        "broken_verifier_cohorts_passing_gate": h["broken_verifier_cohorts_passing_gate"] == 0
        and h["broken_verifier_cohorts_trained"] == 0,
        "eval_cpu_minutes": h["eval_cpu_minutes"] <= MAX_CPU_MINUTES,
    }


def why_missed(s: Mapping[str, Any]) -> list[str]:
    """For each missed target, what the same run measured that explains it."""
    h, b, lp = s["headline"], s["battery"], s["loop"]
    met = targets_met(h)
    rel = b["reliability"]
    hon = b["honest"]
    out: list[str] = []
    if not met["loco_spearman"]:
        kinds = {k: hon["loco"][k]["spearman"]["value"] for k in (*KINDS, "ridge_plain")}
        best = best_name(kinds)
        out.append(
            f"* **`loco_spearman` missed.** tapd ({b['served_kind']}) reaches "
            f"{h['loco_spearman']:.2f} against a noise ceiling of {rel['ceiling']:.2f} "
            f"(label reliability {rel['reliability']:.2f}), so the labels are not what limits it; "
            f"the best fixed kind on these folds is {best} ({kinds[best]:.2f}) and the best "
            f"baseline {h['loco_spearman_best_baseline']:.2f}. Leave-one-cell-out removes every "
            "cohort of the held-out (subject, variant) cell, so the model must rank a cell it has "
            "never seen from the other cells of its subject and of its variant. A model that knew "
            "each held-out cell's own mean label exactly, and nothing within a cell, would reach "
            f"{h['loco_spearman_cell_mean_ceiling']:.2f}: beyond that it must also rank the "
            "cohorts of one cell, whose labels differ by more than the seeds do (the label "
            "reliability above)."
            + (
                f" Inside a cell tapd's ranking reaches a mean Spearman of "
                f"{b['within_cell']['tapd']['within']:.2f} (Within a cell)."
                if b.get("within_cell")
                else ""
            )
        )
    if not met["top10_gain_nats"]:
        o, bl = h["top10_gain_nats_oracle"], h["top10_gain_nats_best_baseline"]
        share = h["top10_gain_nats"] / o if o > 0 else math.nan
        out.append(
            f"* **Top-10 % gain missed.** tapd {h['top10_gain_nats']:+.4f} nats = "
            f"{share * 100:.1f} % of the seed cross-fit oracle's {o:+.4f} and "
            # Three decimals: a ratio just under the target must not print as it.
            f"{h['top10_gain_nats'] / bl if bl > 0 else math.nan:.3f}x the best single signal's "
            f"{bl:+.4f}. With {b['n_honest']} honest cohorts the top 10 % is "
            f"{ev.top_k(b['n_honest'], s['config']['top_fraction'])} cohorts, and the CIs in "
            "the table show how wide that is. The oracle itself gets "
            f"{o / bl if bl > 0 else math.nan:.2f}x the best single signal, so 1.5x that signal "
            f"needs {1.5 * bl / o * 100 if o > 0 else math.nan:.1f} % of the oracle's gain."
            + (
                " A model that knew each held-out cell's own mean label exactly, and nothing "
                f"within a cell, would gain {h['top10_gain_nats_cell_mean_ceiling']:+.4f} "
                f"({h['top10_gain_nats_cell_mean_ceiling'] / bl if bl > 0 else math.nan:.2f}x)."
                if math.isfinite(h.get("top10_gain_nats_cell_mean_ceiling", math.nan))
                else ""
            )
        )
    if not met["loop_p_value_vs_random"] and lp is not None:
        out.append(
            f"* **Loop target missed.** Over {lp['runs']} paired runs tapd's advantage over random "
            f"is {h['loop_advantage_vs_random']:+.4f} nats (p = {h['loop_p_value_vs_random']:.3f}) "
            f"and over `adv_std` + gate {h['loop_advantage_vs_adv_std']:+.4f}; the look-ahead "
            f"oracle's advantage over random is {lp['oracle_vs_random']['mean']['value']:+.4f} "
            f"(p = {lp['oracle_vs_random']['p_value']:.3f}), the room any selector has here."
        )
    if met["loop_p_value_vs_random"] and lp is not None:
        adv = lp["tapd_vs"]["adv_std"]
        if adv["p_value"] >= 0.05:
            out.append(
                f"* **Loop target met only as a mean against `adv_std` + gate:** "
                f"{h['loop_advantage_vs_adv_std']:+.4f} nats, p = {adv['p_value']:.2f} "
                f"({adv['wins']}/{adv['n']} wins), which is not evidence that tapd's arm beats it; "
                "after the last step the difference is "
                f"{h['loop_final_advantage_vs_adv_std']:+.4f} nats (see Closed loop)."
            )
    if not met["broken_verifier_cohorts_passing_gate"]:
        it = b["integrity"]
        out.append(
            f"* **Gate target missed.** {it['broken_passing_gate']} broken-verifier cohorts have "
            f"reward_trust >= {it['floor']:.2f} (highest {it['max_broken_trust']:.2f}); "
            f"{it['broken_trained']} were dispatched."
        )
    if not met["eval_cpu_minutes"]:
        out.append(
            f"* **Run cost missed.** A fresh reproduction costs {h['eval_cpu_minutes']:.1f} "
            f"CPU-minutes, {s['loop_cpu_s'] / 60:.1f} of them the closed loop's."
        )
    return out or ["Every target is met in this run."]


def _e(d: Mapping[str, float], digits: int = 2, signed: bool = False) -> str:
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{d['value']:{f}} [{d['lo']:{f}}, {d['hi']:{f}}]"


def render_markdown(s: Mapping[str, Any], command: str, img: str) -> str:
    from daemon.policy.alignment import DEFAULT_ATTEMPTS

    cfg, b, lp, h = s["config"], s["battery"], s["loop"], s["headline"]
    hon, full = b["honest"], b["all"]
    met = targets_met(h)
    rel = b["reliability"]
    lines = [
        "# Evaluation results",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()} ({b['n_cohorts']} battery "
        f"cohorts, {b['n_honest']} with honest verifiers; {cfg['seeds']} probe-and-revert GRPO "
        f"seeds each; {lp['runs'] if lp else 0} paired closed-loop runs). The measurement took "
        f"{s['cpu_s'] / 60:.1f} CPU-minutes, {s['loop_cpu_s'] / 60:.1f} of them the closed "
        f"loop's ({s['wall_s'] / 60:.1f} min of wall time summed over "
        f"its units, single-threaded torch in each process, on a shared {os.cpu_count()}-core "
        f"{platform.machine()} box); this invocation "
        f"{s['invocation_wall_s'] / 60:.1f} min. Config key `{s['config_key']}`, policy "
        f"`{s['policy_key']}`. Every number below comes from that run; rerun the command to "
        "reproduce it (results are cached per config under the state dir, so a rerun resumes). "
        "The tiny policy is built where the evaluation runs, and its weights (the policy key, "
        "a hash of them) have differed between machines' CPUs; every label depends on them, so "
        "figures are reproduced on a machine that builds the same policy key.",
        "",
        "Definitions are in `lab/evaluation.py`. **Label** = the NLL-lift (nats per answer token, "
        "positive = better) on the held-out probe items of the cohort's own target (its subject) "
        "on which the policy had a foothold, mean over seeds (`LiftResult.target_lift`). CIs: 95 % "
        f"cluster bootstrap over (subject, variant) cells ({cfg['bootstrap']} resamples); the loop's "
        "are Student-t over paired runs.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| `loco_spearman` >= 0.80 and above the best baseline | {h['loco_spearman']:.2f} "
        f"(best baseline {h['loco_spearman_best_baseline']:.2f}) | "
        f"{'yes' if met['loco_spearman'] else '**no**'} |",
        f"| top-10 % gain >= 70 % of the oracle's and >= 1.5x the best single signal's | "
        f"{h['top10_gain_nats']:+.4f} nats (oracle {h['top10_gain_nats_oracle']:+.4f}, best "
        f"signal {h['top10_gain_nats_best_baseline']:+.4f}) | "
        f"{'yes' if met['top10_gain_nats'] else '**no**'} |",
        f"| loop beats random, p < 0.05 over >= 8 paired runs, and beats `adv_std` + gate | "
        f"{h['loop_advantage_vs_random']:+.4f} nats, p = {h['loop_p_value_vs_random']:.3f}, "
        f"{h['loop_paired_runs']:.0f} runs; vs `adv_std` {h['loop_advantage_vs_adv_std']:+.4f} | "
        f"{'yes' if met['loop_p_value_vs_random'] else '**no**'} |",
        f"| 0 broken-verifier cohorts pass the gate or get trained | "
        f"{h['broken_verifier_cohorts_passing_gate']:.0f} pass, "
        f"{h['broken_verifier_cohorts_trained']:.0f} trained | "
        f"{'yes' if met['broken_verifier_cohorts_passing_gate'] else '**no**'} |",
        f"| a fresh reproduction costs <= {MAX_CPU_MINUTES} CPU-minutes on a 2-core machine | "
        f"{h['eval_cpu_minutes']:.1f} CPU-minutes | "
        f"{'yes' if met['eval_cpu_minutes'] else '**no**'} |",
        "",
        *why_missed(s),
        "",
        "## Label reliability",
        "",
        f"Single-seed test-retest Spearman (mean over seed pairs, honest cohorts): "
        f"{rel['test_retest']:.3f}; Spearman-Brown reliability of the {rel['seeds']}-seed mean: "
        f"**{rel['reliability']:.3f}**; noise ceiling of any predictor's Spearman "
        f"(its square root): {rel['ceiling']:.3f}. With broken-verifier cohorts: "
        f"{b['reliability_all']['reliability']:.3f}.",
        "",
        "## Predicted vs actual label, held out",
        "",
        f"tapd's router, fed the honest labels as the product learns them, serves the "
        f"**{b['served_kind']}** stage; `tapd` below is that kind, fixed for every fold. "
        "`tapd (router per fold)` runs the router inside each fold (the kind may differ by fold). "
        "Each other row is one fixed model kind or baseline on the same folds.",
        "",
    ]
    for sec, caption in (
        (hon, "honest-verifier cohorts (the headline)"),
        (full, "all cohorts, broken verifiers included"),
    ):
        lines += [
            f"### {caption}",
            "",
            "| scorer | LOCO Spearman | LOSO Spearman | LOCO pairwise | LOCO top-10 % gain, nats | LOSO top-10 % gain, nats |",
            "|---|---|---|---|---|---|",
        ]
        names = {
            "tapd": f"**tapd** ({b['served_kind']})",
            "tapd_nested": "tapd (router per fold)",
            "heuristic": "stage: heuristic (adv_std)",
            "river": "stage: River",
            "ridge": "stage: ridge",
            "knn": "stage: 3-NN",
            "lightgbm": "stage: LightGBM",
            "ensemble": "stage: ensemble (mean of ridge, 3-NN, LightGBM)",
            "ridge_plain": "baseline: plain ridge",
            "knn_plain": "baseline: plain 3-NN",
        }
        for k, label in names.items():
            lo, ls = sec["loco"][k], sec["loso"][k]
            lines.append(
                f"| {label} | {_e(lo['spearman'])} | {_e(ls['spearman'])} | {_e(lo['pairwise'])} | "
                f"{_e(lo['gain_nats'], 4, True)} | {_e(ls['gain_nats'], 4, True)} |"
            )
        for k, v in sec["signals"].items():
            lines.append(
                f"| signal: `{k}` | {_e(v['spearman'])} | (same) | {_e(v['pairwise'])} | "
                f"{_e(v['gain_nats'], 4, True)} | (same) |"
            )
        lines += [
            "| random | 0 | 0 | 0.50 | 0 | 0 |",
            f"| oracle (seed cross-fit) | (ceiling {rel['ceiling']:.2f}) | | | "
            f"{sec['oracle']['gain_nats']:+.4f} | |",
            f"| perfect ranking of the seed-mean labels | 1 | 1 | 1 | "
            f"{sec['oracle']['perfect_gain_nats']:+.4f} | |",
            "",
            f"Mean label {sec['mean_label']:+.4f} nats"
            + (
                f"; tapd's LOCO top-10 % gain is {sec['loco']['tapd']['gain_relative'] * 100:+.0f} % "
                "of it."
                if sec["loco"]["tapd"]["gain_relative"] is not None
                else " (its CI includes zero, so no relative gain is given)."
            ),
            "",
        ]
    lines += [
        f"![predicted vs actual]({img}/scatter.png) ![selection gain]({img}/selection.png)",
        "",
        "### Per held-out subject (tapd, honest cohorts)",
        "",
        "| subject | cohorts | LOCO Spearman | LOSO Spearman | LOSO top-10 % gain, nats |",
        "|---|---|---|---|---|",
    ]
    for subj, r in hon["loso_per_subject"].items():
        lc = hon["loco_per_subject"].get(subj, {"spearman": math.nan})
        lines.append(
            f"| {subj} | {r['n']} | {lc['spearman']:.2f} | {r['spearman']:.2f} | {r['gain_nats']:+.4f} |"
        )
    if b.get("halves"):
        lines += [
            "",
            "### Each half of the battery alone (honest cohorts)",
            "",
            "Cohorts 0 to n/2 - 1 and n/2 to n - 1 of every cell, each half cross-validated on "
            "its own (leave-one-cell-out, the same fixed kind). The second half was measured "
            "after the first, with fresh seeds, and `pass_var_per_token` was chosen on the first: "
            "the second half is the check that a figure is not one draw's.",
            "",
            "| cohorts per cell | n | tapd LOCO Spearman | plain 3-NN | plain ridge "
            "| tapd top-10 % gain, nats | best signal | oracle |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for hv in b["halves"]:
            lines.append(
                f"| {hv['cohorts']} | {hv['n']} | {hv['tapd']['spearman']:.2f} "
                f"| {hv['knn_plain']['spearman']:.2f} | {hv['ridge_plain']['spearman']:.2f} "
                f"| {hv['tapd']['gain_nats']:+.4f} | {hv['best_signal_gain_nats']:+.4f} "
                f"| {hv['oracle_gain_nats']:+.4f} |"
            )
    wc = b.get("within_cell")
    if wc:
        lines += [
            "",
            "### Within a cell (honest cohorts)",
            "",
            f"Mean over the {wc['cells']} cells whose labels vary of the Spearman between each "
            "score and the label inside the cell (tapd: its leave-one-cell-out prediction; the "
            "others: the feature as it is), and the same Spearman over all honest cohorts. "
            "Ranking inside a cell is what a model needs beyond the cell-mean ceiling. "
            "`update_alignment` (docs/FEATURES.md) was added after this battery was measured, "
            f"and its sample ({DEFAULT_ATTEMPTS} fresh attempts per prompt rather than the "
            f"cohort's own {cfg['k']}) was chosen after comparing both on these labels: "
            "its figures here are not a pre-registered test.",
            "",
            "| score | within a cell | all honest cohorts |",
            "|---|---|---|",
        ]
        for name, r in wc.items():
            if name == "cells":
                continue
            label = "**tapd** (LOCO)" if name == "tapd" else f"`{name}`"
            lines.append(f"| {label} | {r['within']:.2f} | {r['overall']:.2f} |")
    lines += ["", "## Closed loop", ""]
    if lp is None:
        lines.append("Not run.")
    else:
        from daemon.config import PredictorSettings

        lines += [
            f"{lp['runs']} paired runs; run r targets subject r mod {len(cfg['subjects'])}; "
            f"{cfg['loop_steps']} cumulative continual GRPO steps per run; each step every arm "
            f"scores {cfg['loop_candidates']} fresh candidate cohorts (stratified: the target's "
            "frontier, mixed, easy and hard cohorts and other subjects' frontier ones; honest "
            "verifiers) against its own current weights. tapd's predictor is warm-started on the "
            "battery without the target subject (cohorts x other targets), then learns every "
            "realized label. Outcome: the area between the start and the target-NLL curve, per "
            "step (nats, positive = better), on the target's items with a foothold at the start.",
            "",
            "| arm | mean AUC, nats | steps trained | on-target picks | off-target NLL change | collateral NLL change |",
            "|---|---|---|---|---|---|",
        ]
        for a in LOOP_ARMS:
            lines.append(
                f"| {a} | {lp['mean_auc'][a]:+.4f} | {lp['trained_steps'][a]} | "
                f"{lp['on_target_picks'][a]} | {lp['transfer_change'][a]:+.4f} | "
                f"{lp['collateral_change'][a]:+.4f} |"
            )
        lines += [
            "",
            "| paired comparison | mean AUC difference [95 % CI] | wins | p (t, one-sided) | p (Wilcoxon) |",
            "|---|---|---|---|---|",
        ]
        for o, c in lp["tapd_vs"].items():
            lines.append(
                f"| tapd - {o} | {_e(c['mean'], 4, True)} | {c['wins']}/{c['n']} | "
                f"{c['p_value']:.3f} | {c['p_wilcoxon']:.3f} |"
            )
        for name, key in (
            ("oracle - random", "oracle_vs_random"),
            ("adv_std - random", "adv_std_vs_random"),
        ):
            c = lp[key]
            lines.append(
                f"| {name} | {_e(c['mean'], 4, True)} | {c['wins']}/{c['n']} | "
                f"{c['p_value']:.3f} | {c['p_wilcoxon']:.3f} |"
            )
        fin = lp["final_gain"]
        lines += [
            "",
            "The AUC weighs the early steps most. The target-NLL drop after the last step, and "
            "the gain of the steps that train on the target (the first such step in a run, and "
            "any later one), show what it does not:",
            "",
            "| arm | target-NLL drop after the last step, nats | first on-target steps | "
            "their mean gain | later on-target steps | their mean gain |",
            "|---|---|---|---|---|---|",
        ]
        for a in LOOP_ARMS:
            ot = lp["on_target_steps"].get(a)
            cells = (
                f"{ot['first']} | {ot['first_gain']:+.4f} | {ot['again']} | {ot['again_gain']:+.4f}"
                if ot is not None
                else "0 | | 0 |"
            )
            lines.append(f"| {a} | {fin[a]:+.4f} | {cells} |")
        lines += [
            "",
            "| paired comparison of the last-step drop | mean difference [95 % CI] | wins | "
            "p (t, one-sided) | p (Wilcoxon) |",
            "|---|---|---|---|---|",
        ]
        for name, c in lp["final_vs"].items():
            lines.append(
                f"| {name} | {_e(c['mean'], 4, True)} | {c['wins']}/{c['n']} | "
                f"{c['p_value']:.3f} | {c['p_wilcoxon']:.3f} |"
            )
        worse = [o for o in ("random", "adv_std") if fin["tapd"] < fin[o]]
        if worse:
            again = lp["on_target_steps"]["tapd"]
            why = (
                f" Its later on-target steps ({again['again']}) lose "
                f"{-again['again_gain']:.4f} nats each: its predictor, learning one realized "
                "label per step, does not see the returns of training one target again fall."
                if again["again"] and again["again_gain"] < 0
                else ""
            )
            lines += [
                "",
                f"**After the last step tapd's arm has lowered the target NLL less than the "
                f"{' and '.join(worse)} arm{'s' if len(worse) > 1 else ''}** "
                f"({fin['tapd']:+.4f} nats against "
                + ", ".join(f"{o} {fin[o]:+.4f}" for o in worse)
                + ")."
                + why,
            ]
        lines += [
            "",
            f"tapd's online predictions vs realized labels in the loop: Spearman "
            f"{lp['tapd_online_spearman']:.2f}. Step by step, its picks on the target and off "
            "it (mean predicted lift, mean realized label; nats):",
            "",
            "| step | on-target picks | predicted | realized | off-target picks | predicted "
            "| realized |",
            "|---|---|---|---|---|---|---|",
        ]
        for j, st in enumerate(lp["tapd_by_step"]):
            sides = [
                f"{x['n']:.0f} | {x['predicted']:+.4f} | {x['realized']:+.4f}"
                if x["n"]
                else "0 | | "
                for x in (st["on"], st["off"])
            ]
            lines.append(f"| {j + 1} | {sides[0]} | {sides[1]} |")
        lines += [
            "",
            "The served model is a batch refit (every "
            f"{PredictorSettings().refit_every_labels} labels, or on drift) fitted on the "
            "warm-start labels (the battery's other subjects, each against the other targets); "
            f"a run adds at most {cfg['loop_steps']} labels to them.",
            "",
            f"![closed loop]({img}/loop.png)",
        ]
    it = b["integrity"]
    lines += [
        "",
        "## Reward integrity",
        "",
        f"Broken-verifier cohorts (scrambled and weak): {it['n_broken']}; passing the gate "
        f"(reward_trust >= {it['floor']:.2f}): **{it['broken_passing_gate']}** (highest trust "
        f"{it['max_broken_trust']:.2f}); dispatched when the battery is streamed through the "
        f"decision policy in windows of 8, exploration included: **{it['broken_trained']}**. "
        f"False alarms on honest cohorts: {it['sound_flagged']} of {it['n_sound']}.",
        "",
        "| cohorts | training reward change | probe accuracy change (all items) |",
        "|---|---|---|",
        f"| weak verifier | {_e(it['weak_reward_change'], 3, True)} | "
        f"{_e(it['weak_accuracy_change'], 3, True)} |",
        f"| honest verifiers | {_e(it['sound_reward_change'], 3, True)} | |",
        "",
        "## The label by control variant",
        "",
        "| variant | cohorts | pass rate | adv_std | label (target) | accuracy lift (target) | transfer | collateral | whole probe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, d in b["by_variant"].items():
        lines.append(
            f"| {v} | {d['n']} | {d['pass_rate']:.2f} | {d['adv_std']:.2f} | {d['label']:+.4f} | "
            f"{d['acc_lift']:+.3f} | {d['transfer']:+.4f} | {d['collateral']:+.4f} | {d['pooled']:+.4f} |"
        )
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    return "\n".join(lines)


README_BEGIN = "<!-- results table: generated by tapd eval, do not edit -->"
README_END = "<!-- end of results table -->"


def readme_table(s: Mapping[str, Any], command: str) -> str:
    """The README's results table, from the same run as RESULTS.md."""
    h, b, lp = s["headline"], s["battery"], s["loop"]
    hon = b["honest"]
    met = targets_met(h)
    rel = b["reliability"]

    def yes(k: str) -> str:
        return "met" if met[k] else "**missed**"

    rows = [
        "| what | tapd | target / seeds | |",
        "|---|---|---|---|",
        f"| label reliability (Spearman-Brown, {rel['seeds']} seeds) | {rel['reliability']:.3f} "
        f"(noise ceiling {rel['ceiling']:.3f}) | seeds: ≈0.80 ceiling | |",
        f"| Spearman, leave-one-cell-out ({b['n_honest']} honest cohorts, {b['served_kind']}) | "
        f"{_e(hon['loco']['tapd']['spearman'])} | >= 0.80 and > best baseline "
        f"{h['loco_spearman_best_baseline']:.2f} | {yes('loco_spearman')} |",
        f"| Spearman, leave-one-subject-out | {_e(hon['loso']['tapd']['spearman'])} | seeds: "
        "≈ no drop | |",
        f"| top-10 % pick minus mean label, nats | {_e(hon['loco']['tapd']['gain_nats'], 4, True)} "
        f"| >= 70 % of oracle {h['top10_gain_nats_oracle']:+.4f}, >= 1.5x best signal "
        f"{h['top10_gain_nats_best_baseline']:+.4f} | {yes('top10_gain_nats')} |",
    ]
    if lp is not None:
        c = lp["tapd_vs"]["random"]
        rows.append(
            f"| closed loop, target-NLL AUC vs random ({lp['runs']} paired runs) | "
            f"{_e(c['mean'], 4, True)} nats, p = {c['p_value']:.3f}; vs adv_std + gate "
            f"{h['loop_advantage_vs_adv_std']:+.4f} (p = {h['loop_p_value_vs_adv_std']:.3f}); "
            f"after the last step vs adv_std {h['loop_final_advantage_vs_adv_std']:+.4f} | "
            f"p < 0.05, beat adv_std | {yes('loop_p_value_vs_random')}"
            + (
                " (vs adv_std only as a mean)"
                if met["loop_p_value_vs_random"] and h["loop_p_value_vs_adv_std"] >= 0.05
                else ""
            )
            + " |"
        )
    it = b["integrity"]
    rows.append(
        f"| broken-verifier cohorts passing the gate / trained | {it['broken_passing_gate']} / "
        f"{it['broken_trained']} of {it['n_broken']} (false alarms {it['sound_flagged']} of "
        f"{it['n_sound']}) | 0 | {yes('broken_verifier_cohorts_passing_gate')} |"
    )
    rows.append(
        f"| CPU-minutes of a fresh reproduction (the closed loop's share) | "
        f"{h['eval_cpu_minutes']:.1f} ({s['loop_cpu_s'] / 60:.1f}) | <= {MAX_CPU_MINUTES} | "
        f"{yes('eval_cpu_minutes')} |"
    )
    return "\n".join(
        [
            README_BEGIN,
            "",
            f"From `{command}` ([RESULTS](docs/RESULTS.md)):",
            "",
            *rows,
            "",
            README_END,
        ]
    )


def update_readme(path: Path, table: str) -> bool:
    """Replace the generated block of ``path``; False when it has no markers."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(head + table + tail)
    return True


def plot(s: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    out = []
    b = s["battery"]
    honest = [c for c in table_of(rows) if not c.broken]
    pred = np.asarray(b["loco_predictions"])
    actual = ev.actual_lifts(honest)
    fig, ax = plt.subplots(figsize=(5, 4))
    for v in dict.fromkeys(c.variant for c in honest):
        m = np.array([c.variant == v for c in honest])
        ax.scatter(pred[m], actual[m], label=v, s=18)
    lo, hi = float(min(pred.min(), actual.min())), float(max(pred.max(), actual.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"predicted label (leave-one-cell-out, {b['served_kind']}), nats")
    ax.set_ylabel("actual target NLL-lift, nats")
    ax.set_title(f"Spearman {b['honest']['loco']['tapd']['spearman']['value']:.2f}")
    ax.legend(fontsize=7)
    out.append(_save(fig, img_dir / "scatter.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    h = b["honest"]
    names = ["tapd", "ridge_plain", "knn_plain", *h["signals"], "oracle"]
    vals, lows, highs = [], [], []
    for n in names:
        if n == "oracle":
            vals.append(h["oracle"]["gain_nats"])
            lows.append(0.0)
            highs.append(0.0)
            continue
        g = h["loco"][n]["gain_nats"] if n in h["loco"] else h["signals"][n]["gain_nats"]
        vals.append(g["value"])
        lows.append(g["value"] - g["lo"])
        highs.append(g["hi"] - g["value"])
    ax.bar(names, vals, yerr=[lows, highs], color=["C0"] + ["C7"] * (len(names) - 2) + ["C2"])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("top-10 % mean label - mean, nats")
    ax.tick_params(axis="x", labelrotation=25, labelsize=7)
    out.append(_save(fig, img_dir / "selection.png"))

    lp = s["loop"]
    if lp is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        for arm, per in lp["per_step"].items():
            ax.plot(range(len(per)), per, marker="o", label=arm)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("cumulative GRPO step")
        ax.set_ylabel("target NLL change, nats (lower is better)")
        ax.legend()
        out.append(_save(fig, img_dir / "loop.png"))

    fig, ax = plt.subplots(figsize=(5, 3))
    per = b["honest"]["loso_per_subject"]
    ax.bar(list(per), [r["spearman"] if math.isfinite(r["spearman"]) else 0 for r in per.values()])
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
    readme: Path | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Measure (resuming from the cache), evaluate, and write RESULTS.md, results.json, plots.

    With ``readme``, the results table between its markers is regenerated too;
    ``jobs`` worker processes share the closed loop's uncached runs.
    """
    cfg.validate()
    clock = Clock()
    rt = Runtime.load(cfg)
    key = cfg.key(rt.policy_key)
    work = state_dir / "eval" / key
    cache = ResultCache(work / "results.jsonl")
    log(f"eval: config {key}, cache {cache.path} ({len(cache.rows)} rows cached)")
    rows = measure_battery(rt, cfg, cache, work, log)
    runs = run_loop(rt, cfg, rows, cache, work, log, jobs) if loop and cfg.loop_runs else []
    battery = evaluate_battery(cfg, rows)
    loop_summary = evaluate_loop(runs)
    # The cost of a fresh reproduction: the seconds of every unit this report uses.
    units = [*rows, *(s for r in rows for s in r["seeds"]), *runs]
    cpu_s = sum(float(u.get("cpu_s", 0.0)) for u in units)
    loop_cpu_s = sum(float(u.get("cpu_s", 0.0)) for u in runs)
    unit_wall_s = sum(float(u.get("wall_s", 0.0)) for u in units)
    wall, _ = clock.lap()
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "config_key": key,
        "policy_key": rt.policy_key,
        "cpu_s": cpu_s,
        "loop_cpu_s": loop_cpu_s,
        "wall_s": unit_wall_s,
        "invocation_wall_s": wall,
        "battery": battery,
        "loop": loop_summary,
    }
    summary["headline"] = headline(battery, loop_summary, cpu_s)
    summary.update(summary["headline"])
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(summary, rows, out_dir / "img")
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    (out_dir / "RESULTS.md").write_text(render_markdown(summary, command, "img"))
    if readme is not None and not update_readme(readme, readme_table(summary, command)):
        log(f"eval: {readme} has no results-table markers; left as is")
    log(f"eval: wrote {out_dir / 'RESULTS.md'} in {wall / 60:.1f} min")
    return summary


def config_for(
    quick: bool, seeds: int | None, cohorts_per_cell: int | None, loop_runs: int | None = None
) -> EvalConfig:
    cfg = QUICK if quick else FULL
    changes: dict[str, Any] = {}
    if seeds is not None:
        changes["seeds"] = seeds
    if cohorts_per_cell is not None:
        changes["cohorts_per_cell"] = cohorts_per_cell
    if loop_runs is not None:
        changes["loop_runs"] = loop_runs
    return dataclasses.replace(cfg, **changes).validate() if changes else cfg.validate()
