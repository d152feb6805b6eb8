"""Unit and property tests for what refusals teach pacing and a shared account's split (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sending import throttle
from sending.throttle import BELOW, EDGE, Member, Refusal, account_room, equal_shares, judge

MINUTE = 60_000 * 1_000
WINDOW = 60_000
GUARD = 250


def judged(refusals, *, previous_used=1_000, used_now=10, learned=0, cap=1_000):
    return judge(
        refusals=refusals,
        minute_start_ms=MINUTE,
        window_ms=WINDOW,
        guard_ms=GUARD,
        learned_guard_ms=learned,
        previous_used=previous_used,
        previous_cap=cap,
        used_now=used_now,
        cap=cap,
    )


def test_a_refusal_at_the_minute_start_after_a_full_minute_widens_the_start_guard():
    # The provider's clock is 450 ms behind: sends at 250..450 ms land in its full minute.
    verdict = judged([Refusal(MINUTE + 300), Refusal(MINUTE + 460, retry_after_ms=1_000)])
    assert verdict.kind == EDGE
    assert verdict.learned_guard_ms == 460 - GUARD + throttle.GUARD_MARGIN_MS
    assert verdict.cap_estimate is None
    # The Retry-After (1 s after the last refusal) is later than the widened window: it wins.
    assert verdict.hold_until_ms == MINUTE + 1_460
    assert "not turned" in verdict.why


def test_an_edge_refusal_despite_a_learned_guard_at_least_doubles_it():
    verdict = judged([Refusal(MINUTE + 900)], learned=600)
    assert verdict.kind == EDGE and verdict.learned_guard_ms == 1_200
    assert verdict.hold_until_ms == MINUTE + GUARD + 1_200
    # ... and never more than the window allows.
    assert judged([Refusal(MINUTE + 900)], learned=4_000).learned_guard_ms == 5_000


def test_a_refusal_at_the_start_after_a_minute_that_was_not_full_is_below_the_cap():
    verdict = judged([Refusal(MINUTE + 300)], previous_used=500, used_now=40)
    assert verdict.kind == BELOW
    assert verdict.cap_estimate == 40
    assert verdict.hold_until_ms == MINUTE + 300 + throttle.BACKOFF_MS


def test_an_edge_refusal_after_a_short_first_minute_counts_this_minutes_sends_in_the_previous():
    # A send began late in a minute and sent 22 of 40 there. The provider, 1.3 s behind, took our
    # next minute's first 18 into that same minute of its own, so it was full when it refused.
    verdict = judged([Refusal(MINUTE + 1_240)], previous_used=22, used_now=18, cap=40)
    assert verdict.kind == EDGE
    assert verdict.cap_estimate is None  # the rest of our minute still gets the cap
    # Together they fall short of full: below our count, as before.
    assert judged([Refusal(MINUTE + 1_240)], previous_used=22, used_now=15, cap=40).kind == BELOW


def test_a_mid_minute_refusal_caps_the_rest_of_the_minute_and_honours_retry_after():
    verdict = judged([Refusal(MINUTE + 30_000, retry_after_ms=5_000)], used_now=700)
    assert verdict.kind == BELOW
    assert verdict.cap_estimate == 700
    assert verdict.hold_until_ms == MINUTE + 35_000
    assert "someone else sends" in verdict.why


def test_judge_needs_a_refusal():
    with pytest.raises(ValueError):
        judged([])


def test_a_learned_guard_halves_every_half_life():
    half = throttle.GUARD_HALF_LIFE_MS
    assert throttle.decayed_guard_ms(400, 0, 0) == 400
    assert throttle.decayed_guard_ms(400, 0, half) == 200
    assert throttle.decayed_guard_ms(400, 0, 2 * half) == 100
    assert throttle.decayed_guard_ms(400, None, 0) == 0
    assert throttle.decayed_guard_ms(400, 10, 0) == 400  # a clock read before it: no growth


refusal_lists = st.lists(
    st.builds(
        Refusal,
        at_ms=st.integers(MINUTE, MINUTE + WINDOW),
        retry_after_ms=st.none() | st.integers(0, 120_000),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(
    refusals=refusal_lists,
    guard=st.integers(0, 2_000),
    learned=st.integers(0, 5_000),
    previous_used=st.integers(0, 2_000),
    used_now=st.integers(0, 2_000),
    cap=st.integers(1, 2_000),
)
def test_a_verdict_only_ever_delays_starts_or_lowers_the_cap(
    refusals, guard, learned, previous_used, used_now, cap
):
    widest = throttle.max_learned_guard_ms(guard_ms=guard, window_ms=WINDOW)
    learned = min(learned, widest)
    verdict = judge(
        refusals=refusals,
        minute_start_ms=MINUTE,
        window_ms=WINDOW,
        guard_ms=guard,
        learned_guard_ms=learned,
        previous_used=previous_used,
        previous_cap=cap,
        used_now=used_now,
        cap=cap,
    )
    # Retry-After is honoured: nobody starts before the latest time the provider asked for.
    for r in refusals:
        if r.retry_after_ms is not None:
            assert verdict.hold_until_ms >= r.at_ms + min(r.retry_after_ms, WINDOW)
    if verdict.kind == EDGE:
        assert learned <= verdict.learned_guard_ms <= widest
        assert 2 * guard + verdict.learned_guard_ms < WINDOW  # the window stays open
        assert verdict.hold_until_ms >= MINUTE + guard + verdict.learned_guard_ms
        assert previous_used + used_now >= throttle.FULL_SHARE * cap
    else:
        assert verdict.learned_guard_ms == learned
        assert 0 <= verdict.cap_estimate <= min(cap, used_now)
        assert verdict.hold_until_ms > max(r.at_ms for r in refusals) or any(
            r.retry_after_ms is not None for r in refusals
        )


# --- shared accounts ------------------------------------------------------------------------------


def test_three_customers_at_1000_on_a_1200_account_get_400_each():
    members = [Member(i, 1_000, 0, True) for i in (1, 2, 3)]
    assert equal_shares(cap=1_200, members=members) == {1: 400, 2: 400, 3: 400}
    # The first to ask may take its share and anything nobody else holds: here nothing more.
    assert account_room(cap=1_200, members=members, customer_id=1) == 400


def test_a_customer_below_its_equal_share_leaves_the_rest_to_the_others():
    members = [Member(1, 100, 0, True), Member(2, 1_000, 0, True), Member(3, 1_000, 0, True)]
    assert equal_shares(cap=1_200, members=members) == {1: 100, 2: 550, 3: 550}


def test_a_customer_without_backlog_holds_nothing():
    members = [Member(1, 1_000, 300, False), Member(2, 1_000, 0, True), Member(3, 1_000, 0, True)]
    assert equal_shares(cap=1_200, members=members) == {2: 450, 3: 450}
    members[2] = replace(members[2], backlogged=False)
    # Its share flows to the one still sending, within the minute.
    assert account_room(cap=1_200, members=members, customer_id=2) == 900


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    cap=st.integers(1, 3_000),
    limits=st.lists(st.integers(1, 2_000), min_size=1, max_size=5),
)
def test_a_shared_account_never_goes_over_its_cap_and_each_customer_gets_its_share(
    data, cap, limits
):
    """Customers with backlog all minute ask in any order for any amount up to what pacing
    offers: the account's total never passes its cap, and each one that keeps asking ends with
    at least its equal share (its own limit permitting)."""
    members = [Member(i, per_minute, 0, True) for i, per_minute in enumerate(limits)]
    shares = equal_shares(cap=cap, members=members)
    assert sum(shares.values()) <= cap
    used = [0] * len(members)

    def view():
        return [replace(m, used=used[i]) for i, m in enumerate(members)]

    for _ in range(data.draw(st.integers(0, 30), label="grants")):
        who = data.draw(st.integers(0, len(members) - 1))
        room = min(account_room(cap=cap, members=view(), customer_id=who), limits[who] - used[who])
        if room > 0:
            used[who] += data.draw(st.integers(1, room))
        assert sum(used) <= cap
    # Now everyone keeps asking until nothing more is offered.
    for _ in range(len(members) + 1):
        for who in range(len(members)):
            room = account_room(cap=cap, members=view(), customer_id=who)
            used[who] += max(0, min(room, limits[who] - used[who]))
    assert sum(used) <= cap
    for who, member in enumerate(members):
        assert used[who] >= shares[member.customer_id]
    # And nothing is left unused that somebody still wanted.
    assert sum(used) == min(cap, sum(limits))
