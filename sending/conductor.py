"""The conductor: per customer, keep the right number of workers running and tidy up after them.

Customers are ticked together, a shard's round at a time (sending/shards.py runs the rounds as
Celery chains and holds each customer's ConductorLease: one conductor per customer at a time).
A tick reads every customer's State in one statement — an overdue batch, a silent worker, a
finished message, leftovers of a cancel, sending, batches out, room for a worker — and then runs,
for the customers whose state asks for it:
1. reclaim overdue leases (recipients past the started mark back to the queue, the rest
   unknown) and mark workers that stopped checking in as lost;
2. complete messages with nothing queued or leased; cancel what workers handed back for
   cancelled messages;
3. start workers while work fits this minute and fewer than needed run (pacing.workers_needed,
   never more than max_workers), invoking them after commit;
and, for every customer, 4. record its live sample and publish it, after commit, if someone
watches (sending.live). `tick(customer_id)` is the tick of one; tests call the steps one at a
time.
"""

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Avg, Count, Exists, OuterRef, Q

from customers.models import Customer, SendLimit

from . import checkin, leases, ledger, pacing, queue
from .clock import Clock, ms_to_datetime
from .live import Tick
from .live import on_ticks as record_live_samples
from .models import ConductorLease, Lease, Message, Recipient, Worker
from .runtimes import get_runtime, worker_api_url

log = logging.getLogger(__name__)


# A live worker that has been silent for a window, the send timeout and this is lost.
SILENT_MARGIN = timedelta(seconds=10)


def lease_seconds() -> float:
    return float(settings.CONDUCTOR_LEASE_S)


def tick_seconds() -> float:
    return settings.CONDUCTOR_TICK_MS / 1000


def acquire_lease(*, customer_id: int, holder: str, clock: Clock | None = None) -> bool:
    """Take or renew the customer's conductor lease for `holder`; False if another chain has it."""
    now = (clock or Clock.read()).now
    ConductorLease.objects.get_or_create(customer_id=customer_id)
    taken = (
        ConductorLease.objects.filter(customer_id=customer_id)
        .filter(
            Q(holder=holder) | Q(holder="") | Q(expires_at__isnull=True) | Q(expires_at__lt=now)
        )
        .update(
            holder=holder,
            expires_at=now + timedelta(seconds=lease_seconds()),
            heartbeat_at=now,
        )
    )
    return taken == 1


def release_lease(*, customer_id: int, holder: str) -> None:
    """Give the customer's conductor lease up, if `holder` still has it."""
    ConductorLease.objects.filter(customer_id=customer_id, holder=holder).update(
        holder="", expires_at=None
    )


def customers_needing_a_conductor(*, clock: Clock | None = None) -> list[int]:
    """Customers with a message sending and no live conductor."""
    now = (clock or Clock.read()).now
    live = ConductorLease.objects.filter(
        customer_id=OuterRef("customer_id"), expires_at__gte=now
    ).exclude(holder="")
    return list(
        Message.objects.filter(status=Message.Status.SENDING)
        .exclude(Exists(live))
        .values_list("customer_id", flat=True)
        .distinct()
    )


@dataclass
class TickReport:
    customer_id: int
    reclaimed: int = 0
    lost: int = 0
    completed: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    sending: bool = False
    sample: dict | None = None


def tick(*, customer_id: int, clock: Clock | None = None, runtime=None) -> TickReport:
    """One customer's tick (its lease held by the caller): tick_many for one."""
    return tick_many(customer_ids=[customer_id], clock=clock, runtime=runtime)[customer_id]


