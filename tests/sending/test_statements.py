"""The check-in path's hand-written statements give what the ORM gives for the same rows.

Each SQL statement of ledger, queue, workers and leases runs beside its ORM equivalent (on twin
rows, or reading the same rows), and every concrete field is compared: a field the SQL would miss
(a new `auto_now` field, a converter) makes these fail.
"""

import json
from datetime import timedelta

import pytest
from django.db.models import Avg, Count, F

from customers.models import Customer, SendLimit
from sending import leases, ledger, pacing, queue, workers
from sending.clock import Clock, ms_to_datetime
from sending.models import CustomerMinute, Lease, Message, Recipient, Worker
from tests.factories import T0, WINDOW_MS, make_customer, make_message

MINUTE = ms_to_datetime(T0 - T0 % WINDOW_MS)


def values(instance, *, without=("id",)) -> dict:
    """Every concrete field of the row as stored, read back through the ORM."""
    row = type(instance).objects.get(pk=instance.pk)
    return {
        f.attname: getattr(row, f.attname)
        for f in row._meta.concrete_fields
        if f.attname not in without
    }


@pytest.fixture
def customer(db):
    return make_customer("sql-u")


@pytest.fixture
def twin(db):
    return make_customer("sql-twin")


def test_limits_are_the_send_limits_row(customer):
    SendLimit.objects.filter(customer=customer).update(guard_ms=300, paused=True, concurrency=7)
    expected = ledger.limits_for(SendLimit.objects.get(customer=customer))
    assert ledger.read_limits(customer.pk) == expected
    assert ledger.lock_limits(customer.pk) == expected
    with pytest.raises(SendLimit.DoesNotExist):
        ledger.read_limits(customer.pk + 1_000)


def test_charge_writes_what_the_orm_update_writes(customer, twin):
    rows = [
        CustomerMinute.objects.create(customer=c, minute_start=MINUTE, cap=10, granted=5)
        for c in (customer, twin)
    ]
    ledger.charge(minute_id=rows[0].pk, size=40, cap=600)
    CustomerMinute.objects.filter(pk=rows[1].pk).update(granted=F("granted") + 40, cap=600)
    assert values(rows[0], without=("id", "customer_id")) == values(
        rows[1], without=("id", "customer_id")
    )
    assert CustomerMinute.objects.get(pk=rows[0].pk).granted == 45


@pytest.mark.parametrize("crossed", [0, 3])
def test_a_settlement_moves_what_the_orm_update_moves(customer, twin, crossed):
    for c in (customer, twin):
        CustomerMinute.objects.create(customer=c, minute_start=MINUTE, cap=10, granted=50)
    settlement = pacing.Settlement(refund=7, crossed=crossed, sent=40, failed=2, throttled=1)
    ledger.apply_settlement(Lease(customer_id=customer.pk, minute_start=MINUTE), settlement)
    CustomerMinute.objects.filter(customer=twin, minute_start=MINUTE).update(
        refunded=F("refunded") + 7, sent=F("sent") + 40, failed=F("failed") + 2,
        throttled=F("throttled") + 1,
    )  # fmt: skip
    if crossed:
        CustomerMinute.objects.create(
            customer=twin, minute_start=MINUTE + timedelta(milliseconds=WINDOW_MS), cap=0,
            carried_in=crossed,
        )  # fmt: skip

    def minutes(c):
        return [
            values(m, without=("id", "customer_id"))
            for m in CustomerMinute.objects.filter(customer=c).order_by("minute_start")
        ]

    assert minutes(customer) == minutes(twin)


def _lease(customer, worker, *, minute_start, state=Lease.State.OPEN, size=10, may_cross=True,
           overdue_in_s=3, expires_in_s=5):  # fmt: skip
    granted = minute_start + timedelta(seconds=2)
    return Lease.objects.create(
        customer=customer, worker=worker, state=state, minute_start=minute_start, size=size,
        recipient_ids=list(range(size)), granted_at=granted, start_at=granted,
        stop_starting_at=granted + timedelta(seconds=1), minute_ends_in_ms=58_000, guard_ms=250,
        may_cross=may_cross, overdue_at=granted + timedelta(seconds=overdue_in_s),
        expires_at=granted + timedelta(seconds=expires_in_s),
    )  # fmt: skip


