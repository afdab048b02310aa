"""GRPO on the tiny policy: lift per control cohort, revert, rollback, idempotency.

Every test trains for real (TRL GRPOTrainer on the built-in tiny policy).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.config import GRPOParams
from daemon.policy import store as policy
from daemon.policy.store import snapshot
from daemon.trainer.cohort import CohortTrainer, ItemRejected, same_weights
from daemon.trainer.probe import Probe
from daemon.verify.registry import get_verifier
from lab import tasks
from streams.schemas import LiftResult, decode, encode

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2, 3, 4)
VARIANTS = ("easy", "frontier", "hard", "scrambled", "weak_verifier")
PARAMS = GRPOParams(steps=16, learning_rate=5e-3, optimizer="sgd", max_completion_length=8)
PER_FAMILY = 48  # held-out probe items per family; a subject is a target


def make_dispatch(variant: str, seed: int, subject: str, n: int = 8) -> Any:
    from streams.schemas import Dispatch

    cohort = tasks.control_cohort(variant, n, seed, subject=subject)  # type: ignore[arg-type]
    return Dispatch.model_validate(
        {
            "schema": "tapd.dispatch/1",
            "cohort_id": f"{variant}-{subject}-{seed}",
            "slice_key": f"{subject}|{variant}",
            "subject": subject,
            "ts": 0.0,
            "policy_version": "v0",
            "model_version": "m0",
            "feature_schema": "tapd.features/1",
            "features": {"adv_std": 0.3},
            "predicted_lift": 0.1,
            "uncertainty": 0.0,
            "selection": "exploit",
            "items": [
                {
                    "trace_id": f"t{i}",
                    "prompt": t.prompt,
                    "reference": t.reference,
                    "verifier": t.verifier,
                    "verifier_args": dict(t.verifier_args),
                }
                for i, t in enumerate(cohort)
            ],
        }
    )


@pytest.fixture(scope="module")
def policy_pair(tiny_policy: Path) -> Iterator[tuple[PreTrainedModel, PreTrainedTokenizerBase]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU results depend on the thread count
    model, tok = policy.load_policy(tiny_policy, "cpu")
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe() -> Probe:
    # Held-out items of every subject's easy, frontier and hard skills, per subject.
    return Probe(
        tasks.probe_items(tasks.target_probe(PER_FAMILY, 0)),
        get_verifier,
        policy.format_prompt,
        max_new_tokens=8,
    )


def trainer(
    pair: tuple[PreTrainedModel, PreTrainedTokenizerBase], probe: Probe, state: Path, **kw: Any
) -> CohortTrainer:
    model, tok = pair
    kw.setdefault("params", PARAMS)
    kw.setdefault("mode", "probe_revert")
    return CohortTrainer(model, tok, probe, get_verifier, state_dir=state, **kw)


@pytest.fixture(scope="module")
def lift_table(
    policy_pair: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    probe: Probe,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[LiftResult]]:
    """Every control variant over SEEDS, each subject in turn, measured with probe-and-revert."""
    table: dict[str, list[LiftResult]] = {v: [] for v in VARIANTS}
    for seed in SEEDS:
        subject = tasks.SUBJECTS[seed % len(tasks.SUBJECTS)]
        t = trainer(policy_pair, probe, tmp_path_factory.mktemp(f"lift{seed}"))
        for v in VARIANTS:
            table[v].append(t.on_dispatch(make_dispatch(v, seed, subject), 0.0).result)
        t.close()
    print(
        "\nvariant        target nll_lift (mean ± sd)  transfer   collateral  whole probe"
        "  target acc_lift  train reward before -> after"
    )
    for v, rs in table.items():
        nl = [r.label for r in rs]
        print(
            f"{v:14s} {statistics.mean(nl):+.4f} ± {statistics.stdev(nl):.4f}"
            f"          {statistics.mean(_part(r, 'transfer') for r in rs):+.4f}"
            f"    {statistics.mean(_part(r, 'collateral') for r in rs):+.4f}"
            f"     {statistics.mean(r.nll_lift for r in rs):+.4f}"
            f"      {statistics.mean(_acc(r) for r in rs):+.3f}"
            f"           {statistics.mean(r.train_reward_before for r in rs):.2f} -> "
            f"{statistics.mean(r.train_reward_after for r in rs):.2f}"
        )
    return table


def _part(r: LiftResult, part: str) -> float:
    p = getattr(r, f"{part}_lift")
    return p.nll_lift if p is not None else 0.0


def _acc(r: LiftResult) -> float:
    return r.target_lift.acc_lift if r.target_lift is not None else 0.0


@pytest.mark.science
def test_no_foothold_cohort_leaves_the_policy_unchanged(
    lift_table: dict[str, list[LiftResult]],
) -> None:
    # All-wrong groups have zero advantage, hence zero gradient: nothing to learn.
    for r in lift_table["hard"]:
        assert r.train_reward_before == 0.0
        assert abs(r.nll_lift) < 1e-9 and abs(r.label) < 1e-9


@pytest.mark.science
def test_weak_verifier_reward_rises_while_true_accuracy_does_not(
    lift_table: dict[str, list[LiftResult]],
) -> None:
    """xLift's finding: a gameable verifier's reward goes up, the skill does not."""
    weak = lift_table["weak_verifier"]
    before = [r.train_reward_before for r in weak]
    after = [r.train_reward_after for r in weak]
    reward_gain = statistics.mean(after) - statistics.mean(before)
    acc_gain = statistics.mean(_acc(r) for r in weak)
    print(f"\nweak verifier: train reward {reward_gain:+.3f}, target accuracy {acc_gain:+.3f}")
    assert reward_gain > 0.03
    # "does not rise": by less than one item of the target's foothold items
    assert acc_gain < 1 / (2 * PER_FAMILY)


@pytest.mark.science
def test_frontier_cohorts_lift_more_than_known_and_no_foothold(
    lift_table: dict[str, list[LiftResult]],
) -> None:
    """The seeds' worked example on the target's lift, over SEEDS: one-sided Welch t-tests."""
    frontier = [r.label for r in lift_table["frontier"]]
    for other in ("easy", "hard"):
        xs = [r.label for r in lift_table[other]]
        p = stats.ttest_ind(frontier, xs, equal_var=False, alternative="greater").pvalue
        print(f"\nfrontier > {other}: one-sided Welch p = {p:.4f}")
        assert p < 0.05, f"frontier vs {other}: p = {p:.3f}"
    assert all(x > 0 for x in frontier), frontier
    # The same frontier tasks under a scrambled reward teach less.
    scrambled = [r.label for r in lift_table["scrambled"]]
    assert statistics.mean(scrambled) < statistics.mean(frontier)


@pytest.mark.science
def test_a_cohort_teaches_its_own_subject_more_than_the_others(
    lift_table: dict[str, list[LiftResult]],
) -> None:
    """Each subject has its own error mode, so the lift lands on the cohort's target."""
    for r in lift_table["frontier"]:
        assert r.target == r.cohort_id.split("-")[1]
        assert r.target_lift is not None and r.transfer_lift is not None
        assert r.target_lift.nll_lift > r.transfer_lift.nll_lift, r


