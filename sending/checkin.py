"""Worker check-ins: record the last batch, decide, claim the next batch — in one transaction.

Per check-in, in this order:
1. the worker's row (FOR UPDATE): a repeated sequence number replays the stored answer;
2. record the reported lease with one statement (`queue.record`);
3. claim ahead (`_claim_ahead`): decide on an unlocked read and claim that many recipients
   (`queue.claim`, FOR UPDATE SKIP LOCKED, oldest-started message first);
4. the customer's SendLimit row (FOR UPDATE): serializes the customer's budget accounting, so
   concurrent check-ins can never grant the same minute's budget twice. Under it: settle the
   reported lease's minute, `pacing.decide` on fresh rows, charge the grant, and give back what
   it does not grant of the claim (or claim the rest, if it grants more).
After the commit, the messages' claim cursors are moved (`_move_cursors`).
Every check-in locks in this order: its worker, the rows it claims, its customer. Reclaim locks
the worker and then the customer too, and then only leased rows, which no claim holds.
Everything the worker needs to send comes back in the answer; the worker never reads the database.
"""

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import orjson
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest

from customers.models import SendLimit

from . import pacing, queue, tokens
from .models import CustomerMinute, Lease, Message, Recipient, Worker
from .protocol import CheckinRequest, Outcome, ProgressRequest, Report

API_VERSION = "v1"


class Conflict(Exception):
    """The request does not fit the worker's state (409): nothing was recorded."""


class Forbidden(Exception):
    """The token does not allow this (403)."""


@dataclass(frozen=True)
class Clock:
    """The server's time for one check-in, read once."""

    now_ms: int

    @classmethod
    def read(cls) -> "Clock":
        return cls(time.time_ns() // 1_000_000)

    @property
    def now(self) -> datetime:
        return ms_to_datetime(self.now_ms)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(value: datetime) -> int:
    return round(value.timestamp() * 1000)


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


# A check-in's small statements are written as SQL here rather than through the ORM: measured
# in-process, the query compiler and save() took about 40% of a check-in's Python CPU.

_LIMIT_COLUMNS = ("per_minute", "batch_size", "max_workers", "concurrency", "guard_ms", "paused")


def _read_limits(customer_id: int, *, lock: bool) -> pacing.Limits:
    """The customer's SendLimit as pacing's Limits; with `lock`, under its row lock (FOR UPDATE),
    which serializes the customer's budget accounting."""
    lock_clause = " FOR UPDATE" if lock and connection.features.has_select_for_update else ""
    sql = (
        f"SELECT {', '.join(_LIMIT_COLUMNS)} FROM {SendLimit._meta.db_table}"  # noqa: S608
        f" WHERE customer_id = %s{lock_clause}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [customer_id])
        row = cursor.fetchone()
    if row is None:
        raise SendLimit.DoesNotExist(f"customer {customer_id} has no SendLimit")
    return limits_for(SendLimit(**dict(zip(_LIMIT_COLUMNS, row, strict=True))))


def _update(instance, *names: str) -> None:
    """Write these fields of a model instance with one UPDATE by primary key: what
    `save(update_fields=…)` writes, without the compiler and the save signals (no receivers
    listen to the models written here)."""
    meta = instance._meta
    fields = [meta.get_field(name) for name in names]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields)
    params = [f.get_db_prep_save(getattr(instance, f.attname), connection) for f in fields]
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, instance.pk])


