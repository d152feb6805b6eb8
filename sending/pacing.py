"""The pacing core: how much a customer's workers may send in a calendar minute, and when.

Pure Python: no Django, no I/O, no clock reads; time comes in as integer epoch ms and the ledger
from the caller's rows, so every function is deterministic. `decide` grants a batch, a wait or a
stop; `settle`, `settle_abandoned` and `apply_settlement` move budget between minutes;
`workers_needed` sizes the pool. docs/pacing.md holds the budget rules, the assumptions (A1-A6)
and the argument that no minute goes over the cap. One concept, kept in one module (a little over
400 lines): decide and settle share the terms the argument is made in. What refusals teach (a
wider start guard, a back-off, a lower cap for a minute) and a shared account's split are in
`sending.throttle`; they reach `decide` as `Limits.learned_guard_ms`, `hold_until_ms` and
`account_room`, which only ever delay a start or lower a budget.
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
# conductor may start a replacement. Plus how long the server held the grant's request before
# deciding (LeaseTerms.from_grant): its report may wait as long.
OVERDUE_SLACK_MS: Final = 1_500
# A worker declares about this much of sending per progress report (A6; see progress_chunk).
CHUNK_MS: Final = 1_000
# ... and never more than this share of the per-minute cap (see chunk_limit) ...
CHUNK_CAP_SHARE: Final = 0.004
# ... but, from 120/min, at least two sends (see chunk_limit).
CHUNK_MIN_SENDS: Final = 2
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
    # Start guard widening learned from refusals at the minute's edge (sending/throttle.py):
    # starts are held until guard_ms + learned_guard_ms into the minute. Only ever later.
    learned_guard_ms: int = 0

    def __post_init__(self) -> None:
        if self.per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        if self.batch_size < 1 or self.max_workers < 1 or self.concurrency < 1:
            raise ValueError("batch_size, max_workers and concurrency must be >= 1")
        if self.guard_ms < 0 or 2 * self.guard_ms >= self.window_ms:
            raise ValueError("guard_ms must be >= 0 and leave a window: 2 * guard_ms < window_ms")
        if self.spill_hold_ms < 0 or self.spill_hold_ms + self.guard_ms > self.window_ms:
            raise ValueError("spill_hold_ms + guard_ms must not exceed window_ms")
        if self.learned_guard_ms < 0 or 2 * self.guard_ms + self.learned_guard_ms >= (
            self.window_ms
        ):
            raise ValueError("learned_guard_ms must be >= 0 and leave a window")


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
    account_room: int | None = None,
    hold_until_ms: int | None = None,
    held_ms: int = 0,
    answer_ms: int = 0,
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

    ``account_room``: the most the customer's provider account lets it be granted now
    (`throttle.account_room`; None: the account has no other customer and no lower estimate).
    ``hold_until_ms``: a back-off after a refusal (`throttle.judge`): no grant starts before it.
    ``held_ms``: how long the server held this check-in before deciding. A grant's window is
    that much longer (never past the minute's window): the worker announces its first chunk
    and waits for the answer before it starts anything (A6), and a server that held this
    request will hold that one about as long. Without it, a busy server's grants close before
    their workers can start: nothing is sent, so no rate is measured and the next windows are
    as short, while the check-ins that gave their batches back keep the server busy.
    ``answer_ms``: how long the worker measures its provider takes to answer a send. A grant's
    start window ends that much before the minute's window (at most ``spill_hold_ms`` before):
    a send answered after the window's end is charged to the next minute as well (`settle`), so
    starting it costs the next minute one send; not starting it costs nothing, it goes out when
    the next window opens. It only moves the window's end earlier, so the safety argument is
    unchanged.
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
    opens_at = start + limits.guard_ms + limits.learned_guard_ms
    closes_at = end - limits.guard_ms
    until_next_minute = Wait(end - now_ms)

    if now_ms >= closes_at:
        # Trailing guard band: come back at the boundary; the grant made in the leading guard band
        # then tells the worker to start exactly when the next window opens.
        return until_next_minute
    if hold_until_ms is not None and hold_until_ms > now_ms:
        if hold_until_ms >= closes_at:
            return until_next_minute
        opens_at = max(opens_at, hold_until_ms)
        if opens_at - now_ms > limits.guard_ms:
            # Come back when the hold ends rather than holding a grant (and its recipients).
            return Wait(opens_at - now_ms)
    budget = limits.per_minute - ledger.charged - max(open_spill, 0)
    if account_room is not None:
        budget = min(budget, account_room)
    if budget <= 0:
        if refunds_due_ms is not None:
            back_at = max(refunds_due_ms, now_ms) + RECLAIM_SLACK_MS
            if back_at < closes_at:
                return Wait(back_at - now_ms)
        return until_next_minute

    starts_at = max(now_ms, opens_at)
    # The last start whose answer comes back inside the window, by the worker's measure.
    last_start = closes_at - min(max(answer_ms, 0), limits.spill_hold_ms)
    rate = _rate_or_default(worker.rate_per_s, limits)
    fits = math.floor(rate * (last_start - starts_at) / 1000 * FIT_FACTOR)
    size = min(limits.batch_size, budget, backlog, fits)
    if size < 1:
        return until_next_minute
    needs_ms = math.ceil(size / rate * 1000 * STOP_FACTOR) + STOP_SLACK_MS
    stops_at = min(last_start, starts_at + needs_ms + max(held_ms, 0))
    return Grant(
        size=size,
        start_in_ms=starts_at - now_ms,
        stop_starting_in_ms=stops_at - now_ms,
        minute_ends_in_ms=end - now_ms,
        minute_start_ms=start,
    )


@dataclass(frozen=True, slots=True)
class LeaseTerms:
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
    def from_grant(cls, grant: Grant, limits: Limits, *, held_ms: int = 0) -> LeaseTerms:
        """`held_ms`: how long the server held the grant's request before deciding. A busy
        server holds the worker's report about as long, so the lease falls overdue that much
        later: otherwise a live worker's report, queued behind others, would find its lease
        reclaimed and the worker presumed lost, and the replacement would add to the queue.
        Only `overdue_in_ms` moves; the window and everything the safety argument uses stay."""
        last_arrival_in = grant.stop_starting_in_ms + limits.guard_ms + limits.spill_hold_ms
        return cls(
            minute_start_ms=grant.minute_start_ms,
            size=grant.size,
            minute_ends_in_ms=grant.minute_ends_in_ms,
            guard_ms=limits.guard_ms,
            stop_starting_in_ms=grant.stop_starting_in_ms,
            expires_in_ms=last_arrival_in,
            overdue_in_ms=grant.stop_starting_in_ms + OVERDUE_SLACK_MS + max(held_ms, 0),
            may_cross=last_arrival_in > grant.minute_ends_in_ms,
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """What a worker's report for one lease counts.

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