def test_probe_revert_restores_bit_identical_weights_and_trains_once(
    policy_pair: tuple[PreTrainedModel, PreTrainedTokenizerBase], probe: Probe, tmp_path: Path
) -> None:
    model, _ = policy_pair
    before = snapshot(model)
    t = trainer(policy_pair, probe, tmp_path)
    d = make_dispatch("frontier", 3, "compare")
    first = t.on_dispatch(d, 1.0)
    assert not first.duplicate and first.result.steps == PARAMS.steps
    assert first.result.train_reward_before > 0.0  # a frontier cohort: some attempts succeed
    assert same_weights(before, snapshot(model))
    assert first.result.policy_version_before == first.result.policy_version_after == "v0"
    # Redelivered, even to a restarted trainer: the stored result, no second update.
    again = t.on_dispatch(d, 2.0)
    t.close()
    restarted = trainer(policy_pair, probe, tmp_path)
    third = restarted.on_dispatch(d, 3.0)
    restarted.close()
    assert again.duplicate and third.duplicate
    assert again.result == first.result == third.result
    assert decode(encode(first.result), LiftResult) == first.result


def test_a_prompt_that_overflows_the_context_is_rejected_before_training(
    policy_pair: tuple[PreTrainedModel, PreTrainedTokenizerBase], probe: Probe, tmp_path: Path
) -> None:
    model, _ = policy_pair
    before = snapshot(model)
    d = make_dispatch("frontier", 2, "add")
    items = list(d.items)
    # 31 characters + <bos> + 8 completion tokens > the tiny policy's 32 positions.
    items[1] = items[1].model_copy(update={"prompt": "1234567890+1234567890+12345678="})
    d = d.model_copy(update={"items": items})
    t = trainer(policy_pair, probe, tmp_path)
    with pytest.raises(ItemRejected) as e:
        t.on_dispatch(d, 0.0)
    assert e.value.field == "items[1].prompt"
    assert "context of 32 tokens" in e.value.reason
    assert t.ledger.trained() == 0
    assert same_weights(before, snapshot(model))
    t.close()


def test_training_is_deterministic_for_a_seed(
    policy_pair: tuple[PreTrainedModel, PreTrainedTokenizerBase], probe: Probe, tmp_path: Path
) -> None:
    d = make_dispatch("frontier", 4, "digits")
    ta, tb = (
        trainer(policy_pair, probe, tmp_path / "a"),
        trainer(policy_pair, probe, tmp_path / "b"),
    )
    a, b = ta.on_dispatch(d, 0.0).result, tb.on_dispatch(d, 0.0).result
    ta.close()
    tb.close()
    assert a.nll_after == b.nll_after
    assert (a.train_reward_before, a.train_reward_after) == (
        b.train_reward_before,
        b.train_reward_after,
    )
    assert a.nll_after != a.nll_before  # it did train


