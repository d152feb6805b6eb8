"""The conductor fleet in shards: what a round reads, whom it conducts, and two real Celery worker
processes sharing the shards without two conductors ever running one customer."""

import itertools
import re
import signal
from collections import Counter

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sending import checkin, services, shards
from sending.clock import Clock
from sending.models import ConductorLease, Message, Recipient
from sending.sandbox import SandboxServer
from tests.factories import T0, make_customer, make_message, sandbox_customer
from tests.sending.test_conductor import RecordingRuntime
from tests.sending.test_faults import (  # noqa: F401 - the fixtures celery_workers needs
    celery_workers,
    completed,
    fault_minutes,
    provider_clock,
    provider_speed,
    set_limits,
    wait_until,
)


def _customers(n, *, prefix="shard-u"):
    return [make_customer(f"{prefix}-{i}", per_minute=600, max_workers=1) for i in range(n)]


def _round(shard, holder, at=T0):
    return shards.conduct_round(
        shard=shard, holder=holder, clock=Clock(at), runtime=RecordingRuntime()
    )


def test_a_round_conducts_its_shards_sending_customers_and_no_one_else(db, settings):
    settings.CONDUCTOR_SHARDS = 2
    customers = _customers(6)
    sending = customers[:4]
    for customer in sending:
        make_message(customer, 5)
    mine = sorted(c.pk for c in sending if c.pk % 2 == 0)
    other_shard = [c.pk for c in sending if c.pk % 2 == 1]

    first = _round(0, "a")
    assert first.held == mine and sorted(first.sending) == mine
    # Idle customers and the other shard's: not even a lease row.
    assert sorted(ConductorLease.objects.values_list("customer_id", flat=True)) == mine
    assert all(first.reports[c].started for c in mine)  # one worker each

    # A second chain for the same shard conducts nobody while the first holds its customers…
    assert _round(0, "b", at=T0 + 500).held == []
    # …and takes them over once they are no longer renewed (the lease expired).
    taken = _round(0, "b", at=T0 + 500 + int(settings.CONDUCTOR_LEASE_S * 1000) + 1)
    assert taken.held == mine
    assert set(
        ConductorLease.objects.filter(customer_id__in=mine).values_list("holder", flat=True)
    ) == {"b"}

    # A customer whose send ends gets one more tick and is let go.
    done = mine[0]
    Message.objects.filter(customer_id=done).update(status=Message.Status.CANCELLED)
    Recipient.objects.filter(message__customer_id=done).update(status=Recipient.Status.CANCELLED)
    last = _round(0, "b", at=T0 + 7000)
    assert done in last.held and done not in last.sending
    assert ConductorLease.objects.get(customer_id=done).holder == ""
    assert done not in _round(0, "b", at=T0 + 7500).held
    assert other_shard and not ConductorLease.objects.filter(customer_id__in=other_shard).exists()


def test_a_rounds_statements_grow_with_sending_customers_only(db, settings):
    """A few statements for the round, then the live sample's two per sending customer (its
    workers already running: nothing to start); idle customers and backlog size add nothing."""
    settings.CONDUCTOR_SHARDS = 1

    def statements(at):
        with CaptureQueriesContext(connection) as queries:
            _round(0, "a", at=at)
        return len(queries)

    def sending_customer(slug, recipients):
        (customer,) = _customers(1, prefix=slug)
        make_message(customer, recipients)
        checkin.worker_start(customer_id=customer.pk)  # live: no worker to start
        return customer

    sending_customer("one", 10)
    _round(0, "a")  # lease rows made
    one = statements(T0 + 500)
    for i in range(9):
        sending_customer(f"more-{i}", 10)
    _round(0, "a", at=T0 + 1000)
    ten = statements(T0 + 1500)
    _customers(50, prefix="idle")
    with_idle = statements(T0 + 2000)
    big = sending_customer("big", 20_000)
    _round(0, "a", at=T0 + 2500)
    with_backlog = statements(T0 + 3000)
    per_customer = (ten - one) / 9
    assert per_customer <= 3, (one, ten)
    assert with_idle == ten
    assert with_backlog - ten == pytest.approx(per_customer), big


# --- real Celery worker processes on Redis ------------------------------------------------------

