"""A provider account's minute across its customers, and what refusals taught pacing (rows).

`standing` reads, in one statement, what a decision needs besides the customer's own minute: its
provider account (cap, how many customers share it) and its CustomerPacing row (learned start
guard, back-off, this minute's cap estimate). With `lock=True` a shared account's row is locked
too (FOR NO KEY UPDATE, after the customer's SendLimit lock: every check-in takes them in that
order), which serializes the grants of all the account's customers, so their combined charge
can never pass the account's cap. `room` is then what the account lets the customer be granted
(`throttle.account_room` over one set-based statement about all its customers); `learn` records
what a report's refusals teach (`throttle.judge`). docs/pacing.md holds the rules.
"""

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from django.db import connection

from customers.models import Customer, ProviderAccount, SendLimit

from . import pacing, prepared, throttle, wire
from .clock import datetime_to_ms, db_datetime, ms_to_datetime
from .models import CustomerMinute, CustomerPacing, Lease, Message, Recipient


@dataclass(frozen=True)
class Standing:
    account_id: int | None
    account_cap: int | None
    sharers: int  # customers on the account (this one included)
    learned_guard_ms: int  # as stored (not decayed)
    guard_learned_at_ms: int | None
    hold_until_ms: int | None
    estimate_minute_ms: int | None
    cap_estimate: int | None

    @property
    def shared(self) -> bool:
        return self.sharers > 1

    def guard_ms(self, now_ms: int, limits: pacing.Limits) -> int:
        """The learned start guard in force now: decayed, and never wider than the window allows."""
        widest = throttle.max_learned_guard_ms(guard_ms=limits.guard_ms, window_ms=limits.window_ms)
        decayed = throttle.decayed_guard_ms(self.learned_guard_ms, self.guard_learned_at_ms, now_ms)
        return min(widest, decayed)

    def estimate_for(self, minute_start_ms: int) -> int | None:
        return self.cap_estimate if self.estimate_minute_ms == minute_start_ms else None


def _ms(value) -> int | None:
    return None if value is None else datetime_to_ms(db_datetime(value))


def standing(customer_id: int, *, lock: bool) -> Standing:
    c, a, p = Customer._meta.db_table, ProviderAccount._meta.db_table, CustomerPacing._meta.db_table
    sql = f"""
        SELECT c.provider_account_id, a.per_minute_cap,
               (SELECT COUNT(*) FROM {c} o WHERE o.provider_account_id = c.provider_account_id),
               p.learned_guard_ms, p.guard_learned_at, p.hold_until, p.estimate_minute,
               p.cap_estimate
        FROM {c} c
        LEFT JOIN {a} a ON a.id = c.provider_account_id
        LEFT JOIN {p} p ON p.customer_id = c.id
        WHERE c.id = %s
    """  # noqa: S608 - table names only
    with prepared.cursor() as cursor:
        cursor.execute(sql, [customer_id])
        row = cursor.fetchone()
        account_id, cap, sharers, guard, guard_at, hold, est_minute, estimate = row or (None,) * 8
    standing = Standing(
        account_id=account_id,
        account_cap=cap,
        sharers=sharers or 0,
        learned_guard_ms=guard or 0,
        guard_learned_at_ms=_ms(guard_at),
        hold_until_ms=_ms(hold),
        estimate_minute_ms=_ms(est_minute),
        cap_estimate=estimate,
    )
    if lock:
        lock_account(standing)
    return standing


def lock_account(standing: Standing) -> None:
    """Lock a shared account's row until the transaction ends (after the customer's SendLimit
    lock): the grants of all its customers are then serialized. Nothing for an account of one."""
    if standing.shared and connection.vendor == "postgresql":
        # NO KEY UPDATE: customers may still be added to (FK-reference) the account meanwhile.
        with prepared.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM {ProviderAccount._meta.db_table} WHERE id = %s"  # noqa: S608
                " FOR NO KEY UPDATE",
                [standing.account_id],
            )