def _load(model, where: str, params: list, *, lock: bool = False):
    """The first row of `model` matching `where` (SQL), as a model instance, or None.

    Values pass through the same converters the ORM applies (JSON text to Python, SQLite's
    datetime text to aware datetimes), so the instance is what `QuerySet.first()` returns.
    """
    meta = model._meta
    fields = meta.concrete_fields
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    suffix = " FOR UPDATE" if lock and connection.features.has_select_for_update else ""
    sql = (
        f"SELECT {columns} FROM {quote(meta.db_table)} WHERE {where}"  # noqa: S608
        f" ORDER BY {quote(meta.pk.column)} LIMIT 1{suffix}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    values = []
    for model_field, value in zip(fields, row, strict=True):
        col = model_field.get_col(meta.db_table)
        for convert in connection.ops.get_db_converters(col) + col.get_db_converters(connection):
            value = convert(value, col, connection)
        values.append(value)
    return model.from_db(connection.alias, [f.attname for f in fields], values)


def _insert(instance) -> None:
    """INSERT a new model instance and set its primary key: what `save()` writes for a new row,
    without the compiler and the save signals."""
    meta = instance._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    params = [f.get_db_prep_save(f.pre_save(instance, True), connection) for f in fields]
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns})"  # noqa: S608
        f" VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {quote(meta.pk.column)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        instance.pk = cursor.fetchone()[0]
    instance._state.adding = False
    instance._state.db = connection.alias


def worker_start(*, customer_id: int, runtime: str = Worker.Runtime.LOCAL) -> tuple[Worker, str]:
    """Register a worker about to be invoked and mint its first token."""
    worker = Worker.objects.create(customer_id=customer_id, runtime=runtime)
    return worker, tokens.mint(customer_id=customer_id, worker_id=worker.pk)


def _load_worker(claims: tokens.WorkerClaims, worker_id: int) -> Worker:
    if worker_id != claims.worker_id:
        raise Forbidden("this token belongs to another worker")
    worker = _load(Worker, "id = %s", [worker_id], lock=True)
    if worker is None or worker.customer_id != claims.customer_id:
        raise Forbidden("this token does not allow this worker")
    return worker


def checkin(
    *, claims: tokens.WorkerClaims, request: CheckinRequest, clock: Clock | None = None
) -> dict:
    fixed_clock = clock
    with transaction.atomic():
        worker = _load_worker(claims, request.worker_id)
        token = tokens.mint(customer_id=worker.customer_id, worker_id=worker.pk)
        if worker.request_id and request.request_id != worker.request_id:
            # A second delivery of the same invocation (Lambda async invokes can repeat): the
            # first one to check in owns the worker; the other must not send anything.
            return {
                "api": API_VERSION,
                "seq": request.seq,
                "decision": "stop",
                "reason": "another invocation already runs as this worker",
                "token": token,
            }
        if request.seq == worker.last_seq and worker.last_response is not None:
            return {**_replay(worker.last_response), "token": token}
        if request.seq != worker.last_seq + 1:
            raise Conflict(f"seq {request.seq} is out of order: expected {worker.last_seq + 1}")
        lease = _load(Lease, "worker_id = %s AND state = %s", [worker.pk, Lease.State.OPEN.value])
        _check_report(lease, request.report)
        settlement = None
        if lease is not None:
            # Recording needs only the worker's lock (the rows are leased to it), so the heavy
            # statement runs before the customer's lock is taken.
            settlement = _record(
                worker=worker, lease=lease, report=request.report, clock=fixed_clock or Clock.read()
            )
        ahead = None
        if worker.is_live and not request.final:
            ahead = _claim_ahead(worker=worker, clock=fixed_clock or Clock.read())
        limits = _read_limits(worker.customer_id, lock=True)
        # The time of the decision is read once the locks are held, so a wait for them does not
        # make it stale (the worker also anchors the window's end at its request: see worker.py).
        clock = fixed_clock or Clock.read()
        if settlement is not None:
            _apply_settlement(lease, settlement)

        if request.final:
            answer = {"decision": "stop", "reason": "final check-in"}
        elif worker.is_live:
            answer = _decide(worker=worker, limits=limits, clock=clock, ahead=ahead)
        else:
            answer = {"decision": "stop", "reason": f"worker is {worker.state}"}
        if answer["decision"] == "stop" and worker.is_live:
            worker.state = Worker.State.STOPPED
            worker.stop_reason = answer["reason"]
            worker.stopped_at = clock.now
        elif worker.state == Worker.State.STARTING:
            worker.state = Worker.State.RUNNING
        answer = {"api": API_VERSION, "seq": request.seq, **answer}
        worker.request_id = request.request_id
        worker.last_seq = request.seq
        worker.last_response = _replayable(answer)
        worker.last_checkin_at = clock.now
        _update(
            worker,
            "state",
            "stop_reason",
            "stopped_at",
            "request_id",
            "last_seq",
            "last_response",
            "last_checkin_at",
            "rate_per_s",
            "throttled_minute",
        )
    if ahead is not None:
        _move_cursors(ahead)
    return {**answer, "token": token}


