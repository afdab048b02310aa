"""Load: a sustained trace rate, then a burst at 10x it, through real ``tapd run``
and ``tapd trainer`` processes (embedded transport).

The scorer must stay inside its memory bound (its RSS sampled throughout),
report the burst as consumer lag on /metrics, pace its consumption by
backpressure (``tapd_consumption_paused`` seen at 1: one cohort in flight at
a time, the trainer the bottleneck), and drain the burst losing and
duplicating nothing (the same audit as the chaos runs). The full form is part
of ``tapd reliability``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.reliability import load_config, run


@pytest.mark.slow
def test_burst_at_ten_times_the_sustained_rate_is_paced_bounded_and_drained(
    tmp_path: Path,
) -> None:
    cfg = load_config(short=True)
    result = run(cfg, tmp_path)
    a = result.audit
    samples = result.samples
    assert samples, result.events

    # Memory: every sample of the scorer's RSS is under the configured bound.
    assert 0 < result.max_rss_bytes <= cfg.max_rss_mb * 2**20, result.max_rss_bytes
    # Lag is reported and rises with the burst, then drains to zero.
    lags = [s["lag"] for s in samples if s["lag"] >= 0]
    assert lags and max(lags) >= 100, lags
    assert lags[-1] == 0, lags[-5:]
    # Backpressure paced consumption at some point, and was lifted at the end.
    paused = [s["paused"] for s in samples]
    assert 1.0 in paused, paused
    assert paused[-1] == 0.0
    # Nothing lost or duplicated; the trainer did the work backpressure waited on.
    assert a.lost == 0, a.problems()
    assert a.duplicated == 0, a.problems()
    assert a.in_cohorts + a.valid_dead_lettered == a.valid == cfg.n_valid
    assert a.bad_dead_lettered == a.bad == result.plan.n_bad
    assert a.dispatched > 1 and a.lifts + a.trainer_dead_letters == a.dispatched
    assert a.labels == a.lifts == a.label_log
