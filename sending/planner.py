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