def settle(*, terms: LeaseTerms, tally: Tally) -> Settlement:
    """Turn what a worker's report counts into ledger changes.

    Recipients the tally does not account for (counts summing to less than the lease), and sent
    or failed sends without a ``done_ms``, are treated as started and possibly crossed — if the
    lease may cross at all: a lease whose last possible arrival is inside its minute
    (``may_cross`` false) charges nothing to the next one, whatever is in doubt, as
    ``settle_abandoned`` already reasons. A tally accounting for more than the lease is an error.
    """
    counts = (tally.sent, tally.failed, tally.not_started, tally.throttled)
    if min(counts) < 0:
        raise ValueError("report counts must be >= 0")
    unknown = terms.size - sum(counts)
    if unknown < 0:
        raise ValueError(f"report accounts for {sum(counts)} recipients, lease has {terms.size}")
    started = tally.sent + tally.failed
    if len(tally.done_ms) > started:
        raise ValueError("more done_ms than sent + failed sends")
    last_safe = terms.minute_ends_in_ms - terms.guard_ms
    crossed = sum(1 for done in tally.done_ms if done > last_safe)
    if terms.may_cross:
        crossed += started - len(tally.done_ms) + unknown
    return Settlement(
        refund=tally.not_started + tally.throttled,
        crossed=crossed,
        sent=tally.sent,
        failed=tally.failed,
        throttled=tally.throttled,
        unknown=unknown,
    )


def settle_abandoned(*, terms: LeaseTerms, started_through: int) -> Settlement:
    """Settle a lease whose worker is presumed lost, given the progress mark recorded for it.

    ``started_through`` must be the lease's mark read in the transaction that closes the lease
    (A6). Recipients past it were never started: refunded to the lease's own minute (and back to
    the queue). Those up to it are in doubt: ``unknown``, still charged to the lease's minute
    and, if the lease ``may_cross``, charged to the next minute as ``crossed``. Safe to call at
    any time (step 5 of the safety argument); call it once the lease is overdue, at the latest
    when it expires.
    """
    if not 0 <= started_through <= terms.size:
        raise ValueError(f"started_through {started_through} is outside 0..{terms.size}")
    return Settlement(
        refund=terms.size - started_through,
        crossed=started_through if terms.may_cross else 0,
        unknown=started_through,
    )


def settle_expired(*, terms: LeaseTerms, started_through: int | None = None) -> Settlement:
    """An expired, unreported lease: ``settle_abandoned`` with its recorded progress mark.

    ``started_through=None`` means no mark is known (a caller that does not record progress):
    the whole lease is in doubt, nothing is refunded, and all of it is charged to the next minute
    if it may have crossed. For the next minute this is budget-neutral: its open spill becomes
    carried_in.
    """
    return settle_abandoned(
        terms=terms, started_through=terms.size if started_through is None else started_through
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
    crash costs a minute under 1% of its cap, wherever two sends are less than that (from
    300/min).

    Below 500/min that share is under two sends, and a worker waits for each report's answer
    before it starts what the report declared, so with one-send chunks it starts at most one send
    per round trip: at 120/min a round trip over half a second (a busy server) keeps a single
    worker below the cap in every minute (`bench.fleet`, docs/benchmarks.md). So a chunk is at
    least ``CHUNK_MIN_SENDS`` wherever that is no more than a second of the cap (from 120/min):
    a crash then costs a minute at most three sends (2.5% of 120/min, 1% at 300/min), against a
    cap missed in every minute by a few hundred milliseconds of round trip.
    """
    floor = CHUNK_MIN_SENDS if per_minute >= 60 * CHUNK_MIN_SENDS else 1
    return max(floor, math.floor(per_minute * CHUNK_CAP_SHARE))


def open_spill(leases: Iterable[LeaseTerms]) -> int:
    """The ``open_spill`` for ``decide``, given the still-open leases of the previous minute."""
    return sum(terms.size for terms in leases if terms.may_cross)


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
