from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.policy.store import PolicyNotConfigured, format_prompt, load_policy, weights_hash
from lab import tiny_policy as policy_mod
from lab.tasks import TIERS
from lab.tiny_policy import (
    BUILD_MARKER,
    TinyPolicyConfig,
    build_info,
    build_tiny_policy,
    competence_report,
    sample_completions,
    train_tiny_policy,
)
from lab.tokenizer import build_char_tokenizer

# Small enough to train in a second or two: for properties of the build, not competence.
SMALL = TinyPolicyConfig(
    n_layer=1, n_embd=32, n_head=2, steps=15, batch_size=16, pool_per_family=20, warmup_steps=5
)


def test_tokenizer_round_trips_through_autotokenizer(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("37+45=", "rev0120=", "sum9652=22", "919?185=>", "a b\nc"):
        ids = loaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert ids[0] == loaded.bos_token_id
        assert len(ids) == len(text) + 1  # one token per character, plus <bos>
        assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded("82", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(
        ["8", "2"]
    )
    assert {loaded.pad_token, loaded.eos_token, loaded.bos_token} == {"<pad>", "<eos>", "<bos>"}
    assert len({loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id}) == 3
    # Batches pad on the left, where generation wants them.
    batch = loaded(["1+1=", "12+13="], padding=True)["input_ids"]
    assert batch[0][0] == loaded.pad_token_id and batch[1][0] == loaded.bos_token_id
    # Characters outside the vocabulary become <unk> rather than failing.
    assert loaded("é")["input_ids"][1] == loaded.unk_token_id
    assert format_prompt(loaded, "3+4=") == "3+4="


def test_build_is_deterministic_for_a_seed() -> None:
    a, _ = train_tiny_policy(SMALL, seed=1)
    b, _ = train_tiny_policy(SMALL, seed=1)
    c, _ = train_tiny_policy(SMALL, seed=2)
    assert weights_hash(a) == weights_hash(b)
    assert weights_hash(a) != weights_hash(c)


def test_build_is_atomic_cached_and_hf_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build_tiny_policy(tmp_path, seed=0, cfg=SMALL)
    assert (path / BUILD_MARKER).exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no half-built leftovers
    info = build_info(path)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert weights_hash(model) == info["weights_sha256"]
    # A second build is a load: training must not run again.
    monkeypatch.setattr(policy_mod, "train_tiny_policy", lambda *a: pytest.fail("rebuilt"))
    assert build_tiny_policy(tmp_path, seed=0, cfg=SMALL) == path
    # Another config or seed is another directory.
    assert policy_mod.policy_dir(tmp_path, 1, SMALL) != path


def test_tiny_policy_size_and_loading(tiny_policy: Path) -> None:
    info = build_info(tiny_policy)
    assert 100_000 <= info["n_params"] <= 1_000_000
    model, tok = load_policy(tiny_policy)
    assert not model.training and tok.padding_side == "left"
    # A configured path loads the same way with no code change.
    out = sample_completions(model, tok, ["3+4=", "2+2="], 1, temperature=0)
    assert [o[0] for o in out] == ["7", "4"]
    model2, _ = load_policy(tiny_policy)
    assert weights_hash(model2) == weights_hash(model)
    # No configured policy is an error naming the setting, never a silent build.
    with pytest.raises(PolicyNotConfigured, match=r"policy\.model_path"):
        load_policy(None)


@pytest.mark.science
def test_competence_pattern_easy_frontier_hard(tiny_policy: Path) -> None:
    """GRPO needs the tiers: known, disagreeing, and out of reach.

    Measured on probe-partition tasks with 8 samples at temperature 1 per prompt.
    """
    model, tok = load_policy(tiny_policy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # generation on a tiny model only thrashes with more
    try:
        report = competence_report(model, tok, seed=123, n=24, k=8)
    finally:
        torch.set_num_threads(threads)
    by_tier: dict[str, list[float]] = {"easy": [], "frontier": [], "hard": []}
    disagree: dict[str, list[float]] = {"easy": [], "frontier": [], "hard": []}
    for fam, c in report.items():
        by_tier[TIERS[fam]].append(c.sampled)
        disagree[TIERS[fam]].append(c.disagree)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    easy, frontier, hard = (mean(by_tier[t]) for t in ("easy", "frontier", "hard"))
    assert easy >= 0.8, report
    assert 0.25 <= frontier <= 0.75, report
    assert hard <= 0.1, report
    assert easy - frontier >= 0.15 and frontier - hard >= 0.2, report
    # Every easy family is mostly solved; no hard family has a foothold.
    assert min(by_tier["easy"]) >= 0.6 and max(by_tier["hard"]) <= 0.2, report
    # Frontier prompts are where sampled attempts disagree.
    assert mean(disagree["frontier"]) >= 0.4, report
    assert mean(disagree["frontier"]) > mean(disagree["hard"]) + 0.3, report
