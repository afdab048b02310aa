"""Cohort features: the ordered, versioned vector the predictor sees.

The names and their order are a contract (``FEATURE_SCHEMA``); a change of
either bumps the schema version, and persisted predictor models record the
version they were trained on. Formulas are in ``docs/FEATURES.md``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, Literal, TypeVar

import numpy as np

from daemon.core.cohorting import Cohort
from daemon.core.similarity import (
    gram_codes,
    jaccard,
    ngrams,
    norm,
    normalize,
    normalized_template,
    template,
)
from daemon.verify.registry import ProbeSkipped
from streams.probes import cohort_target
from streams.rejection import Rejection
from streams.schemas import TokenStats, Trace

FEATURE_SCHEMA = "tapd.features/3"

# The 23 features of the TAP appendix (seed 001), then reward integrity and
# coverage from xLift (seed 000).
LEARNABILITY = (
    "adv_std",
    "frac_nondegenerate",
    "adv_absmean",
    "frac_all_correct",
    "frac_all_wrong",
    "reward_mean",
    "reward_std",
    "pass_rate",
    "group_passrate_mean",
    "group_passrate_std",
    "pass_var_per_token",
)
RELEVANCE = ("target_similarity", "update_alignment")
SHAPE = ("len_mean", "len_std", "n_groups")
FAMILIARITY = (
    "mean_logprob",
    "surprisal_mean",
    "entropy_mean",
    "logprob_p10",
    "logprob_p50",
    "logprob_p90",
    "confidence_slope",
    "redundancy_mean",
    "min_logprob_mean",
)
INTEGRITY = ("reward_trust",)
COVERAGE = ("near_duplicate_rate", "template_repetition")

FEATURE_NAMES: tuple[str, ...] = (
    LEARNABILITY + RELEVANCE + SHAPE + FAMILIARITY + INTEGRITY + COVERAGE
)

# Directions the seeds establish (TAP appendix, "Monotone"): +1 lift rises
# with the feature, -1 it falls, 0 no constraint.
MONOTONE: dict[str, int] = {
    "adv_std": 1,
    "frac_nondegenerate": 1,
    "frac_all_correct": -1,
    "frac_all_wrong": -1,
}

# Rewards at or over this pass (binary rewards are 0/1; graded ones pass at 0.5).
SUCCESS_THRESHOLD = 0.5
# TRL GRPOTrainer (1.16, scale_rewards="group", its default): advantages are
# (r - group mean) / (group sample std + 1e-4).
ADV_EPS = 1e-4
NEAR_DUPLICATE_JACCARD = 0.8
# Prompts of a cohort whose verifier is red-teamed (bounds the verifier calls).
MAX_TRUST_PROMPTS = 16
# The longest answer, reference or prompt whose probe result or similarity is
# remembered (an echoed prompt is a probe answer). The remembered probe results
# are bounded in bytes by verify.probe_cache_mib.
PROBE_CACHE_MAX_CHARS = 2_048
# Bytes of prompt templates (numbers masked) whose best cosine to the probe set
# is remembered, per probe set (estimated as for the probe results; eight
# probe sets are kept).
SIMILARITY_CACHE_BYTES = 2 * 2**20
_MCQ_OPTIONS = "ABCDEFGHIJ"

GroupClass = Literal["disagree", "known", "no_foothold"]
_V = TypeVar("_V")


class FeatureError(Rejection):
    """A cohort or feature vector that cannot be used: ``field`` and ``reason`` say why."""

    @property
    def feature(self) -> str:
        """The feature's bare name, for ``features.<name>`` fields."""
        return self.field.removeprefix("features.")


# -- learnability --------------------------------------------------------------


def group_advantages(rewards: Sequence[float] | np.ndarray) -> np.ndarray:
    """GRPO advantages of one prompt group, as TRL computes them by default.

    A group of one has no spread (TRL uses std 0 there), so its advantage is 0.
    """
    r = np.asarray(rewards, dtype=np.float64)
    std = float(r.std(ddof=1)) if r.size > 1 else 0.0
    return (r - r.mean()) / (std + ADV_EPS)


def classify_group(rewards: Sequence[float] | np.ndarray) -> GroupClass:
    """The seeds' worked example: 5/8 disagree, 8/8 already known, 0/8 no foothold."""
    passed = [r >= SUCCESS_THRESHOLD for r in rewards]
    if not passed:
        raise FeatureError("rewards", "a prompt group needs at least one attempt")
    if all(passed):
        return "known"
    if not any(passed):
        return "no_foothold"
    return "disagree"


def _learnability(rewards: list[float], sizes: list[int]) -> dict[str, float]:
    """The learnability features of the prompt groups: ``sizes`` rewards each, in order."""
    flat = np.array(rewards, dtype=np.float64)
    if len(set(sizes)) == 1:
        # Every group the same size (the rollout engine tops groups up to K):
        # one 2-D array, reduced per row, instead of a dozen numpy calls per
        # group. Row reductions add in the same order as the 1-D ones, so the
        # values are bit-identical to the general path below.
        return _learnability_rows(flat.reshape(len(sizes), sizes[0]))
    groups = np.split(flat, np.cumsum(sizes)[:-1])
    adv = np.concatenate([group_advantages(g) for g in groups])
    group_pass = np.array([float((g >= SUCCESS_THRESHOLD).mean()) for g in groups])
    return _learnability_values(
        flat,
        adv,
        group_pass,
        float(np.mean([g.max() != g.min() for g in groups])),
    )


