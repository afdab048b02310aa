"""update_alignment on the real tiny policy: what its sign and size say about a GRPO step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.config import TapdSettings
from daemon.core.features import FeatureError, featurize
from daemon.policy.alignment import DEFAULT_ATTEMPTS, UpdateAlignment, fresh_groups
from daemon.policy.hf import HFRolloutEngine
from daemon.policy.rollout import fill_attempts
from daemon.policy.store import format_prompt, load_policy, snapshot
from daemon.trainer.probe import DEFAULT_FOOTHOLD_PROBABILITY
from lab import tasks
from streams.probes import ProbeItem, targets
from streams.schemas import Attempt, Trace


@pytest.fixture(scope="module")
def policy(tiny_policy: Path) -> tuple[Any, Any]:
    torch.set_num_threads(1)
    return load_policy(tiny_policy, "cpu")


def _probe() -> dict[str, list[ProbeItem]]:
    items = tasks.probe_items(tasks.target_probe(12, 0))
    return targets(items)


def _aligner(model: Any, tok: Any) -> UpdateAlignment:
    return UpdateAlignment(
        model, tok, lambda p: format_prompt(tok, p), _probe(), DEFAULT_FOOTHOLD_PROBABILITY
    )


def _cohort(model: Any, tok: Any, subject: str, seed: int) -> list[Trace]:
    batch = tasks.control_cohort("frontier", 8, seed, subject=subject)
    traces = [
        tasks.to_trace(t, policy_version="v0", key=f"{seed}/{i}") for i, t in enumerate(batch)
    ]
    engine = HFRolloutEngine(model, tok, format_prompt=lambda p: format_prompt(tok, p))
    return list(fill_attempts(traces, engine, 8, seed=seed, max_new_tokens=8).traces)


def _solved(prompt: str, answer: str, *, key: int, k: int) -> Trace:
    """A trace whose ``k`` attempts all give the right answer (no learning signal)."""
    task = tasks.Task(prompt=prompt, reference=answer, subject="add", tags={}, verifier="exact")
    attempts = [Attempt(completion=answer, reward=1.0, n_tokens=len(answer))] * k
    return tasks.to_trace(task, policy_version="v0", attempts=attempts, key=key)


def _grpo_loss(aligner: UpdateAlignment, traces: list[Trace]) -> torch.Tensor:
    """TRL's group-scaled GRPO surrogate on the cohort's fixed attempts (a second implementation)."""
    prompts, answers, weights = [], [], []
    for t in traces:
        r = torch.tensor([a.reward for a in t.attempts], dtype=torch.float64)
        adv = (r - r.mean()) / (r.std() + 1e-4)
        for a, w in zip(t.attempts, adv.tolist(), strict=True):
            prompts.append(t.prompt)
            answers.append(a.completion)
            weights.append(w)
    s, n = aligner._answer_logprobs(prompts, answers)
    return -(torch.tensor(weights, dtype=s.dtype) * s).sum() / n.sum()


def _target_nll(aligner: UpdateAlignment, target: str, held: list[ProbeItem]) -> float:
    with torch.no_grad():
        s, n = aligner._answer_logprobs([it.prompt for it in held], [it.reference for it in held])
    return float(-s.sum() / n.sum())


def test_the_sign_says_whether_a_small_grpo_step_lowers_each_targets_nll(policy) -> None:
    model, tok = policy
    base = snapshot(model)
    aligner = _aligner(model, tok)
    traces = _cohort(model, tok, "compare", seed=3)
    names = sorted(aligner.probe)
    got = aligner(traces, names, "v0")
    assert set(got) == set(names) and all(-1.0 <= v <= 1.0 for v in got.values())
    # The foothold items each target's value was measured on, at these weights.
    held = {}
    for t in names:
        with torch.no_grad():
            s, _ = aligner._answer_logprobs(
                [it.prompt for it in aligner.probe[t]], [it.reference for it in aligner.probe[t]]
            )
        held[t] = [
            it
            for it, x in zip(aligner.probe[t], s.tolist(), strict=True)
            if -x <= aligner.max_item_nll
        ]
    before = {t: _target_nll(aligner, t, held[t]) for t in names}
    try:
        model.eval()
        loss = _grpo_loss(aligner, traces)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        with torch.no_grad():  # one small plain gradient step
            for p, g in zip([p for p in model.parameters() if p.requires_grad], grads, strict=True):
                p -= 1e-3 * g
        drop = {t: before[t] - _target_nll(aligner, t, held[t]) for t in names}
    finally:
        model.load_state_dict(base)
    clear = [t for t in names if abs(got[t]) > 0.02]
    assert clear, got
    for t in clear:
        assert math.copysign(1.0, drop[t]) == math.copysign(1.0, got[t]), (t, got[t], drop[t])
    # A compare cohort points at compare's items more than at any other target's.
    assert got["compare"] == max(got.values())


def test_no_learning_signal_or_no_target_gives_zero(policy) -> None:
    model, tok = policy
    aligner = _aligner(model, tok)
    solved = [_solved(f"{i}+1=", str(i + 1), key=i, k=4) for i in range(3)]
    assert aligner(solved, ["add", "mul"], "v0") == {"add": 0.0, "mul": 0.0}
    assert aligner(solved, ["no-such-target"], "v0") == {}
    # A target whose answers the policy never produces has no foothold item.
    alien = {
        "alien": [ProbeItem(target="alien", prompt="1+1=", reference="zzzz", verifier="exact")]
    }
    other = UpdateAlignment(model, tok, lambda p: format_prompt(tok, p), alien, 0.5)
    mixed = _cohort(model, tok, "add", seed=5)
    assert other(mixed, ["alien"], "v0") == {"alien": 0.0}


def test_probe_gradients_are_kept_per_weights_key(policy) -> None:
    model, tok = policy
    base = snapshot(model)
    aligner = _aligner(model, tok)
    traces = _cohort(model, tok, "sub", seed=7)
    first = aligner(traces, ["sub"], "v0")["sub"]
    assert aligner(traces, ["sub"], "v0")["sub"] == first  # deterministic
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
        # Same key: the probe's side is the cached one, the cohort's is recomputed.
        stale = aligner(traces, ["sub"], "v0")["sub"]
        fresh = aligner(traces, ["sub"], "v1")["sub"]
        recomputed = _aligner(model, tok)(traces, ["sub"], "v1")["sub"]
    finally:
        model.load_state_dict(base)
    assert fresh == pytest.approx(recomputed, abs=1e-9)
    assert stale != pytest.approx(fresh, abs=1e-6)


def test_featurize_takes_the_value_and_names_a_bad_one() -> None:
    trace = _solved("1+1=", "2", key=0, k=1)
    assert featurize([trace])["update_alignment"] == 0.0  # not measured
    assert featurize([trace], update_alignment=0.25)["update_alignment"] == 0.25
    with pytest.raises(FeatureError) as e:
        featurize([trace], update_alignment=math.nan)
    assert e.value.field == "features.update_alignment"


def test_the_scorer_measures_it_on_its_own_policy_and_survives_a_broken_one(
    lab_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.service.scorer import PolicyRollout
    from streams.probes import read_probe_file

    settings = TapdSettings.model_validate(
        {
            "policy": {
                "model_path": lab_env["TAPD_POLICY__MODEL_PATH"],
                "probe_path": lab_env["TAPD_POLICY__PROBE_PATH"],
                "device": "cpu",
            }
        }
    )
    probe = targets(read_probe_file(lab_env["TAPD_POLICY__PROBE_PATH"]))
    rollout = PolicyRollout(settings)
    subject = sorted(probe)[0]
    batch = tasks.control_cohort("frontier", 4, 1, subject=subject)
    traces = [tasks.to_trace(t, policy_version="v0", key=i) for i, t in enumerate(batch)]
    filled = list(fill_attempts(traces, rollout, 8, seed=1, max_new_tokens=8).traces)
    value = rollout.update_alignment(filled, probe)
    assert value is not None and -1.0 <= value <= 1.0
    # Its own computation, on the engine's weights and the same fresh
    # attempts (seeded by the trace ids), gives the same value.
    engine = rollout.engine
    direct_aligner = UpdateAlignment(
        engine.model, engine.tokenizer, engine.format_prompt, probe, DEFAULT_FOOTHOLD_PROBABILITY
    )
    assert settings.policy.update_alignment_attempts == DEFAULT_ATTEMPTS
    fresh = fresh_groups(
        filled,
        engine,
        DEFAULT_ATTEMPTS,
        max_new_tokens=settings.grpo.max_completion_length,
        temperature=settings.grpo.temperature,
    )
    direct = direct_aligner(fresh, [subject], "v0")[subject]
    assert value == pytest.approx(direct, abs=1e-12)
    # With the setting at 0 it is measured on the cohort's own attempts.
    own_settings = settings.model_copy(
        update={"policy": settings.policy.model_copy(update={"update_alignment_attempts": 0})}
    )
    own = PolicyRollout(own_settings).update_alignment(filled, probe)
    assert own == pytest.approx(direct_aligner(filled, [subject], "v1")[subject], abs=1e-12)
    assert own != pytest.approx(value, abs=1e-6)
    # A cohort with no target in the probe is not measured.
    other = [t.model_copy(update={"subject": "no-such-subject"}) for t in filled]
    assert rollout.update_alignment(other, probe) is None

    # A failing model is the policy's fault, not the traces': not measured, logged.
    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(rollout._aligner, "_logprobs", broken)
    assert rollout.update_alignment(filled, probe) is None


def test_the_parameter_budget_takes_the_trailing_parameters(policy) -> None:
    model, tok = policy
    params = [p for p in model.parameters() if p.requires_grad]
    whole = _aligner(model, tok)
    assert [id(p) for p in whole._params()] == [id(p) for p in params]
    last_two = params[-1].numel() + params[-2].numel()
    small = UpdateAlignment(
        model, tok, lambda p: format_prompt(tok, p), _probe(), 0.5, max_params=last_two
    )
    assert [id(p) for p in small._params()] == [id(p) for p in params[-2:]]
    # Under any budget at least one tensor is measured.
    one = UpdateAlignment(model, tok, lambda p: format_prompt(tok, p), _probe(), 0.5, max_params=1)
    assert [id(p) for p in one._params()] == [id(params[-1])]
    traces = _cohort(model, tok, "digits", seed=2)
    assert -1.0 <= small(traces, ["digits"], "v0")["digits"] <= 1.0
    with pytest.raises(ValueError, match="max_params"):
        UpdateAlignment(model, tok, lambda p: p, _probe(), 0.5, max_params=0)


def test_batches_sum_to_the_whole_and_hostile_lengths_are_bounded(policy) -> None:
    model, tok = policy
    traces = _cohort(model, tok, "mul", seed=4)
    whole = _aligner(model, tok)(traces, ["mul", "add"], "v0")
    small = UpdateAlignment(
        model,
        tok,
        lambda p: format_prompt(tok, p),
        _probe(),
        DEFAULT_FOOTHOLD_PROBABILITY,
        batch_size=3,
    )(traces, ["mul", "add"], "v0")
    assert small == pytest.approx(whole, abs=1e-5)
    # Attempts an attacker made as long as the schema allows: each row is
    # read to a bounded length, so the value comes back, finite.
    from daemon.policy import alignment as mod

    long = "9" * 30_000
    hostile = [
        t.model_copy(
            update={
                "attempts": [
                    a.model_copy(update={"completion": long + a.completion}) for a in t.attempts
                ]
            }
        )
        for t in traces
    ]
    aligner = _aligner(model, tok)
    row = ([hostile[0].prompt], [hostile[0].attempts[0].completion])
    seqs, starts = aligner._rows(*row)
    # This model reads 32 positions: the row fits them, the answer keeps the rest.
    assert aligner.max_positions == 32 and len(seqs[0]) == 32
    assert len(seqs[0]) - starts[0] == 32 - len(tok(hostile[0].prompt)["input_ids"])
    aligner.max_positions = None  # a model of a longer context reads the answer's first tokens
    seqs, starts = aligner._rows(*row)
    assert len(seqs[0]) - starts[0] == mod.MAX_ANSWER_TOKENS
    aligner.max_positions = 32
    got = aligner(hostile, ["mul"], "v0")["mul"]
    assert math.isfinite(got) and -1.0 <= got <= 1.0


def test_fresh_groups_draw_rounds_of_at_most_max_attempts_seeded_by_the_trace_ids(
    policy,
) -> None:
    from streams.schemas import MAX_ATTEMPTS

    model, tok = policy
    engine = HFRolloutEngine(model, tok, format_prompt=lambda p: format_prompt(tok, p))
    traces = _cohort(model, tok, "add", 3)[:3]
    n = 2 * MAX_ATTEMPTS + 5
    got = fresh_groups(traces, engine, n, max_new_tokens=8)
    # Every prompt gets n attempts, as groups of 64, 64 and 5: fresh ones
    # only (topping up would have kept the 8 carried in the last round).
    assert [len(t.attempts) for t in got] == [MAX_ATTEMPTS] * 3 + [MAX_ATTEMPTS] * 3 + [5] * 3
    assert [t.trace_id for t in got] == [t.trace_id for t in traces] * 3
    # Scored by the trace's own verifier.
    from daemon.verify.registry import get_verifier

    for t in got:
        verify = get_verifier(t.verifier, t.verifier_args)
        assert [a.reward for a in t.attempts] == [
            float(verify(a.completion, t.reference)) for a in t.attempts
        ]

    def draws(ts: list[Trace], seed: int | None = None) -> list[list[str]]:
        return [[a.completion for a in t.attempts] for t in fresh_groups(ts, engine, 16, seed)]

    # The same cohort draws the same attempts (any replica, any pod); rounds
    # and other cohorts draw others.
    assert draws(traces) == draws(traces)
    assert draws(traces) != draws(traces, seed=12345)
    renamed = [t.model_copy(update={"trace_id": t.trace_id + "-x"}) for t in traces]
    assert draws(renamed) != draws(traces)
    assert [a.completion for a in got[0].attempts] != [a.completion for a in got[3].attempts]
    with pytest.raises(ValueError, match="attempts"):
        fresh_groups(traces, engine, 0)


def test_measure_samples_only_for_a_cohort_with_a_learning_signal(policy) -> None:
    model, tok = policy
    aligner = _aligner(model, tok)
    real = HFRolloutEngine(model, tok, format_prompt=lambda p: format_prompt(tok, p))

    class Counting:
        calls = 0

        def sample(self, *a: Any, **k: Any) -> Any:
            Counting.calls += 1
            return real.sample(*a, **k)

    engine = Counting()
    # All attempts right: GRPO has nothing to learn, the predictor serves 0.
    known = [_solved("1+2=", "3", key=i, k=8) for i in range(4)]
    assert aligner.measure(known, ["add"], "v0", engine, DEFAULT_ATTEMPTS) == {"add": 0.0}
    assert Counting.calls == 0
    # With a signal it measures on fresh attempts: fresh_groups' value, sampled.
    cohort = _cohort(model, tok, "add", 5)
    got = aligner.measure(cohort, ["add"], "v0", engine, 16, 7, max_new_tokens=8)
    assert Counting.calls > 0
    fresh = fresh_groups(cohort, real, 16, 7, max_new_tokens=8)
    assert got == aligner(fresh, ["add"], "v0")
    # attempts=0: the cohort's own attempts, nothing sampled.
    calls = Counting.calls
    assert aligner.measure(cohort, ["add"], "v0", engine, 0) == aligner(cohort, ["add"], "v0")
    assert Counting.calls == calls
