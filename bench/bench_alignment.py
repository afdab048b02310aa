"""What ``update_alignment`` costs the scorer, and how noisy it is, per sample size.

    .venv/bin/python -m bench.bench_alignment [--model smollm2|tiny] [--attempts 0,8,32,128]
        [--target SLICE] [--cohorts 6] [--prompts 8] [--tokens N] [--probe-answers 16]
        [--json FILE]

``policy.update_alignment_attempts`` sets how many fresh answers per prompt
the feature's GRPO gradient is estimated from (docs/FEATURES.md); this
measures the trade it sets, on the scorer's own code path
(:meth:`daemon.policy.alignment.UpdateAlignment.measure`, the in-process
Hugging Face engine), for cohorts that carry a learning signal (the only
ones it samples for):

* **cost**: wall and CPU seconds per cohort for the feature, next to the
  baseline measured in the same run: what scoring the cohort costs without
  it (its K attempts sampled and verified, then ``featurize``);
* **noise**: the cohorts are of one target (its capability slice), where
  the feature must rank cohorts the other features cannot tell apart
  (docs/RESULTS.md, "Within a cell"). Each cohort is measured twice from independent samples (at 0,
  two independent draws of the cohort's own K attempts, which is what a
  different set of production attempts would give). Reported: the Spearman
  of the two draws across cohorts, and their mean absolute difference over
  the spread of the values across cohorts (0: the draws agree; about 1.13
  for two unrelated values).

``--model smollm2`` is SmolLM2-135M-Instruct on a reasoning-gym frontier
slice with its held-out probe items, answered in the model's own words as
``tapd probe answers`` does (without, no item has a foothold and the feature
reads 0: it prints both counts) (``tapd build-policy --model smollm2``
first); ``--model tiny`` is the lab's tiny policy on its arithmetic
battery (seconds; the evaluation's organism).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Setup:
    engine: Any
    alignment: Any
    probe: dict[str, list[Any]]  # target -> probe items
    cohort: Callable[[int], tuple[str, list[Any]]]  # seed -> (target, traces without attempts)
    reset: Callable[[], None]
    name: str
    probe_info: dict[str, int] = field(default_factory=dict)


def _tiny(prompts: int, target: str | None) -> Setup:
    from lab import tasks
    from lab.eval_run import EvalConfig, Runtime

    rt = Runtime.load(EvalConfig())
    subject = target or "add"
    if subject not in rt.probe_by_target:
        raise SystemExit(
            f"--target: {subject!r} is not one of {', '.join(sorted(rt.probe_by_target))}"
        )

    def cohort(seed: int) -> tuple[str, list[Any]]:
        batch = tasks.control_cohort("frontier", prompts, seed, subject=subject)  # type: ignore[arg-type]
        return subject, [
            tasks.to_trace(t, policy_version="bench", key=f"a{seed}/{i}")
            for i, t in enumerate(batch)
        ]

    probe = {t: list(v) for t, v in rt.alignment.probe.items()}
    return Setup(rt.engine, rt.alignment, probe, cohort, rt.reset, "tiny")


def _smollm2(prompts: int, target: str | None, answers: int, tokens: int) -> Setup:
    from daemon.policy.alignment import UpdateAlignment
    from daemon.policy.answers import own_answers
    from daemon.policy.hf import HFRolloutEngine
    from daemon.policy.store import format_prompt, load_policy
    from daemon.trainer.probe import DEFAULT_FOOTHOLD_PROBABILITY, Probe, has_foothold
    from daemon.verify.registry import get_verifier
    from lab import rg_tasks
    from lab.smollm2 import prepared_smollm2
    from lab.tasks import to_trace

    path = prepared_smollm2()
    if path is None:
        raise SystemExit("SmolLM2 is not prepared: run `tapd build-policy --model smollm2`")
    model, tok = load_policy(path)
    engine = HFRolloutEngine(model, tok, batch_size=64)
    # By default the slice on which SmolLM2's attempts disagree most (lab.rg_tasks.TIERS).
    sl = rg_tasks.get_slice(target or rg_tasks.tier_slices("frontier")[0].target)
    bare = rg_tasks.probe_items([sl], 8)
    # Answers the policy gives within the completion length (tapd probe answers).
    items = (
        own_answers(bare, engine, answers, seed=0, max_new_tokens=tokens)[0] if answers else bare
    )

    def footholds(its: list[Any]) -> int:
        got = Probe(its, get_verifier, format_prompt, max_new_tokens=tokens).measure(model, tok)
        return sum(has_foothold(x, DEFAULT_FOOTHOLD_PROBABILITY) for x in got.item_nll)

    # What the target's probe offers the label and the feature: the items the
    # policy has a foothold on, with bare references and with its own answers.
    info = {
        "items": len(items),
        "answered": sum(it.answer is not None for it in items),
        "foothold_bare_references": footholds(bare),
        "foothold": footholds(items),
    }
    probe = {sl.target: items}
    alignment = UpdateAlignment(
        model, tok, lambda p: format_prompt(tok, p), probe, DEFAULT_FOOTHOLD_PROBABILITY
    )

    def cohort(seed: int) -> tuple[str, list[Any]]:
        batch = rg_tasks.make_tasks(sl, prompts, seed)
        return sl.target, [
            to_trace(t, policy_version="bench", key=f"a{seed}/{i}") for i, t in enumerate(batch)
        ]

    return Setup(engine, alignment, probe, cohort, lambda: None, "smollm2", info)


def _signal(traces: Sequence[Any]) -> bool:
    return any(len({a.reward for a in t.attempts}) > 1 for t in traces)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def spearman_or_nan(xs: Sequence[float], ys: Sequence[float]) -> float:
    from daemon.core.ranking import spearman

    return spearman(list(xs), list(ys)) if len(xs) >= 3 else math.nan


def run(
    setup: Setup,
    attempts: Sequence[int],
    n_cohorts: int,
    *,
    k: int,
    tokens: int,
    temperature: float,
    max_tries: int = 50,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from daemon.core.features import featurize
    from daemon.policy.rollout import fill_attempts

    found: list[tuple[int, str, list[Any]]] = []  # (seed, target, traces with K attempts)
    floor_wall: list[float] = []
    floor_cpu: list[float] = []
    for seed in range(max_tries):
        if len(found) == n_cohorts:
            break
        setup.reset()
        target, traces = setup.cohort(seed)
        t = _clock()
        filled = fill_attempts(traces, setup.engine, k, seed=seed, max_new_tokens=tokens,
                               temperature=temperature)  # fmt: skip
        prompts = [it.prompt for it in setup.probe[target]]
        featurize(filled.traces, probe_prompts=prompts)
        wall, cpu = _since(t)
        if filled.rejected or not _signal(filled.traces):
            continue  # no learning signal: the feature samples nothing for it
        floor_wall.append(wall)
        floor_cpu.append(cpu)
        found.append((seed, target, list(filled.traces)))
    if len(found) < max(n_cohorts, 1):
        raise SystemExit(f"only {len(found)} of {n_cohorts} cohorts with a learning signal "
                         f"in {max_tries} tries")  # fmt: skip
    floor_s = statistics.median(floor_wall)
    log(f"{setup.name}: {len(found)} cohorts with a learning signal, K = {k}, "
        f"{len(found[0][2])} prompts, {tokens} tokens")  # fmt: skip
    log(f"baseline (K attempts sampled + verified + featurize): "
        f"{floor_s:.2f} s wall, {statistics.median(floor_cpu):.2f} CPU-s per cohort (median)")  # fmt: skip
    # The probe's gradients are kept per policy version, as in the scorer:
    # computed once here, outside the timings (the weights never change).
    setup.alignment(found[0][2], sorted({t for _, t, _ in found}), "bench")
    results: dict[str, Any] = {}
    for a in attempts:
        values: list[list[float]] = [[], []]
        wall_s: list[float] = []
        cpu_s: list[float] = []
        for seed, target, own in found:
            for d in range(2):
                setup.reset()
                traces = own
                if a == 0 and d == 1:
                    # A second, independent set of the cohort's own K attempts.
                    again = fill_attempts(own, setup.engine, k, seed=seed + 104_729,
                                          reprobe_ids=[t.trace_id for t in own],
                                          max_new_tokens=tokens, temperature=temperature)  # fmt: skip
                    traces = list(again.traces)
                t = _clock()
                got = setup.alignment.measure(traces, [target], "bench", setup.engine,
                                              a, seed=seed * 2 + d, max_new_tokens=tokens,
                                              temperature=temperature)  # fmt: skip
                wall, cpu = _since(t)
                values[d].append(float(got[target]))
                if d == 0:
                    wall_s.append(wall)
                    cpu_s.append(cpu)
        spread = statistics.pstdev(values[0] + values[1])
        mad = statistics.fmean(abs(x - y) for x, y in zip(*values, strict=True))
        row = {
            "attempts": a,
            "seconds_wall_median": statistics.median(wall_s),
            "seconds_cpu_median": statistics.median(cpu_s),
            "ratio_to_baseline": statistics.median(wall_s) / floor_s if floor_s > 0 else math.nan,
            "test_retest_spearman": spearman_or_nan(*values),
            "test_retest_mad_over_spread": mad / spread if spread > 0 else math.nan,
            "values": values,
        }
        results[str(a)] = row
        log(f"attempts {a:>4}: {row['seconds_wall_median']:7.2f} s wall "
            f"({row['seconds_cpu_median']:.2f} CPU-s) per cohort = "
            f"{row['ratio_to_baseline']:5.1f}x the baseline; draws agree at Spearman "
            f"{row['test_retest_spearman']:+.2f}, |difference| / spread "
            f"{row['test_retest_mad_over_spread']:.2f}")  # fmt: skip
    return {
        "model": setup.name,
        "cohorts": len(found),
        "prompts": len(found[0][2]),
        "k": k,
        "max_completion_length": tokens,
        "baseline_seconds_wall_median": floor_s,
        "baseline_seconds_cpu_median": statistics.median(floor_cpu),
        "by_attempts": results,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from daemon.config import GRPOParams

    grpo = GRPOParams()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--attempts", default="0,8,32,128",
                    help="comma-separated values of policy.update_alignment_attempts")  # fmt: skip
    ap.add_argument("--target", default=None,
                    help="the cohorts' target: a reasoning-gym slice (smollm2) or a subject (tiny)")  # fmt: skip
    ap.add_argument("--cohorts", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=grpo.max_prompts_per_step)
    ap.add_argument("--tokens", type=int, default=None,
                    help="completion length: the trainer's default (tiny), the real "
                    "evaluation's (smollm2: a chat model's answers are sentences)")  # fmt: skip
    ap.add_argument("--probe-answers", type=int, default=16,
                    help="smollm2: attempts per probe item for its own answer (tapd probe "
                    "answers); 0 keeps the bare references")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    attempts = [int(x) for x in a.attempts.split(",") if x.strip()]
    if any(x < 0 for x in attempts) or not attempts:
        raise SystemExit("--attempts: non-negative integers, e.g. 0,8,32,128")
    if a.cohorts < 3:
        raise SystemExit("--cohorts: at least 3 (a Spearman across cohorts)")
    import torch

    if a.model == "tiny":
        tokens = a.tokens or grpo.max_completion_length
        setup = _tiny(a.prompts, a.target)
    else:
        from lab.real_eval import RealEvalConfig

        tokens = a.tokens or RealEvalConfig().max_completion_length
        setup = _smollm2(a.prompts, a.target, a.probe_answers, tokens)
    if setup.probe_info:
        i = setup.probe_info
        print(f"probe: {i['items']} items of the target, {i['answered']} given the policy's own "
              f"answer; a foothold on {i['foothold']} (on {i['foothold_bare_references']} with "
              "bare references)")  # fmt: skip
    out = run(setup, attempts, a.cohorts, k=grpo.num_generations, tokens=tokens,
              temperature=grpo.temperature)  # fmt: skip
    out["torch_threads"] = torch.get_num_threads()
    out["probe"] = setup.probe_info
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