def tick_many(
    *, customer_ids: list[int], clock: Clock | None = None, runtime=None
) -> dict[int, TickReport]:
    """Tick these customers (their leases held by the caller) with set-based reads: a handful
    of statements for all of them, then per customer only whatever its rows say can change —
    reclaiming an overdue batch, starting a worker — and the live samples of all of them in two
    statements more (`live.on_ticks`).

    One customer's failure is logged and leaves the others' ticks alone.
    """
    clock = clock or Clock.read()
    reports = {c: TickReport(customer_id=c) for c in customer_ids}
    if not customer_ids:
        return reports
    states = read_states(customer_ids=customer_ids, clock=clock)
    for customer_id in [c for c, state in states.items() if state.due]:
        with _isolated(customer_id):
            reports[customer_id].reclaimed = leases.reclaim_overdue(
                clock=clock, customer_id=customer_id
            )
    silent = [c for c, state in states.items() if state.silent]
    for customer_id, n in mark_lost_workers(customer_ids=silent, clock=clock).items():
        reports[customer_id].lost = n
    finished = [c for c, state in states.items() if state.finished]
    for customer_id, message_id in complete_finished_messages(customer_ids=finished, clock=clock):
        reports[customer_id].completed.append(message_id)
    cancel_leftovers(customer_ids=[c for c, state in states.items() if state.leftovers])
    changed = [c for c, state in states.items() if state.due or state.finished]
    if changed:  # a reclaim or a completion: read those customers' state again
        states.update(read_states(customer_ids=changed, clock=clock))
    for customer_id in [c for c, state in states.items() if state.may_start and state.sending]:
        with _isolated(customer_id):
            reports[customer_id].started = start_workers(
                customer_id=customer_id, clock=clock, runtime=runtime
            )
    for customer_id, report in reports.items():
        # Keep ticking while batches are out, so expired ones are reclaimed even after a cancel.
        state = states.get(customer_id)
        report.sending = state is not None and (state.sending or state.out)
    # The live samples of all of them together (a customer whose sample fails is logged there).
    with _isolated(list(customer_ids)):
        ticks = [Tick(c, report.sending, report.lost) for c, report in reports.items()]
        for customer_id, sample in record_live_samples(ticks, now_ms=clock.now_ms).items():
            reports[customer_id].sample = sample
    return reports


@contextmanager
def _isolated(customer_id: int | list[int]):
    try:
        yield
    except DatabaseError:
        raise  # the connection's state is the caller's to handle
    except Exception:
        log.exception("tick step failed for customer(s) %s", customer_id)


@dataclass(frozen=True)
class State:
    """What a customer's rows say can change at this tick."""

    due: bool  # an open batch past its overdue or expiry mark: reclaim it
    silent: bool  # a live worker that never checked in, or went quiet: lost
    finished: bool  # a sending message with nothing queued or leased: complete it
    leftovers: bool  # a cancelled message with queued recipients handed back: cancel them
    sending: bool  # a message sending
    out: bool  # a batch out
    may_start: bool  # not paused, fewer live workers than max_workers: start_workers decides


_STATE_SQL = """
SELECT c.id,
  EXISTS (SELECT 1 FROM {lease} l WHERE l.customer_id = c.id AND l.state = 'open'
          AND (l.overdue_at <= %s OR l.expires_at <= %s)),
  EXISTS (SELECT 1 FROM {worker} w WHERE w.customer_id = c.id
          AND ((w.state = 'starting' AND w.started_at < %s)
               OR (w.state = 'running' AND w.last_checkin_at < %s))),
  EXISTS (SELECT 1 FROM {message} m WHERE m.customer_id = c.id AND m.status = 'sending'
          AND NOT EXISTS (SELECT 1 FROM {recipient} r WHERE r.message_id = m.id
                          AND r.status IN ('queued', 'leased'))),
  EXISTS (SELECT 1 FROM {message} m WHERE m.customer_id = c.id AND m.status = 'cancelled'
          AND EXISTS (SELECT 1 FROM {recipient} r WHERE r.message_id = m.id
                      AND r.status = 'queued')),
  EXISTS (SELECT 1 FROM {message} m WHERE m.customer_id = c.id AND m.status = 'sending'),
  EXISTS (SELECT 1 FROM {lease} l WHERE l.customer_id = c.id AND l.state = 'open'),
  EXISTS (SELECT 1 FROM {limit} s WHERE s.customer_id = c.id AND NOT s.paused
          AND s.max_workers > (SELECT COUNT(*) FROM {worker} w WHERE w.customer_id = c.id
                               AND w.state IN ('starting', 'running')))
FROM {customer} c WHERE c.id IN ({ids})
"""


def read_states(*, customer_ids: list[int], clock: Clock) -> dict[int, State]:
    """Every customer's State in one statement (hand-written: it runs every round)."""
    if not customer_ids:
        return {}
    now = clock.now
    window = timedelta(milliseconds=settings.SEND_WINDOW_MS + settings.SEND_TIMEOUT_MS)
    adapt = connection.ops.adapt_datetimefield_value
    sql = _STATE_SQL.format(
        lease=Lease._meta.db_table,
        worker=Worker._meta.db_table,
        message=Message._meta.db_table,
        recipient=Recipient._meta.db_table,
        limit=SendLimit._meta.db_table,
        customer=Customer._meta.db_table,
        ids=", ".join(["%s"] * len(customer_ids)),
    )
    params = [
        adapt(now),
        adapt(now),
        adapt(now - timedelta(seconds=settings.WORKER_START_TIMEOUT_S)),
        adapt(now - window - SILENT_MARGIN),
        *customer_ids,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0]: State(*(bool(v) for v in row[1:])) for row in cursor.fetchall()}


