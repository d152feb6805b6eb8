"""The pacing core: how much a customer's workers may send, and when.

Pure Python: no Django, no I/O, no clock reads. Time is passed in as integer epoch milliseconds
read by the caller (the worker API reads it once per check-in, inside its transaction), and the
ledger values come from DB rows. Every function here is deterministic.

Calendar minutes
----------------
A "minute" is ``Limits.window_ms`` long (60 000 in production; tests use short windows) and is
aligned to the epoch: ``minute_start = now_ms - now_ms % window_ms``. The *window* of a minute is
the part in which workers may START sends: the minute shrunk by ``guard_ms`` at both ends,
``[minute_start + guard_ms, minute_end - guard_ms]``.

Public API
----------
- ``Limits``, ``MinuteLedger``, ``WorkerView``: inputs (frozen dataclasses).
- ``decide(*, now_ms, limits, ledger, open_spill, backlog, worker, running_workers,
  refunds_due_ms=None)`` returns ``Grant``, ``Wait`` or ``Stop``.
- ``workers_needed(*, limits, backlog, rate_per_worker_per_s, headroom=START_HEADROOM)`` for the
  conductor.
- ``Lease`` (what the caller stores for a grant, ``Lease.from_grant``), ``Report`` (what the
  worker sends back), ``settle(*, lease, report)``, ``settle_abandoned(*, lease,
  started_through)`` and ``settle_expired(*, lease, started_through=None)`` return a
  ``Settlement``.
- ``progress_chunk(*, rate_per_s, concurrency, per_minute=None)``: how many recipients a worker
  declares per progress report (the worker side of A6), never more than ``chunk_limit(per_minute)``
  (the most a grant lets one report declare).
- ``charge(ledger, grant)`` and ``apply_settlement(*, lease_ledger, next_ledger, settlement)``
  show exactly how the DB rows change (the API does the same with ``UPDATE ... SET x = x + n``).
- ``next_rate(old_rate, sent, elapsed_ms)``: EWMA of a worker's send rate.
- ``open_spill(leases)``: the ``open_spill`` argument from the previous minute's open leases.
- ``minute_start(now_ms, window_ms)``.

Budget
------
``used = granted - refunded + carried_in + open_spill`` and ``budget = per_minute - used``.

``open_spill`` is the number of recipients in leases granted in the PREVIOUS minute that are still
open (not yet settled) and ``may_cross`` (``open_spill(leases)`` computes it). The caller passes
it for the whole minute; ``decide`` never ignores it. (Dropping it ``spill_hold_ms`` into the
minute would be unsafe: a send that already ARRIVED in this minute still counts here, and until
its lease is settled nothing else charges it.) A lease is closed in one of two ways:

- by its worker's report (``settle``: the sends that may have crossed become ``carried_in`` of
  the next minute, the sends not started are refunded);
- by abandonment (``settle_abandoned``), when its worker is presumed lost (``Lease.overdue_in_ms``
  after the grant) or at the latest when the lease expires (``Lease.expires_in_ms``;
  ``settle_expired`` is the same settlement). The recipients past the lease's ``started_through``
  (the last progress mark the caller recorded, see A6) were certainly never started: they are
  refunded to the lease's minute at once and go back to the queue. Those up to it are in doubt:
  they stay charged to the lease's minute, become ``unknown`` (never re-sent automatically) and,
  if the lease ``may_cross``, are all charged to the next minute as ``carried_in``.

So closing a lease never lowers the charge for the next minute below what may really have
arrived there. Leases older than the previous minute cannot reach the current minute because
``spill_hold_ms`` (the per-send timeout) is less than a window (see below).

Safety argument (no calendar minute over the cap at the provider)
-----------------------------------------------------------------
Notation: server time is the clock ``now_ms`` comes from. ``d`` = one-way latency of the check-in
response (server -> worker), ``s`` = |provider clock - server clock|, ``L`` = time from a send's
start until it arrives at the provider.

Assumptions:

A1. ``d + s < guard_ms`` (production: d <= ~50 ms, s <= 100 ms, guard 250 ms).
A2. The worker measures its windows on a monotonic clock from the moment it RECEIVES the response
    (its wall clock is never used), and that clock's drift over one minute is negligible.
A3. A send that started at time t has arrived at the provider by the time its response is back
    at the worker (arrival <= done), and no send arrives later than ``spill_hold_ms`` after it
    started (the worker's per-send timeout). ``spill_hold_ms + guard_ms <= window_ms``.
A4. A send the provider throttled (429) does not count toward the provider's cap; a send
    reported ``not_started`` was never handed to the provider.
A5. The caller serialises decide/charge/settle per customer (one DB transaction holding the
    customer's minute rows locked) and charges a grant to the ledger it was decided on.
A6. Progress watermark. Before each chunk of sending (``progress_chunk``: about a second of it, at
    least ``concurrency`` sends, but never more than the grant's ``chunk_limit`` of the cap, which
    wins) the worker reports ``started_through`` = how many of the lease's recipients, in lease
    order, it may have started once that chunk is under way, and it starts NO send past that mark
    before the report is acknowledged. It has one report outstanding at a time and sends the next
    one no earlier than when the chunk before it starts, so the mark runs at most about two chunks
    ahead of its starts. (Neither bound is needed for safety, only for what a crash costs; see
    below.) The caller records the mark (monotone) only while the lease is open, atomically with
    respect to settling it (the UPDATE is conditional on the lease being open, and the settlement
    reads the mark in the same transaction that closes the lease). A progress report for a settled
    lease is refused (409) and the worker then starts nothing more of that lease (it stops). A
    report whose answer was lost is not acknowledged: the worker may retry it (recording is
    monotone, so a retry is harmless) but starts nothing past the previous mark until an answer
    comes. The first report may be sent as soon as the grant is received, before the start window
    opens.

1. Nothing granted in minute M reaches minute M-1 at the provider: the worker starts no send
   before ``now + d + start_in_ms >= minute_start + guard`` (server time), so arrival on the
   provider's clock is ``>= minute_start + guard - s > minute_start`` (A1).
2. A send granted in M with ``done_ms <= minute_ends_in_ms - guard_ms`` arrived in M: its arrival
   (server time) is ``<= now + d + done_ms`` (A2, A3), so on the provider's clock it is
   ``<= now + d + s + minute_ends_in_ms - guard < minute_end`` (A1). Every other started send is
   counted as "crossed" and charged to M+1 (``carried_in``). Until the report comes, a lease that
   ``may_cross`` is charged whole to M+1 through ``open_spill``, and if it is abandoned, all of its
   in-doubt part (up to ``started_through``) becomes ``carried_in``; the rest was never started
   and never will be (step 5). A lease that does not ``may_cross`` cannot reach M+1: its last
   start is ``<= now + d + stop_starting_in_ms`` and arrives ``<= spill_hold_ms`` later, which on
   the provider's clock is ``< now + stop_starting_in_ms + guard + spill_hold_ms <= minute_end``.
3. Nothing granted in M reaches M+2: the last start is ``<= minute_end - guard + d`` and arrival
   is at most ``spill_hold_ms`` later, so on the provider's clock it is
   ``< minute_end - guard + guard + spill_hold_ms <= minute_end + window_ms`` (A1, A3).
4. So the provider's count for M is at most (sends granted in M and started, not throttled) +
   (sends of M-1 that crossed). At any time t in M, the second term is ``<= carried_in(t) +
   open_spill(t)``: each lease of M-1 is open and may cross (charged whole), open and cannot
   cross (nothing to charge), or closed (its possible crossers charged). Refunds only ever return
   sends that were not started and never will be, or throttled sends (A4, step 5), and only to
   the lease's own minute; since ``decide`` only grants in the current minute, a refund becomes
   new budget only while its minute is current (applying it later changes no decision). Let t*
   be the last grant in M: the count is ``<= granted(t*) + size - refunded(t*) + carried_in(t*) +
   open_spill(t*) <= per_minute(t*)`` because ``decide`` only grants ``size <= budget``.
5. Refunding an abandoned lease past its watermark at once is safe, even while its minute is
   current and the refund is granted again to other workers. Let k be the ``started_through``
   read when the lease is settled. Every mark the worker has had acknowledged was recorded
   before the settlement (A6: recorded only while the lease is open, and acknowledged only after
   it was recorded), and marks are monotone, so every acknowledged mark is ``<= k``; the worker
   starts nothing past an acknowledged mark, and any later progress report is refused, after
   which it starts nothing more. So recipients ``k+1 .. size`` are never started by this lease,
   whatever happens to the worker, and may be re-leased and sent by others: each is then counted
   once, in the minute of the lease that really sends it. (Independently, the lease is
   abandoned no earlier than ``overdue_in_ms``, after its start window has closed, so the
   worker starts nothing more of it anyway, but the argument does not need this.)
   If the presumed-lost worker is in fact alive: its in-doubt sends (up to k) may still be under
   way or arrive late; they stay charged to M (not refunded) and, if the lease ``may_cross``, to
   M+1 (``crossed``), which covers both places they can arrive (steps 2 and 3). Its later report
   for the settled lease is refused (409) and it is told to stop; its results cannot move budget
   any more. The cost of a false alarm is a stopped worker and the in-doubt part charged whole.

Hence no minute goes over the cap in force at its last grant. Lowering the cap affects the next
decision (a negative budget means Wait); sends already granted are not recalled.

What a lost worker costs: only its in-doubt recipients that it never actually started; those it
did start really are sent and count at the provider. The mark runs at most about two chunks ahead
of the starts (the rest of the chunk under way and the next one, at most ``2 * chunk_limit - 1``
sends), and a chunk is at most ``chunk_limit(per_minute)``, 0.4% of the cap (one send below
500/min), so a crash costs its minute less than 1% of the cap wherever one send is less than that
(caps above 100/min), and under 0.8% from 500/min. Below 100/min one lost send is already more
than 1% of the cap (1.7% at 60/min): a crash that lands between a report and the start it
announced still takes its minute below 0.99 of the cap, and nothing on the worker's side can
prevent it (a send must be declared before it starts). A worker that dies before its first
progress report costs nothing but its slot. The refund of the recipients past the mark arrives
``overdue_in_ms`` after the grant (at the latest ``expires_in_ms``), usually while the minute is
still current. For it to be used in that minute someone must check in after it: when the budget
is used up, ``decide`` tells a worker to come back ``RECLAIM_SLACK_MS`` after the first open lease
of the minute falls due (``refunds_due_ms``), not at the minute's end, if that is still inside the
window; by then that lease was reported or reclaimed. (Without it, a minute whose budget was all
granted, with every live worker told to wait for the next minute and no replacement needed, lost
the refund: seen in the simulator at 4,500/min.)

Throttling
----------
Simple and conservative: if the requesting worker's last batch was throttled, it waits until the
next minute; if any throttle was recorded in the current minute's ledger, nobody gets a new grant
for the rest of that minute. A throttle means the provider disagrees with our count (a broken
assumption), so we stop feeding that minute instead of guessing by how much.

Worker count
------------
``workers_needed`` sizes the pool so the cap fits in ``1 / START_HEADROOM`` of the guarded window
at the measured per-worker rate. ``decide`` retires a worker (``Stop(SURPLUS)``) only when more
run than ``workers_needed(..., headroom=RETIRE_HEADROOM)``; the gap between the two headrooms is
hysteresis so that rate noise does not start and stop workers in turn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

# A worker whose rate is unknown (first check-in) is assumed to take this long per send, per
# concurrent slot. Conservative: the median provider latency is far lower.
ASSUMED_SEND_MS: Final = 100
# A grant asks for at most this fraction of what the worker's measured rate could start in the
# time left in the window; the rest of the budget goes to the next check-in (of any worker).
FIT_FACTOR: Final = 0.9
# A grant's start window ends no later than STOP_FACTOR times the time the worker's rate needs to
# start the batch, plus STOP_SLACK_MS (and never past the minute's window). A healthy worker
# starts everything well inside that; a lost one is known not to send after it, so its lease can
# expire early and, if it ends early enough, never spill into the next minute.
STOP_FACTOR: Final = 2.0
STOP_SLACK_MS: Final = 1_000
# A worker not back this long after its start window closed is presumed lost: its lease is settled
# as abandoned (recipients past its progress mark are refunded and re-queued at once) and the
# conductor may start a replacement.
OVERDUE_SLACK_MS: Final = 1_500
# A worker declares about this much of sending per progress report (A6; see progress_chunk).
CHUNK_MS: Final = 1_000
# ... and never more than this share of the per-minute cap (see chunk_limit).
CHUNK_CAP_SHARE: Final = 0.004
# A worker told to wait for budget while an open lease of the minute may still give some back
# comes back this long after that lease falls due (the conductor reclaims overdue leases every
# tick, CONDUCTOR_TICK_MS), and never sooner than this after now.
RECLAIM_SLACK_MS: Final = 750
# EWMA weight of the newest sample in next_rate.
RATE_ALPHA: Final = 0.3
START_HEADROOM: Final = 1.5
RETIRE_HEADROOM: Final = 2.0

PAUSED: Final = "paused"
DONE: Final = "done"
SURPLUS: Final = "surplus"


@dataclass(frozen=True, slots=True)
class Limits:
    per_minute: int
    batch_size: int
    max_workers: int
    concurrency: int
    guard_ms: int = 250
    window_ms: int = 60_000
    paused: bool = False
    spill_hold_ms: int = 5_000

    def __post_init__(self) -> None:
        if self.per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        if self.batch_size < 1 or self.max_workers < 1 or self.concurrency < 1:
            raise ValueError("batch_size, max_workers and concurrency must be >= 1")
        if self.guard_ms < 0 or 2 * self.guard_ms >= self.window_ms:
            raise ValueError("guard_ms must be >= 0 and leave a window: 2 * guard_ms < window_ms")
        if self.spill_hold_ms < 0 or self.spill_hold_ms + self.guard_ms > self.window_ms:
            raise ValueError("spill_hold_ms + guard_ms must not exceed window_ms")


@dataclass(frozen=True, slots=True)
class MinuteLedger:
    minute_start_ms: int
    granted: int = 0
    refunded: int = 0
    carried_in: int = 0
    sent: int = 0
    failed: int = 0
    throttled: int = 0

    @property
    def charged(self) -> int:
        """Budget used in this minute, not counting open spill from the previous minute."""
        return self.granted - self.refunded + self.carried_in


@dataclass(frozen=True, slots=True)
class WorkerView:
    rate_per_s: float | None
    throttled: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    size: int
    start_in_ms: int
    stop_starting_in_ms: int
    minute_ends_in_ms: int
    minute_start_ms: int


@dataclass(frozen=True, slots=True)
class Wait:
    ms: int


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str


Decision = Grant | Wait | Stop


def minute_start(now_ms: int, window_ms: int) -> int:
    return now_ms - now_ms % window_ms


def _rate_or_default(rate_per_s: float | None, limits: Limits) -> float:
    if rate_per_s is None or rate_per_s <= 0:
        return limits.concurrency * 1000 / ASSUMED_SEND_MS
    return rate_per_s


def workers_needed(
    *,
    limits: Limits,
    backlog: int,
    rate_per_worker_per_s: float | None,
    headroom: float = START_HEADROOM,
) -> int:
    """How many workers the customer needs now (0 when paused or nothing is queued).

    Enough that ``per_minute * headroom`` sends fit in one guarded window at the measured
    per-worker rate, no more than there are batches in the backlog, at most ``max_workers``.
    """
    if limits.paused or backlog <= 0 or limits.per_minute <= 0:
        return 0
    rate = _rate_or_default(rate_per_worker_per_s, limits)
    per_worker = rate * (limits.window_ms - 2 * limits.guard_ms) / 1000
    wanted = min(limits.per_minute, backlog) * headroom
    need = math.ceil(wanted / per_worker)
    need = min(need, math.ceil(backlog / limits.batch_size), limits.max_workers)
    return max(need, 1)


def decide(
    *,
    now_ms: int,
    limits: Limits,
    ledger: MinuteLedger,
    open_spill: int,
    backlog: int,
    worker: WorkerView,
    running_workers: int,
    refunds_due_ms: int | None = None,
) -> Decision:
    """Decide what a worker checking in at ``now_ms`` gets.

    ``ledger`` must be the current minute's row (a fresh ``MinuteLedger(minute_start)`` if none
    exists yet); ``running_workers`` counts the requesting worker too. ``refunds_due_ms``: the
    earliest time an open lease of the current minute falls due (``min(overdue_in_ms,
    expires_in_ms)`` after its grant), or None. When the budget is used up, a worker is told to
    come back ``RECLAIM_SLACK_MS`` after it rather than at the minute's end: that lease's worker
    has reported by then (what it did not start is refunded) or it is reclaimed as lost (what was
    past its mark is refunded), and someone must be checking in to use the refund while the
    minute lasts.
    """
    if limits.paused:
        return Stop(PAUSED)
    if backlog <= 0:
        return Stop(DONE)
    retire_above = workers_needed(
        limits=limits,
        backlog=backlog,
        rate_per_worker_per_s=worker.rate_per_s,
        headroom=RETIRE_HEADROOM,
    )
    if running_workers > retire_above:
        return Stop(SURPLUS)

    start = minute_start(now_ms, limits.window_ms)
    if ledger.minute_start_ms != start:
        raise ValueError(f"ledger is for minute {ledger.minute_start_ms}, now is in {start}")
    end = start + limits.window_ms
    opens_at = start + limits.guard_ms
    closes_at = end - limits.guard_ms
    until_next_minute = Wait(end - now_ms)

    if now_ms >= closes_at:
        # Trailing guard band: come back at the boundary; the grant made in the leading guard band
        # then tells the worker to start exactly when the next window opens.
        return until_next_minute
    if worker.throttled or ledger.throttled > 0:
        return until_next_minute
    budget = limits.per_minute - ledger.charged - max(open_spill, 0)
    if budget <= 0:
        if refunds_due_ms is not None:
            back_at = max(refunds_due_ms, now_ms) + RECLAIM_SLACK_MS
            if back_at < closes_at:
                return Wait(back_at - now_ms)
        return until_next_minute

    starts_at = max(now_ms, opens_at)
    rate = _rate_or_default(worker.rate_per_s, limits)
    fits = math.floor(rate * (closes_at - starts_at) / 1000 * FIT_FACTOR)
    size = min(limits.batch_size, budget, backlog, fits)
    if size < 1:
        return until_next_minute
    needs_ms = math.ceil(size / rate * 1000 * STOP_FACTOR) + STOP_SLACK_MS
    stops_at = min(closes_at, starts_at + needs_ms)
    return Grant(
        size=size,
        start_in_ms=starts_at - now_ms,
        stop_starting_in_ms=stops_at - now_ms,
        minute_ends_in_ms=end - now_ms,
        minute_start_ms=start,
    )


@dataclass(frozen=True, slots=True)
class Lease:
    """What the caller keeps for a grant until it is settled (times relative to the grant).

    ``may_cross`` is false when even the last send the worker may start arrives at the provider
    before the minute ends (``stop_starting_in_ms + spill_hold_ms + guard_ms <=
    minute_ends_in_ms``, by A1 and A3); such a lease is left out of the next minute's
    ``open_spill`` and expires without charging it. ``expires_in_ms``: after that long past the
    grant no send of the lease can still arrive, so an unreported lease may be settled as expired.
    ``overdue_in_ms``: a worker not back by then is presumed lost: the lease is settled as
    abandoned (``settle_abandoned``) and the conductor may start a replacement without waiting
    for the lease to expire. Abandon at ``min(overdue_in_ms, expires_in_ms)``: with a short send
    timeout a lease can expire before it is overdue.
    """

    minute_start_ms: int
    size: int
    minute_ends_in_ms: int
    guard_ms: int
    stop_starting_in_ms: int
    expires_in_ms: int
    overdue_in_ms: int
    may_cross: bool

    @classmethod
    def from_grant(cls, grant: Grant, limits: Limits) -> Lease:
        last_arrival_in = grant.stop_starting_in_ms + limits.guard_ms + limits.spill_hold_ms
        return cls(
            minute_start_ms=grant.minute_start_ms,
            size=grant.size,
            minute_ends_in_ms=grant.minute_ends_in_ms,
            guard_ms=limits.guard_ms,
            stop_starting_in_ms=grant.stop_starting_in_ms,
            expires_in_ms=last_arrival_in,
            overdue_in_ms=grant.stop_starting_in_ms + OVERDUE_SLACK_MS,
            may_cross=last_arrival_in > grant.minute_ends_in_ms,
        )


@dataclass(frozen=True, slots=True)
class Report:
    """A worker's report for one lease.

    ``done_ms`` holds, for each sent or failed send, when its provider response came back, in ms
    on the worker's monotonic clock since it received the grant. Throttled sends need none.
    """

    sent: int = 0
    failed: int = 0
    not_started: int = 0
    throttled: int = 0
    done_ms: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class Settlement:
    refund: int  # back to the lease's own minute
    crossed: int  # charged to the next minute as carried_in
    sent: int = 0
    failed: int = 0
    throttled: int = 0
    # Recipients the report did not account for, or in doubt in an abandoned lease: treated as
    # sent (and crossed if the lease may cross).
    unknown: int = 0


def settle(*, lease: Lease, report: Report) -> Settlement:
    """Turn a worker's report into ledger changes.

    Recipients the report does not account for (counts summing to less than the lease), and sent
    or failed sends without a ``done_ms``, are treated as started and possibly crossed. A report
    accounting for more than the lease is an error.
    """
    counts = (report.sent, report.failed, report.not_started, report.throttled)
    if min(counts) < 0:
        raise ValueError("report counts must be >= 0")
    unknown = lease.size - sum(counts)
    if unknown < 0:
        raise ValueError(f"report accounts for {sum(counts)} recipients, lease has {lease.size}")
    started = report.sent + report.failed
    if len(report.done_ms) > started:
        raise ValueError("more done_ms than sent + failed sends")
    last_safe = lease.minute_ends_in_ms - lease.guard_ms
    crossed = sum(1 for done in report.done_ms if done > last_safe)
    crossed += started - len(report.done_ms) + unknown
    return Settlement(
        refund=report.not_started + report.throttled,
        crossed=crossed,
        sent=report.sent,
        failed=report.failed,
        throttled=report.throttled,
        unknown=unknown,
    )


def settle_abandoned(*, lease: Lease, started_through: int) -> Settlement:
    """Settle a lease whose worker is presumed lost, given the progress mark recorded for it.

    ``started_through`` must be the lease's mark read in the transaction that closes the lease
    (A6). Recipients past it were never started: refunded to the lease's own minute (and back to
    the queue). Those up to it are in doubt: ``unknown``, still charged to the lease's minute
    and, if the lease ``may_cross``, charged to the next minute as ``crossed``. Safe to call at
    any time (step 5 of the safety argument); call it once the lease is overdue, at the latest
    when it expires.
    """
    if not 0 <= started_through <= lease.size:
        raise ValueError(f"started_through {started_through} is outside 0..{lease.size}")
    return Settlement(
        refund=lease.size - started_through,
        crossed=started_through if lease.may_cross else 0,
        unknown=started_through,
    )


def settle_expired(*, lease: Lease, started_through: int | None = None) -> Settlement:
    """An expired, unreported lease: ``settle_abandoned`` with its recorded progress mark.

    ``started_through=None`` means no mark is known (a caller that does not record progress):
    the whole lease is in doubt, nothing is refunded, and all of it is charged to the next minute
    if it may have crossed. For the next minute this is budget-neutral: its open spill becomes
    carried_in.
    """
    return settle_abandoned(
        lease=lease, started_through=lease.size if started_through is None else started_through
    )


def progress_chunk(
    *, rate_per_s: float | None, concurrency: int, per_minute: int | None = None
) -> int:
    """How many more recipients a worker declares in each progress report (A6).

    About ``CHUNK_MS`` of sending at its measured rate (the assumed rate while it has none), and at
    least ``concurrency`` so every slot has work while the next report is acknowledged; but never
    more than ``chunk_limit(per_minute)`` when the cap is given: what a crash between a report
    and its starts can cost a minute matters more than keeping every slot busy, so the cap's
    bound wins over the ``concurrency`` floor (at small caps a worker then reports every send or
    two). ``per_minute=None``: no cap bound (for callers that do not know the cap).
    """
    if rate_per_s is None or rate_per_s <= 0:
        rate_per_s = concurrency * 1000 / ASSUMED_SEND_MS
    chunk = max(concurrency, math.floor(rate_per_s * CHUNK_MS / 1000))
    if per_minute is not None:
        chunk = min(chunk, chunk_limit(per_minute))
    return chunk


def chunk_limit(per_minute: int) -> int:
    """The most recipients a worker may declare in one progress report, whatever its rate.

    A worker that dies between a report and the starts of its chunk leaves the unstarted rest of
    that chunk charged to its minute (A6). The worker's mark can run up to about two chunks
    ahead of its starts, so a chunk of at most ``CHUNK_CAP_SHARE`` of the cap keeps what such a
    crash costs a minute under 1% of its cap, wherever one send is less than that.
    """
    return max(1, math.floor(per_minute * CHUNK_CAP_SHARE))


def open_spill(leases: Iterable[Lease]) -> int:
    """The ``open_spill`` for ``decide``, given the still-open leases of the previous minute."""
    return sum(lease.size for lease in leases if lease.may_cross)


def charge(ledger: MinuteLedger, grant: Grant) -> MinuteLedger:
    if ledger.minute_start_ms != grant.minute_start_ms:
        raise ValueError("a grant is charged to its own minute")
    return replace(ledger, granted=ledger.granted + grant.size)


def apply_settlement(
    *, lease_ledger: MinuteLedger, next_ledger: MinuteLedger, settlement: Settlement
) -> tuple[MinuteLedger, MinuteLedger]:
    """Return the lease's minute and the next minute with the settlement applied."""
    if next_ledger.minute_start_ms <= lease_ledger.minute_start_ms:
        raise ValueError("next_ledger must be the minute after the lease's minute")
    lease_ledger = replace(
        lease_ledger,
        refunded=lease_ledger.refunded + settlement.refund,
        sent=lease_ledger.sent + settlement.sent,
        failed=lease_ledger.failed + settlement.failed,
        throttled=lease_ledger.throttled + settlement.throttled,
    )
    next_ledger = replace(next_ledger, carried_in=next_ledger.carried_in + settlement.crossed)
    return lease_ledger, next_ledger


def next_rate(old_rate: float | None, sent: int, elapsed_ms: int) -> float | None:
    """EWMA of a worker's send rate (sends per second over the time its batch was busy)."""
    if sent <= 0 or elapsed_ms <= 0:
        return old_rate
    sample = sent * 1000 / elapsed_ms
    if old_rate is None:
        return sample
    return old_rate + RATE_ALPHA * (sample - old_rate)
