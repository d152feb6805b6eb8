"""The check-in: record a worker's last batch, decide, and hand it the next — in one transaction.

Per check-in, in this order:
1. the worker's row (FOR UPDATE): a repeated sequence number replays the stored answer;
2. record the reported lease with one statement (`leases.settle_reported`), and any late reports
   (for leases settled or reclaimed before all their answers came) over the `unknown` their
   recipients were left in (`leases.record_late`, one statement each);
3. claim ahead: decide on an unlocked read and claim that many recipients (`queue.Ahead`,
   FOR UPDATE SKIP LOCKED, oldest-started message first);
4. the customer's SendLimit row (FOR UPDATE, `ledger.lock_limits`): serializes the customer's
   budget accounting, so concurrent check-ins can never grant the same minute's budget twice.
   Under it: settle the reported lease's minute (and late reports' minutes) and judge its
   refusals (`accounts.learn`); then, if its provider account is shared, lock the account's row
   (`accounts.lock_account`), which does for all the account's customers together what the
   SendLimit lock does for one; `pacing.decide` on fresh rows, charge the grant, and give back
   what it does not grant of the claim (or claim the rest, if it grants more).
After the commit, the messages' claim cursors are moved (`queue.move_cursors`), and completed
messages that a late report gave queued recipients again are reopened (`queue.reopen_messages`).
Every check-in locks in this order: its worker, the rows it claims, its customer, its shared
account. Reclaim locks
the worker and then the customer too, and then only leased rows, which no claim holds.
Everything the worker needs to send comes back in the answer; the worker never reads the database.
"""

import time
from dataclasses import replace

from django.db import transaction

from . import accounts, leases, ledger, pacing, queue, throttle, tokens, wire, workers
from .clock import Clock, ms_to_datetime
from .models import Worker

# Large enough that pacing never sizes a grant or the pool by it (see _claim_ahead).
_UNCOUNTED_BACKLOG = 2**62


def worker_start(*, customer_id: int, runtime: str = Worker.Runtime.LOCAL) -> tuple[Worker, str]:
    """Register a worker about to be invoked and mint its first token."""
    worker = Worker.objects.create(customer_id=customer_id, runtime=runtime)
    return worker, tokens.mint(customer_id=customer_id, worker_id=worker.pk)


