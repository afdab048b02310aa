"""Probe answers in the policy's own words (``ProbeItem.answer``).

``own_answers`` and ``tapd probe answers`` on the real tiny policy, and the
probe and ``update_alignment`` measuring an item's answer rather than its
reference when it gives one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from daemon.cli import app
from daemon.policy import answers
from daemon.policy.alignment import UpdateAlignment
from daemon.policy.answers import own_answers
from daemon.policy.hf import HFRolloutEngine
from daemon.policy.rollout import SampledAttempt
from daemon.policy.store import format_prompt, load_policy
from daemon.trainer import probe
from daemon.trainer.probe import DEFAULT_FOOTHOLD_PROBABILITY, Probe
from daemon.verify.registry import get_verifier
from lab import tasks
from streams.probes import ProbeFileError, ProbeItem, read_probe_file, write_probe_file


@pytest.fixture(scope="module")
def policy(tiny_policy: Path) -> tuple[Any, Any]:
    torch.set_num_threads(1)
    return load_policy(tiny_policy, "cpu")


@pytest.fixture(scope="module")
def engine(policy: tuple[Any, Any]) -> HFRolloutEngine:
    model, tok = policy
    return HFRolloutEngine(model, tok, format_prompt=lambda p: format_prompt(tok, p))


def _items() -> list[ProbeItem]:
    return tasks.probe_items(tasks.target_probe(3, 0))


def test_each_answer_is_the_policys_most_probable_right_finished_attempt(
    engine: HFRolloutEngine,
) -> None:
    items = _items()
    got, report = own_answers(items, engine, 8, seed=3, max_new_tokens=8)
    assert report.items == len(items) == len(got) and report.attempts == 8
    assert report.low_temperature_attempts == answers.LOW_TEMPERATURE_ATTEMPTS == 8
    answered = [g for g in got if g.answer is not None]
    assert report.answered == len(answered)
    # The tiny policy knows its easy families and not its hard ones.
    assert 0 < len(answered) < len(items)
    # The same draws, to check each choice against.
    prompts = [it.prompt for it in items]
    # Both draws: 8 at the sampling temperature and the low-temperature 8 (the default).
    draws = [
        a + b
        for a, b in zip(
            engine.sample(prompts, 8, max_new_tokens=8, seed=3),
            engine.sample(prompts, 8, max_new_tokens=8, temperature=0.3, seed=3),
            strict=True,
        )
    ]
    for it, g, group in zip(items, got, draws, strict=True):
        assert g.model_dump(exclude={"answer"}) == it.model_dump(exclude={"answer"})
        verify = get_verifier(it.verifier, dict(it.verifier_args))
        right = [a for a in group if a.n_tokens < 8 and verify(a.completion, it.reference) >= 0.5]
        if not right:
            assert g == it
            continue
        best = max(sum(a.token_logprobs) for a in right)
        chosen = [a for a in right if a.completion == g.answer]
        assert chosen and sum(chosen[0].token_logprobs) == pytest.approx(best)
    again, _ = own_answers(items, engine, 8, seed=3, max_new_tokens=8)
    assert again == got


class ScriptedEngine:
    """A stand-in for sampling with chosen attempts and log-probs (the rule, not the model).

    ``low``: what a draw below temperature 1 gives (default: the same attempts).
    """

    def __init__(
        self,
        groups: Sequence[Sequence[SampledAttempt]],
        low: Sequence[Sequence[SampledAttempt]] | None = None,
    ) -> None:
        self.groups = [list(g) for g in groups]
        self.low = self.groups if low is None else [list(g) for g in low]
        self.temperatures: list[float] = []

    def sample(
        self, prompts: Sequence[str], k: int, *, temperature: float = 1.0, **_: Any
    ) -> list[list[SampledAttempt]]:
        assert len(prompts) == len(self.groups)
        self.temperatures.append(temperature)
        return [g[:k] for g in (self.groups if temperature == 1.0 else self.low)]


def _att(text: str, logprob: float, n_tokens: int = 2) -> SampledAttempt:
    return SampledAttempt(text, n_tokens, [logprob / n_tokens] * n_tokens, [0.0] * n_tokens)


def test_wrong_unfinished_and_empty_attempts_are_never_chosen() -> None:
    # The verifier takes a sentence's last number, as for a chat model.
    last = {"extract": "last"}
    items = [
        ProbeItem(
            target="t",
            prompt=f"{n}+{n}=",
            reference=f"{2 * n}",
            verifier="numeric",
            verifier_args=last,
        )
        for n in (2, 3)
    ]
    engine = ScriptedEngine(
        [
            [
                _att("5", -0.1),  # wrong, however likely
                _att("it is 4 and", -0.2, n_tokens=8),  # right but cut off at the limit
                _att("  ", -0.3),
                _att("I think 4", -3.0),
                _att("the answer is 4", -1.0),
            ],
            [_att("7", -0.1), _att("six", -0.5)],
        ]
    )
    got, report = own_answers(items, engine, 5, max_new_tokens=8)
    assert got[0].answer == "the answer is 4"
    assert got[1] == items[1]  # nothing right: the policy has no foothold there
    assert report.answered == 1


def test_the_low_temperature_draw_finds_the_likeliest_phrasing() -> None:
    """The temperature-1 draw finds only an unlikely right sentence; the
    low-temperature draw finds the likely one, and it wins on the policy's own
    probability. With no low-temperature attempts the unlikely one stays."""
    last = {"extract": "last"}
    items = [ProbeItem(target="t", prompt="2+2=", reference="4", verifier="numeric",
                       verifier_args=last)]  # fmt: skip
    wide = [[_att("5", -0.5), _att("well, maybe it is 4", -9.0)]]
    sharp = [[_att("2 + 2 = 4", -1.5), _att("5", -0.5)]]
    engine = ScriptedEngine(wide, low=sharp)
    got, report = own_answers(items, engine, 2, max_new_tokens=8)
    assert engine.temperatures == [1.0, answers.LOW_TEMPERATURE]
    assert got[0].answer == "2 + 2 = 4" and report.low_temperature_attempts == 8
    alone, report = own_answers(items, engine, 2, max_new_tokens=8, low_temperature_attempts=0)
    assert alone[0].answer == "well, maybe it is 4" and report.low_temperature_attempts == 0
    with pytest.raises(ValueError, match="low_temperature_attempts"):
        own_answers(items, engine, 2, low_temperature_attempts=-1)


def test_bad_arguments_and_a_broken_verifier_are_refused_by_name(
    engine: HFRolloutEngine,
) -> None:
    items = _items()[:2]
    with pytest.raises(ValueError, match="attempts"):
        own_answers(items, engine, 0)
    bad = [items[0], items[1].model_copy(update={"verifier": "no-such-verifier"})]
    with pytest.raises(ValueError, match=r"items\[1\]\.verifier"):
        own_answers(bad, engine, 2)
    empty, report = own_answers([], engine, 2)
    assert empty == [] and report.items == report.answered == 0


def _swapped(it: ProbeItem, other: str, *, answer: bool) -> ProbeItem:
    """The item judged against ``other``; with ``answer``, its NLL still on its own reference."""
    return it.model_copy(update={"reference": other, "answer": it.reference if answer else None})


def test_the_probe_measures_the_answer_and_judges_against_the_reference(
    policy: tuple[Any, Any],
) -> None:
    model, tok = policy
    it = _items()[0]
    other = "9" if it.reference != "9" else "8"

    def measure(item: ProbeItem) -> Any:
        return Probe([item], get_verifier, format_prompt, max_new_tokens=8).measure(model, tok)

    plain = measure(it)
    given = measure(_swapped(it, other, answer=True))
    swapped = measure(_swapped(it, other, answer=False))
    # The NLL is the answer's ...
    assert given.item_nll == plain.item_nll
    assert given.item_nll != pytest.approx(swapped.item_nll)
    # ... and accuracy is judged against the reference, whatever the answer says.
    assert given.item_correct == swapped.item_correct


def test_update_alignment_takes_the_probe_gradient_of_the_answer(
    policy: tuple[Any, Any],
) -> None:
    model, tok = policy
    items = tasks.probe_items(tasks.target_probe(6, 0, subjects=("add",)))

    def grad(probe_items: list[ProbeItem]) -> torch.Tensor | None:
        a = UpdateAlignment(model, tok, lambda p: format_prompt(tok, p), {"add": probe_items},
                            DEFAULT_FOOTHOLD_PROBABILITY)  # fmt: skip
        return a._probe_gradient("add")

    plain = grad(items)
    given = grad([_swapped(it, "x", answer=True) for it in items])
    swapped = grad([_swapped(it, "x", answer=False) for it in items])
    assert plain is not None and given is not None
    assert torch.equal(given, plain)
    assert swapped is None or not torch.equal(swapped, plain)


def test_the_probe_file_keeps_answers_and_refuses_an_empty_one(tmp_path: Path) -> None:
    items = _items()[:3]
    items[1] = items[1].model_copy(update={"answer": "the sum is " + items[1].reference})
    path = write_probe_file(tmp_path / "probe.jsonl", items)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert "answer" not in lines[0] and lines[1]["answer"].startswith("the sum is ")
    assert read_probe_file(path) == items
    assert [it.nll_text for it in items] == [
        items[0].reference,
        "the sum is " + items[1].reference,
        items[2].reference,
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**lines[0], "answer": ""}) + "\n")
    with pytest.raises(ProbeFileError) as e:
        read_probe_file(bad)
    assert e.value.field.endswith("line 1.answer")


def test_tapd_probe_answers_writes_the_policys_answers(
    lab_env: dict[str, str], tmp_path: Path
) -> None:
    source = Path(lab_env["TAPD_POLICY__PROBE_PATH"])
    out = tmp_path / "answered.jsonl"
    env = {**lab_env, "TAPD_POLICY__DEVICE": "cpu"}
    args = ["probe", "answers", str(source), str(out), "--attempts", "4", "--max-new-tokens", "8"]
    r = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    before, after = read_probe_file(source), read_probe_file(out)
    assert report["items"] == len(before) == len(after)
    assert report["answered"] == sum(it.answer is not None for it in after) > 0
    assert (report["attempts"], report["low_temperature_attempts"]) == (4, 8)
    for b, a in zip(before, after, strict=True):
        assert a.model_dump(exclude={"answer"}) == b.model_dump(exclude={"answer"})
    # Without a policy there is nothing to answer with; a bad file is named.
    no_model: dict[str, str | None] = {**env, "TAPD_POLICY__MODEL_PATH": None}
    r = CliRunner().invoke(app, args, env=no_model)
    assert r.exit_code == 2 and "policy.model_path" in r.output
    r = CliRunner().invoke(app, args, env={**env, "TAPD_POLICY__MODEL_PATH": str(tmp_path / "no")})
    assert r.exit_code == 2 and "policy.model_path" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = CliRunner().invoke(app, ["probe", "answers", str(bad), str(out)], env=env)
    assert r.exit_code == 2 and "line 1" in r.output

    # `tapd probe targets`: the configured probe by default, one JSON line a target.
    r = CliRunner().invoke(app, ["probe", "targets"], env=env, catch_exceptions=False)
    head, *rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 0 and head == {"probe_path": str(source), "targets": len(rows)}
    assert {x["target"] for x in rows} == {it.target for it in before}
    assert sum(x["items"] for x in rows) == len(before) and all(x["answered"] == 0 for x in rows)
    r = CliRunner().invoke(app, ["probe", "targets", str(out)], env=env, catch_exceptions=False)
    assert (
        sum(json.loads(x).get("answered", 0) for x in r.stdout.splitlines()) == report["answered"]
    )
    r = CliRunner().invoke(app, ["probe", "targets", str(bad)], env=env)
    assert r.exit_code == 2 and "line 1" in r.output
    r = CliRunner().invoke(app, ["probe", "targets"], env={**env, "TAPD_POLICY__PROBE_PATH": None})
    assert r.exit_code == 0 and json.loads(r.stdout) == {"probe_path": None, "targets": 0}


def test_a_right_answer_is_what_the_probes_accuracy_counts_as_right() -> None:
    # Two layers keep the rule (the policy cannot import the trainer): one value.
    assert answers.CORRECT_AT == probe.CORRECT_AT
