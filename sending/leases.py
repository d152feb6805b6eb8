"""Leases, a batch's life from grant to settlement: opening, progress marks, the worker's report,
and the reclaim of leases whose worker is overdue.

A lease's terms for the pacing core (`pacing.LeaseTerms`) are computed from its row, so what the
pacing decided at the grant is what it settles by.
"""

from dataclasses import dataclass, replace
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from customers.models import SendLimit

from . import ledger, pacing, prepared, queue, wire
from .clock import Clock, datetime_to_ms, ms_to_datetime
from .models import Lease, Worker


def terms_of(lease: Lease) -> pacing.LeaseTerms:
    """A lease row as the pacing core's terms (times relative to the grant)."""
    granted_ms = datetime_to_ms(lease.granted_at)
    return pacing.LeaseTerms(
        minute_start_ms=datetime_to_ms(lease.minute_start),
        size=lease.size,
        minute_ends_in_ms=lease.minute_ends_in_ms,
        guard_ms=lease.guard_ms,
        stop_starting_in_ms=datetime_to_ms(lease.stop_starting_at) - granted_ms,
        expires_in_ms=datetime_to_ms(lease.expires_at) - granted_ms,
        overdue_in_ms=datetime_to_ms(lease.overdue_at) - granted_ms,
        may_cross=lease.may_cross,
    )


def open_lease(
    *,
    worker: Worker,
    grant: pacing.Grant,
    limits: pacing.Limits,
    clock: Clock,
    recipient_ids,
    held_ms: int = 0,
) -> Lease:
    """Record a grant of these recipients (in the order the worker is to start them): the grant
    as decided, its size what the claim found. `held_ms`: how long the server held the request
    before deciding (`pacing.LeaseTerms.from_grant`)."""
    recipient_ids = list(recipient_ids)
    grant = replace(grant, size=len(recipient_ids))
    terms = pacing.LeaseTerms.from_grant(grant, limits, held_ms=held_ms)
    granted_at = clock.now
    lease = Lease(
        customer_id=worker.customer_id,
        worker=worker,
        minute_start=ms_to_datetime(grant.minute_start_ms),
        size=grant.size,
        recipient_ids=recipient_ids,
        granted_at=granted_at,
        start_at=granted_at + timedelta(milliseconds=grant.start_in_ms),
        stop_starting_at=granted_at + timedelta(milliseconds=grant.stop_starting_in_ms),
        minute_ends_in_ms=terms.minute_ends_in_ms,
        guard_ms=terms.guard_ms,
        may_cross=terms.may_cross,
        overdue_at=granted_at + timedelta(milliseconds=terms.overdue_in_ms),
        expires_at=granted_at + timedelta(milliseconds=terms.expires_in_ms),
    )
    _insert(lease)
    return lease


def _insert(lease: Lease) -> None:
    """INSERT a new lease and set its id: what `save()` writes for it, each value prepared by its
    own field (SQL on the check-in path: docs/benchmarks.md, check-in CPU)."""
    fields = [f for f in Lease._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    params = [f.get_db_prep_save(f.pre_save(lease, True), connection) for f in fields]
    with prepared.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(Lease._meta.db_table)} ({columns})"  # noqa: S608
            f" VALUES ({', '.join(['%s'] * len(fields))}) RETURNING id",
            params,
        )
        lease.pk = cursor.fetchone()[0]
    lease._state.adding = False
    lease._state.db = connection.alias


def open_lease_of(worker: Worker) -> Lease | None:
    """The worker's open lease, if it has one (a worker has at most one)."""
    table = connection.ops.quote_name(Lease._meta.db_table)
    rows = Lease.objects.raw(
        f"SELECT * FROM {table} WHERE worker_id = %s AND state = %s ORDER BY id LIMIT 1",  # noqa: S608
        [worker.pk, Lease.State.OPEN.value],
    )
    return next(iter(rows), None)


def mark_settled(lease: Lease, *, state: str, at, awaiting: list[int]) -> None:
    """Close a lease (`state` settled or expired), with the recipients it was settled without an
    outcome for: what `save(update_fields=["state", "settled_at", "awaiting"])` writes."""
    lease.state, lease.settled_at, lease.awaiting = state, at, awaiting
    fields = [Lease._meta.get_field(name) for name in ("state", "settled_at", "awaiting")]
    params = [f.get_db_prep_save(getattr(lease, f.attname), connection) for f in fields]
    with prepared.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Lease._meta.db_table} SET state = %s, settled_at = %s, awaiting = %s "  # noqa: S608
            "WHERE id = %s",
            [*params, lease.pk],
        )


