"""Each feature against values computed by hand on small constructed cohorts."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from daemon.core.cohorting import Cohort
from daemon.core.features import (
    ADV_EPS,
    FEATURE_NAMES,
    MONOTONE,
    FeatureError,
    _learnability,
    bad_answers,
    classify_group,
    feature_vector,
    featurize,
    group_advantages,
    near_duplicate_rate,
    prepare,
    prepare_many,
    reward_trust,
    target_similarity,
    template_repetition,
)
from streams.schemas import Attempt, TokenStats, Trace


def _trace(
    tid: str,
    rewards: list[float],
    *,
    prompt: str = "What is 40 + 2?",
    reference: str = "42",
    verifier: str = "exact",
    n_tokens: int = 3,
    logprobs: list[list[float]] | None = None,
    entropies: list[list[float]] | None = None,
) -> Trace:
    attempts = []
    for i, r in enumerate(rewards):
        lp = logprobs[i] if logprobs else None
        attempts.append(
            Attempt(
                completion=str(r),
                reward=r,
                n_tokens=len(lp) if lp is not None else n_tokens,
                token_logprobs=lp,
                token_entropies=entropies[i] if entropies else None,
            )
        )
    return Trace(
        schema="tapd.trace/1",
        trace_id=tid,
        ts=0.0,
        subject="math",
        prompt=prompt,
        reference=reference,
        verifier=verifier,
        policy_version="p0",
        attempts=attempts,
    )


# The seeds' worked example: 5/8 disagree, 8/8 already known, 0/8 no foothold.
DISAGREE = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
KNOWN = [1.0] * 8
NO_FOOTHOLD = [0.0] * 8


def _worked_example() -> list[Trace]:
    return [
        _trace("a", DISAGREE, prompt="If 3x + 7 = 22, find x", reference="5"),
        _trace("b", KNOWN, prompt="What is 2 + 2?", reference="4"),
        _trace("c", NO_FOOTHOLD, prompt="Prove the Riemann Hypothesis", reference="QED"),
    ]


def test_classify_group_matches_the_worked_example() -> None:
    assert classify_group(DISAGREE) == "disagree"
    assert classify_group(KNOWN) == "known"
    assert classify_group(NO_FOOTHOLD) == "no_foothold"
    with pytest.raises(FeatureError) as e:
        classify_group([])
    assert e.value.field == "rewards"


def test_group_advantages_follow_trl_group_scaling() -> None:
    # 5 of 8 right: mean 0.625, sample std sqrt((5*.375^2 + 3*.625^2)/7).
    s = math.sqrt((5 * 0.375**2 + 3 * 0.625**2) / 7)
    adv = group_advantages(DISAGREE)
    assert adv[0] == pytest.approx(0.375 / (s + ADV_EPS))
    assert adv[1] == pytest.approx(-0.625 / (s + ADV_EPS))
    assert np.all(group_advantages(KNOWN) == 0.0)
    assert group_advantages([1.0]).tolist() == [0.0]


def test_learnability_of_the_worked_example() -> None:
    f = featurize(_worked_example(), verifier_probe=False)
    s = math.sqrt((5 * 0.375**2 + 3 * 0.625**2) / 7)
    # Advantages sum to 0 in every group, so their std over the 24 attempts
    # is the root mean square: only the 5/8 group contributes.
    sum_sq = (5 * 0.375**2 + 3 * 0.625**2) / (s + ADV_EPS) ** 2
    assert f["adv_std"] == pytest.approx(math.sqrt(sum_sq / 24))
    assert f["adv_absmean"] == pytest.approx((5 * 0.375 + 3 * 0.625) / (s + ADV_EPS) / 24)
    assert f["frac_nondegenerate"] == pytest.approx(1 / 3)
    assert f["frac_all_correct"] == pytest.approx(1 / 3)
    assert f["frac_all_wrong"] == pytest.approx(1 / 3)
    p = 13 / 24  # 5 + 8 + 0 of 24 attempts pass
    assert f["reward_mean"] == pytest.approx(p)
    assert f["reward_std"] == pytest.approx(math.sqrt(p * (1 - p)))
    assert f["pass_rate"] == pytest.approx(p)
    g = [5 / 8, 1.0, 0.0]
    assert f["group_passrate_mean"] == pytest.approx(sum(g) / 3)
    mean_g = sum(g) / 3
    assert f["group_passrate_std"] == pytest.approx(
        math.sqrt(sum((x - mean_g) ** 2 for x in g) / 3)
    )
    assert f["n_groups"] == 3.0
    assert f["len_mean"] == 3.0 and f["len_std"] == 0.0


def test_pass_var_per_token_is_the_groups_pass_variance_per_passing_answer_token() -> None:
    # The worked example's 3 groups: p(1 - p) is 5/8 * 3/8, 0 and 0; the 13
    # passing attempts have 3 tokens each.
    f = featurize(_worked_example(), verifier_probe=False)
    assert f["pass_var_per_token"] == pytest.approx((5 / 8 * 3 / 8) / 3 / 3)
    # The same disagreement with longer passing answers is less per token;
    # only passing attempts' lengths count.
    short = [_trace("s", [1.0, 0.0, 1.0, 0.0], n_tokens=2), _trace("k", [1.0] * 4, n_tokens=4)]
    longer = [_trace("s", [1.0, 0.0, 1.0, 0.0], n_tokens=6), _trace("k", [1.0] * 4, n_tokens=6)]
    a = featurize(short, verifier_probe=False)["pass_var_per_token"]
    b = featurize(longer, verifier_probe=False)["pass_var_per_token"]
    assert a == pytest.approx((0.25 + 0.0) / 2 / ((2 * 2 + 4 * 4) / 6))
    assert b == pytest.approx((0.25 + 0.0) / 2 / 6) and b < a
    # Answers under one token are counted as one; no passing attempt gives 0.
    empty = [_trace("e", [1.0, 0.0], n_tokens=0)]
    assert featurize(empty, verifier_probe=False)["pass_var_per_token"] == pytest.approx(0.25)
    none = [_trace("n", [0.0, 0.0])]
    assert featurize(none, verifier_probe=False)["pass_var_per_token"] == 0.0


def test_adv_std_is_about_sqrt_of_frac_nondegenerate() -> None:
    # With per-group scaling a nondegenerate group of K contributes
    # sum a^2 = K - 1 (up to eps), a degenerate one 0: adv_std^2 is about
    # frac_nondegenerate * (K - 1) / K.
    rng = random.Random(3)
    traces = []
    for i in range(40):
        p = rng.choice([0.0, 0.3, 0.6, 1.0])
        traces.append(_trace(f"t{i}", [float(rng.random() < p) for _ in range(8)]))
    f = featurize(traces, verifier_probe=False)
    assert 0.0 < f["frac_nondegenerate"] < 1.0
    assert f["adv_std"] == pytest.approx(math.sqrt(f["frac_nondegenerate"] * 7 / 8), rel=1e-3)


def test_graded_rewards_use_the_success_threshold() -> None:
    f = featurize([_trace("g", [0.6, 0.7]), _trace("h", [0.2, 0.2])], verifier_probe=False)
    assert f["frac_nondegenerate"] == 0.5  # 0.6 != 0.7: GRPO still has a signal there
    assert f["frac_all_correct"] == 0.5  # ... yet both pass
    assert f["frac_all_wrong"] == 0.5
    assert f["pass_rate"] == 0.5
    assert f["reward_mean"] == pytest.approx((0.6 + 0.7 + 0.2 + 0.2) / 4)


def test_familiarity_from_token_arrays() -> None:
    lps = [[-1.0, -2.0, -3.0, -4.0], [-0.5], [-1.0, -2.0, -3.0]]
    ents = [[1.0, 1.0, 1.0, 1.0], [2.0], [0.0, 0.0, 3.0]]
    f = featurize([_trace("x", [1.0, 0.0, 1.0], logprobs=lps, entropies=ents)])
    assert f["mean_logprob"] == pytest.approx((-2.5 - 0.5 - 2.0) / 3)
    assert f["surprisal_mean"] == pytest.approx((10 + 0.5 + 6) / 3)
    assert f["entropy_mean"] == pytest.approx((1 + 2 + 1) / 3)
    # pooled, sorted: -4 -3 -3 -2 -2 -1 -1 -0.5 (8 tokens); linear interpolation
    # at positions 0.7, 3.5 and 6.3.
    assert f["logprob_p10"] == pytest.approx(-4 + 0.7 * 1)
    assert f["logprob_p50"] == pytest.approx(-2.0)
    assert f["logprob_p90"] == pytest.approx(-1.0 + 0.3 * 0.5)
    # halves: [-1,-2] vs [-3,-4] -> -2; one token -> 0; [-1] vs [-2,-3] -> -1.5
    assert f["confidence_slope"] == pytest.approx((-2.0 + 0.0 - 1.5) / 3)
    e = math.exp
    assert f["redundancy_mean"] == pytest.approx(
        ((e(-1) + e(-2) + e(-3) + e(-4)) / 4 + e(-0.5) + (e(-1) + e(-2) + e(-3)) / 3) / 3
    )
    assert f["min_logprob_mean"] == pytest.approx((-4 - 0.5 - 3) / 3)
    assert f["len_mean"] == pytest.approx(8 / 3)
    assert f["len_std"] == pytest.approx(np.std([4, 1, 3]))


_STATS = TokenStats(
    logprob_mean=-1.5,
    logprob_min=-3.0,
    logprob_p10=-2.8,
    logprob_p50=-1.2,
    logprob_p90=-0.4,
    prob_mean=0.3,
    logprob_early=-1.0,
    logprob_late=-2.0,
    entropy_mean=0.7,
)


def test_familiarity_from_token_stats() -> None:
    stats = _STATS
    attempt = Attempt(completion="5", reward=1.0, n_tokens=4, stats=stats)
    trace = _trace("s", [1.0]).model_copy(update={"attempts": [attempt, attempt]})
    f = featurize([trace], verifier_probe=False)
    assert f["mean_logprob"] == -1.5
    assert f["surprisal_mean"] == pytest.approx(6.0)
    assert f["entropy_mean"] == pytest.approx(0.7)
    assert (f["logprob_p10"], f["logprob_p50"], f["logprob_p90"]) == pytest.approx(
        (-2.8, -1.2, -0.4)
    )
    assert f["confidence_slope"] == pytest.approx(-1.0)
    assert f["redundancy_mean"] == pytest.approx(0.3)
    assert f["min_logprob_mean"] == pytest.approx(-3.0)


def test_familiarity_without_logprob_information_is_zero() -> None:
    f = featurize([_trace("n", [1.0, 0.0])], verifier_probe=False)
    assert all(
        f[k] == 0.0 for k in ("mean_logprob", "surprisal_mean", "logprob_p50", "entropy_mean")
    )


def test_target_similarity_is_mean_best_trigram_cosine() -> None:
    # "abcd" -> {abc, bcd}, "abce" -> {abc, bce}: cosine 1/2; "xyz" shares nothing.
    assert target_similarity(["abcd", "xyz"], ["abce", "qqqq"]) == pytest.approx(0.25)
    assert target_similarity(["Same  TEXT"], ["same text"]) == pytest.approx(1.0)
    assert target_similarity(["abcd"], None) == 0.0
    traces = [_trace("p", [1.0], prompt="abcd"), _trace("q", [0.0], prompt="xyz")]
    f = featurize(traces, probe_prompts=["abce"], verifier_probe=False)
    assert f["target_similarity"] == pytest.approx(0.25)


def test_near_duplicate_rate() -> None:
    base = "abcdefghijklmnopqrstuvwxyz"
    # One changed last character: 23 shared of 25 trigrams, Jaccard 0.92.
    near = base[:-1] + "1"
    # Three changed at the end: 21 shared of 27, Jaccard 0.78 < 0.8.
    far = base[:-3] + "123"
    assert near_duplicate_rate([base, near, "zzzz"]) == pytest.approx(2 / 3)
    assert near_duplicate_rate([base, far]) == 0.0
    assert near_duplicate_rate(["same", "same", "same", "other thing"]) == pytest.approx(3 / 4)


def test_template_repetition_masks_numbers() -> None:
    prompts = ["What is 12 + 30?", "What is 7 + 5?", "Name a prime.", "what is 1.5 + 2,000?"]
    assert template_repetition(prompts) == pytest.approx(1 - 2 / 4)
    assert template_repetition(["a", "b"]) == 0.0
    f = featurize(
        [_trace("u", [1.0], prompt=p) for p in prompts[:3]]
        + [_trace("v", [1.0], prompt=prompts[3])],
        verifier_probe=False,
    )
    assert f["template_repetition"] == pytest.approx(0.5)


def test_bad_answers_never_include_the_reference() -> None:
    assert "42" not in bad_answers("What is 40 + 2?", "42")
    assert bad_answers("Pick one", "B")[0] == "C"
    assert "" not in bad_answers("Say nothing", "")


def test_reward_trust_exact_is_one_and_gameable_verifiers_are_low() -> None:
    def cohort(verifier: str) -> list[Trace]:
        return [_trace("r", [1.0], prompt="What is 40 + 2?", reference="42", verifier=verifier)]

    assert reward_trust(cohort("exact")) == 1.0
    # Bad answers for 42: 53, "", the echoed prompt, "A B C D E", 429, 4#zq,
    # zq42qz, "42 or 53". contains rewards 429, zq42qz, "42 or 53".
    assert reward_trust(cohort("contains")) == pytest.approx(1 - 3 / 8)
    # weak_first_digit rewards those, the echo (its first digit is 4) and 4#zq.
    assert reward_trust(cohort("weak_first_digit")) == pytest.approx(1 - 5 / 8)
    # The strict numeric parser rewards none of them; its lenient "last
    # number" mode (for prose answers) lets "zq42qz" through.
    assert reward_trust(cohort("numeric")) == 1.0
    lenient = [
        t.model_copy(update={"verifier_args": {"extract": "last"}}) for t in cohort("numeric")
    ]
    assert reward_trust(lenient) == pytest.approx(1 - 1 / 8)
    mcq = [_trace("m", [1.0], prompt="Pick: A) 1 B) 2 C) 3", reference="B", verifier="mcq")]
    assert reward_trust(mcq) == 1.0
    # One-digit answers get no "first digit + junk" probe (it is the whole answer).
    one_digit = [_trace("d", [1.0], prompt="If 3x + 7 = 22, find x", reference="5")]
    assert "5#zq" not in bad_answers("If 3x + 7 = 22, find x", "5")
    assert reward_trust([one_digit[0].model_copy(update={"verifier": "numeric"})]) >= 0.8
    # An unknown verifier cannot be trusted at all.
    assert reward_trust(cohort("no_such_verifier")) == 0.0
    assert featurize(cohort("contains"))["reward_trust"] < 0.8
    assert featurize(cohort("exact"))["reward_trust"] == 1.0


def test_featurize_returns_every_feature_in_order_and_finite() -> None:
    f = featurize(_worked_example(), probe_prompts=["What is 3 + 3?"])
    assert tuple(f) == FEATURE_NAMES
    assert all(math.isfinite(v) for v in f.values())
    assert feature_vector(f) == [f[n] for n in FEATURE_NAMES]
    assert set(MONOTONE) <= set(FEATURE_NAMES)


def test_featurize_rejects_a_group_without_attempts() -> None:
    with pytest.raises(FeatureError) as e:
        featurize([_trace("a", [1.0]), _trace("empty", [])])
    assert e.value.field == "traces[1].attempts"
    with pytest.raises(FeatureError):
        featurize([])


def test_featurize_takes_a_cohort() -> None:
    traces = tuple(_worked_example())
    cohort = Cohort("c", "{}", "math", traces, 0.0, 1.0, "size")
    assert featurize(cohort) == featurize(traces)


def test_features_do_not_depend_on_trace_order() -> None:
    traces = _worked_example()
    assert featurize(traces) == featurize(list(reversed(traces)))


def test_reward_trust_remembers_pure_verifiers_probes_and_forgets_on_new_caps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daemon.config import VerifySettings
    from daemon.core import features
    from daemon.verify.registry import configure
    from daemon.verify.settings import current

    cohort = [_trace("r", [1.0], prompt="What is 40 + 2?", reference="42", verifier="numeric")]
    first = reward_trust(cohort)
    calls: list[tuple[str, str]] = []
    real = features._passes

    def counting(verify: object, answer: str, reference: str) -> bool | None:
        calls.append((answer, reference))
        return real(verify, answer, reference)  # type: ignore[arg-type]

    monkeypatch.setattr(features, "_passes", counting)
    # The same task again: every probe answer comes from the cache, same trust.
    assert reward_trust(cohort) == first
    assert calls == []
    # New verify caps may change a verifier's reward: everything is run again.
    before = current()
    configure(VerifySettings(**before.model_dump()))
    try:
        assert reward_trust(cohort) == first
    finally:
        configure(before)
    assert calls
    # Plugin verifiers (here the lab's gameable ones) are never remembered.
    calls.clear()
    contains = [t.model_copy(update={"verifier": "contains"}) for t in cohort]
    reward_trust(contains)
    n = len(calls)
    reward_trust(contains)
    assert len(calls) == 2 * n > 0


def test_reward_trust_probes_a_known_reference_once_whatever_the_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference's own bad answers are probed once per (verifier, reference); a
    new prompt with that reference costs only its echo. Warm or cold, the trust is
    the same, and so is the count of bad answers it is taken over."""
    from daemon.config import VerifySettings
    from daemon.core import features
    from daemon.verify.registry import configure
    from daemon.verify.settings import current

    rng = random.Random(8)
    cohorts = []
    for c in range(60):
        traces = []
        for i in range(rng.randint(1, 8)):
            verifier, ref = rng.choice(
                [("numeric", str(rng.randrange(12))), ("mcq", rng.choice("ABC")),
                 ("exact", rng.choice(["yes", "no", "7"])), ("numeric", "3.5")]
            )  # fmt: skip
            # Prompts that repeat, that echo a bad answer, that echo the reference.
            prompt = rng.choice([f"Q{rng.randrange(50)}: {ref}?", ref, "A B C D E", f"{ref}9"])
            traces.append(
                _trace(f"c{c}-{i}", [1.0], prompt=prompt, reference=ref, verifier=verifier)
            )
        cohorts.append(traces)
    warm = [reward_trust(c) for c in cohorts]
    before = current()
    configure(VerifySettings(**before.model_dump()))  # new caps: every cache starts empty
    try:
        cold = [reward_trust(c) for c in reversed(cohorts)][::-1]
    finally:
        configure(before)
    assert warm == cold
    assert len(set(warm)) > 1
    for prompt, ref in (("What is 1 + 2?", "3"), ("3", "3"), ("A B C D E", "B"), ("x", "")):
        both = bad_answers(prompt, ref)
        assert len(set(both)) == len(both) and ref.strip() not in both
        # The echo is a bad answer exactly when it is not the reference's.
        assert (prompt in both) == (features.normalize(prompt) != features.normalize(ref))

    calls: list[str] = []
    real = features._passes

    def counting(verify: object, answer: str, reference: str) -> bool | None:
        calls.append(answer)
        return real(verify, answer, reference)  # type: ignore[arg-type]

    monkeypatch.setattr(features, "_passes", counting)
    reward_trust([_trace("k", [1.0], prompt="What is 4 + 4?", reference="8", verifier="numeric")])
    calls.clear()
    reward_trust([_trace("n", [1.0], prompt="What is 5 + 3?", reference="8", verifier="numeric")])
    assert calls == ["What is 5 + 3?"]


