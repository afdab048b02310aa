from __future__ import annotations

import pytest

from daemon.verify.registry import get_verifier
from lab.tasks import (
    FAMILIES,
    MAX_TASK_CHARS,
    SUBJECTS,
    TIERS,
    control_cohort,
    in_probe_partition,
    make_tasks,
    probe_items,
    probe_set,
    target_probe,
    tier_families,
    to_trace,
)
from streams.schemas import Trace, decode, encode

TAG_KEYS = {"task_type", "operation", "output_constraint", "background"}


def test_subjects_cover_the_required_families() -> None:
    assert {"add", "sub", "mul", "compare", "digits"} <= set(SUBJECTS)
    for subject in SUBJECTS:
        tiers = {TIERS[k] for k in FAMILIES if k[0] == subject}
        assert tiers == {"easy", "frontier", "hard"}, subject


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tasks_are_deterministic_tagged_short_and_verified(family: tuple[str, str]) -> None:
    a = make_tasks(*family, 40, seed=3)
    assert a == make_tasks(*family, 40, seed=3)
    assert a != make_tasks(*family, 40, seed=4)
    for t in a:
        assert set(t.tags) >= TAG_KEYS and all(t.tags[k] for k in TAG_KEYS)
        assert len(t.prompt) + len(t.reference) < MAX_TASK_CHARS
        assert (t.subject, t.difficulty) == family
        # The reference is right by its own verifier, a different answer is not.
        verify = get_verifier(t.verifier, t.verifier_args)
        assert verify(t.reference, t.reference) == 1.0
        assert verify(t.reference + "1", t.reference) == 0.0


def test_arithmetic_references_are_correct() -> None:
    for t in make_tasks("add", "2d_carry", 50, 0):
        a, b = t.prompt[:-1].split("+")
        assert int(a) + int(b) == int(t.reference)
        assert int(a[-1]) + int(b[-1]) >= 10 or int(a[0]) + int(b[0]) >= 10
    for t in make_tasks("add", "2d_nocarry", 50, 0):
        a, b = t.prompt[:-1].split("+")
        assert all(int(x) + int(y) < 10 for x, y in zip(a, b, strict=True))
    for t in make_tasks("sub", "2d_borrow", 50, 0):
        a, b = t.prompt[:-1].split("-")
        assert int(a) - int(b) == int(t.reference) >= 0
    for t in make_tasks("mul", "2x1", 50, 0):
        a, b = t.prompt[:-1].split("*")
        assert int(a) * int(b) == int(t.reference)
    for t in make_tasks("compare", "3d", 50, 0):
        a, b = (int(x) for x in t.prompt[:-1].split("?"))
        assert t.reference == ("<" if a < b else ">" if a > b else "=")


def test_probe_is_disjoint_from_training_cohorts() -> None:
    probe = probe_set(400, seed=0)
    assert {(t.subject, t.difficulty) for t in probe} == set(FAMILIES)
    assert all(in_probe_partition(t.prompt) for t in probe)
    train_prompts = {
        t.prompt
        for seed in range(5)
        for variant in ("easy", "frontier", "hard", "mixed", "scrambled", "weak_verifier")
        for subject in SUBJECTS
        for t in control_cohort(variant, 40, seed, subject)  # type: ignore[arg-type]
    }
    assert train_prompts.isdisjoint(t.prompt for t in probe)
    assert not any(in_probe_partition(p) for p in train_prompts)
    # Different probe seeds give different probes from the same partition.
    assert probe_set(50, 1) != probe_set(50, 0)


def test_target_probe_has_held_out_items_per_family_and_subject_targets() -> None:
    probe = target_probe(48, seed=0)
    assert len(probe) == 48 * len(FAMILIES)
    assert all(in_probe_partition(t.prompt) for t in probe)
    for family in FAMILIES:
        fam = [t for t in probe if (t.subject, t.difficulty) == family]
        assert len(fam) == 48
        # Distinct prompts wherever the family's held-out space has 48 of them.
        if family[1] not in ("1d", "2d"):
            assert len({t.prompt for t in fam}) == 48, family
    items = probe_items(probe)
    assert {it.target for it in items} == set(SUBJECTS)
    assert all(it.target == t.subject for it, t in zip(items, probe, strict=True))


def test_frontier_cohorts_draw_every_frontier_family_of_their_subject() -> None:
    for subject in SUBJECTS:
        drawn = {
            c[0].difficulty
            for seed in range(40)
            for c in [control_cohort("frontier", 4, seed, subject)]
        }
        assert drawn == set(tier_families(subject, "frontier")), subject


def test_control_cohorts_follow_the_tiers_and_verifiers() -> None:
    for subject in SUBJECTS:
        for tier in ("easy", "frontier", "hard"):
            c = control_cohort(tier, 12, 0, subject)  # type: ignore[arg-type]
            assert len(c) == 12 and all(TIERS[(t.subject, t.difficulty)] == tier for t in c)
        mixed = control_cohort("mixed", 12, 0, subject)
        assert {TIERS[(t.subject, t.difficulty)] for t in mixed} == {"easy", "frontier", "hard"}
        scr = control_cohort("scrambled", 12, 5, subject)
        assert all(t.verifier == "scrambled" and t.verifier_args == {"seed": 5} for t in scr)
        weak = control_cohort("weak_verifier", 12, 0, subject)
        assert all(t.verifier in ("weak_first_digit", "contains") for t in weak)
        # The weak verifier really is weak: it rewards some wrong answers.
        fooled = 0
        for t in weak:
            wrong = "<>=" if t.verifier == "contains" else t.reference[0] + "0000"
            fooled += get_verifier(t.verifier)(wrong, t.reference) == 1.0
        assert fooled >= 10
    # subject=None picks one subject per cohort, deterministically.
    c = control_cohort("frontier", 10, 11)
    assert len({t.subject for t in c}) == 1 and c == control_cohort("frontier", 10, 11)


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="subject"):
        make_tasks("poetry", "1d", 1, 0)
    with pytest.raises(ValueError, match="difficulty"):
        make_tasks("add", "9d", 1, 0)
    with pytest.raises(ValueError, match="variant"):
        control_cohort("impossible", 1, 0, "add")  # type: ignore[arg-type]


def test_to_trace_is_a_valid_deterministic_trace() -> None:
    t = make_tasks("add", "2d_carry", 1, 0)[0]
    tr = to_trace(t, policy_version="tiny-0", key=1)
    assert isinstance(tr, Trace) and tr.attempts == []
    assert decode(encode(tr), Trace) == tr
    assert tr.tags["difficulty"] == "2d_carry" and tr.tags["operation"] == "add_carry"
    assert tr.trace_id == to_trace(t, policy_version="tiny-0", key=1).trace_id
    assert tr.trace_id != to_trace(t, policy_version="tiny-0", key=2).trace_id
    assert tr.trace_id != to_trace(t, policy_version="tiny-1", key=1).trace_id
