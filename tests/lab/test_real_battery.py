"""The reasoning-gym battery for the real model: slices, held-out probes, controls."""

from __future__ import annotations

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
        assert (t.subject, t.difficulty) == (sl.family, sl.difficulty)
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
    assert {f"{t.subject}/{t.difficulty}" for t in hard} <= set(rg_tasks.TIERS)


def test_demo_passes_every_grpo_knob_to_the_trainer(tmp_path: object) -> None:
    from pathlib import Path

    from daemon.config import load_settings
    from lab.demo import _settings_env, demo_settings

    s = demo_settings(Path(str(tmp_path)), 0, 4, Path("p"), Path("q"), model="smollm2")
    assert s.grpo.lora_rank == 8
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
    from lab.real_eval import FULL, summarize

    def row(cell: str, lift: float, adv: float) -> dict[str, object]:
        return {"cell": cell, "features": {"adv_std": adv}, "seconds": 1.0,
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