def members(
    *, account_id: int, minute_start: datetime, window_ms: int
) -> tuple[list[throttle.Member], int | None]:
    """Every customer of the account as its minute sees it, and the lowest cap estimate any of
    them learned for this minute (None: none), in one statement.

    Backlog is looked for past each message's claim cursor only: the claim index's entries
    behind it are claimed rows (dead until vacuum) that an EXISTS from the start would walk on
    every check-in. It is one index probe per sending message (`ORDER BY id LIMIT 1`, the claim's
    own shape): written as a join, PostgreSQL planned it as a scan of every queued recipient,
    60-130 ms a call on a shared account with 300k queued (bench.worker_api, shared).
    A customer whose only queued recipients were handed back behind its cursor (the last of a
    send) counts as without backlog: its share is then anyone's."""
    previous = minute_start - timedelta(milliseconds=window_ms)
    adapt = connection.ops.adapt_datetimefield_value
    sql = f"""
        SELECT c.id, sl.per_minute, sl.paused,
               COALESCE(m.granted - m.refunded + m.carried_in, 0),
               (SELECT COALESCE(SUM(l.size), 0) FROM {Lease._meta.db_table} l
                WHERE l.customer_id = c.id AND l.state = %s AND l.minute_start = %s
                  AND l.may_cross = %s),
               EXISTS (SELECT 1 FROM {Message._meta.db_table} msg
                       WHERE msg.customer_id = c.id AND msg.status = %s
                         AND (SELECT r.id FROM {Recipient._meta.db_table} r
                              WHERE r.message_id = msg.id AND r.status = %s
                                AND r.id > msg.claim_after
                              ORDER BY r.id LIMIT 1) IS NOT NULL),
               CASE WHEN p.estimate_minute = %s THEN p.cap_estimate END
        FROM {Customer._meta.db_table} c
        JOIN {SendLimit._meta.db_table} sl ON sl.customer_id = c.id
        LEFT JOIN {CustomerMinute._meta.db_table} m
               ON m.customer_id = c.id AND m.minute_start = %s
        LEFT JOIN {CustomerPacing._meta.db_table} p ON p.customer_id = c.id
        WHERE c.provider_account_id = %s
    """  # noqa: S608 - table names and placeholders only
    params = [
        Lease.State.OPEN.value,
        adapt(previous),
        True,
        Message.Status.SENDING.value,
        Recipient.Status.QUEUED.value,
        adapt(minute_start),
        adapt(minute_start),
        account_id,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    found = [
        throttle.Member(
            customer_id=cid,
            per_minute=per_minute,
            used=int(charged) + int(spill),
            backlogged=bool(backlog) and not paused,
        )
        for cid, per_minute, paused, charged, spill, backlog, _ in rows
    ]
    estimates = [estimate for *_, estimate in rows if estimate is not None]
    return found, min(estimates, default=None)


def room(
    *, standing: Standing, customer_id: int, minute_start: datetime, window_ms: int, used: int
) -> int | None:
    """What the account (and this minute's cap estimate) lets the customer be granted now, or
    None when nothing but its own limit applies. ``used``: its own charge plus open spill."""
    minute_ms = datetime_to_ms(minute_start)
    if standing.shared:
        found, estimate = members(
            account_id=standing.account_id, minute_start=minute_start, window_ms=window_ms
        )
        cap = min(c for c in (standing.account_cap, estimate) if c is not None)
        # The asking customer has backlog by definition: what it claimed ahead of this decision
        # is leased already, so its queue may look empty.
        found = [replace(m, backlogged=True) if m.customer_id == customer_id else m for m in found]
        return throttle.account_room(cap=cap, members=found, customer_id=customer_id)
    caps = [c for c in (standing.account_cap, standing.estimate_for(minute_ms)) if c is not None]
    return min(caps) - used if caps else None


def learn(
    *,
    customer_id: int,
    lease: Lease,
    results: tuple[wire.Result, ...],
    standing: Standing,
    limits: pacing.Limits,
    now_ms: int,
) -> throttle.Verdict | None:
    """Judge a report's refusals (after its settlement was applied) and keep the verdict."""
    granted_ms = datetime_to_ms(lease.granted_at)
    refusals = [
        throttle.Refusal(
            at_ms=now_ms if r.done_ms is None else granted_ms + r.done_ms,
            retry_after_ms=r.retry_after_ms,
        )
        for r in results
        if r.outcome is wire.Outcome.THROTTLED
    ]
    if not refusals:
        return None
    minute_ms = datetime_to_ms(lease.minute_start)
    window_ms = limits.window_ms
    previous_used, used_now, cap = _account_use(
        customer_id=customer_id, standing=standing, minute_start=lease.minute_start, limits=limits
    )
    learned = standing.guard_ms(now_ms, limits)
    verdict = throttle.judge(
        refusals=refusals,
        minute_start_ms=minute_ms,
        window_ms=window_ms,
        guard_ms=limits.guard_ms,
        learned_guard_ms=learned,
        previous_used=previous_used,
        previous_cap=cap,
        used_now=used_now,
        cap=cap,
    )
    fields = {
        "hold_until": ms_to_datetime(verdict.hold_until_ms),
        "last_refusal_at": ms_to_datetime(now_ms),
        "last_refusal": verdict.why[:500],
    }
    if verdict.kind == throttle.EDGE:
        fields.update(
            learned_guard_ms=verdict.learned_guard_ms, guard_learned_at=ms_to_datetime(now_ms)
        )
    else:
        estimate = verdict.cap_estimate
        previous = standing.estimate_for(minute_ms)
        if previous is not None:
            estimate = min(estimate, previous)
        fields.update(estimate_minute=lease.minute_start, cap_estimate=estimate)
    CustomerPacing.objects.update_or_create(customer_id=customer_id, defaults=fields)
    return verdict


def _account_use(
    *, customer_id: int, standing: Standing, minute_start: datetime, limits: pacing.Limits
) -> tuple[int, int, int]:
    """The account's charge in the minute before and in this one (open spill included: what the
    provider may have counted), and the cap in force."""
    window = limits.window_ms
    previous = minute_start - timedelta(milliseconds=window)
    if standing.shared:
        before, _ = members(account_id=standing.account_id, minute_start=previous, window_ms=window)
        now, _ = members(
            account_id=standing.account_id, minute_start=minute_start, window_ms=window
        )
        cap = standing.account_cap or limits.per_minute
        return sum(m.used for m in before), sum(m.used for m in now), cap
    cap = min(c for c in (standing.account_cap, limits.per_minute) if c is not None)
    rows = {
        datetime_to_ms(m.minute_start): m.charged
        for m in CustomerMinute.objects.filter(
            customer_id=customer_id, minute_start__in=[previous, minute_start]
        )
    }
    return rows.get(datetime_to_ms(previous), 0), rows.get(datetime_to_ms(minute_start), 0), cap
