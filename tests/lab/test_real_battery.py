"""The reasoning-gym battery for the real model: slices, held-out probes, controls."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym", reason="the real battery needs reasoning-gym")

from daemon.verify.registry import get_verifier
from lab import rg_tasks
from lab.tasks import in_probe_partition


@pytest.mark.parametrize("sl", rg_tasks.CANDIDATES, ids=lambda s: s.target)
def test_every_slice_is_judged_by_its_own_scorer(sl: rg_tasks.RGSlice) -> None:
    tasks = rg_tasks.make_tasks(sl, 6, seed=0)
    assert len(tasks) == 6
    for t in tasks:
        # The subject is the slice (the probe's target name); the family is a tag.
        assert (t.subject, t.difficulty) == (sl.target, sl.difficulty)
        assert t.tags["task_type"] == sl.family
        assert not in_probe_partition(t.prompt)  # training side of the partition
        v = get_verifier(t.verifier, t.verifier_args)
        assert v(t.reference, t.reference) == 1.0  # the reference itself passes
    assert rg_tasks.make_tasks(sl, 6, seed=0) == tasks  # deterministic


def test_probe_is_held_out_and_grouped_by_target() -> None:
    slices = [rg_tasks.get_slice(t) for t in rg_tasks.TIERS]
    items = rg_tasks.probe_items(slices, 5, seed=0)
    by_target: dict[str, list[str]] = {}
    for it in items:
        by_target.setdefault(it.target, []).append(it.prompt)
    assert set(by_target) == set(rg_tasks.TIERS)
    train = {t.prompt for sl in slices for t in rg_tasks.make_tasks(sl, 40, seed=0)}
    for prompts in by_target.values():
        assert len(prompts) == len(set(prompts)) == 5
        assert all(in_probe_partition(p) for p in prompts)
        assert not set(prompts) & train


def test_control_cohorts_carry_the_broken_verifiers() -> None:
    scrambled = rg_tasks.control_cohort("scrambled", 4, seed=1)
    assert {t.verifier for t in scrambled} == {"scrambled"}
    weak = rg_tasks.control_cohort("weak_verifier", 4, seed=1)
    assert {t.verifier for t in weak} == {"contains"}
    # Containment is gameable: a padded answer passes without being right.
    t = weak[0]
    assert get_verifier(t.verifier, t.verifier_args)(f"0 1 {t.reference} 99", t.reference) == 1.0
    hard = rg_tasks.control_cohort("hard", 4, seed=1)
    assert {t.subject for t in hard} <= set(rg_tasks.TIERS)


@pytest.mark.parametrize("cell", [*rg_tasks.TIERS, "scrambled", "weak_verifier", "mixed"])
def test_the_product_finds_each_real_cohorts_target_from_its_traces(cell: str) -> None:
    """The scorer and the trainer resolve a cohort's target from its subject.

    A real cohort's traces must name the slice the probe's items are kept
    under, or the trainer reports no target lift and the scorer no
    ``target_similarity`` or ``update_alignment`` for it.
    """
    from lab.tasks import to_trace
    from streams.probes import cohort_target

    known = {it.target for it in rg_tasks.probe_items(
        [rg_tasks.get_slice(t) for t in rg_tasks.TIERS], 2, seed=0)}  # fmt: skip
    tasks = (
        rg_tasks.make_tasks(rg_tasks.get_slice(cell), 4, seed=3)
        if cell in rg_tasks.TIERS
        else rg_tasks.control_cohort(cell, 4, seed=3)
    )
    for t in tasks:
        trace = to_trace(t, policy_version="v0", key="k")
        assert cohort_target(trace.subject, None, known) == trace.subject
        assert trace.subject.endswith(f"/{t.difficulty}")
    if cell in rg_tasks.TIERS:
        assert {t.subject for t in tasks} == {cell}


def test_demo_passes_every_grpo_knob_to_the_trainer(tmp_path: object) -> None:
    from pathlib import Path

    from daemon.config import load_settings
    from lab.demo import _settings_env, demo_settings

    s = demo_settings(Path(str(tmp_path)), 0, 4, Path("p"), Path("q"), model="smollm2")
    assert s.grpo.lora_rank == 8
    # The scorer measures update_alignment on the cohort's own attempts on a CPU.
    assert s.policy.update_alignment_attempts == 0
    tiny = demo_settings(Path(str(tmp_path)), 0, 4, Path("p"), Path("q"))
    assert tiny.policy.update_alignment_attempts == load_settings().policy.update_alignment_attempts
    env = _settings_env(s)
    import os

    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("TAPD_GRPO__")})
        assert load_settings().grpo == s.grpo  # the trainer process reads the same knobs
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_full_real_evaluation_plan_meets_the_issue_size() -> None:
    from lab.real_eval import CONTROLS, FULL, SMOKE, specs

    plan = list(specs(FULL))
    cells = {cell for _, cell, _ in plan}
    assert len(plan) >= 24 and FULL.seeds >= 2
    assert set(CONTROLS) <= cells  # broken-verifier controls are in the battery
    families = {c.split("/")[0] for c in cells if "/" in c}
    assert len(families) >= 4
    assert len({cid for cid, _, _ in plan}) == len(plan)  # every cohort has its own cache key
    assert FULL.key() != SMOKE.key()


def test_eval_cache_key_ignores_what_measures_nothing() -> None:
    """More loop runs or another analysis reuse every cached unit; a measured setting does not."""
    import dataclasses

    from lab.eval_run import FULL as TINY

    same = dataclasses.replace(TINY, loop_runs=TINY.loop_runs + 7, bootstrap=50, top_fraction=0.2)
    assert same.key("p") == TINY.key("p")
    for changed in (
        dataclasses.replace(TINY, seeds=TINY.seeds + 1),
        dataclasses.replace(TINY, loop_steps=TINY.loop_steps + 1),
        dataclasses.replace(TINY, loop_candidates=TINY.loop_candidates + 1),
    ):
        assert changed.key("p") != TINY.key("p")
    assert TINY.key("p") != TINY.key("q")  # another policy's weights


def test_real_eval_summary_groups_lift_by_tier() -> None:
    from daemon.core.features import FEATURE_NAMES
    from lab.real_eval import FULL, summarize

    def row(cell: str, lift: float, adv: float) -> dict[str, object]:
        # Every feature, as a cached row has (the gate's decision reads them all).
        feats = {**dict.fromkeys(FEATURE_NAMES, 0.0), "adv_std": adv, "reward_trust": 1.0}
        return {"cell": cell, "features": feats, "seconds": 1.0,
                "seeds": [{"nll_lift": lift, "seconds": 10.0}, {"nll_lift": lift, "seconds": 20.0}]}  # fmt: skip

    rows = [
        row("products/1x1", 0.03, 0.5),
        row("basic_arithmetic/add_1d", 0.02, 0.4),
        row("basic_arithmetic/addsub_2d", 0.0, 0.1),
        row("scrambled", -0.01, 0.45),
    ]
    s = summarize(FULL, rows)
    assert s["mean_nll_lift_by_tier"] == pytest.approx(
        {"frontier": 0.025, "hard": 0.0, "scrambled": -0.01}
    )
    assert s["runs"] == 8 and s["seconds_per_grpo_run"] == pytest.approx(15.0)
    # ranks 4,2,1,3 against 4,3,2,1: rho = 1 - 6*6/(4*15) = 0.4
    assert s["spearman_signal_vs_lift"]["adv_std"] == pytest.approx(0.4)


def _real_rows(seed: int = 0, noise: float = 0.002) -> list[dict[str, object]]:
    """Cached-row shaped battery: 4 slices x 3 cohorts x 2 seeds and a scrambled control.

    The label rises with ``update_alignment`` inside and across cells, and
    the seeds agree up to small noise; one cohort's slice has no foothold.
    """
    import random

    from daemon.core.features import FEATURE_NAMES

    rnd = random.Random(seed)
    slices = ["products/1x1", "basic_arithmetic/add_1d", "chain_sum/2t_1d", "gcd/small"]
    rows: list[dict[str, object]] = []
    for c in range(3):
        for j, sl in enumerate(slices):
            ua = 0.1 * j + 0.05 * c + rnd.uniform(-0.01, 0.01)
            feats = {**dict.fromkeys(FEATURE_NAMES, 0.0), "update_alignment": ua,
                     "frac_nondegenerate": 0.5, "adv_std": 0.6, "pass_rate": 0.3,
                     "group_passrate_mean": 0.3, "group_passrate_std": 0.1}  # fmt: skip
            seeds = []
            for _ in range(2):
                y = 0.2 * ua + rnd.gauss(0.0, noise)
                part = {"items": 4, "tokens": 40, "nll_before": 1.0, "nll_after": 1.0 - y,
                        "nll_lift": y, "acc_before": 0.5, "acc_after": 0.5, "acc_lift": 0.0}  # fmt: skip
                seeds.append({"label": y, "target_lift": part, "nll_lift": y, "seconds": 30.0})
            rows.append({"cohort_id": f"real-{j}-{c}", "cell": sl, "target": sl, "features": feats,
                         "seconds": 5.0, "seeds": seeds})  # fmt: skip
    none = {"label": None, "target_lift": None, "nll_lift": 0.01, "seconds": 30.0}
    rows.append({"cohort_id": "real-nofoot", "cell": "basic_arithmetic/addsub_2d",
                 "target": "basic_arithmetic/addsub_2d", "features": rows[0]["features"],
                 "seconds": 5.0, "seeds": [none, none]})  # fmt: skip
    scr = {**rows[0], "cohort_id": "real-scrambled-0", "cell": "scrambled"}
    rows.append(scr)
    return rows


def test_real_eval_ranks_the_product_label_with_the_tiny_evaluations_code() -> None:
    from lab.real_eval import FULL, label_table, render, summarize

    rows = _real_rows()
    table, unlabeled = label_table(rows)  # type: ignore[arg-type]
    assert unlabeled == 1 and len(table) == 13
    scrambled = [c for c in table if c.cohort_id == "real-scrambled-0"]
    assert scrambled[0].broken and scrambled[0].cell == "products|scrambled"
    s = summarize(FULL, rows)  # type: ignore[arg-type]
    rk = s["ranking"]
    assert rk["ranked"] and rk["honest_cohorts"] == 12 and rk["cells"] == 4
    # Seeds agree up to small noise: the label is reliable.
    assert rk["reliability"]["reliability"] > 0.9
    # The feature that sets the label ranks it; a constant signal does not.
    assert rk["scores"]["update_alignment"]["spearman"]["value"] > 0.9
    assert rk["scores"]["adv_std"]["spearman"]["value"] == 0.0 or math.isnan(
        rk["scores"]["adv_std"]["spearman"]["value"]
    )
    for name in ("tapd_loco", "tapd_loso", "ridge_plain_loco", "knn_plain_loso"):
        assert "spearman" in rk["scores"][name] or "error" in rk["scores"][name]
    assert rk["perfect_gain_nats"] >= rk["oracle_gain_nats"] - 1e-12
    assert s["cohorts_without_label"] == 1
    assert s["footing"]["products/1x1"]["foothold"] == 4
    assert s["footing"]["basic_arithmetic/addsub_2d"]["foothold"] == 0
    doc = render(s)
    assert "**" + f"{rk['reliability']['reliability']:.3f}" + "**" in doc
    assert "feature: `update_alignment`" in doc and "no label: 1 here" in doc


def test_real_eval_reports_what_the_gate_refuses() -> None:
    """The decision policy's gate on cached features: a broken verifier that
    passes and an honest cohort refused are both counted and shown."""
    from lab.real_eval import FULL, gate, render, summarize

    rows = _real_rows()
    trust = {"real-scrambled-0": 0.3, "real-0-0": 0.5}  # one false alarm
    for r in rows:
        r["features"] = {**r["features"], "reward_trust": trust.get(r["cohort_id"], 1.0)}  # type: ignore[dict-item]
    weak = {**rows[-1], "cohort_id": "real-weak_verifier-0", "cell": "weak_verifier"}
    weak["features"] = {**weak["features"], "reward_trust": 0.85}  # type: ignore[dict-item]
    rows.append(weak)
    g = gate(rows)  # type: ignore[arg-type]
    assert g["floor"] == 0.8 and g["n_broken"] == 2 and g["n_honest"] == len(rows) - 2
    assert g["broken_passing_gate"] == 1 and g["max_broken_trust"] == 0.85
    assert g["honest_refused"] == 1 and g["min_honest_trust"] == 0.5
    doc = render(summarize(FULL, rows))  # type: ignore[arg-type]
    assert "## The reward-trust gate on this battery" in doc
    assert "| 2 | 1 | **1** | highest 0.850 |" in doc


def test_real_eval_says_when_its_seeds_do_not_agree() -> None:
    from lab.real_eval import FULL, render, summarize

    agree = summarize(FULL, _real_rows())  # type: ignore[arg-type]
    noisy = summarize(FULL, _real_rows(noise=1.0))  # type: ignore[arg-type]
    assert noisy["ranking"]["reliability"]["reliability"] < 0.5
    assert "The seeds do not agree" in render(noisy)
    assert "The seeds do not agree" not in render(agree)


def test_real_eval_says_why_it_does_not_rank_too_few_labels() -> None:
    from lab.real_eval import FULL, render, summarize

    rows = _real_rows()[:2]
    s = summarize(FULL, rows)  # type: ignore[arg-type]
    assert not s["ranking"]["ranked"] and "2 honest cohorts" in s["ranking"]["reason"]
    assert "Not computed: 2 honest cohorts" in render(s)
    assert "reliability" not in s["ranking"]  # fewer than 3: not even that
    # Four cohorts: too few to rank, enough to say whether the seeds agree.
    s = summarize(FULL, _real_rows()[:4], {"products/1x1": {"items": 8, "answered": 7}})  # type: ignore[arg-type]
    assert not s["ranking"]["ranked"] and s["ranking"]["reliability"]["reliability"] > 0.9
    doc = render(s)
    assert "Label reliability over those 4 cohorts" in doc
    assert "| products/1x1 | 8 | 7 | 4 |" in doc


def test_unknown_model_is_refused_by_name() -> None:
    from typer.testing import CliRunner

    from daemon.cli import app

    for cmd in (["eval", "--model", "gpt5"], ["demo", "--model", "gpt5"],
                ["build-policy", "--model", "gpt5"]):  # fmt: skip
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2, (cmd, res.output)
        assert "--model: unknown 'gpt5'" in res.output


def test_a_real_models_probe_is_answered_in_the_policys_own_words(
    tmp_path: Path, tiny_policy: Path
) -> None:
    # The demo's step for SmolLM2 (rg_tasks.answer_probe), here on the tiny
    # policy and its own probe (reasoning-gym prompts exceed its context): the
    # file is rewritten in place, item for item, each answer one its verifier
    # accepts; the reference is untouched.
    from lab import tasks
    from streams.probes import read_probe_file

    path = tasks.write_probe(tmp_path / "probe.jsonl", 24, seed=0)
    before = read_probe_file(path)
    rg_tasks.answer_probe(path, tiny_policy, attempts=4, max_new_tokens=8)
    after = read_probe_file(path)
    assert len(after) == len(before)
    assert any(a.answer is not None for a in after)
    for b, a in zip(before, after, strict=True):
        assert a.model_dump(exclude={"answer"}) == b.model_dump(exclude={"answer"})
        if a.answer is not None:
            assert get_verifier(a.verifier, a.verifier_args)(a.answer, a.reference) >= 0.5


def test_the_real_eval_resets_weights_and_trainability_between_runs() -> None:
    """A merged LoRA run leaves base parameters frozen; the next cohort's
    update_alignment needs them trainable, and the base weights back."""
    import torch

    from daemon.policy.store import snapshot
    from lab.real_eval import _reset

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    base = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.requires_grad_(False)
    _reset(model, base)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