def test_training_leaves_no_hooks_or_checkpointing_on_the_model(
    policy_pair: tuple[PreTrainedModel, PreTrainedTokenizerBase], probe: Probe, tmp_path: Path
) -> None:
    """TRL adds a forward hook per generation that nothing removes; a long-lived
    trainer would call thousands of them on every forward pass."""
    from daemon.trainer.trl import _checkpointing

    model, _ = policy_pair

    def hooks() -> list[tuple[str, str, int]]:
        return [
            (name, kind, len(getattr(m, kind)))
            for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks")
            if getattr(m, kind)
        ]

    with torch.no_grad():  # transformers' own capturing hooks, installed once
        model(input_ids=torch.tensor([[1, 2, 3]]), output_attentions=True)
    mine = model.get_input_embeddings().register_forward_hook(lambda *_: None)
    before = hooks()
    assert before  # the caller's own hook is there, and must stay
    # Probe-and-revert: the weights go back (the module's other tests share
    # them), the hooks must too.
    t = trainer(policy_pair, probe, tmp_path)
    t.on_dispatch(make_dispatch("frontier", 1, "add"), 0.0)
    t.on_dispatch(make_dispatch("frontier", 2, "mul"), 1.0)
    t.close()
    assert hooks() == before
    assert not _checkpointing(model)
    mine.remove()


def test_a_fresh_model_trains_and_is_left_as_it_was_found(tiny_policy: Path) -> None:
    """Hooks that transformers installs on a model's first pass (once, marking the
    model) go with the rest where the training run's pass installed them, and
    the next pass installs them again."""
    from daemon.trainer.trl import TRLBackend, _checkpointing, _forward_hook_ids, _unwrap

    model, tok = policy.load_policy(tiny_policy, "cpu")
    untouched, _ = policy.load_policy(tiny_policy, "cpu")

    def hooks(m: torch.nn.Module) -> int:
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    def after_a_pass(m: torch.nn.Module) -> int:
        with torch.no_grad():
            m(input_ids=torch.tensor([[1, 2, 3]]), output_attentions=True)
        return hooks(m)

    assert hooks(model) == 0
    out = TRLBackend().train(
        model,
        tok,
        [{"prompt": "12+7="}, {"prompt": "3+4="}],
        lambda completions, **_: [float(len(c) % 2) for c in completions],
        GRPOParams(steps=2, num_generations=4, max_completion_length=4, optimizer="sgd"),
    )
    assert out.steps == 2
    assert hooks(model) == 0 and not _checkpointing(model)
    # This TRL's training passes do not ask for captured outputs; a pass that
    # does, between the snapshot and the unwrap, stands in for one that would.
    before = _forward_hook_ids(model)
    assert after_a_pass(model) > 0
    _unwrap(model, None, before, set(), False)
    assert hooks(model) == 0
    assert after_a_pass(model) == after_a_pass(untouched) > 0


def test_continual_keeps_checkpoints_and_resumes_from_the_ledger(
    tiny_policy: Path, probe: Probe, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    pair = policy.load_policy(tiny_policy, "cpu")
    base = snapshot(pair[0])
    t = trainer(pair, probe, tmp_path, mode="continual", rollback_nll_worsening=10.0)
    r = t.on_dispatch(make_dispatch("frontier", 3, "compare"), 0.0).result
    assert (r.policy_version_before, r.policy_version_after, r.rolled_back) == ("v0", "v1", False)
    trained = snapshot(pair[0])
    assert not same_weights(base, trained)
    assert t.checkpoint_path(1).exists()
    t.close()
    # A new process: fresh base weights, then the version the ledger names.
    fresh = policy.load_policy(tiny_policy, "cpu")
    resumed = trainer(fresh, probe, tmp_path, mode="continual")
    assert resumed.policy_version == "v1"
    assert same_weights(trained, snapshot(fresh[0]))
    resumed.close()


def test_continual_rolls_back_a_harmful_update(
    tiny_policy: Path, probe: Probe, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    pair = policy.load_policy(tiny_policy, "cpu")
    base = snapshot(pair[0])
    # A scrambled reward at a huge Adam step wrecks the policy.
    harmful = GRPOParams(
        steps=4, learning_rate=1e-2, optimizer="adamw_torch", max_completion_length=8
    )
    t = trainer(
        pair, probe, tmp_path, mode="continual", params=harmful, rollback_nll_worsening=0.05
    )
    r = t.on_dispatch(make_dispatch("scrambled", 1, "sub"), 0.0).result
    t.close()
    assert r.nll_after - r.nll_before > 0.05
    assert r.rolled_back
    assert r.policy_version_after == r.policy_version_before == "v0"
    assert same_weights(base, snapshot(pair[0]))
    assert not t.checkpoint_path(1).exists()