def checkin(
    *,
    claims: tokens.WorkerClaims,
    request: wire.CheckinRequest,
    clock: Clock | None = None,
    received_ns: int | None = None,
) -> dict:
    """`received_ns`: when the request arrived (time.monotonic_ns(), noted by the ASGI router).
    A grant then says how long the server held the request before reading its clock
    (`held_ms`), so that the worker can anchor the window's end that much after it sent the
    request instead of at the sending (see sending.worker.batch.Window)."""
    fixed_clock = clock
    with transaction.atomic():
        worker = _lock_worker(claims, request.worker_id)
        token = tokens.mint(customer_id=worker.customer_id, worker_id=worker.pk)
        if worker.request_id and request.request_id != worker.request_id:
            # A second delivery of the same invocation (Lambda async invokes can repeat): the
            # first one to check in owns the worker; the other must not send anything.
            answer = wire.stop("another invocation already runs as this worker")
            return {"api": wire.API_VERSION, "seq": request.seq, **answer, "token": token}
        if request.seq == worker.last_seq and worker.last_response is not None:
            return {**_replay(worker.last_response, worker.customer_id), "token": token}
        if request.seq != worker.last_seq + 1:
            raise wire.Conflict(
                f"seq {request.seq} is out of order: expected {worker.last_seq + 1}"
            )

        lease = leases.open_lease_of(worker)
        report, late = request.report, list(request.late)
        if report is not None and lease is None:
            # Its lease was reclaimed before the report came: still the truth, recorded late.
            report, late = None, [report, *late]
        if len({r.lease_id for r in late}) < len(late):
            raise wire.Conflict("late: one report per lease")
        late_leases = [leases.closed_lease_of(worker, r.lease_id) for r in late]
        leases.check_report(lease, report)
        settlement = None
        if lease is not None:
            # Recording needs only the worker's lock (the rows are leased to it), so the heavy
            # statement runs before the customer's lock is taken.
            settlement = leases.settle_reported(
                lease=lease, report=report, clock=fixed_clock or Clock.read()
            )
            _note_report(worker, lease, report)
        late_records = [
            leases.record_late(lease=closed, report=r)
            for closed, r in zip(late_leases, late, strict=True)
        ]
        ahead = None
        if worker.is_live and not request.final:
            ahead = _claim_ahead(
                worker=worker, clock=fixed_clock or Clock.read(), answer_ms=request.answer_ms
            )

        limits = ledger.lock_limits(worker.customer_id)
        standing = accounts.standing(worker.customer_id, lock=False)
        # The time of the decision is read once the locks are held, so a wait for them does not
        # make it stale; the worker anchors the window's end at its request plus this hold
        # (rounded down: that anchor may only err early).
        held_ms = None
        if received_ns is not None:
            held_ms = max(0, time.monotonic_ns() - received_ns) // 1_000_000
        clock = fixed_clock or Clock.read()
        if settlement is not None:
            ledger.apply_settlement(lease, settlement)
            if settlement.throttled and accounts.learn(
                customer_id=worker.customer_id,
                lease=lease,
                results=report.results,
                standing=standing,
                limits=limits,
                now_ms=clock.now_ms,
            ):
                standing = accounts.standing(worker.customer_id, lock=False)
        for record in late_records:
            ledger.apply_settlement(record.lease, record.settlement)
        granted: list[queue.Claimed] = []  # a grant's recipients, rows built after the commit
        if request.final:
            answer = wire.stop("final check-in")
        elif worker.is_live:
            # Taken as late as it can be: the account's other customers queue behind it.
            accounts.lock_account(standing)
            answer, granted = _decide(
                worker=worker,
                limits=limits,
                standing=standing,
                clock=clock,
                ahead=ahead,
                held_ms=held_ms,
                answer_ms=request.answer_ms,
            )
        else:
            answer = wire.stop(f"worker is {worker.state}")

        if answer["decision"] == "stop" and worker.is_live:
            worker.state = Worker.State.STOPPED
            worker.stop_reason = answer["reason"]
            worker.stopped_at = clock.now
        elif worker.state == Worker.State.STARTING:
            worker.state = Worker.State.RUNNING
        answer = {"api": wire.API_VERSION, "seq": request.seq, **answer}
        worker.request_id = request.request_id
        worker.last_seq = request.seq
        worker.last_response = wire.replayable(answer)
        worker.last_checkin_at = clock.now
        workers.save_checkin(worker)
    if ahead is not None:
        queue.move_cursors(ahead)
    queue.reopen_messages([i for record in late_records for i in record.maybe_queued])
    if granted:
        # Out of the transaction and the customer's lock (see wire.batch).
        answer = wire.with_recipients(answer, ahead.messages[0].customer, granted)
    return {**answer, "token": token}


def _lock_worker(claims: tokens.WorkerClaims, worker_id: int) -> Worker:
    if worker_id != claims.worker_id:
        raise wire.Forbidden("this token belongs to another worker")
    worker = workers.lock(worker_id)
    if worker is None or worker.customer_id != claims.customer_id:
        raise wire.Forbidden("this token does not allow this worker")
    return worker


def _replay(stored: dict, customer_id: int) -> dict:
    batch = stored.get("batch")
    if batch is None:
        return stored
    lease_ids = leases.recipient_ids_of(batch["lease_id"])
    customer = workers.customer_with_account(customer_id)
    return wire.replay(stored, queue.in_order(lease_ids), customer)


def _note_report(worker: Worker, lease, report: wire.Report) -> None:
    """What a report says about its worker: its send rate, and whether it was throttled."""
    started = sum(1 for r in report.results if r.outcome in wire.STARTED)
    worker.rate_per_s = pacing.next_rate(worker.rate_per_s, started, report.elapsed_ms)
    if any(r.outcome is wire.Outcome.THROTTLED for r in report.results):
        worker.throttled_minute = lease.minute_start


def _claim_ahead(*, worker: Worker, clock: Clock, answer_ms: int = 0) -> queue.Ahead:
    """Claim the batch a check-in will most likely be granted, before taking the customer's lock.

    Claiming is a check-in's heaviest statement, and it does not need the customer's lock:
    `FOR UPDATE SKIP LOCKED` keeps concurrent claims apart on its own. Done here, it is out of
    the time the lock is held, which the customer's other workers queue behind. The size comes
    from the same decision, taken on an unlocked read: under the lock the decision is taken
    again on fresh rows, and what it does not grant is returned to the queue
    (`queue.Ahead.give_back`), or more is claimed if it grants more. Nothing is claimed when the
    unlocked decision is not a grant, so a worker told to wait costs no claim.
    """
    customer_id = worker.customer_id
    ahead = queue.Ahead(messages=queue.sending_messages(customer_id))
    limits = ledger.read_limits(customer_id)
    standing = accounts.standing(customer_id, lock=False)
    minute_start = ms_to_datetime(pacing.minute_start(clock.now_ms, limits.window_ms))
    pool = ledger.read_pool(
        customer_id=customer_id, minute_start=minute_start, window_ms=limits.window_ms
    )
    # The backlog is not counted here: as many as can be granted is what the claim finds out.
    decision = _decision(
        worker=worker,
        limits=limits,
        standing=standing,
        clock=clock,
        pool=pool,
        backlog=_UNCOUNTED_BACKLOG,
        answer_ms=answer_ms,
    )
    if isinstance(decision, pacing.Grant):
        ahead.claim(decision.size)
    return ahead