def recipient_ids_of(lease_id: int) -> list[int]:
    """A lease's recipients, in the order its worker starts them."""
    return Lease.objects.values_list("recipient_ids", flat=True).get(pk=lease_id)


def check_report(lease: Lease | None, report: wire.Report | None) -> None:
    """A report must be for the worker's open lease and name only its recipients, once each."""
    if report is None:
        if lease is not None:
            raise wire.Conflict(f"lease {lease.pk} is open: report it before asking for more")
        return
    if lease is None or report.lease_id != lease.pk:
        raise wire.Conflict(f"lease {report.lease_id} is not this worker's open lease")
    check_members(lease, report)


def check_members(lease: Lease, report: wire.Report) -> None:
    """A report names only its lease's recipients, once each."""
    ids = [r.id for r in report.results]
    if len(ids) != len(set(ids)):
        raise wire.Conflict("a recipient appears more than once in the report")
    members = set(lease.recipient_ids)
    strangers = [r.id for r in report.results if r.id not in members]
    if strangers:
        shown = ", ".join(str(i) for i in strangers[:10])
        raise wire.Conflict(f"recipients not in lease {lease.pk}: {shown}")


def _status_change(result: wire.Result, granted_ms: int) -> queue.StatusChange:
    if result.outcome is wire.Outcome.SENT:
        return queue.StatusChange(
            result.id,
            queue.SENT,
            provider_id=result.provider_id,
            attempted=True,
            sent_at_ms=granted_ms + (result.done_ms or 0),
        )
    if result.outcome is wire.Outcome.UNKNOWN:
        return queue.StatusChange(result.id, queue.UNKNOWN, error=result.error, attempted=True)
    if result.outcome is wire.Outcome.FAILED:
        status = queue.FAILED if result.permanent else queue.RETRY
        return queue.StatusChange(result.id, status, error=result.error, attempted=True)
    return queue.StatusChange(result.id, queue.QUEUED, error=result.error)


def settle_reported(*, lease: Lease, report: wire.Report, clock: Clock) -> pacing.Settlement:
    """Record a lease's results (one statement) and close the lease; return how its budget moves
    between minutes (the caller applies it under the customer's lock).

    Recipients the report leaves out are `unknown` up to the lease's progress mark (they may have
    been started: never re-sent automatically) and queued again past it.
    """
    by_id = {r.id: r for r in report.results}
    granted_ms = datetime_to_ms(lease.granted_at)
    changes = []
    left_out = []
    for position, recipient_id in enumerate(lease.recipient_ids):
        result = by_id.get(recipient_id)
        if result is not None:
            changes.append(_status_change(result, granted_ms))
        elif position < lease.started_through:
            changes.append(queue.StatusChange(recipient_id, queue.UNKNOWN))
            left_out.append(recipient_id)
        else:
            changes.append(queue.StatusChange(recipient_id, queue.QUEUED))
    queue.record(changes, max_attempts=settings.SEND_MAX_ATTEMPTS)

    counts = {o: 0 for o in wire.Outcome}
    for result in report.results:
        counts[result.outcome] += 1
    started = [r for r in report.results if r.outcome in wire.STARTED]
    not_started = counts[wire.Outcome.NOT_STARTED] + sum(
        1
        for position, rid in enumerate(lease.recipient_ids)
        if rid not in by_id and position >= lease.started_through
    )
    settlement = pacing.settle(
        terms=terms_of(lease),
        tally=pacing.Tally(
            sent=counts[wire.Outcome.SENT],
            # A send in doubt counts as started: it stays charged, and with no answer time it is
            # charged to the next minute too.
            failed=counts[wire.Outcome.FAILED] + counts[wire.Outcome.UNKNOWN],
            not_started=not_started,
            throttled=counts[wire.Outcome.THROTTLED],
            done_ms=[r.done_ms for r in started if r.done_ms is not None],
        ),
    )
    mark_settled(lease, state=Lease.State.SETTLED, at=clock.now, awaiting=left_out)
    return settlement