def _replayable(answer: dict) -> dict:
    """The answer as stored for a retried seq: recipients are kept as ids only (the lease has
    them, and their data does not change while leased), so each check-in writes a few hundred
    bytes rather than the whole batch."""
    batch = answer.get("batch")
    if batch is None:
        return answer
    return {**answer, "batch": {**batch, "recipients": None}}


def _replay(stored: dict) -> dict:
    batch = stored.get("batch")
    if batch is None:
        return stored
    lease = Lease.objects.get(pk=batch["lease_id"])
    rows = Recipient.objects.in_bulk(lease.recipient_ids)
    recipients = [
        {"id": r.id, "message": r.message_id, "to": r.email, "merge": r.merge_data}
        for r in (rows[i] for i in lease.recipient_ids)
    ]
    return {**stored, "batch": {**batch, "recipients": recipients}}


def _check_report(lease: Lease | None, report: Report | None) -> None:
    if report is None:
        if lease is not None:
            raise Conflict(f"lease {lease.pk} is open: report it before asking for more")
        return
    if lease is None or report.lease_id != lease.pk:
        raise Conflict(f"lease {report.lease_id} is not this worker's open lease")
    ids = [r.id for r in report.results]
    if len(ids) != len(set(ids)):
        raise Conflict("a recipient appears more than once in the report")
    members = set(lease.recipient_ids)
    strangers = [r.id for r in report.results if r.id not in members]
    if strangers:
        shown = ", ".join(str(i) for i in strangers[:10])
        raise Conflict(f"recipients not in lease {lease.pk}: {shown}")


def _outcome(result, granted_ms: int) -> queue.Outcome:
    if result.outcome is Outcome.SENT:
        return queue.Outcome(
            result.id,
            queue.SENT,
            provider_id=result.provider_id,
            attempted=True,
            sent_at_ms=granted_ms + (result.done_ms or 0),
        )
    if result.outcome is Outcome.UNKNOWN:
        return queue.Outcome(result.id, queue.UNKNOWN, error=result.error, attempted=True)
    if result.outcome is Outcome.FAILED:
        status = queue.FAILED if result.permanent else queue.RETRY
        return queue.Outcome(result.id, status, error=result.error, attempted=True)
    return queue.Outcome(result.id, queue.QUEUED, error=result.error)