OWNERSHIP_SQL = """
CREATE TABLE IF NOT EXISTS test_conductor_holders (
    customer_id bigint, holder text, expires_at timestamptz, at timestamptz);
CREATE OR REPLACE FUNCTION test_conductor_holder() RETURNS trigger AS $$
BEGIN
    INSERT INTO test_conductor_holders
        VALUES (NEW.customer_id, NEW.holder, NEW.expires_at, clock_timestamp());
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS test_conductor_holder ON sending_conductorlease;
CREATE TRIGGER test_conductor_holder AFTER INSERT OR UPDATE ON sending_conductorlease
    FOR EACH ROW EXECUTE FUNCTION test_conductor_holder();
"""
OWNERSHIP_DROP = """
DROP TRIGGER IF EXISTS test_conductor_holder ON sending_conductorlease;
DROP FUNCTION IF EXISTS test_conductor_holder();
DROP TABLE IF EXISTS test_conductor_holders;
"""


def _takeovers_before_expiry() -> list[tuple]:
    """Every change of a customer's holder to another chain before the previous holder's lease
    had expired (it had not let it go): two conductors for one customer at once."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT customer_id, holder, expires_at, at FROM test_conductor_holders"
            " ORDER BY customer_id, at"
        )
        rows = cursor.fetchall()
    bad = []
    for (c1, h1, e1, _), (c2, h2, _, at2) in itertools.pairwise(rows):
        if c1 == c2 and h1 and h2 and h1 != h2 and (e1 is None or at2 < e1):
            bad.append((c1, h1, h2, e1, at2))
    return bad


def _rounds_run(log: str) -> int:
    return len(re.findall(r"sending\.tasks\.conduct_shard\[[^\]]+\] succeeded", log))


def test_two_celery_processes_share_the_shards_and_never_conduct_one_customer_twice(
    celery_workers,  # noqa: F811 - the fixture, imported
    settings,
    tmp_path,
):
    cap, n = 60, 6
    keys = [f"shard-key-{i}" for i in range(n)]
    sandbox = SandboxServer(
        caps=dict.fromkeys(keys, cap),
        clock=provider_clock(settings.SEND_WINDOW_MS),
        speed=provider_speed(settings.SEND_WINDOW_MS),
    ).start()
    with connection.cursor() as cursor:
        cursor.execute(OWNERSHIP_SQL)
    try:
        messages = []
        for key in keys:
            customer = sandbox_customer(
                sandbox, per_minute=cap, batch_size=10, concurrency=2, api_key=key
            )
            set_limits(customer, max_workers=1)
            message = make_message(customer, 90)
            Message.objects.filter(pk=message.pk).update(status=Message.Status.DRAFT)
            messages.append(message)
        celery_workers.env.update(
            CONDUCTOR_SHARDS="3", LOG_LEVEL="INFO", CELERY_TASK_LOG_LEVEL="INFO"
        )
        a = celery_workers.start("conductor-a")
        celery_workers.start("conductor-b", beat=True)
        for message in messages:
            services.message_start(message_id=message.pk)

        def both_ran_rounds():
            logs = {p.name: p.read_text() for p in tmp_path.glob("conductor-*.log")}
            return all(_rounds_run(logs.get(f"conductor-{x}.log", "")) >= 3 for x in "ab")

        try:
            wait_until(both_ran_rounds, timeout_s=120, every_s=0.2, what="rounds in both")
        except AssertionError:
            print(celery_workers.output())
            raise
        sent_before = len(sandbox.sends)
        celery_workers.kill(a, signal.SIGKILL)  # its chains, ticks and worker threads die
        try:
            for message in messages:
                wait_until(completed(message), timeout_s=240, every_s=0.2, what="completion")
        except AssertionError:
            print(celery_workers.output())
            raise
        assert len(sandbox.sends) > sent_before
        assert _takeovers_before_expiry() == []

        report = sandbox.report()
        assert report["duplicates"] == {} and report["over_cap_minutes"] == {}
        arrived = Counter(s.idempotency_key for s in sandbox.sends)
        assert max(arrived.values()) == 1
        statuses = Counter(
            Recipient.objects.filter(message__in=messages).values_list("status", flat=True)
        )
        # Sent, or unknown where the killed process's workers were mid-batch; never lost.
        assert set(statuses) <= {Recipient.Status.SENT, Recipient.Status.UNKNOWN}, statuses
        sent = set(
            Recipient.objects.filter(
                message__in=messages, status=Recipient.Status.SENT
            ).values_list("pk", flat=True)
        )
        assert {str(pk) for pk in sent} <= set(arrived)
    finally:
        sandbox.stop()
        with connection.cursor() as cursor:
            cursor.execute(OWNERSHIP_DROP)