def _group_rows(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of one size, one per row of ``g``: each row's advantages, pass share
    and whether its rewards differ. Row by row, bit for bit the per-group values."""
    # A group of one has no spread (group_advantages).
    one = g.shape[1] == 1
    std = np.zeros((g.shape[0], 1)) if one else g.std(axis=1, ddof=1, keepdims=True)
    adv = (g - g.mean(axis=1, keepdims=True)) / (std + ADV_EPS)
    return adv, (g >= SUCCESS_THRESHOLD).mean(axis=1), g.max(axis=1) != g.min(axis=1)


def _learnability_rows(g: np.ndarray) -> dict[str, float]:
    """:func:`_learnability` of groups of one size, one per row of ``g``."""
    adv, group_pass, differ = _group_rows(g)
    return _learnability_values(g.ravel(), adv.ravel(), group_pass, float(np.mean(differ)))


def _learnability_prepared(prepared: Sequence[Prepared]) -> dict[str, float]:
    """:func:`_learnability` of prepared traces' groups (their rows made at prepare
    time), with ``len_mean`` and ``len_std`` over every attempt's token count."""
    blocks = [p.group_rows for p in prepared]
    x = np.empty((5, sum(b.shape[1] for b in blocks)))
    np.concatenate(blocks, axis=1, out=x[:3])
    return _attempt_values(
        x,
        np.fromiter((p.group_pass for p in prepared), dtype=np.float64, count=len(prepared)),
        sum(p.nondegenerate for p in prepared) / len(prepared),
    )


def _learnability_values(
    rewards: np.ndarray, adv: np.ndarray, group_pass: np.ndarray, nondegenerate: float
) -> dict[str, float]:
    x = np.zeros((5, rewards.size))
    x[0], x[1] = rewards, adv
    values = _attempt_values(x, group_pass, nondegenerate)
    # No token counts here.
    del values["len_mean"], values["len_std"], values["pass_var_per_token"]
    return values


def _attempt_values(
    x: np.ndarray, group_pass: np.ndarray, nondegenerate: float
) -> dict[str, float]:
    """The learnability features, and the token counts' mean and spread, from ``x``,
    whose rows 0 to 2 hold every attempt's reward, advantage and token count (rows
    3 and 4 are filled here), and each group's pass share.

    The per-attempt means and spreads are row reductions of one array: each row
    adds in the order its 1-D reduction would, so the values are those of
    ``rewards.mean()``, ``adv.std()`` and the rest bit for bit, in a few calls
    instead of a dozen (a closing cohort pays numpy's per-call cost, not the
    arithmetic). Shares of 0/1 values are counts over sizes: exact either way.
    """
    np.abs(x[1], out=x[3])
    np.greater_equal(x[0], SUCCESS_THRESHOLD, out=x[4])
    means = x.mean(axis=1)
    spread = x[:3].std(axis=1)
    groups = group_pass.size
    passed = np.count_nonzero(x[4])
    # The label is a lift per answer token: the same within-group disagreement
    # spread over longer answers moves each token's NLL less (docs/FEATURES.md).
    pass_tokens = float(np.dot(x[2], x[4])) / passed if passed else 0.0
    pass_var = float(np.dot(group_pass, 1.0 - group_pass)) / groups
    return {
        "adv_std": float(spread[1]),
        "frac_nondegenerate": nondegenerate,
        "adv_absmean": float(means[3]),
        "frac_all_correct": np.count_nonzero(group_pass == 1.0) / groups,
        "frac_all_wrong": np.count_nonzero(group_pass == 0.0) / groups,
        "reward_mean": float(means[0]),
        "reward_std": float(spread[0]),
        "pass_rate": float(means[4]),
        "group_passrate_mean": float(group_pass.mean()),
        "group_passrate_std": float(group_pass.std()),
        "pass_var_per_token": pass_var / max(1.0, pass_tokens) if passed else 0.0,
        "len_mean": float(means[2]),
        "len_std": float(spread[2]),
    }


# -- familiarity ---------------------------------------------------------------


def _pool(arrays: Sequence[Sequence[float]], total: int) -> np.ndarray:
    # One pass over a flat iterator: far cheaper than one array per attempt.
    return np.fromiter(itertools.chain.from_iterable(arrays), dtype=np.float64, count=total)


# The quantiles of logprob_p10/p50/p90, as np.percentile computes them (q / 100).
_QUANTILES = (10 / 100, 50 / 100, 90 / 100)


# From this many values on, one selection per order statistic, each on the
# part the previous ones left, beats numpy's partition at several kth at once
# (which re-scans the whole array per kth: 0.28 against 0.10 ms at 16k).
_SELECT_ONE_BY_ONE = 4_096