def mark_lost_workers(*, customer_ids: list[int], clock: Clock) -> dict[int, int]:
    """Workers that never checked in after starting, or went quiet, are lost (per customer).

    A live worker checks in at least once a window (a grant never outlives its minute, a wait
    never outlasts one), so silence for a window plus the send timeout plus a margin means it is
    gone. Its open lease, if any, is reclaimed when the lease expires.
    """
    if not customer_ids:
        return {}
    now = clock.now
    window = timedelta(milliseconds=settings.SEND_WINDOW_MS + settings.SEND_TIMEOUT_MS)
    quiet_after = window + SILENT_MARGIN
    start_timeout = timedelta(seconds=settings.WORKER_START_TIMEOUT_S)
    silent = list(
        Worker.objects.filter(customer_id__in=customer_ids)
        .filter(
            Q(state=Worker.State.STARTING, started_at__lt=now - start_timeout)
            | Q(state=Worker.State.RUNNING, last_checkin_at__lt=now - quiet_after)
        )
        .values_list("pk", "customer_id")
    )
    if not silent:
        return {}
    Worker.objects.filter(pk__in=[pk for pk, _ in silent], state__in=Worker.LIVE_STATES).update(
        state=Worker.State.LOST, stopped_at=now, stop_reason="stopped checking in"
    )
    return dict(Counter(customer_id for _, customer_id in silent))


def complete_finished_messages(*, customer_ids: list[int], clock: Clock) -> list[tuple[int, int]]:
    """Messages sending with nothing queued or leased are completed: (customer, message)."""
    if not customer_ids:
        return []
    pending = Recipient.objects.filter(
        message_id=OuterRef("pk"), status__in=[Recipient.Status.QUEUED, Recipient.Status.LEASED]
    )
    finished = list(
        Message.objects.filter(customer_id__in=customer_ids, status=Message.Status.SENDING)
        .exclude(Exists(pending))
        .values_list("customer_id", "pk")
    )
    if finished:
        Message.objects.filter(
            pk__in=[m for _, m in finished], status=Message.Status.SENDING
        ).update(status=Message.Status.COMPLETED, completed_at=clock.now)
        log.info("messages %s completed", finished)
    return finished


def cancel_leftovers(*, customer_ids: list[int]) -> int:
    """Recipients of a cancelled message that a worker handed back unsent are cancelled too."""
    if not customer_ids:
        return 0
    queued = Recipient.objects.filter(message_id=OuterRef("pk"), status=Recipient.Status.QUEUED)
    cancelled = Message.objects.filter(
        Exists(queued), customer_id__in=customer_ids, status=Message.Status.CANCELLED
    ).values_list("pk", flat=True)
    return queue.cancel_queued(message_ids=list(cancelled))


def start_workers(*, customer_id: int, clock: Clock, runtime=None) -> list[int]:
    """Start workers while work fits this minute and fewer than needed are running."""
    limits = ledger.read_limits(customer_id)
    if limits.paused:
        return []
    live = Worker.objects.filter(customer_id=customer_id, state__in=Worker.LIVE_STATES)
    stats = live.aggregate(n=Count("id"), rate=Avg("rate_per_s"))
    backlog = queue.count_backlog(customer_id=customer_id, limits=limits)
    needed = pacing.workers_needed(
        limits=limits, backlog=backlog, rate_per_worker_per_s=stats["rate"]
    )
    to_start = min(needed - stats["n"], settings.CONDUCTOR_MAX_STARTS_PER_TICK)
    if to_start <= 0 or not _work_fits(customer_id=customer_id, limits=limits, clock=clock):
        return []
    runtime = runtime or get_runtime()
    api_url = worker_api_url()
    started = []
    for _ in range(to_start):
        worker, token = checkin.worker_start(customer_id=customer_id, runtime=runtime.name)
        started.append(worker.pk)
        transaction.on_commit(
            lambda w=worker.pk, t=token: runtime.invoke(api_url=api_url, token=t, worker_id=w)
        )
    log.info("customer %s: starting workers %s (%s needed)", customer_id, started, needed)
    return started


def _work_fits(*, customer_id: int, limits: pacing.Limits, clock: Clock) -> bool:
    """Budget is left in this minute, or the next minute is close enough that a worker started
    now (cold start included) arrives in time for it."""
    minute_ms = pacing.minute_start(clock.now_ms, limits.window_ms)
    until_next = minute_ms + limits.window_ms - clock.now_ms
    if until_next <= settings.WORKER_WARMUP_MS:
        return True
    row = ledger.minute(customer_id, ms_to_datetime(minute_ms))
    return row is None or row.charged < limits.per_minute
