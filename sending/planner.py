"""How long a send will take: one function for the live pages, the confirmation pages and the
scheduler.

Pure Python, no Django: the callers read the numbers (the send limit, the account's cap, what is
queued ahead, recent throughput) and pass them in.

Before a send starts the rate is the plan: the customer's per-minute limit, never above its
provider account's cap (the limit is validated against it, but an account lowered later wins),
and nothing while the customer is paused. Once sending, it is what was really sent lately, so a
send that runs slower than its limit (few workers, a slow provider, throttling) shows the ETA it
will really have. Messages of one customer are served oldest-started first, so a message waits
for what is queued ahead of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Recent throughput is believed once this many seconds of it are known; before, the plan.
RECENT_MIN_SECONDS = 20
# How quickly a shown ETA's rate follows a change in throughput (seconds, an EWMA's time
# constant): long enough that a one-second gap in sends does not make the ETA jump.
STEADY_TAU_S = 30.0


@dataclass(frozen=True)
class Plan:
    per_minute: int  # the rate the send will really get, per calendar minute
    seconds: float | None  # until the last recipient is sent; None: it will not progress
    reason: str = ""  # why the rate is what it is, for people (e.g. "paused", "account cap")

    @property
    def duration(self) -> str:
        return humanize(self.seconds)


def planned_per_minute(
    *, per_minute: int, account_cap: int | None, paused: bool = False
) -> tuple[int, str]:
    """The rate a customer's sends get by their limits, and what sets it."""
    if paused:
        return 0, "the customer's sending is paused"
    if account_cap is not None and account_cap < per_minute:
        return account_cap, "the provider account's cap"
    return per_minute, "the customer's send limit"


def eta(
    *,
    remaining: int,
    per_minute: int,
    account_cap: int | None = None,
    paused: bool = False,
    ahead: int = 0,
    recent_per_s: float | None = None,
    recent_seconds: float = 0,
    window_s: float = 60,
) -> Plan:
    """How long until `remaining` recipients are sent, with `ahead` queued before them.

    `recent_per_s` is the throughput measured over the last `recent_seconds` (the live
    pages' steadied rate); it replaces the plan once RECENT_MIN_SECONDS of it are known.
    `window_s` is the provider's counting window (60 s; tests shorten it).
    """
    rate, reason = planned_per_minute(per_minute=per_minute, account_cap=account_cap, paused=paused)
    per_s = rate / window_s
    if not paused and recent_per_s is not None and recent_seconds >= RECENT_MIN_SECONDS:
        per_s = min(recent_per_s, per_s) if per_s else recent_per_s
        reason = "recent throughput"
    if remaining <= 0:
        return Plan(per_minute=rate, seconds=0, reason=reason)
    if per_s <= 0:
        return Plan(per_minute=rate, seconds=None, reason=reason)
    return Plan(
        per_minute=round(per_s * window_s),
        seconds=math.ceil((ahead + remaining) / per_s),
        reason=reason,
    )


def humanize(seconds: float | None) -> str:
    """A duration as people read it: "45 s", "3 min 20 s", "2 h 5 min"."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def steady(previous: float | None, measured: float, *, dt_s: float, tau_s=STEADY_TAU_S) -> float:
    """An exponentially weighted rate: `measured` blended into `previous` over `dt_s`."""
    if previous is None:
        return measured
    weight = 1 - math.exp(-max(dt_s, 0) / tau_s)
    return previous + (measured - previous) * weight


# Several sends at once ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """One message's send, as the timeline sees it."""

    key: int  # the message's id
    customer: int
    account: int | None  # the provider account (None: the customer has none)
    starts_s: float  # seconds from now; when it started (negative) for a send already running
    remaining: int  # recipients left to send
    per_minute: int  # the most the customer gets: see customer_per_minute()


@dataclass(frozen=True)
class Finish:
    key: int
    seconds: float | None  # from now, sharing as planned; None: it will not finish
    alone_s: float | None  # from now, were it the only send of its account and customer
    shared_with: tuple[int, ...]  # the sends it shares capacity with while it runs

    @property
    def delayed(self) -> bool:
        """It finishes noticeably later than it would alone (1 % or a second)."""
        if self.seconds is None or self.alone_s is None:
            return self.seconds != self.alone_s
        return self.seconds - self.alone_s > max(1.0, 0.01 * self.alone_s)