def _record(*, worker: Worker, lease: Lease, report: Report, clock: Clock) -> pacing.Settlement:
    """Record a lease's results (one statement), close the lease, and return how its budget
    moves between minutes (applied by the caller under the customer's lock)."""
    by_id = {r.id: r for r in report.results}
    granted_ms = datetime_to_ms(lease.granted_at)
    outcomes = []
    for position, recipient_id in enumerate(lease.recipient_ids):
        result = by_id.get(recipient_id)
        if result is not None:
            outcomes.append(_outcome(result, granted_ms))
        elif position < lease.started_through:
            # Not accounted for but possibly started: never re-sent automatically.
            outcomes.append(queue.Outcome(recipient_id, queue.UNKNOWN))
        else:
            outcomes.append(queue.Outcome(recipient_id, queue.QUEUED))
    queue.record(outcomes, max_attempts=settings.SEND_MAX_ATTEMPTS)

    counts = {o: 0 for o in Outcome}
    for result in report.results:
        counts[result.outcome] += 1
    started = [
        r for r in report.results if r.outcome in (Outcome.SENT, Outcome.FAILED, Outcome.UNKNOWN)
    ]
    not_started = counts[Outcome.NOT_STARTED] + sum(
        1
        for position, rid in enumerate(lease.recipient_ids)
        if rid not in by_id and position >= lease.started_through
    )
    settlement = pacing.settle(
        lease=_pacing_lease(lease),
        report=pacing.Report(
            sent=counts[Outcome.SENT],
            # A send in doubt counts as started: it stays charged, and with no answer time it is
            # charged to the next minute too.
            failed=counts[Outcome.FAILED] + counts[Outcome.UNKNOWN],
            not_started=not_started,
            throttled=counts[Outcome.THROTTLED],
            done_ms=[r.done_ms for r in started if r.done_ms is not None],
        ),
    )
    lease.state = Lease.State.SETTLED
    lease.settled_at = clock.now
    _update(lease, "state", "settled_at")
    worker.rate_per_s = pacing.next_rate(worker.rate_per_s, len(started), report.elapsed_ms)
    if counts[Outcome.THROTTLED]:
        worker.throttled_minute = lease.minute_start
    return settlement


def _pacing_lease(lease: Lease) -> pacing.Lease:
    granted_ms = datetime_to_ms(lease.granted_at)
    return pacing.Lease(
        minute_start_ms=datetime_to_ms(lease.minute_start),
        size=lease.size,
        minute_ends_in_ms=lease.minute_ends_in_ms,
        guard_ms=lease.guard_ms,
        stop_starting_in_ms=datetime_to_ms(lease.stop_starting_at) - granted_ms,
        expires_in_ms=datetime_to_ms(lease.expires_at) - granted_ms,
        overdue_in_ms=datetime_to_ms(lease.overdue_at) - granted_ms,
        may_cross=lease.may_cross,
    )


def _minute(customer_id: int, minute_start: datetime, cap: int) -> CustomerMinute:
    row, _ = CustomerMinute.objects.get_or_create(
        customer_id=customer_id, minute_start=minute_start, defaults={"cap": cap}
    )
    return row


def _apply_settlement(lease: Lease, settlement: pacing.Settlement) -> None:
    window = timedelta(milliseconds=settings.SEND_WINDOW_MS)
    with connection.cursor() as cursor:
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
        following = lease.minute_start + window
        row = _minute(lease.customer_id, following, cap=0)
        CustomerMinute.objects.filter(pk=row.pk).update(
            carried_in=F("carried_in") + settlement.crossed
        )


def _decide(*, worker: Worker, limits: pacing.Limits, clock: Clock, ahead: "_Ahead") -> dict:
    customer_id = worker.customer_id
    minute_ms = pacing.minute_start(clock.now_ms, limits.window_ms)
    minute_start = ms_to_datetime(minute_ms)
    pool = _pool(customer_id=customer_id, minute_start=minute_start, window_ms=limits.window_ms)
    if pool.minute_id is None:  # the minute's first check-in
        row = _minute(customer_id, minute_start, cap=limits.per_minute)
        pool = replace(
            pool,
            minute_id=row.pk,
            ledger=pacing.MinuteLedger(
                minute_start_ms=minute_ms,
                granted=row.granted,
                refunded=row.refunded,
                carried_in=row.carried_in,
                throttled=row.throttled,
            ),
        )
    # The rows claimed ahead are leased already, so the count of queued ones leaves them out.
    backlog = backlog_for(
        customer_id=customer_id, limits=limits, messages=ahead.messages, cursors=ahead.positions
    )
    decision = _decision(
        worker=worker, limits=limits, clock=clock, pool=pool, backlog=backlog + len(ahead.claimed)
    )
    if not isinstance(decision, pacing.Grant):
        ahead.give_back(0)
    if isinstance(decision, pacing.Stop):
        return {"decision": "stop", "reason": decision.reason}
    if isinstance(decision, pacing.Wait):
        return {"decision": "wait", "wait_ms": decision.ms}
    return _grant(
        worker=worker,
        grant=decision,
        minute_id=pool.minute_id,
        limits=limits,
        clock=clock,
        ahead=ahead,
    )


