"""A customer's minutes: its limits and budget lock, what a decision reads, charges, settlements.

One CustomerMinute row per customer and calendar minute holds what was granted, refunded and
carried in from the minute before. Every change to the rows of a customer is made under its
SendLimit row lock (`lock_limits`), which serializes the customer's budget accounting.
The statements a check-in makes are SQL, each checked against the ORM's result in
tests/sending/test_statements.py; the rest is ORM.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.db.models import F

from customers.models import SendLimit

from . import pacing, prepared
from .clock import datetime_to_ms, db_datetime
from .models import CustomerMinute, Lease, Worker


def limits_for(send_limit: SendLimit) -> pacing.Limits:
    return pacing.Limits(
        per_minute=send_limit.per_minute,
        batch_size=send_limit.batch_size,
        max_workers=send_limit.max_workers,
        concurrency=send_limit.concurrency,
        guard_ms=send_limit.guard_ms,
        window_ms=settings.SEND_WINDOW_MS,
        paused=send_limit.paused,
        spill_hold_ms=settings.SEND_TIMEOUT_MS,
    )


_LIMIT_COLUMNS = ("per_minute", "batch_size", "max_workers", "concurrency", "guard_ms", "paused")


def read_limits(customer_id: int) -> pacing.Limits:
    """The customer's limits, read without a lock."""
    return _limits(customer_id, lock=False)


def lock_limits(customer_id: int) -> pacing.Limits:
    """The customer's limits, under its SendLimit row lock (held until the transaction ends)."""
    return _limits(customer_id, lock=True)


def _limits(customer_id: int, *, lock: bool) -> pacing.Limits:
    # SQL rather than the ORM on the check-in path: see docs/benchmarks.md (check-in CPU).
    lock_clause = " FOR UPDATE" if lock and connection.features.has_select_for_update else ""
    sql = (
        f"SELECT {', '.join(_LIMIT_COLUMNS)} FROM {SendLimit._meta.db_table}"  # noqa: S608
        f" WHERE customer_id = %s{lock_clause}"
    )
    with prepared.cursor() as cursor:
        cursor.execute(sql, [customer_id])
        row = cursor.fetchone()
    if row is None:
        raise SendLimit.DoesNotExist(f"customer {customer_id} has no SendLimit")
    return limits_for(SendLimit(**dict(zip(_LIMIT_COLUMNS, row, strict=True))))


def minute(customer_id: int, minute_start: datetime) -> CustomerMinute | None:
    return CustomerMinute.objects.filter(customer_id=customer_id, minute_start=minute_start).first()


def _minute_row(customer_id: int, minute_start: datetime, cap: int) -> CustomerMinute:
    row, _ = CustomerMinute.objects.get_or_create(
        customer_id=customer_id, minute_start=minute_start, defaults={"cap": cap}
    )
    return row


@dataclass(frozen=True)
class Pool:
    """What a decision reads besides the limits and the backlog."""

    minute_id: int | None  # the current minute's CustomerMinute row (None: not made yet)
    ledger: pacing.MinuteLedger  # its counts (all zero while the row is not made yet)
    open_spill: int  # pacing.open_spill() over the previous minute's open leases
    running: int  # live workers, the asking one included
    rate_per_s: float | None  # their mean measured rate
    refunds_due_ms: int | None  # when the first open lease of the minute falls due (reclaim)