def _order_statistics(x: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """The values of rank ``ks`` (sorted, distinct) in ``x``, as a full sort would place them."""
    if x.size < _SELECT_ONE_BY_ONE:
        ordered = np.partition(x, list(ks))
        return {k: float(ordered[k]) for k in ks}
    y = x.copy()
    out: dict[int, float] = {}
    # (start, end, ranks inside): partition the middle rank's segment, then the
    # ranks below it lie in the part before it and those above in the part after.
    todo: list[tuple[int, int, list[int]]] = [(0, y.size, list(ks))]
    while todo:
        start, end, inside = todo.pop()
        mid = len(inside) // 2
        k = inside[mid]
        segment = y[start:end]
        segment.partition(k - start)
        out[k] = float(y[k])
        below, above = inside[:mid], inside[mid + 1 :]
        if above and above[0] == k + 1:
            # The next rank is the smallest value after this one: no partition.
            out[k + 1] = float(y[k + 1 : end].min())
            above = above[1:]
        if above:
            todo.append((k + 1, end, above))
        if below:
            todo.append((start, k, below))
    return out


def _percentiles(pooled: np.ndarray) -> tuple[float, float, float]:
    """``np.percentile(pooled, [10, 50, 90])`` (its default "linear" method), bit for bit.

    The same order statistics (:func:`_order_statistics`) and numpy's own
    interpolation formula, without its generic machinery, which cost more than
    the rest of the token features on a cohort's few hundred log-probs. One
    exception to "bit for bit": where 0.0 and -0.0 are both in a pool of 4,096
    or more and a percentile lands on them, its zero may carry the other sign
    (the value is the same; which zero a selection leaves there is its own).
    """
    last = pooled.size - 1
    bounds: list[tuple[int, int, float]] = []
    for q in _QUANTILES:
        v = last * q  # numpy: (n - 1) * quantiles
        if v >= last:
            # numpy takes the largest for both ends, and its weight is v - (-1).
            bounds.append((last, last, v + 1))
        else:
            low = math.floor(v)
            bounds.append((low, low + 1, v - low))
    at = _order_statistics(pooled, sorted({i for lo, hi, _ in bounds for i in (lo, hi)}))
    out: list[float] = []
    for lo, hi, t in bounds:
        a, b = at[lo], at[hi]
        # numpy's _lerp: a + (b - a) * t, from the upper end when t >= 0.5.
        diff = b - a
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return out[0], out[1], out[2]


# The one empty array every prepared trace without such values shares (read-only).
_NO_VALUES = np.empty(0)
_NO_VALUES.flags.writeable = False


def _values(xs: list[float]) -> np.ndarray:
    return np.array(xs, dtype=np.float64) if xs else _NO_VALUES


class Prepared:
    """What :func:`featurize` needs of one trace that the trace alone decides.

    Computed once, when the trace is cohorted (:func:`prepare_many`, a poll
    batch at a time), so that the work left when its cohort closes is the
    cohort-wide part: joining a few small arrays, percentiles, learnability,
    reward trust, near-duplicates. Held per trace:

    * ``logprobs``: the token log-probs of its attempts, pooled into one
      float64 array (the cohort's percentiles need them all);
    * ``attempt_rows``: five rows of one value per attempt (mean log-prob,
      surprisal, minimum log-prob, confidence slope, mean probability), from
      the token arrays where shipped, else from the attempt's TokenStats;
    * its group's rewards, advantages and token counts (a row each), its pass share
      and whether its rewards differ;
    * each attempt's mean entropy, the prompt normalised, its template, and
      its n-grams as integer codes (:func:`~daemon.core.similarity.gram_codes`).

    Every value is a function of the trace alone (no sum runs across two
    traces), so a trace prepared in any batch, or alone when it is featurized
    without having been prepared, gives the same features bit for bit.
    """

    __slots__ = (
        "attempt_rows",
        "entropies",
        "grams",
        "group_pass",
        "group_rows",
        "logprobs",
        "nondegenerate",
        "normalized",
        "stats",
        "stats_entropies",
        "stats_tokens",
        "template",
    )

    def __init__(
        self,
        trace: Trace,
        logprobs: np.ndarray,
        rows: np.ndarray,
        group: tuple[np.ndarray, float, bool],
        normalized: str,
        grams: np.ndarray,
    ) -> None:
        self.logprobs = logprobs
        self.normalized = normalized
        self.grams = grams
        self.group_rows, self.group_pass, self.nondegenerate = group
        without = [a for a in trace.attempts if not a.token_logprobs and a.stats is not None]
        self.stats: tuple[TokenStats, ...] = tuple(a.stats for a in without if a.stats is not None)
        self.stats_tokens = tuple(max(a.n_tokens, 1) for a in without)
        if self.stats:
            s_mean = np.array([s.logprob_mean for s in self.stats])
            stats_rows = np.array(
                [
                    s_mean,
                    -s_mean * np.asarray(self.stats_tokens, dtype=np.float64),
                    [s.logprob_min for s in self.stats],
                    [s.logprob_late - s.logprob_early for s in self.stats],
                    [s.prob_mean for s in self.stats],
                ]
            )
            rows = np.concatenate((rows, stats_rows), axis=1)
        self.attempt_rows = rows
        # Only each attempt's mean entropy is needed: summed where the floats
        # are (a list), which costs a third of copying them into an array.
        # Held as arrays, so that a closing cohort joins them in one call.
        self.entropies = _values(
            [sum(x) / len(x) for a in trace.attempts if (x := a.token_entropies)]
        )
        self.stats_entropies = _values(
            [
                a.stats.entropy_mean
                for a in trace.attempts
                if not a.token_entropies
                and a.stats is not None
                and a.stats.entropy_mean is not None
            ]
        )
        self.template = normalized_template(normalized)


# Prepared traces by identity, each entry dropped with its trace (a weak
# reference's callback): the scorer prepares a trace when it is cohorted and
# featurizes it when its cohort closes, without either holding the other.
_prepared: dict[int, tuple[weakref.ref[Trace], Prepared]] = {}


def _forget(key: int, ref: weakref.ref[Trace]) -> None:
    got = _prepared.get(key)
    if got is not None and got[0] is ref:
        del _prepared[key]


def _known(trace: Trace) -> Prepared | None:
    got = _prepared.get(id(trace))
    return got[1] if got is not None and got[0]() is trace else None


def _attempt_rows(pooled: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The five per-attempt rows of :class:`Prepared` for attempts whose
    ``lengths`` (each >= 1) token log-probs lie one after another in ``pooled``.

    Each value is a reduction over its own attempt's slice (``reduceat``), so
    it does not depend on which other attempts are pooled with it.
    """
    n = lengths.size
    if not n:
        return np.empty((5, 0))
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    half = lengths // 2
    # Each attempt's early half [start, start + half) and late half, in one pass.
    bounds = np.empty(2 * n, dtype=np.int64)
    bounds[0::2] = starts
    bounds[1::2] = starts + half
    halves = np.add.reduceat(pooled, bounds)
    sums = np.add.reduceat(pooled, starts)
    early = halves[0::2] / np.maximum(half, 1)
    late = halves[1::2] / (lengths - half)
    rows = np.empty((5, n))
    np.divide(sums, lengths, out=rows[0])
    np.negative(sums, out=rows[1])
    rows[2] = np.minimum.reduceat(pooled, starts)
    # One token has no early and late half: no slope (its "early half" above
    # is reduceat's value for an empty slice, the token itself).
    rows[3] = np.where(lengths >= 2, late - early, 0.0)
    rows[4] = np.add.reduceat(np.exp(pooled), starts) / lengths
    return rows


def _groups(traces: Sequence[Trace]) -> list[tuple[np.ndarray, float, bool]]:
    """Each trace's group part of :class:`Prepared`: the groups of each size as the
    rows of one array (:func:`_group_rows`, each row's values its own)."""
    out: list[tuple[np.ndarray, float, bool] | None] = [None] * len(traces)
    by_size: dict[int, list[int]] = {}
    for i, t in enumerate(traces):
        by_size.setdefault(len(t.attempts), []).append(i)
    for size, members in by_size.items():
        if not size:
            # No attempts yet (the rollout engine tops the group up, as a new
            # trace): nothing to reduce, and featurize refuses it as it is.
            for i in members:
                out[i] = (np.empty((3, 0)), 0.0, False)
            continue
        g = np.array([[a.reward for a in traces[i].attempts] for i in members], dtype=np.float64)
        n_tokens = np.array(
            [[a.n_tokens for a in traces[i].attempts] for i in members], dtype=np.float64
        )
        adv, group_pass, differ = _group_rows(g)
        # Each group's rewards, advantages and token counts: one (3, size) block a trace.
        rows = np.stack((g, adv, n_tokens), axis=1)
        for row, i in enumerate(members):
            out[i] = (rows[row].copy(), float(group_pass[row]), bool(differ[row]))
    return [x for x in out if x is not None]


def prepare_many(traces: Sequence[Trace]) -> list[Prepared]:
    """Each trace's :class:`Prepared` part, computed at most once while the trace lives.

    The token work of the traces not yet prepared is done in one numpy pass
    over all of them (a scorer prepares a poll batch at a time): per trace it
    costs a few microseconds, where a pass per trace cost a dozen numpy calls.
    """
    out: list[Prepared | None] = [_known(t) for t in traces]
    todo = [i for i, p in enumerate(out) if p is None]
    if todo:
        arrays = [[a.token_logprobs for a in traces[i].attempts if a.token_logprobs] for i in todo]
        lens = [len(x) for per in arrays for x in per]
        pooled = _pool([x for per in arrays for x in per], sum(lens))
        rows = _attempt_rows(pooled, np.array(lens, dtype=np.int64))
        groups = _groups([traces[i] for i in todo])
        normalized = [normalize(traces[i].prompt) for i in todo]
        grams = gram_codes(normalized)
        at = tokens = 0
        for k, (i, per) in enumerate(zip(todo, arrays, strict=True)):
            n = len(per)
            size = sum(lens[at : at + n])
            # Copies: a trace's part must not keep the whole batch's arrays alive.
            prepared = Prepared(
                traces[i],
                pooled[tokens : tokens + size].copy(),
                rows[:, at : at + n].copy(),
                groups[k],
                normalized[k],
                grams[k],
            )
            at += n
            tokens += size
            key = id(traces[i])
            ref = weakref.ref(traces[i], lambda r, key=key: _forget(key, r))  # type: ignore[misc]
            _prepared[key] = (ref, prepared)
            out[i] = prepared
    return [p for p in out if p is not None]


def prepare(trace: Trace) -> Prepared:
    """The trace's :class:`Prepared` part (:func:`prepare_many` of one trace)."""
    return prepare_many([trace])[0]


def _familiarity(prepared: Sequence[Prepared]) -> dict[str, float]:
    """Per-attempt token statistics, from full arrays when shipped, else TokenStats."""
    blocks = [p.attempt_rows for p in prepared if p.attempt_rows.shape[1]]
    if not blocks:
        return dict.fromkeys(FAMILIARITY, 0.0)
    # Every attempt's five values, joined: a few dozen small blocks, one mean each row.
    means = np.concatenate(blocks, axis=1).mean(axis=1)
    with_arrays = [p.logprobs for p in prepared if p.logprobs.size]
    if with_arrays:
        p10, p50, p90 = _percentiles(np.concatenate(with_arrays))
    else:
        stats = [s for p in prepared for s in p.stats]
        w = np.asarray([n for p in prepared for n in p.stats_tokens], dtype=np.float64)
        p10, p50, p90 = (
            float(np.average([getattr(s, f"logprob_{q}") for s in stats], weights=w))
            for q in ("p10", "p50", "p90")
        )
    # Those from token arrays first, then those from TokenStats: one order,
    # so one mean, whichever way they are joined.
    entropies = np.concatenate(
        [p.entropies for p in prepared] + [p.stats_entropies for p in prepared]
    )
    return {
        "mean_logprob": float(means[0]),
        "surprisal_mean": float(means[1]),
        "entropy_mean": float(entropies.mean()) if entropies.size else 0.0,
        "logprob_p10": float(p10),
        "logprob_p50": float(p50),
        "logprob_p90": float(p90),
        "confidence_slope": float(means[3]),
        "redundancy_mean": float(means[4]),
        "min_logprob_mean": float(means[2]),
    }


# -- relevance and coverage ----------------------------------------------------


class _ProbeIndex:
    """The probe prompts' n-gram vectors as one row-normalised matrix.

    Prompts are compared by their :func:`~daemon.core.similarity.template`
    (every number masked): the operation, not the operands, says whether a
    prompt is the target's kind of task. Raw 3-grams of ``37+45=`` match
    ``37-45=`` better than ``912+608=``, and a cohort of long operands shares
    fewer 3-grams with any one probe item than a cohort of short ones, so the
    unmasked cosine measured operand length (difficulty) more than relevance.
    """

    def __init__(self, probe_prompts: Sequence[str]) -> None:
        vecs = [ngrams(template(p)) for p in probe_prompts]
        self.vocab: dict[str, int] = {}
        for v in vecs:
            for g in v:
                self.vocab.setdefault(g, len(self.vocab))
        m = np.zeros((len(vecs), len(self.vocab)))
        for i, v in enumerate(vecs):
            for g, c in v.items():
                m[i, self.vocab[g]] = c
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        self.matrix = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
        # One row per n-gram: a prompt's few n-grams gather a few rows, not a
        # dense pass over the whole vocabulary (hundreds of columns) per prompt.
        self.by_gram = np.ascontiguousarray(self.matrix.T)
        self._memo: OrderedDict[str, float] = OrderedDict()
        self._memo_bytes = 0

    def best_cosine(self, text: str) -> float:
        return self.best_cosines([text])[0]

    def best_cosines(self, texts: Sequence[str]) -> list[float]:
        """Each text's highest cosine to any probe prompt, the cohort's prompts at once.

        Texts are compared by their :func:`template`. The templates not
        remembered are scored together (:meth:`_score`), so a cohort costs a
        few numpy calls rather than a few per prompt.
        """
        return self.best_cosines_masked([template(t) for t in texts])

    def best_cosines_masked(self, masked: Sequence[str]) -> list[float]:
        """:meth:`best_cosines` of texts already masked (:func:`template`)."""
        out: list[float | None] = []
        todo: dict[str, int] = {}
        for m in masked:
            hit = self._memo.get(m)
            if hit is not None:
                # A template asked again (the same task, or other numbers in it): no work.
                self._memo.move_to_end(m)
            elif m not in todo:
                todo[m] = len(todo)
            out.append(hit)
        if todo:
            fresh = self._score(list(todo))
            for m, value in zip(todo, fresh, strict=True):
                if len(m) <= PROBE_CACHE_MAX_CHARS:
                    self._memo[m] = value
                    self._memo_bytes += _ENTRY_BYTES + len(m)
                    while self._memo_bytes > SIMILARITY_CACHE_BYTES:
                        old, _ = self._memo.popitem(last=False)
                        self._memo_bytes -= _ENTRY_BYTES + len(old)
            out = [fresh[todo[m]] if v is None else v for m, v in zip(masked, out, strict=True)]
        return [float(v) for v in out if v is not None]

    def _score(self, masked: list[str]) -> list[float]:
        """The best cosines of already masked texts (:func:`template`)."""
        values = [0.0] * len(masked)
        if not len(self.matrix):
            return values
        get = self.vocab.get
        per_text: list[tuple[int, float, list[int], list[float]]] = []
        for i, text in enumerate(masked):
            vec = ngrams(text)
            cols: list[int] = []
            counts: list[float] = []
            for g, c in vec.items():
                j = get(g)
                if j is not None:
                    cols.append(j)
                    counts.append(c)
            if cols:  # else no n-gram in common with any probe prompt (or blank): 0
                per_text.append((i, norm(vec), cols, counts))
        # Each prompt's dot products are its own rows summed in order
        # (reduceat), so a value never depends on which other prompts shared
        # its batch: a memo hit, a cohort and a lone prompt agree bit for bit.
        # Prompts go in chunks, so that a huge cohort cannot allocate
        # n-grams x probes at once.
        width = max(1, self.by_gram.shape[1])
        lo = 0
        while lo < len(per_text):
            hi, cells = lo, 0
            while hi < len(per_text) and (
                hi == lo or cells + len(per_text[hi][2]) * width <= _SCORE_CELLS
            ):
                cells += len(per_text[hi][2]) * width
                hi += 1
            chunk = per_text[lo:hi]
            cols_all = np.fromiter(
                itertools.chain.from_iterable(c for _, _, c, _ in chunk), dtype=np.intp
            )
            counts_all = np.fromiter(
                itertools.chain.from_iterable(w for _, _, _, w in chunk), dtype=np.float64
            )
            starts = np.cumsum([0] + [len(c) for _, _, c, _ in chunk[:-1]])
            dots = np.add.reduceat(self.by_gram[cols_all] * counts_all[:, None], starts, axis=0)
            best = dots.max(axis=1) / np.fromiter((n for _, n, _, _ in chunk), dtype=np.float64)
            for (i, _, _, _), v in zip(chunk, best.tolist(), strict=True):
                values[i] = v
            lo = hi
        return values


# Cells of the n-grams x probes matrix gathered at once (8 MB of float64).
_SCORE_CELLS = 1 << 20


@functools.lru_cache(maxsize=8)
def _probe_index(probe_prompts: tuple[str, ...]) -> _ProbeIndex:
    # The probe set changes rarely and is shared by every cohort: embed it once.
    return _ProbeIndex(probe_prompts)


# Probe prompts: one flat list, or per target (capability slice) as the probe file gives them.
ProbePrompts = Sequence[str] | Mapping[str, Sequence[str]]


def target_prompts(subject: str, probe_prompts: ProbePrompts | None) -> Sequence[str] | None:
    """The probe prompts a cohort of ``subject`` is compared with: its target's, when known.

    The target is :func:`streams.probes.cohort_target`'s, the same rule the trainer
    measures the lift with; a cohort with no target in the probe is compared
    with every probe prompt.
    """
    if probe_prompts is None or not isinstance(probe_prompts, Mapping):
        return probe_prompts
    target = cohort_target(subject, None, probe_prompts)
    if target is not None:
        return probe_prompts[target]
    return [p for ps in probe_prompts.values() for p in ps]


def target_similarity(prompts: Sequence[str], probe_prompts: Sequence[str] | None) -> float:
    """Mean over prompts of the best character-3-gram cosine to any probe prompt.

    Both sides are compared with their numbers masked (:class:`_ProbeIndex`):
    the value says whether the cohort asks the target's kind of question, not
    how long its operands are.
    """
    return _target_similarity([template(p) for p in prompts], probe_prompts)


def _target_similarity(templates: Sequence[str], probe_prompts: Sequence[str] | None) -> float:
    """:func:`target_similarity` of the prompts' templates."""
    if not probe_prompts or not templates:
        return 0.0
    index = _probe_index(tuple(probe_prompts))
    return float(np.mean(index.best_cosines_masked(templates)))


def near_duplicate_rate(prompts: Sequence[str]) -> float:
    """Share of prompts with another prompt of 3-gram Jaccard >= 0.8 in the cohort.

    Exact, without comparing every pair: two sets with Jaccard >= t share at
    least ``ceil(t * |x|)`` n-grams, so under one fixed order of the n-grams
    (rarest in the cohort first) their first common n-gram lies within the
    first ``|x| - ceil(t * |x|) + 1`` of each (the prefix filter of all-pairs
    similarity joins). Only prompts sharing a prefix n-gram are compared.
    """
    return _near_duplicate_rate(gram_codes([normalize(p) for p in prompts]))


def _near_duplicate_rate(codes: Sequence[np.ndarray]) -> float:
    """:func:`near_duplicate_rate` of the prompts' n-grams as
    :func:`~daemon.core.similarity.gram_codes` (each array sorted and distinct).

    The order, the prefixes and the candidate pairs are found for all prompts
    at once in numpy; only the candidate pairs are compared one by one.
    """
    n = len(codes)
    if not n:
        return 0.0
    dup = [False] * n
    sizes = np.fromiter(map(len, codes), dtype=np.int64, count=n)
    # Empty sets (blank prompts) are alike (Jaccard 1) and unlike any other (0).
    empty = np.flatnonzero(sizes == 0).tolist()
    if len(empty) > 1:
        for i in empty:
            dup[i] = True
    if not sizes.any():
        return sum(dup) / n
    grams = np.concatenate(codes)
    owner = np.repeat(np.arange(n), sizes)
    distinct, which, df = np.unique(grams, return_inverse=True, return_counts=True)
    # Each n-gram's rank: rarest in the cohort first, ties by code.
    rank = np.empty(distinct.size, dtype=np.int64)
    rank[np.lexsort((distinct, df))] = np.arange(distinct.size)
    ranked = rank[which.ravel()]
    order = np.lexsort((ranked, owner))
    ranked, owner = ranked[order], owner[order]
    # The 1e-9 keeps 0.8 * 5 (4.000000000000001) from rounding the prefix
    # down; a longer prefix only adds candidates.
    prefix = sizes - np.ceil(NEAR_DUPLICATE_JACCARD * sizes - 1e-9).astype(np.int64) + 1
    starts = np.cumsum(sizes) - sizes
    keep = np.arange(owner.size) - starts[owner] < prefix[owner]
    gram, member = ranked[keep], owner[keep]
    # Candidates: pairs of prompts with a prefix n-gram in common. Grouped by
    # n-gram (members ascending within one), the pairs d apart in a group are
    # the rows d apart that hold the same n-gram; no pair at d, no group past d.
    # Marked in an n x n table (n <= 256 a cohort), so that a pair sharing
    # many prefix n-grams (near-copies) is one candidate, in bounded memory.
    by_gram = np.lexsort((member, gram))
    gram, member = gram[by_gram], member[by_gram]
    candidate = np.zeros((n, n), dtype=bool)
    for d in range(1, n):
        same = gram[d:] == gram[:-d]
        if not same.any():
            break
        candidate[member[:-d][same], member[d:][same]] = True
    sets: dict[int, set[int]] = {}

    def grams_of(i: int) -> set[int]:
        got = sets.get(i)
        if got is None:
            got = sets[i] = set(codes[i].tolist())
        return got

    first, second = np.nonzero(candidate)
    for i, j in zip(first.tolist(), second.tolist(), strict=True):
        if (not dup[i] or not dup[j]) and jaccard(grams_of(i), grams_of(j)) >= (
            NEAR_DUPLICATE_JACCARD
        ):
            dup[i] = dup[j] = True
    return sum(dup) / n


def template_repetition(prompts: Sequence[str]) -> float:
    """1 - distinct templates / prompts, a template being the prompt with numbers masked."""
    return _template_repetition([template(p) for p in prompts])


def _template_repetition(templates: Sequence[str]) -> float:
    if not templates:
        return 0.0
    return 1.0 - len(set(templates)) / len(templates)


# -- reward integrity ----------------------------------------------------------


def bad_answers(prompt: str, reference: str) -> list[str]:
    """Answers a sound verifier must not reward for ``reference``.

    Wrong (the reference perturbed), trivial (empty, the prompt echoed) and
    adversarial (every MCQ option at once, the answer padded to a longer
    number or word, its first digit followed by junk, the answer embedded in
    junk, a hedge of the answer and a wrong one). An answer that normalises
    to the reference itself is left out: rewarding it is correct. All but the
    echoed prompt depend on the reference alone (:func:`_reference_bad_answers`).
    """
    out = list(_reference_bad_answers(reference))
    if _echo_is_bad(prompt, reference, out):
        out.append(prompt)
    return out


def _echo_is_bad(prompt: str, reference: str, reference_bad: Sequence[str]) -> bool:
    """Whether the echoed prompt is a bad answer not already among the reference's own."""
    return normalize(prompt) != normalize(reference.strip()) and prompt not in reference_bad


@functools.lru_cache(maxsize=4096)
def _reference_bad_answers(reference: str) -> tuple[str, ...]:
    """The :func:`bad_answers` that the reference alone decides, in a fixed order.

    Remembered per reference: a cohort's references repeat (the same answer
    to many prompts, as numbers and options do) where its prompts do not.
    """
    ref = reference.strip()
    if any(c.isdigit() for c in ref):
        wrong = "".join(str((int(c) + 1) % 10) if c.isdigit() else c for c in ref)
    elif len(ref) == 1 and ref.upper() in _MCQ_OPTIONS:
        wrong = _MCQ_OPTIONS[(_MCQ_OPTIONS.index(ref.upper()) + 1) % len(_MCQ_OPTIONS)]
    else:
        wrong = f"not {ref}"
    digits = [c for c in ref if c.isdigit()]
    candidates = [
        wrong,
        "",
        " ".join(_MCQ_OPTIONS[:5]),
        # A wrong, longer number (or word) that contains the answer.
        f"{ref}9" if digits else f"{ref}x",
        f"zq{ref}qz",
        f"{ref} or {wrong}",
    ]
    # Knowing only the leading digit must not pass; with a one-digit answer
    # "5#zq" is the whole answer plus junk, which a lenient parser may accept.
    if digits and normalize(digits[0]) != normalize(ref):
        candidates.insert(4, f"{digits[0]}#zq")
    target = normalize(ref)
    out: list[str] = []
    for c in candidates:
        if normalize(c) != target and c not in out:
            out.append(c)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _bad_answers(prompt: str, reference: str) -> tuple[str, ...]:
    # A prompt seen again (the same task asked again) costs one lookup.
    return tuple(bad_answers(prompt, reference))


def _verifier_key(trace: Trace) -> tuple[str, str]:
    if not trace.verifier_args:  # most verifiers take none: skip the encoder
        return trace.verifier, "{}"
    return trace.verifier, json.dumps(trace.verifier_args, sort_keys=True, default=str)


# Verifiers whose reward is a pure function of (arguments, answer, reference)
# under the verify caps: their probe results are remembered across cohorts, so
# that an answer the cohorts repeat (the same task asked again, the same bad
# answer derived from the same reference) is verified once. The code verifier
# runs in a sandbox under a time limit and a per-cohort budget, and plugin
# verifiers promise nothing: they are always run.
PURE_VERIFIERS = frozenset({"exact", "numeric", "mcq", "regex"})

_ProbeKey = tuple[str, str, str, str]
_VerifierKey = tuple[str, str]
# Built pure verifiers remembered (their arguments vary little: a regex pattern per task family).
VERIFIER_CACHE_SIZE = 1_024


# What one remembered probe costs beyond its key's text: an ordered-dict entry
# and link, the key tuple and the value, with the allocator's slack.
_ENTRY_BYTES = 240


def _entry_bytes(key: _ProbeKey) -> int:
    return _ENTRY_BYTES + sum(map(len, key))


class _BytesLRU(Generic[_V]):
    """Least recently used probe results, bounded by their estimated bytes.

    A bound in entries let the memory grow for as long as longer keys (prompts,
    answers) kept arriving: a long-running scorer's memory is bounded by what
    ``verify.probe_cache_mib`` allows, whatever the traces hold.
    """

    __slots__ = ("_d", "bytes", "max_bytes")

    def __init__(self, max_bytes: int = 0) -> None:
        self._d: OrderedDict[_ProbeKey, _V] = OrderedDict()
        self.bytes = 0
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: _ProbeKey) -> _V | None:
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
        return hit

    def put(self, key: _ProbeKey, value: _V) -> None:
        if key in self._d:
            self._d[key] = value
            self._d.move_to_end(key)
            return
        if len(key[2]) > PROBE_CACHE_MAX_CHARS or len(key[3]) > PROBE_CACHE_MAX_CHARS:
            return
        size = _entry_bytes(key)
        if size > self.max_bytes:
            return
        self._d[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, _ = self._d.popitem(last=False)
            self.bytes -= _entry_bytes(old)

    def clear(self, max_bytes: int) -> None:
        self._d.clear()
        self.bytes = 0
        self.max_bytes = max_bytes


class _ProbeCache:
    """Pure verifiers' probe results and built verifiers, valid for one set of verify caps.

    ``results``: (verifier, arguments, answer, reference) -> rewarded;
    ``bad``: (verifier, arguments, "", reference) -> (rewarded, probed) over the
    reference's own bad answers (:func:`_reference_bad_answers`), so that a
    reference seen again, with any prompt, costs one lookup.
    """

    def __init__(self) -> None:
        self.caps: object = None
        self.results: _BytesLRU[bool] = _BytesLRU()
        self.bad: _BytesLRU[tuple[int, int]] = _BytesLRU()
        self.verifiers: dict[_VerifierKey, Callable[[str, str], float] | None] = {}

    def check_caps(self) -> None:
        from daemon.verify.settings import current

        # A verifier built (and a result computed) under other caps may differ.
        caps = current()
        if caps is not self.caps:
            self.caps = caps
            # The budget is shared: half for single answers, half for prompts.
            half = int(caps.probe_cache_mib * 2**20) // 2
            self.results.clear(half)
            self.bad.clear(half)
            self.verifiers.clear()

    def remember_verifier(
        self, key: _VerifierKey, verify: Callable[[str, str], float] | None
    ) -> None:
        if len(self.verifiers) >= VERIFIER_CACHE_SIZE:
            self.verifiers.clear()
        self.verifiers[key] = verify


_probe_cache = _ProbeCache()


# Verifiers whose reference is not an answer (the code verifier's reference is
# a test suite): the reference probes below do not apply to them.
REFERENCE_NOT_AN_ANSWER = frozenset({"code"})
# Other prompts' references each reference is tried on (the cross probes).
CROSS_PROBES_PER_REFERENCE = 2


def _passes(verify: Callable[[str, str], float] | None, answer: str, reference: str) -> bool | None:
    """Whether a verifier rewards ``answer``; unknown verifiers reward everything.

    ``None``: not probed (a sandboxed run over the cohort's probe budget).
    A verifier that raises did not reward.
    """
    if verify is None:
        return True
    try:
        return float(verify(answer, reference)) >= SUCCESS_THRESHOLD
    except ProbeSkipped:
        return None
    except Exception:
        return False


def _share(results: Iterable[bool | None]) -> float | None:
    """The share of probes that passed, over those that ran (``None``: none ran)."""
    ran = [r for r in results if r is not None]
    # statistics.fmean's own formula, without its generic-input overhead.
    return math.fsum(ran) / len(ran) if ran else None


def reward_trust(traces: Sequence[Trace]) -> float:
    """How far the cohort's verifiers reward correctness: 1 sound, 0 no better than chance.

    Up to ``MAX_TRUST_PROMPTS`` prompts (lowest trace ids: independent of
    arrival order) are probed, and the trust is the *lowest* of three shares:

    * 1 - the share of known-bad answers (:func:`bad_answers`) rewarded;
    * the share of references rewarded as their own prompt's answer;
    * 1 - the share of references rewarded as the answer to *another* prompt
      whose reference differs (the cross probes).

    The last two are averaged per distinct reference, so that a verifier
    whose reward ignores the reference (a scrambled one) scores at most 0.5
    by one or the other whenever the cohort has two distinct references,
    however few symbols its answers use (``<``, ``>``, ``=``): it either
    rejects a right answer or rewards the same symbol where it is wrong.
    Verifiers whose reference is not an answer (:data:`REFERENCE_NOT_AN_ANSWER`)
    get the first share only. An unknown verifier cannot be trusted: each of
    its probes counts as rewarded. A verifier that raises did not reward.
    """
    from daemon.verify.registry import ProbeBudget, probe_verifier

    # Code verifiers run a trace's prompt as code here: in the sandbox, with
    # a shorter time limit and a per-cohort budget of runs.
    budget = ProbeBudget()
    chosen = sorted(traces, key=lambda t: t.trace_id)[:MAX_TRUST_PROMPTS]
    _probe_cache.check_caps()
    cache: dict[tuple[str, str], Callable[[str, str], float] | None] = {}
    keys = {id(t): _verifier_key(t) for t in chosen}

    def verifier(t: Trace) -> Callable[[str, str], float] | None:
        key = keys[id(t)]
        if key not in cache:
            pure = t.verifier in PURE_VERIFIERS
            if pure and key in _probe_cache.verifiers:
                cache[key] = _probe_cache.verifiers[key]
                return cache[key]
            try:
                cache[key] = probe_verifier(t.verifier, t.verifier_args, budget)
            except ValueError:
                cache[key] = None
            if pure:
                _probe_cache.remember_verifier(key, cache[key])
        return cache[key]

    def passes(t: Trace, answer: str, reference: str) -> bool | None:
        verify = verifier(t)
        if verify is None or t.verifier not in PURE_VERIFIERS:
            return _passes(verify, answer, reference)
        name, args = keys[id(t)]
        pkey = (name, args, answer, reference)
        hit = _probe_cache.results.get(pkey)
        if hit is not None:
            return hit
        passed = _passes(verify, answer, reference)
        if passed is not None:
            _probe_cache.results.put(pkey, passed)
        return passed

    def bad_probes(t: Trace) -> tuple[int, int]:
        """(rewarded, probed) over the trace's bad answers."""
        verify = verifier(t)
        if verify is None or t.verifier not in PURE_VERIFIERS:
            rewarded = probed = 0
            for answer in _bad_answers(t.prompt, t.reference):
                passed = _passes(verify, answer, t.reference)
                if passed is None:  # over the probe budget: not probed, counts neither way
                    continue
                probed += 1
                rewarded += passed
            return rewarded, probed
        # A pure verifier: the reference's own bad answers are probed once per
        # (verifier, reference), whatever the prompt; the echoed prompt, the
        # one bad answer a new prompt brings, is one remembered probe.
        own = _reference_bad_answers(t.reference)
        bkey = (*keys[id(t)], "", t.reference)
        hit = _probe_cache.bad.get(bkey)
        if hit is None:
            results = [_passes(verify, answer, t.reference) for answer in own]
            hit = (sum(r is True for r in results), sum(r is not None for r in results))
            _probe_cache.bad.put(bkey, hit)
        rewarded, probed = hit
        if _echo_is_bad(t.prompt, t.reference, own):
            passed = passes(t, t.prompt, t.reference)
            if passed is not None:
                probed += 1
                rewarded += passed
        return rewarded, probed

    rewarded = total = 0
    for t in chosen:
        r, n = bad_probes(t)
        rewarded += r
        total += n
    trust = 1.0 - rewarded / total if total else 1.0

    answers = [t for t in chosen if t.verifier not in REFERENCE_NOT_AN_ANSWER]
    # Each reference normalised once (the cross probes compare every pair of them).
    norm_ref = [normalize(t.reference) for t in answers]
    by_ref: dict[str, list[Trace]] = {}
    for t, ref in zip(answers, norm_ref, strict=True):
        by_ref.setdefault(ref, []).append(t)
    own = [
        s
        for ts in by_ref.values()
        if (s := _share(passes(t, t.reference, t.reference) for t in ts)) is not None
    ]
    if own:
        trust = min(trust, statistics.fmean(own))
    cross: list[float] = []
    for ref, ts in by_ref.items():
        others = [t for t, other in zip(answers, norm_ref, strict=True) if other != ref]
        if not others:
            continue
        # A few other prompts per reference, spread over the cohort deterministically.
        step = max(1, len(others) // CROSS_PROBES_PER_REFERENCE)
        tried = others[::step][:CROSS_PROBES_PER_REFERENCE]
        answer = ts[0].reference
        s = _share(passes(o, answer, o.reference) for o in tried)
        if s is not None:
            cross.append(s)
    if cross:
        trust = min(trust, 1.0 - statistics.fmean(cross))
    return trust


# -- the feature vector --------------------------------------------------------


def _subject(traces: Sequence[Trace]) -> str:
    """The cohort's subject: its traces' most common one (a slice usually shares it)."""
    counts: dict[str, int] = {}
    for t in traces:
        counts[t.subject] = counts.get(t.subject, 0) + 1
    return max(counts, key=lambda k: (counts[k], k))


def featurize(
    cohort_or_traces: Cohort | Sequence[Trace],
    *,
    probe_prompts: ProbePrompts | None = None,
    verifier_probe: bool = True,
    update_alignment: float | None = None,
) -> dict[str, float]:
    """All ``FEATURE_NAMES``, in order, as finite floats; formulas in docs/FEATURES.md.

    Every trace is one prompt group and needs at least one attempt (the
    rollout engine tops groups up to K before this is called).
    ``update_alignment`` needs the policy's weights, so the caller measures it
    (``daemon.policy.alignment``); ``None`` (not measured) gives 0.
    """
    traces = cohort_or_traces.traces if isinstance(cohort_or_traces, Cohort) else cohort_or_traces
    if not traces:
        raise FeatureError("traces", "a cohort needs at least one trace")
    for i, t in enumerate(traces):
        if not t.attempts:
            raise FeatureError(
                f"traces[{i}].attempts", f"trace {t.trace_id!r} has no attempts to learn from"
            )
    prepared = prepare_many(traces)
    templates = [p.template for p in prepared]

    values: dict[str, float] = {
        **_learnability_prepared(prepared),  # with len_mean and len_std
        "target_similarity": _target_similarity(
            templates, target_prompts(_subject(traces), probe_prompts)
        ),
        "update_alignment": 0.0 if update_alignment is None else update_alignment,
        "n_groups": float(len(traces)),
        **_familiarity(prepared),
        "reward_trust": reward_trust(traces) if verifier_probe else 1.0,
        "near_duplicate_rate": _near_duplicate_rate([p.grams for p in prepared]),
        "template_repetition": _template_repetition(templates),
    }
    out = {name: float(values[name]) for name in FEATURE_NAMES}
    for name, v in out.items():
        if not math.isfinite(v):
            raise FeatureError(f"features.{name}", f"computed {v}: every feature must be finite")
    return out


def feature_vector(features: Mapping[str, float]) -> list[float]:
    """The features in ``FEATURE_NAMES`` order; extra keys are ignored (newer schemas).

    Every value must be a finite number (not a bool): a feature vector comes
    from messages (lift labels, dispatches) as well as from :func:`featurize`.
    """
    out: list[float] = []
    for name in FEATURE_NAMES:
        if name not in features:
            raise FeatureError(f"features.{name}", "missing")
        v = features[name]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise FeatureError(f"features.{name}", f"not a number ({type(v).__name__})")
        if not math.isfinite(v):
            raise FeatureError(f"features.{name}", f"not finite ({v!r})")
        out.append(float(v))
    return out