def closed_lease_of(worker: Worker, lease_id: int) -> Lease:
    """A lease of this worker's that is no longer open (settled, or reclaimed as overdue): what a
    late report may be for. Anything else is a conflict."""
    lease = Lease.objects.filter(pk=lease_id, worker_id=worker.pk).first()
    if lease is None:
        raise wire.Conflict(f"lease {lease_id} is not this worker's")
    if lease.state == Lease.State.OPEN:
        raise wire.Conflict(f"lease {lease_id} is open: report it, not as late")
    return lease


@dataclass(frozen=True)
class LateRecord:
    """What a late report changed: the counts for its lease's minute, and the recipients it may
    have queued again (their messages are reopened after the commit, `queue.reopen_messages`)."""

    lease: Lease
    settlement: pacing.Settlement
    maybe_queued: list[int]


def record_late(*, lease: Lease, report: wire.Report) -> LateRecord:
    """Record a report for a lease that was settled without it: the worker's earlier report left
    a send out (still unanswered then), or the lease was reclaimed as overdue before the report
    came. One statement (`queue.record_late`); returns the counts for the lease's minute, which
    the caller applies under the customer's lock (`ledger.apply_settlement`), and the recipients
    it may have queued again.

    Only recipients up to the lease's progress mark are looked at: those past it went back to the
    queue when the lease was settled, and the worker was refused any start past it. Of those,
    only rows still `unknown` change (`unknown` → sent, failed, queued again if the worker says
    it never reached the provider, or still unknown with what the worker now knows of it), so a
    late report never re-queues a recipient that could have gone out, and never touches one that
    is leased again. Only recipients the lease was settled without an outcome for are heard
    (`Lease.awaiting`), each once: a late word never revises what a report already said. What
    changes counts in the lease's own minute, the minute it was charged to: sent and failed to its
    counts, a recipient queued again refunded to it (it was charged and never sent). What was
    charged to the next minute as possibly crossing is given back to it where the report shows it
    did not cross (`_uncrossed`) — an unanswered send too, when its timeout ran out before the
    minute's last safe moment; the rest stays charged (the safe side).
    """
    check_members(lease, report)
    awaiting = (
        lease.recipient_ids[: lease.started_through] if lease.awaiting is None else lease.awaiting
    )
    heard = {r.id: r for r in report.results}
    results = {i: heard[i] for i in awaiting if i in heard}
    if results:
        lease.awaiting = [i for i in awaiting if i not in results]
        lease.save(update_fields=["awaiting"])
    granted_ms = datetime_to_ms(lease.granted_at)
    changes = [_status_change(r, granted_ms) for r in results.values()]
    changed = queue.record_late(
        changes,
        lease_id=lease.pk,
        customer_id=lease.customer_id,
        max_attempts=settings.SEND_MAX_ATTEMPTS,
    )
    counts = {o: 0 for o in wire.Outcome}
    for recipient_id in changed:
        counts[results[recipient_id].outcome] += 1
    requeued = counts[wire.Outcome.NOT_STARTED] + counts[wire.Outcome.THROTTLED]
    settlement = pacing.Settlement(
        refund=requeued,
        crossed=-_uncrossed(lease, [results[i] for i in changed]),
        sent=counts[wire.Outcome.SENT],
        failed=counts[wire.Outcome.FAILED],
        throttled=counts[wire.Outcome.THROTTLED],
    )
    # Recipients that may be queued again (not started, throttled, a temporary failure).
    retry = [
        i for i in changed if results[i].outcome not in (wire.Outcome.SENT, wire.Outcome.UNKNOWN)
    ]
    return LateRecord(lease=lease, settlement=settlement, maybe_queued=retry)


def _uncrossed(lease: Lease, results: list[wire.Result]) -> int:
    """How many of these recipients, charged to the next minute too when their lease was
    settled in doubt, are now known not to have arrived in it: never started, or answered before
    the minute's last safe moment (the same rule as `pacing.settle`, on the worker's `done_ms`;
    for an `unknown`, the latest it can have arrived: its start plus the send timeout).
    A lease that may cross charged every recipient its report left out (or, reclaimed, every
    one in doubt) to the next minute; one that cannot cross charged none (`pacing.settle`)."""
    if not lease.may_cross:
        return 0
    last_safe = lease.minute_ends_in_ms - lease.guard_ms
    return sum(
        1
        for r in results
        if r.outcome in (wire.Outcome.NOT_STARTED, wire.Outcome.THROTTLED)
        or (r.outcome in wire.STARTED and r.done_ms is not None and r.done_ms <= last_safe)
    )


