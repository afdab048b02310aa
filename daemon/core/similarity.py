"""Text similarity that needs no downloaded model: character n-grams.

Prompts are normalised (lower case, runs of whitespace collapsed) before
n-grams are taken, so formatting differences do not hide a duplicate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

NGRAM = 3
# A code point takes 21 bits: three side by side fit an int64.
_CODE_BITS = 21
_G = TypeVar("_G", str, int)
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


def normalized_gram_set(t: str, n: int = NGRAM) -> set[str]:
    """The distinct n-grams of :func:`ngrams` of a text :func:`normalize` already gave."""
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


def gram_codes(texts: Sequence[str], n: int = NGRAM) -> list[np.ndarray]:
    """Each normalised text's :func:`normalized_gram_set` as exact integer codes.

    A gram of ``n`` <= 3 characters is its code points side by side in one
    int64, so two texts share a code exactly when they share the gram, and
    Jaccard over codes is Jaccard over grams. A text shorter than ``n`` (whose
    one gram is the text) is coded negative, with its length, apart from
    every ``n``-gram. Each array is sorted and holds 8 bytes a gram, where a
    set of 3-character strings holds about 70; all texts are coded in one
    numpy pass, and each text's codes are its own (a copy).
    """
    if not 1 <= n <= 3:
        raise ValueError(f"n: gram codes hold 1 to 3 characters, not {n}")
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    # UTF-32 with lone surrogates passed through: one code point a character.
    cp = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(
        np.int64
    )
    m = cp.size - n + 1
    codes = np.empty(0, dtype=np.int64)
    bounds = np.zeros(lens.size + 1, dtype=np.int64)
    if m > 0:
        codes = cp[:m].copy()
        for i in range(1, n):
            codes <<= _CODE_BITS
            codes |= cp[i : i + m]
        # The text each gram starts in, and whether it ends there too.
        text = np.repeat(np.arange(lens.size), lens)[:m]
        starts = np.cumsum(lens) - lens
        inside = np.arange(m) - starts[text] <= (lens - n)[text]
        codes, text = codes[inside], text[inside]
        order = np.lexsort((codes, text))
        codes, text = codes[order], text[order]
        keep = np.ones(codes.size, dtype=bool)
        keep[1:] = (codes[1:] != codes[:-1]) | (text[1:] != text[:-1])
        codes, text = codes[keep], text[keep]
        bounds = np.searchsorted(text, np.arange(lens.size + 1))
    out: list[np.ndarray] = []
    for k, t in enumerate(texts):
        if len(t) >= n:
            out.append(codes[bounds[k] : bounds[k + 1]].copy())
        elif t:
            packed = 0
            for c in t:
                packed = (packed << _CODE_BITS) | ord(c)
            out.append(np.array([-1 - ((len(t) << (2 * _CODE_BITS)) | packed)], dtype=np.int64))
        else:
            out.append(np.empty(0, dtype=np.int64))
    return out


def jaccard(a: set[_G], b: set[_G]) -> float:
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
