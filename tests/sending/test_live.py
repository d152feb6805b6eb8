"""Live samples: built from the ledger, leases and workers (never a count over recipients), kept
per second for ten minutes, published after commit, coalesced, and only when watched."""

import threading
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sending import alerts, live, planner
from sending.checkin import ms_to_datetime
from sending.models import CustomerMinute, Lease, Recipient
from tests.factories import (
    T0,
    WINDOW_MS,
    CustomerFactory,
    LeaseFactory,
    WorkerFactory,
    make_message,
)

MINUTE = ms_to_datetime(T0 - T0 % WINDOW_MS)
PREVIOUS = MINUTE - timedelta(milliseconds=WINDOW_MS)


@pytest.fixture
def customer(db):
    customer = CustomerFactory(per_minute=600)
    make_message(customer, 50)
    return customer


def minute_row(customer, start, **counts):
    return CustomerMinute.objects.create(customer=customer, minute_start=start, cap=600, **counts)


def open_lease(customer, *, minute=MINUTE, size=100, started_through=0, worker=None):
    worker = worker or WorkerFactory(customer=customer)
    return LeaseFactory(
        customer=customer,
        worker=worker,
        minute_start=minute,
        size=size,
        started_through=started_through,
    )


def test_a_sample_is_the_ledger_rows_the_open_leases_and_the_live_workers(customer):
    minute_row(customer, PREVIOUS, granted=600, refunded=10, sent=580, failed=5, throttled=2)
    minute_row(customer, MINUTE, granted=300, refunded=0, carried_in=4, sent=100, failed=1)
    open_lease(customer, size=150, started_through=60)
    WorkerFactory(customer=customer, state="stopped")

    sample, _ = live.build(customer.pk, T0, None)

    assert sample["minute"] == {
        "t": T0 - T0 % WINDOW_MS,
        "cap": 600,
        "granted": 300,
        "refunded": 0,
        "carried_in": 4,
        "sent": 100,
        "failed": 1,
        "throttled": 0,
        "charged": 304,
        "in_flight": 150,
    }
    assert sample["previous"]["sent"] == 580 and sample["previous"]["throttled"] == 2
    assert sample["workers"] == 1  # the stopped one is not counted
    assert sample["limits"] == {
        "per_minute": 600,
        "max_workers": 5,
        "concurrency": 16,
        "paused": False,
        "account_cap": 1_200,
    }
    (message,) = sample["messages"]
    assert message["total"] == 50


def test_after_the_first_tick_a_sample_reads_no_recipient_row(customer):
    open_lease(customer, started_through=10)
    live.build(customer.pk, T0, None)  # counts each message's recipients once, then keeps it
    with CaptureQueriesContext(connection) as queries:
        live.build(customer.pk, T0 + 500, None)
    assert len(queries) == 2
    assert not [q for q in queries if Recipient._meta.db_table in q["sql"]]


def test_a_round_reads_every_customer_in_the_same_two_statements_and_gets_each_its_own(db):
    customers = [CustomerFactory(per_minute=600 + 100 * i) for i in range(3)]
    messages = {}
    for i, customer in enumerate(customers):
        messages[customer.pk] = make_message(customer, 10)
        minute_row(customer, MINUTE, granted=100 + i, sent=10 * (i + 1))
        open_lease(customer, size=20 + i, started_through=5 + i)
    quiet = CustomerFactory()  # nothing sending: no sample, no statement of its own
    alone = {c.pk: live.read_rows(c.pk, T0) for c in customers}
    for customer in customers:  # each message's size, counted once and kept (as a first tick)
        live.build(customer.pk, T0, None, rows=alone[customer.pk])

    assert live.read_rows_many([c.pk for c in customers], T0) == alone
    ticks = [live.Tick(c.pk, True) for c in customers] + [live.Tick(quiet.pk, False)]
    with CaptureQueriesContext(connection) as queries:
        samples = live.on_ticks(ticks, now_ms=T0 + 500)
    assert len(queries) == 2
    assert samples[quiet.pk] is None
    for i, customer in enumerate(customers):
        sample = samples[customer.pk]
        assert sample["customer"] == customer.pk
        assert sample["minute"]["sent"] == 10 * (i + 1)
        assert sample["limits"]["per_minute"] == 600 + 100 * i
        assert sample["workers"] == 1
        assert [m["id"] for m in sample["messages"]] == [messages[customer.pk].pk]