def _decision(
    *, worker: Worker, limits: pacing.Limits, clock: Clock, pool: "_Pool", backlog: int
) -> pacing.Decision:
    return pacing.decide(
        now_ms=clock.now_ms,
        limits=limits,
        ledger=pool.ledger,
        open_spill=pool.open_spill,
        backlog=backlog,
        # A throttled worker backs off for the rest of the minute it was throttled in.
        # A worker with no measured rate yet is taken to be as fast as its peers, the estimate the
        # conductor starts workers by: otherwise a new worker, assumed faster, could be retired as
        # surplus by the same numbers that made the conductor start it.
        worker=pacing.WorkerView(
            rate_per_s=worker.rate_per_s or pool.rate_per_s,
            throttled=worker.throttled_minute == ms_to_datetime(pool.ledger.minute_start_ms),
        ),
        running_workers=pool.running,
        refunds_due_ms=pool.refunds_due_ms,
    )


@dataclass
class _Ahead:
    """Recipients claimed before the customer's lock is taken, and the messages they came from.

    `claimed` is in claim order (oldest-started message first). Each message's `claim_after` is
    as read; where each claim pass got to is kept in `positions`, and moved to the messages after
    the commit (`_move_cursors`).
    """

    messages: list[Message]
    claimed: list[queue.Claimed] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)  # message id -> cursor to store

    def claim(self, wanted: int) -> None:
        """Claim up to `wanted` more, message by message in the order they are served."""
        for message in self.messages:
            need = wanted - len(self.claimed)
            if need <= 0:
                break
            after = self.positions.get(message.pk, message.claim_after)
            taken, self.positions[message.pk] = _claim_from(message, need, after)
            self.claimed += taken

    def give_back(self, keep: int) -> list[queue.Claimed]:
        """Keep the first `keep` claimed recipients and return the rest to the queue (one
        statement), moving each message's cursor back to before the first one returned."""
        kept, surplus = self.claimed[:keep], self.claimed[keep:]
        if surplus:
            queue.release([c.id for c in surplus], status=queue.QUEUED)
            for c in surplus:
                position = self.positions.get(c.message_id, c.id)
                self.positions[c.message_id] = min(position, c.id - 1)
        self.claimed = kept
        return kept


# Large enough that pacing never sizes a grant or the pool by it (see _claim_ahead).
_UNCOUNTED_BACKLOG = 2**62


def _claim_ahead(*, worker: Worker, clock: Clock) -> _Ahead:
    """Claim the batch a check-in will most likely be granted, before taking the customer's lock.

    Claiming is a check-in's heaviest statement, and it does not need the customer's lock:
    `FOR UPDATE SKIP LOCKED` keeps concurrent claims apart on its own. Done here, it is out of
    the time the lock is held, which the other workers of the customer queue behind (measured
    under bench.worker_api: the wait for the lock was 54 ms at p99 with the claim inside it).
    The size comes from the same decision, taken on an unlocked read: under the lock the
    decision is taken again on fresh rows, and what it does not grant is returned to the queue
    (`_Ahead.give_back`), or more is claimed if it grants more. Nothing is claimed when the
    unlocked decision is not a grant, so a worker told to wait costs no claim.
    """
    customer_id = worker.customer_id
    ahead = _Ahead(messages=sending_messages(customer_id))
    limits = _read_limits(customer_id, lock=False)
    minute_start = ms_to_datetime(pacing.minute_start(clock.now_ms, limits.window_ms))
    pool = _pool(customer_id=customer_id, minute_start=minute_start, window_ms=limits.window_ms)
    # The backlog is not counted here: as many as can be granted is what the claim finds out.
    decision = _decision(
        worker=worker, limits=limits, clock=clock, pool=pool, backlog=_UNCOUNTED_BACKLOG
    )
    if isinstance(decision, pacing.Grant):
        ahead.claim(decision.size)
    return ahead