def test_target_similarity_compares_templates_not_operands() -> None:
    # The numbers are masked: other operands of the same operation are the
    # target's kind of task, whatever their length; the same operands under
    # another operation are not.
    probe = ["12+34=", "5+6="]
    assert target_similarity(["987+654=", "1+2="], probe) == pytest.approx(1.0)
    assert target_similarity(["12-34="], probe) == 0.0
    assert target_similarity(["Add 3.5 and 1,000"], ["add 7 and 8"]) == pytest.approx(1.0)


def test_target_similarity_gathers_only_the_prompts_ngrams() -> None:
    from daemon.core.features import _ProbeIndex
    from daemon.core.similarity import cosine, ngrams, template

    rng = random.Random(7)
    words = ["what", "is", "the", "sum", "of", "solve", "prime", "area", "x", "12", "345"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    probes = [text() for _ in range(40)]
    index = _ProbeIndex(probes)
    for _ in range(200):
        t = text()
        dense = max(cosine(ngrams(template(t)), ngrams(template(p))) for p in probes)
        # Only the summation order differs from the dense product: a few ulps.
        assert index.best_cosine(t) == pytest.approx(dense, abs=1e-12)
        # Asked again (the memo): the very same value.
        assert index.best_cosine(t) == index._score([template(t)])[0]
    assert index.best_cosine("zzzz") == 0.0
    # A cohort at once (repeats, blanks, strangers, memo hits among them)
    # gives what one prompt at a time gives.
    fresh = _ProbeIndex(probes)
    batch = [text() for _ in range(30)] + ["", "zzzz", "   "]
    batch += [*batch[:5], batch[0]]
    assert fresh.best_cosines(batch) == [index._score([template(t)])[0] for t in batch]
    assert fresh.best_cosines(batch) == fresh.best_cosines(batch)


def test_target_similarity_in_chunks_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.core.features as features
    from daemon.core.similarity import template

    words = ["plus", "minus", "times", "over", "and then some", "twice"]
    probes = [f"what is {i} {words[i % 6]} {i * 7}" for i in range(30)]
    prompts = [template(f"what is {i} {words[i % 5]} {words[i % 4]}") for i in range(50)]
    prompts += ["", "qqq"]
    whole = features._ProbeIndex(probes)._score(prompts)
    monkeypatch.setattr(features, "_SCORE_CELLS", 64)  # a chunk or two prompts each
    assert features._ProbeIndex(probes)._score(prompts) == whole
    assert whole[-2:] == [0.0, 0.0] and min(whole[:-2]) > 0.3
    assert len(set(whole)) > 5  # the prompts differ, and so do their values


def test_near_duplicate_rate_prefix_filter_matches_every_pair_compared() -> None:
    from daemon.core.features import NEAR_DUPLICATE_JACCARD
    from daemon.core.similarity import jaccard, ngrams

    def every_pair(prompts: list[str]) -> float:
        sets = [set(ngrams(p)) for p in prompts]
        dup = [
            any(jaccard(a, b) >= NEAR_DUPLICATE_JACCARD for j, b in enumerate(sets) if j != i)
            for i, a in enumerate(sets)
        ]
        return sum(dup) / len(dup)

    rng = random.Random(11)
    rates = set()
    for _ in range(400):
        base = ["".join(rng.choice("abcde ") for _ in range(rng.randint(0, 14))) for _ in range(3)]
        prompts = []
        for _ in range(rng.randint(1, 20)):
            chars = list(rng.choice(base))
            for _ in range(rng.randint(0, 2)):
                chars.insert(rng.randint(0, len(chars)), rng.choice("abcde"))
            prompts.append("".join(chars) or " ")
        rate = near_duplicate_rate(prompts)
        assert rate == every_pair(prompts)
        # The scorer's path: each prompt's grams coded when its trace is prepared.
        traces = [_trace(f"n{i}", [1.0], prompt=p) for i, p in enumerate(prompts)]
        assert featurize(traces, verifier_probe=False)["near_duplicate_rate"] == rate
        rates.add(rate)
    assert len(rates) > 10  # the cases cover many rates, not only 0 and 1


def test_gram_codes_are_the_grams_exactly() -> None:
    """Codes share exactly what the grams share, whatever the characters (non-ASCII,
    astral, NUL, a lone surrogate) and lengths (texts shorter than a gram), and a
    text's codes do not depend on the texts coded with it."""
    from daemon.core.similarity import gram_codes, jaccard, normalize, normalized_gram_set

    rng = random.Random(3)
    alphabet = ["a", "b", " ", "1", "é", "\ud800", "\U0001f600", "\x00", "z"]
    texts = [
        normalize("".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 3, 5, 30]))))
        for _ in range(600)
    ]
    codes = gram_codes(texts)
    for t, c in zip(texts, codes, strict=True):
        assert c.dtype == np.int64 and len(c) == len(normalized_gram_set(t))
        assert c.tolist() == sorted(set(c.tolist()))
    for i, j in ((rng.randrange(600), rng.randrange(600)) for _ in range(5_000)):
        want = jaccard(normalized_gram_set(texts[i]), normalized_gram_set(texts[j]))
        assert jaccard(set(codes[i].tolist()), set(codes[j].tolist())) == want
    for lo, hi in ((0, 1), (7, 19), (300, 600)):
        assert [c.tolist() for c in gram_codes(texts[lo:hi])] == [c.tolist() for c in codes[lo:hi]]
    assert gram_codes([]) == []
    with pytest.raises(ValueError, match="n: "):
        gram_codes(["abcd"], n=4)