def test_per_second_points_come_from_the_progress_marks_and_the_reports(customer):
    minute_row(customer, MINUTE, granted=200)
    lease = open_lease(customer, size=200, started_through=0)
    _, state = live.build(customer.pk, T0, None)

    Lease.objects.filter(pk=lease.pk).update(started_through=40)
    sample, state = live.build(customer.pk, T0 + 1000, state)
    assert sample["point"][1:] == [40, 1]

    # The batch is reported: 70 sent, the mark gone with the open lease; 30 more were started.
    Lease.objects.filter(pk=lease.pk).update(state=Lease.State.SETTLED)
    CustomerMinute.objects.filter(customer=customer, minute_start=MINUTE).update(sent=70)
    sample, state = live.build(customer.pk, T0 + 2000, state)
    assert sample["point"][1] == 30
    assert [p[1] for p in state["seconds"]] == [0, 40, 30]


def test_points_are_kept_for_ten_minutes(customer):
    state = None
    for second in range(live.SECONDS_KEPT + 30):
        _, state = live.build(customer.pk, T0 + second * 1000, state)
    assert len(state["seconds"]) == live.SECONDS_KEPT
    assert state["seconds"][0][0] == (T0 // 1000) + 30


def test_on_tick_publishes_only_when_watched_and_at_most_four_a_second(
    customer, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as unwatched:
        for i in range(10):
            assert live.on_tick(customer_id=customer.pk, now_ms=T0 + i * 100, sending=True)
    assert unwatched == []

    live.mark_watched(customer.pk)
    with django_capture_on_commit_callbacks() as watched:
        for i in range(10, 21):  # one second of ticks every 100 ms
            live.on_tick(customer_id=customer.pk, now_ms=T0 + i * 100, sending=True)
    assert len(watched) == 4


def test_a_customer_that_stops_sending_gets_one_last_message_and_then_nothing(
    customer, django_capture_on_commit_callbacks
):
    live.mark_watched(customer.pk)
    live.on_tick(customer_id=customer.pk, now_ms=T0, sending=True)
    with django_capture_on_commit_callbacks() as callbacks:
        assert live.on_tick(customer_id=customer.pk, now_ms=T0 + 500, sending=False) is None
        assert live.on_tick(customer_id=customer.pk, now_ms=T0 + 1000, sending=False) is None
    assert len(callbacks) == 1
    assert live.last_samples([customer.pk]) == {}


def test_a_snapshot_opens_with_the_minutes_of_a_day_and_the_seconds_kept(customer):
    old = MINUTE - timedelta(hours=25)
    minute_row(customer, old, sent=1)
    for minutes_ago in (2, 1, 0):
        start = MINUTE - timedelta(milliseconds=WINDOW_MS * minutes_ago)
        minute_row(customer, start, granted=600, sent=590 + minutes_ago)
    state = None
    for second in range(3):
        live.on_tick(customer_id=customer.pk, now_ms=T0 + second * 1000, sending=True)
    state = live.snapshot(customer.pk, T0 + 3000)
    assert [row["sent"] for row in state["minutes"]] == [592, 591, 590]
    assert len(state["seconds"]) == 3
    assert state["sample"]["t"] == T0 + 2000


def test_eta_follows_the_plan_before_sending_and_recent_throughput_after():
    plan = planner.eta(remaining=1_200, per_minute=600)
    assert (plan.per_minute, plan.seconds) == (600, 120)
    assert planner.eta(remaining=100, per_minute=600, account_cap=60).seconds == 100
    assert planner.eta(remaining=100, per_minute=600, paused=True).seconds is None
    assert planner.eta(remaining=100, per_minute=600, ahead=500).seconds == 60
    slow = planner.eta(remaining=100, per_minute=600, recent_per_s=2, recent_seconds=60)
    assert slow.seconds == 50 and slow.reason == "recent throughput"
    # Too little measured yet: the plan.
    assert (
        planner.eta(remaining=100, per_minute=600, recent_per_s=2, recent_seconds=5).seconds == 10
    )
    assert planner.humanize(200) == "3 min 20 s" and planner.humanize(7300) == "2 h 1 min"


def test_the_eta_rate_is_steadied():
    rate = planner.steady(10.0, 0.0, dt_s=1)
    assert 9 < rate < 10  # one second without sends barely moves it
    assert planner.steady(None, 4.0, dt_s=1) == 4.0


# --- alerts -------------------------------------------------------------------------------------


def test_an_over_cap_minute_is_logged_once_per_period_with_customer_and_messages(
    customer, caplog, django_capture_on_commit_callbacks
):
    minute_row(customer, PREVIOUS, granted=620, sent=610)
    sample, _ = live.build(customer.pk, T0, None)
    with caplog.at_level("WARNING", logger="sending.alerts"):
        first = alerts.check(sample)
        again = alerts.check(sample)
    assert [a["kind"] for a in first] == ["over_cap"] == [a["kind"] for a in again]
    (record,) = caplog.records  # raised once; shown as long as it lasts
    assert record.levelname == "ERROR"
    assert f"customer {customer.pk}" in record.getMessage()
    assert str(sample["messages"][0]["id"]) in record.getMessage()


def test_alerts_are_mailed_to_admins_and_the_customers_address(
    customer, settings, mailoutbox, django_capture_on_commit_callbacks
):
    settings.ADMINS = [("Ops", "ops@emailops.example")]
    settings.ALERT_MAIL_ADMINS = True
    customer.alert_email = "it@college.example"
    customer.save()
    minute_row(customer, MINUTE, throttled=40)
    sample, _ = live.build(customer.pk, T0, None)
    with django_capture_on_commit_callbacks(execute=True):
        alerts.check(sample, lost=2)
    subjects = sorted((m.subject, tuple(m.to)) for m in mailoutbox)
    assert len(subjects) == 4  # two kinds, each to the admins and to the customer
    assert {to for _, to in subjects} == {("ops@emailops.example",), ("it@college.example",)}
    assert any("throttling" in s for s, _ in subjects)
    assert any("Workers were lost" in s for s, _ in subjects)


# --- publishing through Redis -------------------------------------------------------------------


LAYER_CLIENT = "emailops-live-test"


def _redis_clients(redis_url) -> int:
    """Connections the channel layer of the test below holds open: they carry its client name,
    so the other tests' connections to the same Redis do not count."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for c in client.client_list() if c.get("name") == LAYER_CLIENT)
    finally:
        client.close()


def test_publishing_from_many_threads_reuses_one_pool_and_reaches_the_group(redis_url, settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": redis_url, "socket_timeout": 15, "client_name": LAYER_CLIENT}]
            },
        }
    }
    from channels.layers import channel_layers

    live.close_publisher()  # an earlier test's publisher would keep its own layer
    channel_layers.backends.pop("default", None)
    layer = get_channel_layer()
    group = "live-test-pool"
    received = []

    async def listen(ready: threading.Event, count: int):
        channel = await layer.new_channel()
        await layer.group_add(live.LIVE_GROUP, channel)
        ready.set()
        while len(received) < count:
            batch = await layer.receive(channel)
            assert batch["type"] == "live.batch"
            received.extend(item for to, item in batch["items"] if to == group)
        await layer.group_discard(live.LIVE_GROUP, channel)
        await layer.close_pools()

    before = _redis_clients(redis_url)
    ready = threading.Event()
    listener = threading.Thread(target=async_to_sync(listen), args=(ready, 80), daemon=True)
    listener.start()
    assert ready.wait(10)

    def publish_many(n):
        for i in range(n):
            live.publish([(group, {"type": "live.sample", "n": i})], wait_s=5)

    def four_threads_publish(n):
        publishers = [threading.Thread(target=publish_many, args=(n,)) for _ in range(4)]
        for thread in publishers:
            thread.start()
        for thread in publishers:
            thread.join(30)
        return _redis_clients(redis_url)

    after_40 = four_threads_publish(10)
    after_80 = four_threads_publish(10)
    listener.join(30)
    live.close_publisher()
    closed = _redis_clients(redis_url)

    assert len(received) == 80  # in batches: nothing dropped, nothing twice
    assert sorted(item["n"] for item in received) == sorted(list(range(10)) * 8)
    # One event loop for every publish: a pool as large as the publishes in flight at once
    # (four threads), plus the listener's connection and one more seen now and then in passing
    # (a connection being replaced), that does not grow with the publishes: a pool per publish
    # would add a connection each, forty a round.
    assert after_40 - before <= 6
    assert after_80 - before <= 6
    assert closed <= before
    channel_layers.backends.pop("default", None)
