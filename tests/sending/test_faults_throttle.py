"""Throttling and shared accounts, end to end on PostgreSQL: a provider whose clock is behind ours
by more than the guard (enforcing its cap), a 429 storm followed by 500s, and three customers on
one provider account.

As in tests/sending/test_faults.py (whose helpers these use): the worker API is served by uvicorn,
workers run the real handler in threads started by real conductor ticks, and mail goes to a real
SandboxServer whose clock runs 60_000 / SEND_WINDOW_MS times faster than the wall clock, so its
calendar minute is one of the engine's short minutes and its cap checks ours at the provider.
Minutes here are 6 s with a 1 s guard. Every wait is bounded.
"""

import time
from collections import Counter, defaultdict

import pytest

from customers.models import SendLimit
from sending import conductor, throttle
from sending.models import CustomerMinute, CustomerPacing, Message, Recipient
from sending.runtimes import LocalRuntime, local_invocations
from sending.sandbox import Latency, SandboxServer, minute_key
from tests.factories import API_KEY, CustomerFactory, ProviderAccountFactory, make_message
from tests.sending.test_faults import (
    TICK_S,
    assert_provider_saw_each_at_most_once,
    assert_unknown_only_where_in_doubt,
    provider_clock,
    provider_ms,
    provider_speed,
    set_limits,
)

WINDOW_MS = 6_000


@pytest.fixture
def six_second_minutes(fast_minutes, settings):
    settings.SEND_WINDOW_MS = WINDOW_MS
    settings.SEND_TIMEOUT_MS = 1_000
    settings.SEND_MAX_ATTEMPTS = 3
    settings.WORKER_API_TIMEOUT_S = 1  # <= the guard: see tests/sending/test_faults.py


def sandbox_at(settings, *, cap: int, behind_ms: int = 0, latency_ms: float = 10):
    """A sandbox on the sped-up clock, `behind_ms` of OUR time behind ours."""
    fast = provider_clock(settings.SEND_WINDOW_MS)
    offset = provider_ms(settings.SEND_WINDOW_MS, behind_ms)
    return SandboxServer(
        caps={API_KEY: cap},
        clock=lambda: fast() - offset,
        speed=provider_speed(settings.SEND_WINDOW_MS),
        latency=Latency(median_ms=latency_ms),
    ).start()


def customers_on(sandbox, n: int, *, account_cap: int, per_minute: int, batch_size: int = 10):
    account = ProviderAccountFactory(
        settings={"api_url": sandbox.url},
        credentials={"api_key": API_KEY},
        per_minute_cap=account_cap,
    )
    made = []
    for _ in range(n):
        customer = CustomerFactory(provider_account=account)
        SendLimit.objects.filter(customer=customer).update(
            per_minute=per_minute, batch_size=batch_size, concurrency=4
        )
        set_limits(customer, max_workers=3)
        made.append(customer)
    return made


