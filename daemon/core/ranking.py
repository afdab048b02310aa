"""Ranking statistics: one implementation, one tie rule, for the live gauges and the evaluation.

* :func:`spearman`: Pearson correlation of average ranks (ties share the
  mean of their ranks); NaN when fewer than 3 pairs or either side is
  constant, so a constant predictor reads as undefined, not as noise.
* :func:`pairwise_accuracy`: over pairs whose realized values differ, the
  share the prediction orders the same way; a pair the prediction ties gets
  half credit (a coin flip), so ties are neither rewarded nor punished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_PAIRS = 3


def ranks(v: Sequence[float] | np.ndarray) -> np.ndarray:
    """Average ranks (0-based), ties sharing the mean of their positions."""
    arr = np.asarray(v, dtype=np.float64)
    order = arr.argsort(kind="mergesort")
    r = np.empty(len(arr))
    r[order] = np.arange(len(arr), dtype=np.float64)
    _, inv, counts = np.unique(arr, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inv, r)
    out: np.ndarray = (sums / counts)[inv]
    return out


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when undefined."""
    if len(a) != len(b) or len(a) < MIN_PAIRS:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def pairwise_accuracy(
    predicted: Sequence[float] | np.ndarray, realized: Sequence[float] | np.ndarray
) -> float:
    """Share of pairs with distinct realized values ordered right (prediction ties: 1/2)."""
    p, r = np.asarray(predicted, np.float64), np.asarray(realized, np.float64)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"predicted: shape {p.shape} does not match realized {r.shape}")
    dp = np.sign(p[:, None] - p[None, :])
    dr = np.sign(r[:, None] - r[None, :])
    mask = np.triu(dr != 0, k=1)
    n = int(mask.sum())
    if n == 0:
        return math.nan
    credit = np.where(dp == dr, 1.0, np.where(dp == 0, 0.5, 0.0))
    return float(credit[mask].sum() / n)