def test_token_percentiles_are_numpys_bit_for_bit() -> None:
    from daemon.core.features import _percentiles

    rng = np.random.default_rng(5)
    for n in [*range(1, 40), 100, 255, 256, 1001, 4095, 4096, 4097, 16_384, 70_001]:
        for x in (
            -rng.exponential(2.0, n),
            np.round(-rng.exponential(1.0, n), 1),  # ties
            -rng.choice([0.0, 0.05, 0.5, 3.0], n),  # -0.0 among them: the sign is kept too
        ):
            want = [repr(float(v)) for v in np.percentile(x, [10, 50, 90])]
            assert [repr(v) for v in _percentiles(x)] == want
    # Zeros of both signs in a large pool: the same values (a zero's sign may differ).
    for n in (5_000, 20_001):
        x = rng.choice([0.0, -0.0, -0.5, 0.5], n)
        assert list(_percentiles(x)) == [float(v) for v in np.percentile(x, [10, 50, 90])]
    # Any ranks, adjacent or not, at either end, against a full sort.
    from daemon.core.features import _order_statistics

    for n in (4_096, 9_000):
        x = np.round(-rng.exponential(1.0, n), 2)
        for _ in range(30):
            ks = sorted(set(rng.integers(0, n, rng.integers(1, 9)).tolist()) | {0, n - 1})
            ks = sorted(set(ks) | {k + 1 for k in ks[:2] if k + 1 < n})
            assert _order_statistics(x, ks) == {k: float(np.sort(x)[k]) for k in ks}


