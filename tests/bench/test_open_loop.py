"""The open-loop schedule of bench.worker_api: Poisson arrivals at the asked rate, and latency
figures that leave the warm-up out and count the wait for a free worker."""

from __future__ import annotations

import itertools
import math

from bench import open_loop


def test_arrivals_come_at_the_asked_rate_with_exponential_gaps():
    rate, seconds = 40.0, 500.0
    times = open_loop.arrivals(rate, seconds, seed=7)
    expected = rate * seconds
    # A Poisson count: within 4 standard deviations of its mean.
    assert abs(len(times) - expected) < 4 * math.sqrt(expected)
    assert times == sorted(times)
    assert times[0] > 0
    assert times[-1] < seconds
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 1 / rate) < 0.05 / rate
    # Exponential: about e^-1 of the gaps are longer than the mean (a fixed period gives none).
    longer = sum(g > 1 / rate for g in gaps) / len(gaps)
    assert abs(longer - math.exp(-1)) < 0.03
    assert open_loop.arrivals(rate, seconds, seed=7) == times
    assert open_loop.arrivals(rate, seconds, seed=8) != times


def test_the_summary_counts_from_the_schedule_and_leaves_the_warm_up_out():
    level = open_loop.Level(rate_per_s=10.0, scheduled=5)
    warm = open_loop.WARMUP_S
    level.samples = [
        (warm - 0.5, 900.0, 500, 500, "send", 800),  # warm-up: not counted
        (warm + 0.1, 10.0, 500, 500, "send", 4),
        (warm + 0.2, 20.0, 500, 500, "send", 8),
        (warm + 0.3, 30.0, 0, 500, "send", 12),  # a first check-in: no report
        (warm + 0.4, 400.0, 500, 0, "wait", None),  # a wait says no hold
    ]
    summary = open_loop.summary(level)
    assert summary["checkins"] == 4
    assert summary["full"] == 2
    assert summary["p50"] == 20.0
    assert summary["p99"] == 400.0
    assert summary["full_p99"] == 20.0
    assert summary["decisions"] == {"send": 3, "wait": 1}
    # The server's hold, from the grants only.
    assert summary["held_p50"] == 8
    assert summary["held_p99"] == 12
    # The load generator's CPU, over every check-in it sent (the warm-up's too).
    level.client_cpu_s = 0.025
    assert open_loop.summary(level)["client_cpu_ms_per_checkin"] == 5.0


def test_the_messages_hold_what_every_level_consumes_above_the_floor():
    capacity = 40.0  # check-ins a second, saturated
    per_customer = open_loop.recipients_needed(capacity)
    consumed = sum(
        p / 100 * capacity * (open_loop.WARMUP_S + open_loop.DURATION_S) * open_loop.BATCH_SIZE
        for p in open_loop.LEVELS
    )
    assert per_customer * 2 - consumed >= 2 * open_loop.BACKLOG_FLOOR - 2
