"""The ``reasoning_gym`` verifier: each family's own scorer behind tapd's registry."""

from __future__ import annotations

import pytest

from daemon.verify.registry import VerifierArgsError, get_verifier, known_verifiers

pytest.importorskip(
    "reasoning_gym", reason="optional dependency: pip install 'tapd[reasoning-gym]'"
)


def test_registered_with_the_product_verifiers() -> None:
    assert "reasoning_gym" in known_verifiers()


def test_the_familys_own_scorer_judges_the_answer() -> None:
    import reasoning_gym

    ds = reasoning_gym.create_dataset("chain_sum", size=5, seed=3)
    v = get_verifier("reasoning_gym", {"task": "chain_sum"})
    for entry in ds:
        assert v(entry["answer"], entry["answer"]) == 1.0
        assert v(str(int(entry["answer"]) + 1), entry["answer"]) == 0.0
    # reasoning-gym's default scorer gives partial credit to an answer that
    # contains the reference: the family's rule, not tapd's.
    partial = get_verifier("reasoning_gym", {"task": "gcd"})("the gcd is 8", "8")
    assert 0.0 < partial < 1.0


def test_extraction_rules() -> None:
    last = get_verifier("reasoning_gym", {"task": "basic_arithmetic", "extract": "last_number"})
    assert last("3 + 5 = 8", "8") == 1.0
    assert last("The answer is 1,234.", "1234") == 1.0
    assert last("8 or maybe 9", "8") == 0.0  # the last number counts
    assert last("no digits here", "8") == 0.0
    # A number glued to junk is not read as one: the reward-trust gate's probe.
    for glued in ("zq8qz", "8th", "x_8"):
        assert last(glued, "8") == 0.0, glued
    assert last("3 - 5 = -2.", "-2") == 1.0
    tag = get_verifier("reasoning_gym", {"task": "basic_arithmetic", "extract": "answer_tag"})
    assert tag("work... <answer>8</answer>", "8") == 1.0
    assert tag("8", "8") == 0.0  # no tag, no answer


def test_partial_credit_off_rewards_only_the_full_answer() -> None:
    graded = get_verifier("reasoning_gym", {"task": "products", "extract": "last_number"})
    exact = get_verifier(
        "reasoning_gym", {"task": "products", "extract": "last_number", "partial_credit": False}
    )
    # reasoning-gym's default scorer pays a padded number len(ref)/len(answer).
    assert graded("109", "10") == pytest.approx(2 / 3)
    assert exact("109", "10") == 0.0
    assert exact("So 2 times 5 is 10.", "10") == graded("So 2 times 5 is 10.", "10") == 1.0


def test_the_gate_trusts_the_exact_scorer_more_than_partial_credit() -> None:
    """reward_trust on a real battery cohort: 1.0 with full credit only (what the
    battery uses); lower with reasoning-gym's partial credit, which pays the padded
    number, one of the gate's several bad answers per reference."""
    from daemon.core.features import reward_trust
    from lab import rg_tasks
    from lab.tasks import to_trace

    tasks = rg_tasks.make_tasks(rg_tasks.get_slice("basic_arithmetic/addsub_2d"), 8, seed=0)
    exact = [to_trace(t, policy_version="v0", key=i) for i, t in enumerate(tasks)]
    assert all(t.verifier_args["partial_credit"] is False for t in exact)
    graded = [
        t.model_copy(update={"verifier_args": {**t.verifier_args, "partial_credit": True}})
        for t in exact
    ]
    assert reward_trust(exact) == 1.0
    assert reward_trust(graded) < 0.9


def test_reward_trust_figures_in_the_feature_doc() -> None:
    """docs/FEATURES.md's worked example (reference 42, 8 bad answers): partial
    credit pays the padded 429 only; full credit pays none."""
    from daemon.core.features import reward_trust
    from lab.tasks import Task, to_trace
    from streams.schemas import Trace

    def trace(partial: bool) -> Trace:
        args = {"task": "basic_arithmetic", "extract": "last_number", "partial_credit": partial}
        task = Task("What is 40 + 2?", "42", "arith", {}, "reasoning_gym", args, "add")
        return to_trace(task, policy_version="v0", key=0)

    assert reward_trust([trace(True)]) == pytest.approx(1 - 1 / 8)
    assert reward_trust([trace(False)]) == 1.0


def test_metadata_reaches_families_that_need_it() -> None:
    import reasoning_gym

    entry = reasoning_gym.create_dataset("word_sorting", size=1, seed=0)[0]
    v = get_verifier("reasoning_gym", {"task": "word_sorting", "metadata": entry["metadata"]})
    assert v(entry["answer"], entry["answer"]) == 1.0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({}, "verifier_args.task"),
        ({"task": "no_such_family"}, "verifier_args.task"),
        ({"task": "gcd", "extract": "first"}, "verifier_args.extract"),
        ({"task": "gcd", "metadata": [1]}, "verifier_args.metadata"),
        ({"task": "gcd", "other": 1}, "verifier_args.other"),
        ({"task": "gcd", "partial_credit": "no"}, "verifier_args.partial_credit"),
    ],
)
def test_bad_arguments_name_the_field(args: dict[str, object], field: str) -> None:
    with pytest.raises(VerifierArgsError) as e:
        get_verifier("reasoning_gym", args)
    assert e.value.field == field


def test_never_raises_on_a_completion() -> None:
    v = get_verifier("reasoning_gym", {"task": "decimal_arithmetic"})
    for junk in ("", "   ", "nan", "1e999999", "\x00", "x" * 10_000):
        assert 0.0 <= v(junk, "1.5") <= 1.0