def record_progress(*, claims, request: wire.ProgressRequest) -> None:
    """Record how far into its lease a worker may have started sends (never lowered).

    One conditional UPDATE that only touches an open lease: if the lease was settled meanwhile
    (reclaimed as overdue), nothing is recorded and the worker is told so (409) — it must then
    start nothing more, which is what makes refunding past the mark safe (docs/pacing.md, A6).
    """
    if request.worker_id != claims.worker_id:
        raise wire.Forbidden("this token belongs to another worker")
    # Hand-written: every sending worker calls this about once a second (a lease's customer is
    # its worker's, so the token's customer is checked on the lease's own column).
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    with prepared.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Lease._meta.db_table}"  # noqa: S608 - table name only
            f" SET started_through = {greatest}(started_through, %s)"
            " WHERE id = %s AND worker_id = %s AND customer_id = %s AND state = %s"
            " AND size >= %s",
            [
                request.started_through,
                request.lease_id,
                request.worker_id,
                claims.customer_id,
                Lease.State.OPEN,
                request.started_through,
            ],
        )
        if cursor.rowcount:
            return
    lease = Lease.objects.filter(pk=request.lease_id, worker_id=request.worker_id).first()
    if lease is None:
        raise wire.Conflict(f"lease {request.lease_id} is not this worker's")
    if lease.state != Lease.State.OPEN:
        raise wire.Conflict(f"lease {request.lease_id} is {lease.state}: start nothing more")
    raise wire.Conflict(
        f"started_through {request.started_through} is past the lease's {lease.size}"
    )


def reclaim_overdue(*, clock: Clock | None = None, customer_id: int | None = None) -> int:
    """Settle leases whose worker is overdue (not back by `overdue_at`, or `expires_at` if that
    comes first): the worker is presumed lost. Recipients past its started mark go back to the
    queue and their budget to the lease's minute (usable by other workers while that minute
    lasts); those up to the mark become unknown, stay charged, and if they may cross are charged
    to the next minute too. If the worker is in fact alive, its progress and its report are
    refused (409) and it is told to stop, so it starts nothing past the mark.

    Each lease is settled in a transaction of its own that takes the same locks, in the same
    order, as a check-in (worker, then the customer's SendLimit), so a late check-in and a reclaim
    never both settle a lease, and the minute's budget is never read half-updated.
    Returns the number of leases reclaimed.
    """
    clock = clock or Clock.read()
    due = Lease.objects.filter(
        Q(overdue_at__lte=clock.now) | Q(expires_at__lte=clock.now), state=Lease.State.OPEN
    )
    if customer_id is not None:
        due = due.filter(customer_id=customer_id)
    reclaimed = 0
    for lease_id, worker_id, lease_customer in due.order_by("id").values_list(
        "id", "worker_id", "customer_id"
    )[:500]:
        with transaction.atomic():
            Worker.objects.select_for_update().filter(pk=worker_id).first()
            SendLimit.objects.select_for_update().filter(customer_id=lease_customer).first()
            lease = (
                Lease.objects.select_for_update()
                .filter(pk=lease_id, state=Lease.State.OPEN)
                .first()
            )
            if lease is None:
                continue  # its worker reported while we waited for the lock
            in_doubt = lease.recipient_ids[: lease.started_through]
            not_started = lease.recipient_ids[lease.started_through :]
            queue.release(in_doubt, status=queue.UNKNOWN)
            queue.release(not_started, status=queue.QUEUED)
            ledger.apply_settlement(
                lease,
                pacing.settle_abandoned(
                    terms=terms_of(lease), started_through=lease.started_through
                ),
            )
            mark_settled(lease, state=Lease.State.EXPIRED, at=clock.now, awaiting=in_doubt)
            Worker.objects.filter(pk=worker_id, state__in=Worker.LIVE_STATES).update(
                state=Worker.State.LOST, stopped_at=clock.now, stop_reason="lease overdue"
            )
            reclaimed += 1
    return reclaimed