def customer_per_minute(
    *,
    per_minute: int,
    account_cap: int | None,
    max_workers: int,
    worker_per_s: float | None,
    window_s: float = 60,
    paused: bool = False,
) -> tuple[int, str]:
    """The most one customer's sends get per window, and what sets it: its limit, the account's
    cap, or its workers (max_workers times the measured per-worker rate, when one was measured)."""
    rate, reason = planned_per_minute(per_minute=per_minute, account_cap=account_cap, paused=paused)
    if rate and worker_per_s:
        workers = math.floor(max_workers * worker_per_s * window_s)
        if workers < rate:
            return (
                workers,
                f"{max_workers} worker{'s' if max_workers != 1 else ''} at the measured rate",
            )
    return rate, reason


def _fair_shares(demands: dict[int, float], cap: float) -> dict[int, float]:
    """Max-min fair split of `cap` among demands (water-filling): nobody gets more than it asks,
    what one leaves is shared by the others."""
    shares: dict[int, float] = {}
    left = dict(demands)
    budget = cap
    while left:
        each = budget / len(left)
        small = {k: d for k, d in left.items() if d <= each}
        if not small:
            shares.update({k: each for k in left})
            break
        for k, d in small.items():
            shares[k] = d
            budget -= d
            del left[k]
    return shares


def timeline(
    sends: list[Send], *, account_caps: dict[int, int], window_s: float = 60
) -> dict[int, float | None]:
    """When each send finishes (seconds from now), all of them running as planned.

    A customer's sends are served one after the other, oldest started first; each customer
    gets at most its `per_minute`; the customers sending through one provider account share
    its cap (max-min fair: one that needs less leaves the rest to the others). Rates are
    constant between events (a send starting or finishing): the loop runs twice per send.
    """
    left = {s.key: float(s.remaining) for s in sends}
    finished: dict[int, float | None] = {s.key: None for s in sends}
    for s in sends:
        if s.remaining <= 0:
            left[s.key] = 0.0
            finished[s.key] = max(s.starts_s, 0.0)
    now = 0.0
    for _ in range(2 * len(sends) + 2):
        running = {}
        for s in sorted(sends, key=lambda s: (s.starts_s, s.key)):
            if s.starts_s <= now and left[s.key] > 0 and s.customer not in running:
                running[s.customer] = s
        rates = _rates(running, account_caps=account_caps, window_s=window_s)
        upcoming = [s.starts_s for s in sends if s.starts_s > now and left[s.key] > 0]
        steps = [left[s.key] / rates[s.key] for s in running.values() if rates[s.key] > 0]
        if upcoming:
            steps.append(min(upcoming) - now)
        if not steps:
            break
        dt = min(steps)
        for s in running.values():
            left[s.key] -= rates[s.key] * dt
            if left[s.key] <= 1e-6:
                left[s.key] = 0.0
                finished[s.key] = now + dt
        now += dt
    return finished


def _rates(running: dict[int, Send], *, account_caps: dict[int, int], window_s: float):
    rates = {}
    by_account: dict[int, dict[int, float]] = {}
    for customer, s in running.items():
        demand = s.per_minute / window_s
        if s.account is None or s.account not in account_caps:
            rates[s.key] = demand
        else:
            by_account.setdefault(s.account, {})[customer] = demand
    for account, demands in by_account.items():
        shares = _fair_shares(demands, account_caps[account] / window_s)
        for customer, share in shares.items():
            rates[running[customer].key] = share
    return rates


def plan_sends(
    sends: list[Send], *, account_caps: dict[int, int], window_s: float = 60
) -> dict[int, Finish]:
    """Each send's finish with the others, alone, and which sends it shares capacity with."""
    together = timeline(sends, account_caps=account_caps, window_s=window_s)
    plans = {}
    for s in sends:
        alone = timeline([s], account_caps=account_caps, window_s=window_s)[s.key]
        end = together[s.key]
        shared = tuple(
            o.key
            for o in sends
            if o.key != s.key
            and (o.customer == s.customer or (o.account is not None and o.account == s.account))
            and o.remaining > 0
            and o.starts_s < (end if end is not None else math.inf)
            and (together[o.key] is None or together[o.key] > max(s.starts_s, 0))
        )
        plans[s.key] = Finish(key=s.key, seconds=end, alone_s=alone, shared_with=shared)
    return plans


def in_bursts(seconds: float | None, *, window_s: float = 60) -> float | None:
    """A steady-rate duration as pacing delivers it: each minute's budget goes out in a burst at
    the minute's start, so a send of k minutes' budget ends early in its k-th minute — on
    average 1.5 minutes before the steady rate says (half a minute for where in its first minute
    it starts). Sends shorter than two minutes are left as they are."""
    if seconds is None or seconds < 2 * window_s:
        return seconds
    return seconds - 1.5 * window_s