def test_the_pool_is_what_the_orm_reads_of_the_same_rows(customer, settings):
    previous = MINUTE - timedelta(milliseconds=settings.SEND_WINDOW_MS)
    live = [Worker.objects.create(customer=customer, rate_per_s=r) for r in (10.0, 30.0)]
    Worker.objects.create(customer=customer, state=Worker.State.STOPPED, rate_per_s=99.0)
    _lease(customer, live[0], minute_start=previous, size=20)
    _lease(customer, live[0], minute_start=previous, size=5, may_cross=False)
    _lease(customer, live[1], minute_start=previous, size=7, state=Lease.State.SETTLED)
    _lease(customer, live[1], minute_start=MINUTE, overdue_in_s=4, expires_in_s=2)
    _lease(customer, live[0], minute_start=MINUTE, overdue_in_s=6, expires_in_s=9)
    window_ms = settings.SEND_WINDOW_MS
    before = ledger.read_pool(customer_id=customer.pk, minute_start=MINUTE, window_ms=window_ms)
    CustomerMinute.objects.create(
        customer=customer, minute_start=MINUTE, cap=9, granted=30, refunded=4, carried_in=2,
        throttled=1,
    )  # fmt: skip
    pool = ledger.read_pool(customer_id=customer.pk, minute_start=MINUTE, window_ms=window_ms)

    row = CustomerMinute.objects.get(customer=customer, minute_start=MINUTE)
    open_now = Lease.objects.filter(customer=customer, state="open", minute_start=MINUTE)
    due = min(min(lease.overdue_at, lease.expires_at) for lease in open_now)
    workers_live = Worker.objects.filter(customer=customer, state__in=Worker.LIVE_STATES)
    stats = workers_live.aggregate(n=Count("id"), rate=Avg("rate_per_s"))
    spill = Lease.objects.filter(
        customer=customer, state="open", minute_start=previous, may_cross=True
    )
    expected = ledger.Pool(
        minute_id=row.pk,
        ledger=pacing.MinuteLedger(
            minute_start_ms=round(MINUTE.timestamp() * 1000),
            granted=30,
            refunded=4,
            carried_in=2,
            throttled=1,
        ),
        open_spill=sum(lease.size for lease in spill),
        running=stats["n"],
        rate_per_s=stats["rate"],
        refunds_due_ms=round(due.timestamp() * 1000),
    )
    assert pool == expected
    assert (before.minute_id, before.ledger.granted, before.open_spill) == (None, 0, 20)


def test_the_backlog_count_is_the_orms_count(customer):
    first = make_message(customer, 30, started_minutes_ago=2)
    second = make_message(customer, 30, started_minutes_ago=1)
    taken = list(first.recipients.order_by("id").values_list("id", flat=True)[:10])
    Recipient.objects.filter(id__in=taken[:4]).update(status=Recipient.Status.SENT)
    Message.objects.filter(pk=first.pk).update(claim_after=taken[-1])
    limits = ledger.read_limits(customer.pk)  # batch 50, 5 workers: exact up to 300

    queued = Recipient.objects.filter(message__customer=customer, status=Recipient.Status.QUEUED)
    assert queue.count_backlog(customer_id=customer.pk, limits=limits) == queued.count() == 56
    # From a check-in's own cursors: only what lies past them, until that is within range.
    small = pacing.Limits(per_minute=600, batch_size=5, max_workers=1, concurrency=1)
    counted = queue.count_backlog(
        customer_id=customer.pk, limits=small, cursors={second.pk: 10_000_000}
    )
    assert counted == max(queued.filter(message=first, id__gt=taken[-1]).count(), 601)


def test_moving_a_cursor_writes_what_the_orm_update_writes(customer):
    first, second = make_message(customer, 3), make_message(customer, 3)
    ahead = queue.Ahead(messages=list(Message.objects.filter(pk=first.pk)))
    ahead.positions[first.pk] = 42
    queue.move_cursors(ahead)
    Message.objects.filter(pk=second.pk, claim_after=0).update(claim_after=42)
    without = ("id", "created_at", "updated_at", "started_at")
    assert values(first, without=without) == values(second, without=without)
    # Only if nobody moved it since it was read.
    ahead.positions[first.pk] = 7
    queue.move_cursors(ahead)
    assert Message.objects.get(pk=first.pk).claim_after == 42


