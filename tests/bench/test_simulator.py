"""The pacing core in the virtual-time simulator: counted at the provider, not assumed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.simulator import SimConfig, simulate, simulate_baseline
from sending import pacing

# Short "minutes" keep this fast; the production window is 60 s.
# Twenty workers at concurrency 8 start ~3,600 sends in a 1.5 s window, so they can carry 2,000.
# The cap is that high because a progress chunk is at most pacing.chunk_limit (0.4%) of the cap
# per minute, whatever the minute's length: at 2,000 it is 8, still `concurrency`. At a cap of a
# few hundred per 2 s minute a chunk would be two sends, so each worker would start two sends per
# check-in round trip (2-30 ms each way here, as in production): too slow for a 1.5 s window,
# though in a 60 s minute that cap needs only a few sends a second.
SHORT = SimConfig(
    per_minute=2_000,
    max_workers=20,
    concurrency=8,
    batch_size=100,
    minutes=40,
    window_ms=2_000,
    guard_ms=250,
    spill_hold_ms=1_000,
    cold_start_ms=(50, 300),
    crash_p=0.005,
    lifetime_minutes=7,
    seed=11,
)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_short_run_with_skew_and_crashes_never_goes_over_and_fills_minutes(seed):
    result = simulate(replace(SHORT, seed=seed))
    summary = result.summary()
    assert summary["crashes"] > 0  # the run did exercise crashed workers and their leases
    assert summary["workers_started"] > SHORT.max_workers  # replacements were started
    assert result.over_cap_minutes == 0
    assert summary["utilization_mean"] >= 0.95
    clean = result.eligible.copy()
    clean[sorted(result.crash_minutes)] = False
    assert clean.sum() >= 20
    assert (result.accepted[clean] / SHORT.per_minute).min() >= 0.99
    # A crash costs at most its lease's in-doubt part, charged to its minute and (crossed) to the
    # next one: per minute, at most two batches per crash in it or the minute before.
    for minute in np.flatnonzero(result.eligible):
        near = sum(1 for m in result.crash_lease_minutes if m in (minute - 1, minute))
        short = SHORT.per_minute - result.accepted[minute]
        assert short <= 2 * SHORT.batch_size * near + 0.01 * SHORT.per_minute, minute


def test_realistic_minute_with_many_workers_fills_the_cap_exactly():
    config = SimConfig(per_minute=6_000, max_workers=5, batch_size=100, minutes=5, seed=5)
    result = simulate(config)
    assert result.over_cap_minutes == 0
    assert (result.accepted[result.eligible] == 6_000).all()


def test_without_a_guard_band_the_provider_sees_over_cap_minutes():
    # Shows the simulated provider can catch a violation: with no guard, skew and latency push
    # sends into minutes that were not charged for them.
    config = replace(SHORT, guard_ms=0, crash_p=0.0)
    over = sum(simulate(replace(config, seed=seed)).over_cap_minutes for seed in range(3))
    assert over > 0


def test_worker_wall_clocks_do_not_matter():
    skewed = simulate(replace(SHORT, worker_clock_skew_ms=100_000))
    exact = simulate(replace(SHORT, worker_clock_skew_ms=0))
    assert np.array_equal(skewed.counts, exact.counts)


def test_same_seed_same_run_other_seed_other_run():
    assert np.array_equal(simulate(SHORT).counts, simulate(SHORT).counts)
    assert not np.array_equal(simulate(SHORT).counts, simulate(replace(SHORT, seed=12)).counts)


def test_orchestra_too_small_for_the_cap_is_throughput_bound_and_still_safe():
    config = replace(SHORT, per_minute=1_000, max_workers=1, crash_p=0.0)
    result = simulate(config)
    assert result.over_cap_minutes == 0
    util = result.accepted[result.eligible] / config.per_minute
    assert 0.05 < util.mean() < 0.5


def test_baseline_token_bucket_sends_at_the_cap_and_goes_over_in_some_minutes():
    config = SimConfig(per_minute=600, max_workers=3, batch_size=25, minutes=60, seed=3)
    baseline = simulate_baseline(config)
    sent = baseline.counts[baseline.eligible]
    assert abs(sent.mean() / config.per_minute - 1) < 0.01  # it runs at the cap on average
    assert baseline.over_cap_minutes > 0  # and, with no calendar alignment, jitter goes over
    assert simulate(config).over_cap_minutes == 0


# A 60 s minute, 6_000/min, batches of 500 (about four progress chunks) and a crash every 20
# batches on average.
CRASHY = SimConfig(
    per_minute=6_000, max_workers=5, batch_size=500, minutes=30, crash_p=0.05, seed=21
)


def test_progress_reports_give_a_crashed_workers_unstarted_recipients_back_in_time():
    with_progress = simulate(CRASHY)
    without = simulate(replace(CRASHY, progress=False))
    for result in (with_progress, without):
        assert result.stats["crashes"] >= 15
        assert result.over_cap_minutes == 0
    stats = with_progress.stats
    assert stats["abandoned"] >= stats["crashes"]
    assert stats["refunded"] > 0  # recipients past the mark, back while the minute is current
    assert stats["max_chunk"] < CRASHY.batch_size
    # Only what was declared and never started is lost, not the rest of the lease ...
    assert stats["in_doubt_unsent"] < 0.25 * stats["crashes"] * CRASHY.batch_size
    short = CRASHY.per_minute - with_progress.accepted[with_progress.eligible]
    assert short.sum() <= stats["in_doubt_unsent"]
    # ... which is far less than without progress reports.
    short_without = CRASHY.per_minute - without.accepted[without.eligible]
    assert short.sum() < 0.5 * short_without.sum()


def test_a_live_worker_presumed_lost_is_refused_and_stops_and_nothing_goes_over():
    # Slow sends (median 600 ms, cut at 5 s) keep live workers out past overdue_in_ms: their
    # leases are abandoned, their reports refused, and replacements take over.
    config = replace(CRASHY, latency_median_ms=600.0, crash_p=0.0, max_workers=20, minutes=10)
    result = simulate(config)
    assert result.stats["false_alarms"] > 0
    assert result.stats["abandoned"] == result.stats["false_alarms"]
    assert result.over_cap_minutes == 0


def test_at_a_small_cap_a_crash_costs_its_minute_at_most_two_chunks():
    # 600/min: a chunk is pacing.chunk_limit(600) = 2 sends, below the concurrency (8), so a
    # worker reports every two sends. A crash every 50 batches on average.
    config = SimConfig(
        per_minute=600, max_workers=3, batch_size=25, minutes=60, crash_p=0.02, seed=4
    )
    result = simulate(config)
    limit = pacing.chunk_limit(config.per_minute)
    stats = result.stats
    assert limit == 2 < config.concurrency
    assert stats["crashes"] >= 20
    assert result.over_cap_minutes == 0
    assert stats["max_chunk"] == limit
    # The mark runs at most the rest of the chunk under way and the next one ahead of the starts.
    assert 0 < stats["max_in_doubt_unsent"] <= 2 * limit - 1
    for minute in np.flatnonzero(result.eligible):
        crashes = result.crash_lease_minutes.count(int(minute))
        short = config.per_minute - result.accepted[minute]
        assert short <= (2 * limit - 1) * crashes, minute
        if crashes <= 1:
            assert short < 0.01 * config.per_minute, minute
