"""Text similarity that needs no downloaded model: character n-grams.

Prompts are normalised (lower case, runs of whitespace collapsed) before
n-grams are taken, so formatting differences do not hide a duplicate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

NGRAM = 3
_SPACES = re.compile(r"\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def normalize(text: str) -> str:
    return _SPACES.sub(" ", text.lower()).strip()


def ngrams(text: str, n: int = NGRAM) -> Counter[str]:
    """Character n-gram counts of the normalised text (the whole text if shorter than n)."""
    t = normalize(text)
    if len(t) < n:
        return Counter([t]) if t else Counter()
    return Counter(t[i : i + n] for i in range(len(t) - n + 1))


def gram_set(text: str, n: int = NGRAM) -> set[str]:
    """The distinct n-grams of :func:`ngrams`, built as a set (no counts to keep)."""
    return normalized_gram_set(normalize(text), n)


def normalized_gram_set(t: str, n: int = NGRAM) -> set[str]:
    """:func:`gram_set` of a text :func:`normalize` already gave."""
    if len(t) < n:
        return {t} if t else set()
    return {t[i : i + n] for i in range(len(t) - n + 1)}


def norm(a: Counter[str]) -> float:
    return math.sqrt(sum(v * v for v in a.values()))


def cosine(a: Counter[str], b: Counter[str]) -> float:
    if not a or not b:
        return 0.0
    if len(a) > len(b):
        a, b = b, a
    dot = sum(v * b[g] for g, v in a.items() if g in b)
    return dot / (norm(a) * norm(b)) if dot else 0.0


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def max_similarity(texts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """For each text, its highest n-gram cosine to any target (0 with no targets)."""
    target_vecs = [ngrams(t) for t in targets]
    return [max((cosine(ngrams(x), v) for v in target_vecs), default=0.0) for x in texts]


def template(text: str) -> str:
    """The prompt with every number masked: two prompts differing only in numbers share it."""
    return normalized_template(normalize(text))


def normalized_template(t: str) -> str:
    """:func:`template` of a text :func:`normalize` already gave."""
    return _NUMBER.sub("#", t)