def _move_cursors(ahead: _Ahead) -> None:
    """Store where the claims got to in each message, after the check-in's commit.

    The cursor is where the next claim starts looking, not what makes a claim exclusive (leased
    rows are not queued, and rows being claimed are locked), so a cursor read stale costs a claim
    only a walk over entries it skips. It is written outside the check-in's transaction, which
    then never waits for a message's row lock while holding claimed rows: an operator's cancel
    holds that lock while it cancels the message's queued rows, which would wait for ours.
    Written only if no other check-in moved it since it was read.
    """
    table = connection.ops.quote_name(Message._meta.db_table)
    with connection.cursor() as cursor:
        for message in ahead.messages:
            position = ahead.positions.get(message.pk)
            if position is None or position == message.claim_after:
                continue
            cursor.execute(
                f"UPDATE {table} SET claim_after = %s WHERE id = %s AND claim_after = %s",  # noqa: S608
                [position, message.pk, message.claim_after],
            )


@dataclass(frozen=True)
class _Pool:
    """What a decision reads besides the limits and the backlog."""

    minute_id: int | None  # the current minute's CustomerMinute row (None: not made yet)
    ledger: pacing.MinuteLedger  # its counts (all zero while the row is not made yet)
    open_spill: int  # pacing.open_spill() over the previous minute's open leases
    running: int  # live workers, the asking one included
    rate_per_s: float | None  # their mean measured rate
    refunds_due_ms: int | None  # when the first open lease of the minute falls due (reclaim)