def read_pool(*, customer_id: int, minute_start: datetime, window_ms: int) -> Pool:
    """The current minute's ledger and the earliest time one of its open leases falls due, the
    customer's live workers, and the previous minute's open spill, in one query."""
    previous_minute = minute_start - timedelta(milliseconds=window_ms)
    live = [state.value for state in Worker.LIVE_STATES]
    # The open state is a literal, so that a prepared statement's generic plan can use the
    # partial index of open leases (sending/prepared.py).
    open_state = Lease.State.OPEN.value
    sql = f"""
        SELECT m.id, m.granted, m.refunded, m.carried_in, m.throttled,
               p.open_spill, p.running, p.rate, p.refunds_due
        FROM (
            SELECT (SELECT COALESCE(SUM(l.size), 0) FROM {Lease._meta.db_table} l
                    WHERE l.customer_id = %s AND l.state = '{open_state}' AND l.minute_start = %s
                      AND l.may_cross = %s) AS open_spill,
                   (SELECT MIN(CASE WHEN l.overdue_at < l.expires_at
                                    THEN l.overdue_at ELSE l.expires_at END)
                    FROM {Lease._meta.db_table} l
                    WHERE l.customer_id = %s AND l.state = '{open_state}' AND l.minute_start = %s
                   ) AS refunds_due,
                   COUNT(*) AS running, AVG(w.rate_per_s) AS rate
            FROM {Worker._meta.db_table} w
            WHERE w.customer_id = %s AND w.state IN ({", ".join(["%s"] * len(live))})
        ) p
        LEFT JOIN {CustomerMinute._meta.db_table} m
            ON m.customer_id = %s AND m.minute_start = %s
    """  # noqa: S608 - table names, a constant and placeholders only
    params = [
        customer_id,
        connection.ops.adapt_datetimefield_value(previous_minute),
        True,
        customer_id,
        connection.ops.adapt_datetimefield_value(minute_start),
        customer_id,
        *live,
        customer_id,
        connection.ops.adapt_datetimefield_value(minute_start),
    ]
    with prepared.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    minute_id, granted, refunded, carried_in, throttled, open_spill, running, rate, due = row
    return Pool(
        minute_id=minute_id,
        ledger=pacing.MinuteLedger(
            minute_start_ms=datetime_to_ms(minute_start),
            granted=granted or 0,
            refunded=refunded or 0,
            carried_in=carried_in or 0,
            throttled=throttled or 0,
        ),
        open_spill=int(open_spill),
        running=running,
        rate_per_s=rate,
        refunds_due_ms=None if due is None else datetime_to_ms(db_datetime(due)),
    )


def with_minute_row(pool: Pool, *, customer_id: int, minute_start: datetime, cap: int) -> Pool:
    """`pool` with its minute's row made, if the minute's first check-in finds none yet."""
    if pool.minute_id is not None:
        return pool
    row = _minute_row(customer_id, minute_start, cap)
    ledger = pacing.MinuteLedger(
        minute_start_ms=pool.ledger.minute_start_ms,
        granted=row.granted,
        refunded=row.refunded,
        carried_in=row.carried_in,
        throttled=row.throttled,
    )
    return Pool(
        minute_id=row.pk,
        ledger=ledger,
        open_spill=pool.open_spill,
        running=pool.running,
        rate_per_s=pool.rate_per_s,
        refunds_due_ms=pool.refunds_due_ms,
    )


def charge(*, minute_id: int, size: int, cap: int) -> None:
    """Charge a grant to its minute, and note the cap it was granted under."""
    with prepared.cursor() as cursor:
        cursor.execute(
            f"UPDATE {CustomerMinute._meta.db_table} SET granted = granted + %s, cap = %s"  # noqa: S608
            " WHERE id = %s",
            [size, cap, minute_id],
        )


def apply_settlement(lease: Lease, settlement: pacing.Settlement) -> None:
    """Move a settled lease's budget: refunds and counts to its own minute, what may have crossed
    to the next one (as `carried_in`)."""
    with prepared.cursor() as cursor:
        cursor.execute(
            f"""UPDATE {CustomerMinute._meta.db_table}
                SET refunded = refunded + %s, sent = sent + %s, failed = failed + %s,
                    throttled = throttled + %s
                WHERE customer_id = %s AND minute_start = %s""",  # noqa: S608 - table name only
            [
                settlement.refund,
                settlement.sent,
                settlement.failed,
                settlement.throttled,
                lease.customer_id,
                connection.ops.adapt_datetimefield_value(lease.minute_start),
            ],
        )
    if settlement.crossed:
        following = lease.minute_start + timedelta(milliseconds=settings.SEND_WINDOW_MS)
        row = _minute_row(lease.customer_id, following, cap=0)
        CustomerMinute.objects.filter(pk=row.pk).update(
            carried_in=F("carried_in") + settlement.crossed
        )
