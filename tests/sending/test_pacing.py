"""Unit and property tests for the pure pacing core (no Django)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sending import pacing
from sending.pacing import (
    Grant,
    LeaseTerms,
    Limits,
    MinuteLedger,
    Stop,
    Tally,
    Wait,
    WorkerView,
    decide,
    settle,
)

LIMITS = Limits(
    per_minute=100,
    batch_size=20,
    max_workers=3,
    concurrency=4,
    guard_ms=250,
    window_ms=2_000,
    spill_hold_ms=500,
)
MINUTE = 10_000  # a minute start: 10_000 % 2_000 == 0
FAST = WorkerView(rate_per_s=100.0)
rates = st.one_of(st.none(), st.floats(0.5, 5_000, allow_nan=False))


def check_in(
    now_ms: int,
    *,
    limits: Limits = LIMITS,
    ledger: MinuteLedger | None = None,
    open_spill: int = 0,
    backlog: int = 1_000,
    worker: WorkerView = FAST,
    running_workers: int = 1,
    refunds_due_ms: int | None = None,
    account_room: int | None = None,
    hold_until_ms: int | None = None,
    held_ms: int = 0,
    answer_ms: int = 0,
) -> pacing.Decision:
    start = pacing.minute_start(now_ms, limits.window_ms)
    return decide(
        now_ms=now_ms,
        limits=limits,
        ledger=ledger or MinuteLedger(minute_start_ms=start),
        open_spill=open_spill,
        backlog=backlog,
        worker=worker,
        running_workers=running_workers,
        refunds_due_ms=refunds_due_ms,
        account_room=account_room,
        hold_until_ms=hold_until_ms,
        held_ms=held_ms,
        answer_ms=answer_ms,
    )


def test_grant_inside_the_window_starts_now_and_ends_at_the_guarded_window_end():
    decision = check_in(MINUTE + 500)
    assert decision == Grant(
        size=20,
        start_in_ms=0,
        stop_starting_in_ms=1_250,  # window closes at MINUTE + 2_000 - 250
        minute_ends_in_ms=1_500,
        minute_start_ms=MINUTE,
    )


def test_grant_in_the_leading_guard_band_starts_when_the_window_opens():
    decision = check_in(MINUTE + 100)
    assert isinstance(decision, Grant)
    assert decision.start_in_ms == 150
    assert decision.minute_ends_in_ms == 1_900


def test_grant_start_window_is_cut_to_what_the_batch_needs_early_in_the_minute():
    limits = replace(LIMITS, window_ms=60_000, spill_hold_ms=5_000)
    decision = check_in(60_000 * 5 + 1_000, limits=limits)
    assert isinstance(decision, Grant)
    # 20 sends at 100/s take 200 ms: start window is 2 x 200 ms + slack, not the whole minute.
    assert decision.stop_starting_in_ms == 400 + pacing.STOP_SLACK_MS
    assert not LeaseTerms.from_grant(decision, limits).may_cross


def test_a_held_check_in_gets_a_longer_window_and_a_later_overdue_but_never_past_the_minute():
    limits = replace(LIMITS, window_ms=60_000, spill_hold_ms=5_000)
    now = 60_000 * 5 + 1_000
    quick = check_in(now, limits=limits)
    held = check_in(now, limits=limits, held_ms=3_000)
    assert isinstance(quick, Grant) and isinstance(held, Grant)
    assert held.size == quick.size and held.start_in_ms == quick.start_in_ms
    assert held.stop_starting_in_ms == quick.stop_starting_in_ms + 3_000
    terms = LeaseTerms.from_grant(held, limits, held_ms=3_000)
    assert terms.overdue_in_ms == held.stop_starting_in_ms + pacing.OVERDUE_SLACK_MS + 3_000
    # Near the minute's end the window still closes at the guarded end, however long the hold.
    late = check_in(MINUTE + 500, held_ms=60_000)
    assert isinstance(late, Grant) and late.stop_starting_in_ms == 1_250


def test_a_windows_end_leaves_room_for_the_answer_the_worker_measures():
    # Closes at MINUTE + 1_750. A worker whose provider answers in 300 ms starts nothing after
    # 1_450, so what it starts is answered by the minute's last safe moment.
    worker = WorkerView(rate_per_s=20.0)
    quick = check_in(MINUTE + 1_000, worker=worker)
    slow = check_in(MINUTE + 1_000, worker=worker, answer_ms=300)
    assert isinstance(quick, Grant) and isinstance(slow, Grant)
    assert quick.stop_starting_in_ms == 750 and slow.stop_starting_in_ms == 450
    assert (quick.size, slow.size) == (13, 8)  # what fits each window at 20 a second, 0.9 of it
    # Nothing can be answered in time any more: back when the next minute opens, not granted.
    assert check_in(MINUTE + 1_500, answer_ms=300) == Wait(500)
    # An answer time past the send timeout (500 ms) counts as the timeout: a send is given up then.
    assert check_in(MINUTE + 1_000, answer_ms=60_000) == check_in(MINUTE + 1_000, answer_ms=500)
    assert check_in(MINUTE + 1_000, worker=worker, answer_ms=-5) == quick


def test_trailing_guard_band_waits_until_the_next_minute():
    assert check_in(MINUTE + 1_800) == Wait(200)
    assert check_in(MINUTE + 1_750) == Wait(250)


def test_exhausted_budget_waits_until_the_next_minute():
    ledger = MinuteLedger(minute_start_ms=MINUTE, granted=100)
    assert check_in(MINUTE + 600, ledger=ledger) == Wait(1_400)


def test_exhausted_budget_waits_only_until_an_open_lease_may_give_some_back():
    ledger = MinuteLedger(minute_start_ms=MINUTE, granted=100)
    slack = pacing.RECLAIM_SLACK_MS
    # A lease of this minute falls due at +300: come back when it has reported or been reclaimed.
    assert check_in(MINUTE + 200, ledger=ledger, refunds_due_ms=MINUTE + 300) == Wait(100 + slack)
    # Already due (not reclaimed yet): come back after the next reclaim could have run.
    assert check_in(MINUTE + 200, ledger=ledger, refunds_due_ms=MINUTE + 100) == Wait(slack)
    # Too late for this minute's window (it closes at +1,750): wait for the next minute.
    assert check_in(MINUTE + 200, ledger=ledger, refunds_due_ms=MINUTE + 1_200) == Wait(1_800)


def test_paused_stops():
    assert check_in(MINUTE + 600, limits=replace(LIMITS, paused=True)) == Stop(pacing.PAUSED)


def test_empty_backlog_stops():
    assert check_in(MINUTE + 600, backlog=0) == Stop(pacing.DONE)


def test_surplus_worker_is_retired_but_a_needed_one_is_not():
    fast = WorkerView(rate_per_s=1_000.0)  # one worker does 1_500 a window; cap is 100
    assert check_in(MINUTE + 600, worker=fast, running_workers=2) == Stop(pacing.SURPLUS)
    assert isinstance(check_in(MINUTE + 600, worker=fast, running_workers=1), Grant)


def test_lowered_cap_applies_at_the_next_decision():
    ledger = MinuteLedger(minute_start_ms=MINUTE, granted=80)
    first = check_in(MINUTE + 600, ledger=ledger)
    assert isinstance(first, Grant) and first.size == 20
    lowered = replace(LIMITS, per_minute=60)
    assert check_in(MINUTE + 601, limits=lowered, ledger=ledger) == Wait(1_399)
    raised = replace(LIMITS, per_minute=90)
    decision = check_in(MINUTE + 602, limits=raised, ledger=ledger)
    assert isinstance(decision, Grant) and decision.size == 10


def test_open_spill_and_carried_in_reduce_the_budget():
    ledger = MinuteLedger(minute_start_ms=MINUTE, granted=40, refunded=10, carried_in=30)
    decision = check_in(MINUTE + 600, ledger=ledger, open_spill=25)
    assert isinstance(decision, Grant)
    assert decision.size == 100 - (40 - 10 + 30) - 25
    assert check_in(MINUTE + 600, ledger=ledger, open_spill=40) == Wait(1_400)


def test_grant_is_no_bigger_than_the_backlog():
    decision = check_in(MINUTE + 600, backlog=7)
    assert isinstance(decision, Grant) and decision.size == 7


def test_grant_near_the_window_end_is_sized_to_the_worker_rate():
    slow = WorkerView(rate_per_s=10.0)
    decision = check_in(MINUTE + 1_250, worker=slow)  # 500 ms left: 10/s x 0.5 s x 0.9
    assert isinstance(decision, Grant) and decision.size == 4
    assert check_in(MINUTE + 1_700, worker=slow) == Wait(300)  # 50 ms left: not even one


def test_first_check_in_uses_the_assumed_rate():
    decision = check_in(MINUTE + 1_500, worker=WorkerView(rate_per_s=None))
    # 4 slots at 100 ms a send = 40/s; 250 ms left x 0.9 -> 9
    assert isinstance(decision, Grant) and decision.size == 9


def test_a_throttled_minute_goes_on_granting():
    # A refusal no longer stops the minute: what it teaches comes in as a hold, a learned guard
    # or an account room (tests/sending/test_throttle.py).
    ledger = MinuteLedger(minute_start_ms=MINUTE, throttled=8)
    assert isinstance(check_in(MINUTE + 600, ledger=ledger), Grant)


def test_a_hold_delays_the_start_or_sends_the_worker_away_until_it_ends():
    soon = check_in(MINUTE + 600, hold_until_ms=MINUTE + 700)
    assert isinstance(soon, Grant) and soon.start_in_ms == 100
    assert check_in(MINUTE + 600, hold_until_ms=MINUTE + 1_000) == Wait(400)
    # A hold past the window's end: come back next minute.
    assert check_in(MINUTE + 600, hold_until_ms=MINUTE + 1_800) == Wait(1_400)
    # A hold that is over changes nothing.
    assert check_in(MINUTE + 600, hold_until_ms=MINUTE + 500) == check_in(MINUTE + 600)


def test_a_learned_guard_opens_the_window_later_and_only_at_the_start():
    limits = replace(LIMITS, learned_guard_ms=300)
    decision = check_in(MINUTE, limits=limits)
    assert isinstance(decision, Grant)
    assert decision.start_in_ms == 550  # guard 250 + learned 300
    assert decision.stop_starting_in_ms <= 2_000 - 250  # the end guard is unchanged
    with pytest.raises(ValueError):
        replace(LIMITS, learned_guard_ms=1_500)


def test_account_room_caps_the_grant():
    decision = check_in(MINUTE + 600, account_room=3)
    assert isinstance(decision, Grant) and decision.size == 3
    assert check_in(MINUTE + 600, account_room=0) == Wait(1_400)


def test_ledger_of_another_minute_is_rejected():
    with pytest.raises(ValueError, match="ledger"):
        check_in(MINUTE + 600, ledger=MinuteLedger(minute_start_ms=MINUTE - 2_000))


@pytest.mark.parametrize(
    "changes",
    [{"guard_ms": 1_000}, {"spill_hold_ms": 1_800}, {"batch_size": 0}, {"per_minute": -1}],
)
def test_limits_reject_settings_that_break_the_safety_argument(changes):
    with pytest.raises(ValueError):
        replace(LIMITS, **changes)


def lease_for(now_ms: int = MINUTE + 600) -> LeaseTerms:
    grant = check_in(now_ms)
    assert isinstance(grant, Grant)
    return LeaseTerms.from_grant(grant, LIMITS)


def test_settle_refunds_not_started_and_throttled_and_counts_late_responses_as_crossed():
    lease = lease_for()  # minute ends 1_400 ms after the grant; last safe done is 1_150
    report = Tally(
        sent=12, failed=3, not_started=3, throttled=2, done_ms=[100] * 13 + [1_150, 1_151]
    )
    settlement = settle(terms=lease, tally=report)
    assert settlement.refund == 5
    assert settlement.crossed == 1
    assert (settlement.sent, settlement.failed, settlement.throttled) == (12, 3, 2)
    assert settlement.unknown == 0


def test_settle_treats_unreported_recipients_and_missing_done_times_as_crossed():
    lease = lease_for()
    settlement = settle(terms=lease, tally=Tally(sent=10, not_started=5, done_ms=[100] * 8))
    assert settlement.unknown == 5
    assert settlement.crossed == 5 + 2
    assert settlement.refund == 5


def test_settle_rejects_a_report_for_more_than_the_lease():
    with pytest.raises(ValueError):
        settle(terms=lease_for(), tally=Tally(sent=15, not_started=6, done_ms=[1] * 15))


def test_expired_lease_refunds_nothing_and_charges_the_next_minute_only_if_it_may_cross():
    crossing = lease_for()
    assert crossing.may_cross
    assert pacing.settle_expired(terms=crossing) == pacing.Settlement(
        refund=0, crossed=20, unknown=20
    )
    early = replace(crossing, may_cross=False)
    assert pacing.settle_expired(terms=early).crossed == 0


def test_abandoned_lease_refunds_past_the_mark_and_keeps_the_in_doubt_part_charged():
    crossing = lease_for()
    assert pacing.settle_abandoned(terms=crossing, started_through=8) == pacing.Settlement(
        refund=12, crossed=8, unknown=8
    )
    early = replace(crossing, may_cross=False)
    assert pacing.settle_abandoned(terms=early, started_through=8) == pacing.Settlement(
        refund=12, crossed=0, unknown=8
    )
    # Died before its first progress report: nothing was started, all of it comes back.
    assert pacing.settle_abandoned(terms=crossing, started_through=0) == pacing.Settlement(
        refund=20, crossed=0, unknown=0
    )
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="started_through"):
            pacing.settle_abandoned(terms=crossing, started_through=bad)


def test_expired_lease_is_abandoned_at_its_mark_or_whole_without_one():
    lease = lease_for()
    assert pacing.settle_expired(terms=lease, started_through=5) == pacing.settle_abandoned(
        terms=lease, started_through=5
    )
    assert pacing.settle_expired(terms=lease) == pacing.settle_abandoned(
        terms=lease, started_through=lease.size
    )


def test_refund_of_an_abandoned_lease_is_budget_again_while_its_minute_is_current():
    lease = lease_for()  # 20 granted at MINUTE + 600
    ledger = pacing.charge(MinuteLedger(minute_start_ms=MINUTE, granted=80), check_in(MINUTE + 600))
    assert ledger.granted == 100
    assert check_in(MINUTE + 700, ledger=ledger) == Wait(1_300)
    settlement = pacing.settle_abandoned(terms=lease, started_through=8)
    ledger, following = pacing.apply_settlement(
        lease_ledger=ledger,
        next_ledger=MinuteLedger(minute_start_ms=MINUTE + 2_000),
        settlement=settlement,
    )
    decision = check_in(MINUTE + 900, ledger=ledger)
    assert isinstance(decision, Grant) and decision.size == 12
    assert following.carried_in == 8


def test_progress_chunk_is_about_a_second_of_sending_and_at_least_the_concurrency():
    assert pacing.progress_chunk(rate_per_s=123.7, concurrency=8) == 123
    assert pacing.progress_chunk(rate_per_s=3.0, concurrency=8) == 8
    # No measured rate yet: the assumed one (8 slots at ASSUMED_SEND_MS a send).
    assert pacing.progress_chunk(rate_per_s=None, concurrency=8) == 80


def test_chunk_limit_is_a_share_of_the_cap_and_two_sends_from_120_a_minute():
    assert pacing.chunk_limit(0) == 1
    assert pacing.chunk_limit(60) == 1  # 0.24; two sends would be two seconds of the cap
    assert pacing.chunk_limit(119) == 1
    assert pacing.chunk_limit(120) == 2  # 0.48; two sends are a second of the cap
    assert pacing.chunk_limit(499) == 2
    assert pacing.chunk_limit(600) == 2  # 2.4
    assert pacing.chunk_limit(4_500) == 18
    assert pacing.chunk_limit(60_000) == 240


@given(cap=st.integers(min_value=301, max_value=10**7))
def test_two_chunks_less_one_send_are_under_one_percent_of_a_cap_above_300(cap):
    # How far a worker's mark can run ahead of its starts (A6): the rest of the chunk under way
    # and the next one. Under 1% of the cap wherever two sends are.
    assert 2 * pacing.chunk_limit(cap) - 1 < 0.01 * cap


@given(cap=st.integers(min_value=1, max_value=300))
def test_below_300_a_minute_a_crash_costs_at_most_three_sends_and_a_chunk_a_second(cap):
    chunk = pacing.chunk_limit(cap)
    assert 2 * chunk - 1 <= 3
    # Never more than a second of the cap's rate in one chunk, unless one send is already more.
    assert chunk == 1 or chunk <= cap / 60


def test_progress_chunk_never_exceeds_the_caps_chunk_limit_even_below_the_concurrency():
    # The cap's bound wins over the concurrency floor ...
    assert pacing.progress_chunk(rate_per_s=3.0, concurrency=8, per_minute=60) == 1
    assert pacing.progress_chunk(rate_per_s=None, concurrency=8, per_minute=600) == 2
    assert pacing.progress_chunk(rate_per_s=123.7, concurrency=8, per_minute=4_500) == 18
    # ... and does not change a chunk already below it.
    assert pacing.progress_chunk(rate_per_s=123.7, concurrency=8, per_minute=60_000) == 123
    assert pacing.progress_chunk(rate_per_s=3.0, concurrency=8, per_minute=60_000) == 8


@given(
    rate=st.none() | st.floats(min_value=0.01, max_value=10_000),
    concurrency=st.integers(min_value=1, max_value=64),
    cap=st.integers(min_value=0, max_value=10**6),
)
def test_progress_chunk_is_between_one_and_the_chunk_limit(rate, concurrency, cap):
    chunk = pacing.progress_chunk(rate_per_s=rate, concurrency=concurrency, per_minute=cap)
    unbounded = pacing.progress_chunk(rate_per_s=rate, concurrency=concurrency)
    assert chunk == min(unbounded, pacing.chunk_limit(cap))
    assert 1 <= chunk <= pacing.chunk_limit(cap)


def test_open_spill_counts_only_leases_that_may_cross():
    crossing = lease_for()
    early = replace(crossing, size=7, may_cross=False)
    assert pacing.open_spill([crossing, early, crossing]) == 40


def test_apply_settlement_refunds_the_lease_minute_and_carries_into_the_next():
    lease_ledger = MinuteLedger(minute_start_ms=MINUTE, granted=50)
    next_ledger = MinuteLedger(minute_start_ms=MINUTE + 2_000, granted=3)
    settlement = pacing.Settlement(refund=4, crossed=2, sent=10, failed=1, throttled=1)
    lease_ledger, next_ledger = pacing.apply_settlement(
        lease_ledger=lease_ledger, next_ledger=next_ledger, settlement=settlement
    )
    assert lease_ledger == MinuteLedger(
        MINUTE, granted=50, refunded=4, sent=10, failed=1, throttled=1
    )
    assert next_ledger == MinuteLedger(MINUTE + 2_000, granted=3, carried_in=2)


def test_next_rate_is_an_ewma_and_ignores_empty_samples():
    assert pacing.next_rate(None, 50, 500) == 100.0
    assert pacing.next_rate(100.0, 20, 100) == pytest.approx(100 + 0.3 * (200 - 100))
    assert pacing.next_rate(100.0, 0, 100) == 100.0
    assert pacing.next_rate(None, 5, 0) is None


def test_workers_needed_scales_with_the_cap_and_respects_bounds():
    limits = replace(LIMITS, per_minute=6_000, max_workers=10, batch_size=100)
    # 100/s over a 1.5 s window = 150 a worker; 6_000 x 1.5 headroom / 150 = 60 -> max 10
    assert pacing.workers_needed(limits=limits, backlog=10**6, rate_per_worker_per_s=100.0) == 10
    assert pacing.workers_needed(limits=limits, backlog=250, rate_per_worker_per_s=100.0) == 3
    small = replace(limits, per_minute=300)
    assert pacing.workers_needed(limits=small, backlog=10**6, rate_per_worker_per_s=100.0) == 3
    assert pacing.workers_needed(limits=limits, backlog=0, rate_per_worker_per_s=100.0) == 0
    paused = replace(limits, paused=True)
    assert pacing.workers_needed(limits=paused, backlog=10, rate_per_worker_per_s=1.0) == 0


@settings(max_examples=500, deadline=None)
@given(
    limits=st.builds(
        Limits,
        per_minute=st.integers(0, 500),
        batch_size=st.integers(1, 100),
        max_workers=st.integers(1, 5),
        concurrency=st.integers(1, 8),
        guard_ms=st.integers(0, 400),
        window_ms=st.just(2_000),
        spill_hold_ms=st.integers(0, 1_000),
    ),
    now=st.integers(0, 10**12),
    granted=st.integers(0, 500),
    refund_share=st.floats(0, 1),
    carried_in=st.integers(0, 300),
    spill=st.integers(0, 300),
    backlog=st.integers(0, 1_000),
    rate=rates,
    running=st.integers(1, 6),
)
def test_any_single_decision_respects_budget_batch_backlog_and_window(
    limits, now, granted, refund_share, carried_in, spill, backlog, rate, running
):
    minute = pacing.minute_start(now, limits.window_ms)
    ledger = MinuteLedger(
        minute_start_ms=minute,
        granted=granted,
        refunded=int(granted * refund_share),
        carried_in=carried_in,
    )
    decision = decide(
        now_ms=now,
        limits=limits,
        ledger=ledger,
        open_spill=spill,
        backlog=backlog,
        worker=WorkerView(rate_per_s=rate),
        running_workers=running,
    )
    if isinstance(decision, Wait):
        assert 0 < decision.ms <= limits.window_ms
    if isinstance(decision, Grant):
        assert 1 <= decision.size <= limits.per_minute - ledger.charged - spill
        assert decision.size <= min(limits.batch_size, backlog)
        assert now + decision.start_in_ms >= minute + limits.guard_ms
        assert now + decision.stop_starting_in_ms <= minute + limits.window_ms - limits.guard_ms


# -- property test: any sequence of check-ins, progress reports, reports, abandonments, expiries,
# clock steps and cap changes ---------------------------------------------------------------------


@dataclass
class OpenLease:
    lease: LeaseTerms
    granted_at: int
    start_in_ms: int
    # The mark the caller recorded. A report is recorded (and only then acknowledged) only while
    # the lease is open, so the worker's acknowledged mark, the most it may ever start, is this.
    mark: int = 0
    # Progress reports sent by the worker but not yet at the server.
    in_flight: list[int] = field(default_factory=list)


@st.composite
def limits_strategy(draw: st.DrawFn) -> Limits:
    window = draw(st.sampled_from([1_000, 2_000, 60_000]))
    guard = draw(st.integers(0, min(300, window // 2 - 1)))
    return Limits(
        per_minute=draw(st.integers(0, 80)),
        batch_size=draw(st.integers(1, 30)),
        max_workers=draw(st.integers(1, 5)),
        concurrency=draw(st.integers(1, 8)),
        guard_ms=guard,
        window_ms=window,
        spill_hold_ms=draw(st.integers(0, window - guard)),
    )


@settings(max_examples=120, deadline=None)
@given(data=st.data(), limits=limits_strategy(), start=st.integers(0, 10**12))
def test_no_sequence_of_events_charges_a_minute_over_the_cap(data, limits, start):
    window = limits.window_ms
    now = start
    ledgers: dict[int, MinuteLedger] = {}
    open_leases: list[OpenLease] = []
    # Oracle, per minute: sends that may count there at the provider in the worst case.
    started: defaultdict[int, int] = defaultdict(int)
    crossed_in: defaultdict[int, int] = defaultdict(int)
    last_cap: dict[int, int] = {}

    def ledger(minute: int) -> MinuteLedger:
        return ledgers.get(minute) or MinuteLedger(minute_start_ms=minute)

    def check_in_once(
        backlog: int,
        worker: WorkerView,
        running: int,
        hold: int | None,
        room: int | None,
        held: int = 0,
        answer: int = 0,
    ) -> bool:
        minute = pacing.minute_start(now, window)
        spill = pacing.open_spill(
            o.lease for o in open_leases if o.lease.minute_start_ms == minute - window
        )
        decision = decide(
            now_ms=now,
            limits=limits,
            ledger=ledger(minute),
            open_spill=spill,
            backlog=backlog,
            worker=worker,
            running_workers=running,
            hold_until_ms=None if hold is None else minute + hold,
            account_room=room,
            held_ms=held,
            answer_ms=answer,
        )
        if isinstance(decision, Wait):
            assert decision.ms > 0
        if not isinstance(decision, Grant):
            return False
        assert 1 <= decision.size <= min(limits.batch_size, backlog)
        assert decision.minute_start_ms == minute
        assert now + decision.minute_ends_in_ms == minute + window
        assert 0 <= decision.start_in_ms <= decision.stop_starting_in_ms
        assert now + decision.start_in_ms >= minute + limits.guard_ms + limits.learned_guard_ms
        if hold is not None:
            assert now + decision.start_in_ms >= minute + hold
        if room is not None:
            assert decision.size <= room
        assert now + decision.stop_starting_in_ms <= minute + window - limits.guard_ms - min(
            answer, limits.spill_hold_ms
        )
        ledgers[minute] = pacing.charge(ledger(minute), decision)
        charged = ledgers[minute].charged + spill
        assert charged <= limits.per_minute
        lease = LeaseTerms.from_grant(decision, limits, held_ms=held)
        open_leases.append(OpenLease(lease, now, decision.start_in_ms))
        last_cap[minute] = limits.per_minute
        return True

    ops = ["advance", "check_in", "check_in", "fill", "progress", "progress", "deliver"]
    ops += ["report", "abandon", "cap"]
    for _ in range(data.draw(st.integers(1, 100), label="steps")):
        op = data.draw(st.sampled_from(ops))
        if op == "advance":
            now += data.draw(st.integers(0, window + window // 2))
        elif op == "cap":
            widest = window - 2 * limits.guard_ms - 1
            limits = replace(
                limits,
                per_minute=data.draw(st.integers(0, 80)),
                batch_size=data.draw(st.integers(1, 30)),
                learned_guard_ms=data.draw(st.integers(0, max(0, min(widest, window // 4)))),
            )
        elif op == "progress" and open_leases:
            # The worker declares a mark (never lower than one it sent before) and waits.
            item = data.draw(st.sampled_from(open_leases))
            floor = max([item.mark, *item.in_flight])
            item.in_flight.append(data.draw(st.integers(floor, item.lease.size)))
        elif op == "deliver" and any(o.in_flight for o in open_leases):
            # The oldest report in flight reaches the server while the lease is open: recorded
            # (monotone), then acknowledged. (One reaching it after the lease was settled is
            # refused and the worker starts nothing more: it just drops out here.)
            item = data.draw(st.sampled_from([o for o in open_leases if o.in_flight]))
            item.mark = max(item.mark, item.in_flight.pop(0))
        elif op == "abandon" and open_leases:
            # Presumed lost, at any time (safe whenever; the API does it when overdue). The
            # worker may be alive: it may still start anything up to its acknowledged mark.
            index = data.draw(st.integers(0, len(open_leases) - 1))
            item = open_leases.pop(index)
            lease = item.lease
            expired = now >= item.granted_at + lease.expires_in_ms
            how = data.draw(st.sampled_from(["abandoned", "expired", "expired_no_mark"]))
            if how == "abandoned" or not expired:
                settlement = pacing.settle_abandoned(terms=lease, started_through=item.mark)
                may_start = item.mark
            elif how == "expired":
                settlement = pacing.settle_expired(terms=lease, started_through=item.mark)
                may_start = item.mark
            else:  # a caller that kept no mark: the worker may have started anything
                settlement = pacing.settle_expired(terms=lease)
                may_start = lease.size
            assert settlement.refund + settlement.unknown == lease.size
            minute = lease.minute_start_ms
            ledgers[minute], ledgers[minute + window] = pacing.apply_settlement(
                lease_ledger=ledger(minute),
                next_ledger=ledger(minute + window),
                settlement=settlement,
            )
            # Oracle: everything it may start is sent, and may cross if physically possible.
            started[minute] += may_start
            crossed_in[minute + window] += may_start if lease.may_cross else 0
        elif op == "report" and open_leases:
            index = data.draw(st.integers(0, len(open_leases) - 1))
            item = open_leases[index]
            lease = item.lease
            expired = now >= item.granted_at + lease.expires_in_ms and data.draw(st.booleans())
            if expired:
                settlement = pacing.settle_expired(terms=lease)
                unknown, sent_failed, late = lease.size, 0, 0
            else:
                # A6: the worker started nothing past its acknowledged mark.
                sent, failed, not_started, throttled = _split(data, lease.size, item.mark)
                # Physically possible done times: started inside the window, back within the
                # send timeout.
                done = data.draw(
                    st.lists(
                        st.integers(
                            item.start_in_ms,
                            lease.stop_starting_in_ms + limits.spill_hold_ms,
                        ),
                        min_size=sent + failed,
                        max_size=sent + failed,
                    )
                )
                report = Tally(sent, failed, not_started, throttled, done)
                settlement = pacing.settle(terms=lease, tally=report)
                sent_failed = sent + failed
                unknown = lease.size - sent - failed - not_started - throttled
                late = sum(d > lease.minute_ends_in_ms - lease.guard_ms for d in done)
            minute = lease.minute_start_ms
            ledgers[minute], ledgers[minute + window] = pacing.apply_settlement(
                lease_ledger=ledger(minute),
                next_ledger=ledger(minute + window),
                settlement=settlement,
            )
            started[minute] += sent_failed + unknown
            crossed_in[minute + window] += late + (unknown if lease.may_cross else 0)
            open_leases.pop(index)
        elif op in ("check_in", "fill"):
            # "fill": healthy workers check in until the minute's budget is gone, so that any
            # budget the ledger wrongly frees is granted again.
            for _ in range(1 if op == "check_in" else 10):
                hold = room = None
                held = answer = 0
                if op == "check_in":
                    backlog = data.draw(st.integers(0, 500))
                    worker = WorkerView(rate_per_s=data.draw(rates))
                    running = data.draw(st.integers(1, 6))
                    hold = data.draw(st.none() | st.integers(0, window), label="hold")
                    room = data.draw(st.none() | st.integers(-5, 80), label="room")
                    held = data.draw(st.integers(0, 2 * window), label="held")
                    answer = data.draw(st.integers(0, window), label="answer")
                else:
                    backlog, worker, running = 500, WorkerView(rate_per_s=1_000.0), 1
                if not check_in_once(backlog, worker, running, hold, room, held, answer):
                    break
    # Leases never reported: worst case, everything was sent and may have crossed.
    for item in open_leases:
        started[item.lease.minute_start_ms] += item.lease.size
        if item.lease.may_cross:
            crossed_in[item.lease.minute_start_ms + window] += item.lease.size
    for minute, cap in last_cap.items():
        assert started[minute] + crossed_in[minute] <= cap, minute


def _split(data: st.DataObject, size: int, mark: int) -> tuple[int, int, int, int]:
    """sent, failed, not_started, throttled: at most ``mark`` started (sent, failed, throttled)."""
    left = mark
    started = []
    for _ in range(3):
        part = data.draw(st.integers(0, left))
        started.append(part)
        left -= part
    sent, failed, throttled = started
    if data.draw(st.booleans()):  # usually the worker started all it declared
        sent += left
    rest = size - sent - failed - throttled
    not_started = data.draw(st.integers(0, rest))
    if data.draw(st.booleans()):  # usually the report accounts for everyone
        not_started = rest
    return sent, failed, not_started, throttled


def test_rate_fit_never_asks_for_more_than_the_worker_can_start():
    # Not a tautology: a worker at 10/s with 1 s left may be granted at most 9.
    decision = check_in(MINUTE + 750, worker=WorkerView(rate_per_s=10.0))
    assert isinstance(decision, Grant)
    assert decision.size <= math.floor(10 * decision.stop_starting_in_ms / 1000)