def _pool(*, customer_id: int, minute_start: datetime, window_ms: int) -> _Pool:
    """The current minute's ledger and the earliest time one of its open leases falls due, the
    customer's live workers, and the previous minute's open spill, in one query."""
    previous_minute = minute_start - timedelta(milliseconds=window_ms)
    live = [state.value for state in Worker.LIVE_STATES]
    sql = f"""
        SELECT m.id, m.granted, m.refunded, m.carried_in, m.throttled,
               p.open_spill, p.running, p.rate, p.refunds_due
        FROM (
            SELECT (SELECT COALESCE(SUM(l.size), 0) FROM {Lease._meta.db_table} l
                    WHERE l.customer_id = %s AND l.state = %s AND l.minute_start = %s
                      AND l.may_cross = %s) AS open_spill,
                   (SELECT MIN(CASE WHEN l.overdue_at < l.expires_at
                                    THEN l.overdue_at ELSE l.expires_at END)
                    FROM {Lease._meta.db_table} l
                    WHERE l.customer_id = %s AND l.state = %s AND l.minute_start = %s
                   ) AS refunds_due,
                   COUNT(*) AS running, AVG(w.rate_per_s) AS rate
            FROM {Worker._meta.db_table} w
            WHERE w.customer_id = %s AND w.state IN ({", ".join(["%s"] * len(live))})
        ) p
        LEFT JOIN {CustomerMinute._meta.db_table} m
            ON m.customer_id = %s AND m.minute_start = %s
    """  # noqa: S608 - table names and placeholders only
    params = [
        customer_id,
        Lease.State.OPEN.value,
        connection.ops.adapt_datetimefield_value(previous_minute),
        True,
        customer_id,
        Lease.State.OPEN.value,
        connection.ops.adapt_datetimefield_value(minute_start),
        customer_id,
        *live,
        customer_id,
        connection.ops.adapt_datetimefield_value(minute_start),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    minute_id, granted, refunded, carried_in, throttled, open_spill, running, rate, due = row
    return _Pool(
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
        refunds_due_ms=None if due is None else datetime_to_ms(_db_datetime(due)),
    )


def _db_datetime(value) -> datetime:
    """A datetime read by raw SQL: SQLite hands back its stored text (naive UTC)."""
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def sending_messages(customer_id: int) -> list[Message]:
    """The customer's messages that are sending, oldest-started first (the order they are
    served in), with what a grant's answer needs of the customer."""
    return list(
        Message.objects.filter(customer_id=customer_id, status=Message.Status.SENDING)
        .select_related("customer__provider_account")
        .order_by("started_at", "id")
    )


def backlog_for(
    *,
    customer_id: int,
    limits: pacing.Limits,
    messages: list[Message] | None = None,
    cursors: dict[int, int] | None = None,
) -> int:
    """Queued recipients of the customer's sending messages, for pacing decisions.

    Counted exactly up to a pool's worth of batches; past that it is reported as at least a
    minute's cap. Pacing needs the backlog exactly only when it is small (the last batches,
    `Stop(done)`); above, it needs to know it is at least what a minute can send. An estimate on
    the high side there keeps a worker a little longer near the end, never one too few.

    The count walks the claim index from each message's claim cursor: the entries behind a cursor
    belong to recipients already taken (dead until vacuum, yet each one is visited by a count
    from the start). Only when what lies ahead of the cursors is within the exact range are the
    recipients returned to the queue behind them counted too. `cursors` (message id -> cursor)
    overrides the messages' own: a check-in counts from where its own claim got to.
    """
    cursors = cursors or {}
    if messages is None:  # only the ids and cursors are needed here
        messages = list(
            Message.objects.filter(customer_id=customer_id, status=Message.Status.SENDING).only(
                "id", "claim_after"
            )
        )
    exact_up_to = limits.batch_size * (limits.max_workers + 1)
    sql = f"""SELECT COUNT(*) FROM (
            SELECT id FROM {Recipient._meta.db_table}
            WHERE message_id = %s AND status = %s AND id > %s ORDER BY id LIMIT %s
        ) AS ahead"""  # noqa: S608 - table name only
    with connection.cursor() as cursor:
        for from_cursor in (True, False):
            counted = 0
            for message in messages:
                after = cursors.get(message.pk, message.claim_after) if from_cursor else 0
                cursor.execute(sql, [message.pk, queue.QUEUED, after, exact_up_to + 1 - counted])
                counted += cursor.fetchone()[0]
                if counted > exact_up_to:
                    return max(counted, limits.per_minute + 1)
    return counted


def _grant(
    *,
    worker: Worker,
    grant: pacing.Grant,
    minute_id: int,
    limits: pacing.Limits,
    clock: Clock,
    ahead: _Ahead,
) -> dict:
    if len(ahead.claimed) < grant.size:
        ahead.claim(grant.size)
    leased = ahead.give_back(grant.size)
    if not leased:
        # Another check-in took the last of the queue between our count and our claim.
        return {"decision": "wait", "wait_ms": 1000}
    granted_at = clock.now
    terms = pacing.Lease.from_grant(replace(grant, size=len(leased)), limits)
    lease = Lease(
        customer_id=worker.customer_id,
        worker=worker,
        minute_start=ms_to_datetime(grant.minute_start_ms),
        size=len(leased),
        recipient_ids=[c.id for c in leased],
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
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {CustomerMinute._meta.db_table} SET granted = granted + %s, cap = %s"  # noqa: S608
            " WHERE id = %s",
            [len(leased), limits.per_minute, minute_id],
        )
    used = {c.message_id for c in leased}
    return {
        "decision": "send",
        "batch": {
            "lease_id": lease.pk,
            "start_in_ms": grant.start_in_ms,
            "stop_starting_in_ms": grant.stop_starting_in_ms,
            "minute_ends_in_ms": grant.minute_ends_in_ms,
            "concurrency": limits.concurrency,
            # The most recipients one progress report may declare (pacing.chunk_limit).
            "chunk_limit": pacing.chunk_limit(limits.per_minute),
            # The per-send timeout the pacing assumes (no send arrives later than this).
            "send_timeout_ms": limits.spill_hold_ms,
            "provider": _provider_payload(ahead.messages[0].customer),
            "messages": {str(m.pk): _message_payload(m) for m in ahead.messages if m.pk in used},
            "recipients": [
                {
                    "id": c.id,
                    "message": c.message_id,
                    "to": c.email,
                    "merge": orjson.Fragment(c.merge_json),
                }
                for c in leased
            ],
        },
    }


def _claim_from(message: Message, wanted: int, after: int) -> tuple[list[queue.Claimed], int]:
    """Claim from one message past the cursor `after`; rescan once from the start when the
    cursor reaches the end, so recipients returned to the queue are found again. Returns what was
    claimed and where the claim got to (the message's next cursor)."""
    leased: list[queue.Claimed] = []
    started_at = after
    for attempt in range(2):
        while len(leased) < wanted:
            need = wanted - len(leased)
            result = queue.claim(
                customer_id=message.customer_id, message_id=message.pk, after_id=after, limit=need
            )
            leased += result.leased
            after = result.last_id
            if result.scanned < need:
                break  # this pass reached the end of the queue
        if len(leased) >= wanted or attempt == 1 or started_at == 0:
            break
        after = 0
    return leased, after


def _provider_payload(customer) -> dict | None:
    """How the worker reaches the customer's provider (credentials travel only over the API)."""
    account = customer.provider_account
    if account is None:
        return None
    return {
        "kind": account.kind,
        "settings": account.settings,
        "credentials": account.credentials,
        "per_minute_cap": account.per_minute_cap,
    }


def _message_payload(message: Message) -> dict:
    customer = message.customer
    return {
        "subject": message.subject,
        "text": message.text_body,
        "html": message.html_body,
        "from_email": message.from_email or customer.default_from_email,
        "reply_to": message.reply_to or customer.default_reply_to,
    }


def progress(*, claims: tokens.WorkerClaims, request: ProgressRequest) -> None:
    """Record how far into its lease a worker may have started sends (never lowered).

    One conditional UPDATE that only touches an open lease: if the lease was settled meanwhile
    (reclaimed as overdue), nothing is recorded and the worker is told so (409) — it must then
    start nothing more, which is what makes refunding past the mark safe (pacing, A6).
    """
    if request.worker_id != claims.worker_id:
        raise Forbidden("this token belongs to another worker")
    updated = Lease.objects.filter(
        pk=request.lease_id,
        worker_id=request.worker_id,
        worker__customer_id=claims.customer_id,
        state=Lease.State.OPEN,
        size__gte=request.started_through,
    ).update(started_through=Greatest(F("started_through"), request.started_through))
    if updated:
        return
    lease = Lease.objects.filter(pk=request.lease_id, worker_id=request.worker_id).first()
    if lease is None:
        raise Conflict(f"lease {request.lease_id} is not this worker's")
    if lease.state != Lease.State.OPEN:
        raise Conflict(f"lease {request.lease_id} is {lease.state}: start nothing more")
    raise Conflict(f"started_through {request.started_through} is past the lease's {lease.size}")


def reclaim_overdue_leases(*, clock: Clock | None = None, customer_id: int | None = None) -> int:
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
            _apply_settlement(
                lease,
                pacing.settle_abandoned(
                    lease=_pacing_lease(lease), started_through=lease.started_through
                ),
            )
            lease.state = Lease.State.EXPIRED
            lease.settled_at = clock.now
            lease.save(update_fields=["state", "settled_at"])
            Worker.objects.filter(pk=worker_id, state__in=Worker.LIVE_STATES).update(
                state=Worker.State.LOST, stopped_at=clock.now, stop_reason="lease overdue"
            )
            reclaimed += 1
    return reclaimed