def test_groups_of_one_size_and_of_mixed_sizes_give_the_same_learnability() -> None:
    """The 2-D fast path (groups of one size) against the per-group path, bit for bit."""
    from daemon.core.features import _learnability, group_advantages

    rng = random.Random(5)
    for _ in range(200):
        k, n = rng.randint(1, 9), rng.randint(1, 12)
        rewards = [
            float(rng.random() < 0.4) if rng.random() < 0.8 else rng.random() for _ in range(k * n)
        ]
        fast = _learnability(rewards, [k] * n)
        # The same groups, one at a time, as TRL normalises them.
        groups = [np.array(rewards[i * k : (i + 1) * k]) for i in range(n)]
        adv = np.concatenate([group_advantages(g) for g in groups])
        assert fast["adv_std"] == float(adv.std())
        assert fast["adv_absmean"] == float(np.abs(adv).mean())
        assert fast["frac_nondegenerate"] == float(np.mean([g.max() != g.min() for g in groups]))
    # Mixed sizes: each group's advantages are its own.
    mixed = _learnability([1.0, 0.0, 1.0, 1.0, 0.0], [2, 3])
    adv = np.concatenate(
        [group_advantages(np.array([1.0, 0.0])), group_advantages(np.array([1.0, 1.0, 0.0]))]
    )
    assert mixed["adv_std"] == float(adv.std())
    assert mixed["group_passrate_mean"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_probe_results_are_bounded_in_bytes_by_the_verify_setting() -> None:
    """A long-running scorer's remembered probes stay within verify.probe_cache_mib."""
    from daemon.config import VerifySettings
    from daemon.core import features
    from daemon.verify.registry import configure
    from daemon.verify.settings import current

    before = current()
    configure(VerifySettings(**{**before.model_dump(), "probe_cache_mib": 0.05}))
    try:
        budget = int(0.05 * 2**20) // 2
        for i in range(2_000):
            p, ref = f"What is {i} + {i * 7}? " + "x" * (i % 300), str(8 * i)
            reward_trust([_trace(f"t{i}", [1.0], prompt=p, reference=ref, verifier="numeric")])
            for cache in (features._probe_cache.results, features._probe_cache.bad):
                assert cache.bytes <= cache.max_bytes == budget
        # Full, and still answering: the newest reference (and its prompt's
        # echo) is remembered, the oldest not.
        key = features._verifier_key(_trace("t", [1.0], verifier="numeric"))
        bad, results = features._probe_cache.bad, features._probe_cache.results
        for cache in (bad, results):
            assert cache.bytes > budget // 2 and 0 < len(cache) < 2_000
        assert bad.get((*key, "", ref)) is not None
        assert bad.get((*key, "", "0")) is None
        assert results.get((*key, p, ref)) is False
    finally:
        configure(before)
    # New caps start an empty cache under their own budget.
    reward_trust([_trace("r", [1.0], prompt="What is 1 + 1?", reference="2", verifier="numeric")])
    assert features._probe_cache.bad.max_bytes == int(before.probe_cache_mib * 2**20) // 2


def _mixed_traces(seed: int) -> list[Trace]:
    """Traces whose attempts mix token arrays, TokenStats, missing entropies and
    empty arrays, of different lengths (one-token attempts among them)."""
    rng = random.Random(seed)
    traces = []
    for i in range(12):
        attempts = []
        for j in range(6):
            n = rng.randrange(0, 40) if (i + j) % 5 else 0
            lp = [-rng.random() * 4 for _ in range(n)]
            kind = (i * 7 + j) % 4
            attempts.append(
                Attempt(
                    completion=str(j),
                    reward=float(rng.random() < 0.5),
                    n_tokens=n,
                    token_logprobs=lp if kind != 3 else None,
                    token_entropies=[rng.random() for _ in lp] if kind == 1 else None,
                    stats=_STATS if kind >= 2 else None,
                )
            )
        base = _trace(f"p{i}", [0.0], prompt=f"What  is {rng.randrange(99)} + {i}?")
        traces.append(base.model_copy(update={"attempts": attempts}))
    return traces


def test_a_prepared_trace_gives_the_features_of_an_unprepared_one_bit_for_bit() -> None:
    """The per-trace part made at cohorting time (prepare) changes when work is done,
    never a value."""
    traces = _mixed_traces(5)
    fresh = [t.model_copy(deep=True) for t in traces]
    for t in traces:
        prepare(t)
    assert featurize(traces, verifier_probe=False) == featurize(fresh, verifier_probe=False)


def test_a_trace_prepared_in_a_batch_gives_what_it_gives_alone() -> None:
    """A scorer prepares a poll batch at once, and a trace restored from a snapshot is
    prepared alone: no value may depend on which traces shared its batch."""
    traces = _mixed_traces(6)
    batch = [t.model_copy(deep=True) for t in traces]
    parts = prepare_many(batch[3:] + batch[:3])
    assert [id(p) for p in prepare_many(batch)] == [id(p) for p in parts[9:] + parts[:9]]
    for alone, together in zip(map(prepare, traces), prepare_many(batch), strict=True):
        assert alone is not together
        assert alone.attempt_rows.tobytes() == together.attempt_rows.tobytes()
        assert alone.logprobs.tobytes() == together.logprobs.tobytes()
        assert alone.entropies.tobytes() == together.entropies.tobytes()
        assert alone.group_rows.tobytes() == together.group_rows.tobytes()
        assert alone.template == together.template
    for cut in (slice(0, 5), slice(4, 12)):
        assert featurize(traces[cut], verifier_probe=False) == featurize(
            batch[cut], verifier_probe=False
        )
    # Groups of other sizes (and one not yet rolled out) in the batch: each group's
    # learnability is its own, as the per-group reference computes it.
    mixed = [
        traces[0].model_copy(update={"attempts": traces[0].attempts[:k]}) for k in (1, 3, 0, 6, 3)
    ]
    parts = prepare_many(mixed)
    assert parts[2].group_rows.size == 0
    rolled = [t for t in mixed if t.attempts]
    want = _learnability(
        [a.reward for t in rolled for a in t.attempts], [len(t.attempts) for t in rolled]
    )
    got = featurize(rolled, verifier_probe=False)
    assert {k: got[k] for k in want} == want


def test_a_trace_is_prepared_once_and_its_part_goes_with_it() -> None:
    import gc

    from daemon.core import features

    before = len(features._prepared)
    t = _trace("w", [1.0, 0.0], logprobs=[[-1.0, -2.0], [-0.5]], entropies=[[1.0, 1.0], [2.0]])
    part = prepare(t)
    assert prepare(t) is part
    # Another trace with the same content is another trace: its own part.
    other = t.model_copy(deep=True)
    assert prepare(other) is not part
    assert len(features._prepared) == before + 2
    del t, other, part
    gc.collect()
    # Nothing outlives its trace: a scorer's memo holds exactly its live traces.
    assert len(features._prepared) == before