def test_claimed_rows_are_the_rows_the_orm_reads(customer):
    message = make_message(customer, 5)
    result = queue.claim(customer_id=customer.pk, message_id=message.pk, after_id=0, limit=5)
    rows = {r.pk: r for r in Recipient.objects.filter(message=message)}
    assert [c.id for c in result.leased] == sorted(rows)
    for claimed in result.leased:
        row = rows[claimed.id]
        assert (claimed.message_id, claimed.email, row.status) == (message.pk, row.email, "leased")
        assert json.loads(claimed.merge_json) == row.merge_data


def test_a_locked_worker_is_the_orms_worker(customer):
    worker = Worker.objects.create(customer=customer, last_response={"a": [1, "b"]})
    Worker.objects.filter(pk=worker.pk).update(
        last_checkin_at=MINUTE, throttled_minute=MINUTE, rate_per_s=12.5, request_id="r"
    )
    locked = workers.lock(worker.pk)
    assert {f.attname: getattr(locked, f.attname) for f in Worker._meta.concrete_fields} == {
        "id": worker.pk,
        **values(worker),
    }
    assert workers.lock(worker.pk + 1_000) is None


def test_a_checkin_writes_its_worker_as_save_does(customer):
    ours, theirs = (Worker.objects.create(customer=customer) for _ in range(2))
    Worker.objects.filter(pk__in=[ours.pk, theirs.pk]).update(started_at=MINUTE)
    for worker in (ours, theirs):
        worker.refresh_from_db()
        worker.state = Worker.State.STOPPED
        worker.stop_reason = "done"
        worker.stopped_at = worker.last_checkin_at = MINUTE + timedelta(seconds=3)
        worker.request_id, worker.last_seq = "inv-1", 4
        worker.last_response = {"decision": "stop", "reason": "done", "batch": None}
        worker.rate_per_s, worker.throttled_minute = 17.25, MINUTE
    workers.save_checkin(ours)
    theirs.save()  # every field, auto_now ones included
    assert values(ours) == values(theirs)


def test_an_opened_lease_is_the_row_create_makes(customer):
    worker = Worker.objects.create(customer=customer)
    limits = ledger.read_limits(customer.pk)
    grant = pacing.Grant(
        size=50, start_in_ms=0, stop_starting_in_ms=20_000, minute_ends_in_ms=58_500,
        minute_start_ms=round(MINUTE.timestamp() * 1000),
    )  # fmt: skip
    clock = Clock(grant.minute_start_ms + 1_500)
    lease = leases.open_lease(
        worker=worker, grant=grant, limits=limits, clock=clock, recipient_ids=[5, 3, 9]
    )
    twin = Lease.objects.create(**{k: v for k, v in values(lease).items()})
    assert values(lease) == values(twin)
    assert (lease.size, lease.recipient_ids) == (3, [5, 3, 9])
    assert leases.terms_of(lease) == pacing.LeaseTerms.from_grant(
        pacing.Grant(3, 0, 20_000, 58_500, grant.minute_start_ms), limits
    )
    assert leases.open_lease_of(worker).pk == lease.pk
    assert values(leases.open_lease_of(worker)) == values(lease)


def test_settling_a_lease_writes_what_save_writes(customer):
    worker = Worker.objects.create(customer=customer)
    ours, theirs = (_lease(customer, worker, minute_start=MINUTE) for _ in range(2))
    at = MINUTE + timedelta(seconds=9)
    leases.mark_settled(ours, state=Lease.State.SETTLED, at=at, awaiting=[7, 9])
    theirs.state, theirs.settled_at, theirs.awaiting = Lease.State.SETTLED, at, [7, 9]
    theirs.save()
    assert values(ours) == values(theirs)
    assert leases.open_lease_of(worker) is None


def test_cancelling_queued_recipients_touches_queued_ones_only(customer):
    message = make_message(customer, 4)
    first = message.recipients.order_by("id").first()
    Recipient.objects.filter(pk=first.pk).update(status=Recipient.Status.LEASED)
    assert queue.cancel_queued(message_ids=[message.pk]) == 3
    counts = dict(
        Recipient.objects.filter(message=message)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    assert counts == {"leased": 1, "cancelled": 3}
    assert Customer.objects.filter(pk=customer.pk).exists()