def drive_all(customers, runtime, *, until, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    next_tick = 0.0
    while not until():
        now = time.monotonic()
        if now >= next_tick:
            for customer in customers:
                conductor.tick(customer_id=customer.pk, runtime=runtime)
            next_tick = now + TICK_S
        if now > deadline:
            counts = Counter(
                Recipient.objects.filter(message__customer__in=customers).values_list(
                    "status", flat=True
                )
            )
            minutes = [
                (m.customer_id, m.minute_start.strftime("%M:%S"), m.granted, m.refunded, m.sent)
                for m in CustomerMinute.objects.filter(customer__in=customers).order_by("pk")
            ]
            raise AssertionError(
                f"timed out after {timeout_s} s; recipients {counts}; minutes {minutes}"
            )
        time.sleep(0.01)


def all_completed(messages):
    ids = [m.pk for m in messages]
    return lambda: (
        Message.objects.filter(pk__in=ids, status=Message.Status.COMPLETED).count() == len(ids)
    )


def join_workers(customers):
    ours = set()
    for customer in customers:
        ours |= set(customer.workers.values_list("pk", flat=True))
    for invocation in local_invocations():
        if invocation.worker_id in ours:
            assert invocation.join(10), f"worker {invocation.worker_id} is still running"


def assert_provider_agrees(messages, sandbox):
    """Nobody twice; every `sent` recipient of these messages arrived, with its provider id;
    whatever arrived is `sent` or in doubt (`unknown`), never queued, failed or lost."""
    sends = sandbox.sends
    keys = Counter(s.idempotency_key for s in sends)
    assert not [k for k, n in keys.items() if n > 1], keys.most_common(3)
    by_key = {s.idempotency_key: s for s in sends}
    rows = {str(r.pk): r for r in Recipient.objects.filter(message__in=messages)}
    assert set(by_key) <= set(rows), "the provider got mail for strangers"
    for key, row in rows.items():
        if row.status == Recipient.Status.SENT:
            assert row.provider_message_id == by_key[key].message_id
        elif key in by_key:
            assert row.status == Recipient.Status.UNKNOWN, (key, row.status)
        else:
            assert row.status in (Recipient.Status.FAILED, Recipient.Status.UNKNOWN), row.status


def accepted_minutes(sandbox) -> dict[str, int]:
    return sandbox.report()["accepted_per_minute"].get(API_KEY, {})


def wait_for_phase(phase_ms: int) -> None:
    """Sleep until the wall clock is ``phase_ms`` into one of our (epoch-aligned) minutes."""
    time.sleep(((phase_ms - time.time() * 1000) % WINDOW_MS) / 1000)


# The provider refuses only where its minute shared with the start of our next one is full, so
# the start is pinned where that is sure. 2_000: the first minute sends its whole cap. 4_300:
# 1.7 s before a minute ends (0.7 s before its end guard), the first minute sends only part of
# its cap and the provider's minute fills with our next minute's first sends (once a flake in
# CI, pinned here). Later (4_700, in one CI run), our first minute sent too little for the
# provider to refuse at all (a worker starts no send it expects answered after the minute's last
# safe moment): the skew was not tested.
@pytest.mark.parametrize("start_phase_ms", [2_000, 4_300], ids=["mid-minute", "late-in-a-minute"])
def test_a_provider_clock_behind_by_more_than_the_guard_costs_seconds_not_minutes(
    api_url, six_second_minutes, postgres, settings, start_phase_ms
):
    settings.WORKER_API_URL = api_url
    cap = 40
    # Behind by 1.3 s with a 1 s guard: the first sends of each of our minutes land in the
    # provider's previous minute, which is full.
    sandbox = sandbox_at(settings, cap=cap, behind_ms=1_300)
    try:
        (customer,) = customers_on(sandbox, 1, account_cap=1_000, per_minute=cap)
        message = make_message(customer, 5 * cap)
        runtime = LocalRuntime(mode="thread", timeout_s=60)
        wait_for_phase(start_phase_ms)
        drive_all([customer], runtime, until=all_completed([message]), timeout_s=75)
        join_workers([customer])

        report = sandbox.report()
        refused = report["throttled"].get(API_KEY, {})
        # The provider refused some sends at a minute's edge; the engine learned the skew from
        # them and widened the customer's start guard. A refusal only says the provider's minute
        # had not turned by then, so one refusal 186 ms after the window opened teaches 286 ms
        # (186 + the margin), not the 400 the whole 1.3 s skew would; a later refusal doubles it.
        assert refused, "the provider never refused: the skew was not tested"
        learned = CustomerPacing.objects.get(customer=customer)
        assert throttle.GUARD_MARGIN_MS <= learned.learned_guard_ms <= 1_500, learned.last_refusal
        assert "not turned" in learned.last_refusal
        # Each minute with a refusal widens the guard: the first by at least the margin, each
        # later one at least doubling it (100, 200, 400 ms), so the 300 ms by which the skew
        # exceeds the guard is covered after at most three. Refusals come only while the
        # provider's previous minute is full (until then our early sends are accepted into it),
        # so which minutes they fall in varies from run to run; how many does not exceed three.
        minutes = accepted_minutes(sandbox)
        assert 1 <= len(refused) <= 3, (refused, minutes)
        # Our minutes with a refusal still used the whole cap (or, the send's last minute, sent
        # what was left): the refused sends went out seconds later in the same minute, not the
        # minute after. (Used, not sent: a send of the minute before answered after its last
        # safe moment is charged to this one too.)
        ours = CustomerMinute.objects.filter(customer=customer, throttled__gt=0)
        assert ours.exists()
        last = CustomerMinute.objects.filter(customer=customer, sent__gt=0).latest("minute_start")
        assert all(
            (m.charged == cap and m.sent == cap - m.carried_in) or m.pk == last.pk for m in ours
        ), [(m.minute_start, m.sent, m.carried_in, m.charged) for m in ours]
        # At the provider a refusal never costs a whole minute. (Its minute after one can be
        # short: until the guard is learned, our minutes begin by sending into the provider's
        # previous one; once it is, they no longer do, and the first of the provider's minutes
        # after that gets only what our minute sent after the refusal.)
        for minute in refused:
            following = sorted(m for m in minutes if m > minute)
            assert minutes[minute] + minutes[following[0]] >= cap, minutes
        # Never over the cap at the provider, nobody twice, nobody lost, the DB agrees.
        assert all(n <= cap for n in minutes.values()), minutes
        rows = list(Recipient.objects.filter(message=message))
        assert {r.status for r in rows} <= {Recipient.Status.SENT, Recipient.Status.UNKNOWN}
        assert_unknown_only_where_in_doubt(message)
        report_over = report["over_cap_minutes"].get(API_KEY, {})
        # Attempted over the cap only where the refusals were (a refusal is an attempt).
        assert set(report_over) <= set(refused)
        by_key = {s.idempotency_key: s for s in sandbox.sends}
        assert not [s for s in sandbox.sends if s.duplicate]
        assert {str(r.pk) for r in rows if r.status == Recipient.Status.SENT} <= set(by_key)
    finally:
        sandbox.stop()


def test_a_429_storm_then_500s_loses_nothing_and_the_next_minute_is_full(
    api_url, six_second_minutes, postgres, settings
):
    settings.WORKER_API_URL = api_url
    cap, n = 40, 200
    sandbox = sandbox_at(settings, cap=cap, latency_ms=20)
    try:
        (customer,) = customers_on(sandbox, 1, account_cap=1_000, per_minute=cap)
        message = make_message(customer, n)
        runtime = LocalRuntime(mode="thread", timeout_s=60)
        drive_all([customer], runtime, until=lambda: len(sandbox.sends) >= 10, timeout_s=20)
        # Mid-minute: 429s for a minute, then 500s for a minute (each refused minute stops at
        # its first 429, so the 500s must outlast a minute's start to be met at all).
        storm = sandbox.inject_fault(429, duration_ms=provider_ms(WINDOW_MS, WINDOW_MS))
        drive_all([customer], runtime, until=lambda: sandbox.ledger.now_ms() > storm.until_ms,
                  timeout_s=15)  # fmt: skip
        errors = sandbox.inject_fault(500, duration_ms=provider_ms(WINDOW_MS, WINDOW_MS))
        drive_all([customer], runtime, until=all_completed([message]), timeout_s=75)
        join_workers([customer])

        report = sandbox.report()
        assert report["faults"].get("429") and report["faults"].get("500"), report["faults"]
        assert report["throttled"] == {}, "the provider's own cap refused something"
        # The first full minute after the storm is back at the cap: the refusals lowered the
        # cap for the minute they came in, not for the minutes after.
        minutes = accepted_minutes(sandbox)
        after = sorted(m for m in minutes if m > minute_key(errors.until_ms))
        assert len(after) >= 2, minutes  # a full minute, then the last
        assert minutes[after[0]] == cap, minutes
        assert all(v <= cap for v in minutes.values())
        # Nothing lost, nothing twice; a 500 is a failed attempt, failed for good only after
        # SEND_MAX_ATTEMPTS.
        rows = list(Recipient.objects.filter(message=message))
        assert {r.status for r in rows} <= {"sent", "unknown", "failed"}
        assert all(r.attempts >= settings.SEND_MAX_ATTEMPTS for r in rows if r.status == "failed")
        assert_unknown_only_where_in_doubt(message)
        assert_provider_saw_each_at_most_once(message, sandbox)
        pacing_row = CustomerPacing.objects.get(customer=customer)
        assert "someone else sends" in pacing_row.last_refusal
    finally:
        sandbox.stop()


def test_three_customers_on_one_account_share_its_cap_and_never_overrun_it(
    api_url, six_second_minutes, postgres, settings
):
    settings.WORKER_API_URL = api_url
    account_cap, per_minute = 60, 50
    sandbox = sandbox_at(settings, cap=account_cap)
    try:
        customers = customers_on(sandbox, 3, account_cap=account_cap, per_minute=per_minute)
        messages = [make_message(c, 3 * account_cap // 3 + 40) for c in customers]
        runtime = LocalRuntime(mode="thread", timeout_s=60)
        drive_all(customers, runtime, until=all_completed(messages), timeout_s=75)
        join_workers(customers)

        report = sandbox.report()
        # Together never over the account's cap at the provider: not even an attempt past it.
        assert report["throttled"] == {} and report["over_cap_minutes"] == {}, report
        assert all(n <= account_cap for n in accepted_minutes(sandbox).values())
        # Each customer, per provider minute.
        owner = {}
        for message in messages:
            for pk in Recipient.objects.filter(message=message).values_list("pk", flat=True):
                owner[str(pk)] = message.customer_id
        per = defaultdict(Counter)
        for send in sandbox.sends:
            per[minute_key(send.arrived_ms)][owner[send.idempotency_key]] += 1
        full = [m for m in sorted(per)[1:-1] if len(per[m]) == 3]
        assert full, dict(per)
        # While all three had backlog, each got its equal share (20 of 60), give or take what a
        # minute's edges shift.
        for minute in full:
            for customer in customers:
                assert 15 <= per[minute][customer.pk] <= 25, (minute, dict(per[minute]))
        # The ledger says the same: never more than the account's cap charged in a minute.
        charged = defaultdict(int)
        for row in CustomerMinute.objects.filter(customer__in=customers):
            charged[row.minute_start] += row.sent
        assert max(charged.values()) <= account_cap
        assert_provider_agrees(messages, sandbox)
    finally:
        sandbox.stop()