def _decide(
    *,
    worker: Worker,
    limits: pacing.Limits,
    standing: accounts.Standing,
    clock: Clock,
    ahead: queue.Ahead,
    held_ms: int | None,
    answer_ms: int = 0,
) -> tuple[dict, list[queue.Claimed]]:
    """The decision under the customer's lock, on fresh rows, and what follows from it: the
    answer, and the recipients leased by a grant (none otherwise), whose rows the caller adds
    after the commit (`wire.with_recipients`)."""
    customer_id = worker.customer_id
    minute_start = ms_to_datetime(pacing.minute_start(clock.now_ms, limits.window_ms))
    pool = ledger.read_pool(
        customer_id=customer_id, minute_start=minute_start, window_ms=limits.window_ms
    )
    pool = ledger.with_minute_row(
        pool, customer_id=customer_id, minute_start=minute_start, cap=limits.per_minute
    )
    # The rows claimed ahead are leased already, so the count of queued ones leaves them out.
    backlog = queue.count_backlog(
        customer_id=customer_id, limits=limits, messages=ahead.messages, cursors=ahead.positions
    )
    decision = _decision(
        worker=worker,
        limits=limits,
        standing=standing,
        clock=clock,
        pool=pool,
        backlog=backlog + len(ahead.claimed),
        held_ms=held_ms or 0,
        answer_ms=answer_ms,
    )
    if isinstance(decision, pacing.Stop):
        ahead.give_back(0)
        return wire.stop(decision.reason), []
    if isinstance(decision, pacing.Wait):
        ahead.give_back(0)
        return wire.wait(decision.ms), []

    if len(ahead.claimed) < decision.size:
        ahead.claim(decision.size)
    leased = ahead.give_back(decision.size)
    if not leased:
        # Another check-in took the last of the queue between our count and our claim.
        return wire.wait(1000), []
    lease = leases.open_lease(
        worker=worker,
        grant=decision,
        limits=limits,
        clock=clock,
        recipient_ids=[c.id for c in leased],
        held_ms=held_ms or 0,
    )
    ledger.charge(minute_id=pool.minute_id, size=len(leased), cap=limits.per_minute)
    answer = wire.batch(
        lease_id=lease.pk,
        grant=decision,
        limits=limits,
        chunk_limit=pacing.chunk_limit(limits.per_minute),
        customer=ahead.messages[0].customer,
        messages=ahead.messages,
        recipients=leased,
        held_ms=held_ms,
    )
    return answer, leased


def _decision(
    *,
    worker: Worker,
    limits: pacing.Limits,
    standing: accounts.Standing,
    clock: Clock,
    pool: ledger.Pool,
    backlog: int,
    held_ms: int = 0,
    answer_ms: int = 0,
) -> pacing.Decision:
    minute_ms = pool.ledger.minute_start_ms
    limits = replace(limits, learned_guard_ms=standing.guard_ms(clock.now_ms, limits))
    room = accounts.room(
        standing=standing,
        customer_id=worker.customer_id,
        minute_start=ms_to_datetime(minute_ms),
        window_ms=limits.window_ms,
        used=pool.ledger.charged + pool.open_spill,
    )
    hold = standing.hold_until_ms
    if hold is not None and hold > clock.now_ms:
        # Workers come back from a back-off spread out, not all in the same millisecond.
        hold += throttle.jitter_ms(worker.pk, minute_ms)
    return pacing.decide(
        now_ms=clock.now_ms,
        limits=limits,
        ledger=pool.ledger,
        open_spill=pool.open_spill,
        backlog=backlog,
        # A worker with no measured rate yet is taken to be as fast as its peers, the estimate the
        # conductor starts workers by: otherwise a new worker, assumed faster, could be retired as
        # surplus by the same numbers that made the conductor start it.
        worker=pacing.WorkerView(rate_per_s=worker.rate_per_s or pool.rate_per_s),
        running_workers=pool.running,
        refunds_due_ms=pool.refunds_due_ms,
        account_room=room,
        hold_until_ms=hold,
        held_ms=held_ms,
        answer_ms=answer_ms,
    )
