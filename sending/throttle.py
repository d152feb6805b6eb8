"""What the provider's refusals teach pacing, and how a shared provider account's minute is split.

Pure Python like `sending.pacing` (no Django, no I/O, no clock reads): the caller passes times as
epoch ms and counts from its rows. docs/pacing.md ("Throttling", "Shared provider accounts") holds
the rules and why they keep the safety argument true; in short:

- `judge` tells a refusal at the minute's edge (the provider's minute has not turned yet: its
  clock is behind ours by more than the guard) from one mid-minute below our own count (someone
  else sends on the account, or its real cap is lower). The first widens the customer's start
  guard by what was learned; the second lowers the cap for the rest of that minute. Both back off
  (the provider's Retry-After when it gave one) instead of giving up the whole minute.
- `decayed_guard_ms`: a learned start guard halves every `GUARD_HALF_LIFE_MS` without refusals.
- `account_room`: how much more a shared account lets one of its customers be granted now, so
  that the account's cap holds across all of them and each customer with backlog keeps at least
  an equal share of the account's minute; what one leaves unused flows to the others.

Everything here can only delay a start or lower a budget; nothing raises one, so the no-minute-
over-the-cap argument of docs/pacing.md needs no new assumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# A refusal at most this long after the start window opened (and never more than an eighth of the
# window) is "at the minute's edge".
EDGE_MS: Final = 1_000
# The previous minute counts as full when at least this share of its cap was used.
FULL_SHARE: Final = 0.95
# A learned start guard covers the last edge refusal seen plus this margin.
GUARD_MARGIN_MS: Final = 100
# ... and never more than this (nor a quarter of the window).
MAX_LEARNED_GUARD_MS: Final = 5_000
# Without refusals, a learned start guard halves every hour.
GUARD_HALF_LIFE_MS: Final = 3_600_000
# The back-off after a refusal that gave no Retry-After.
BACKOFF_MS: Final = 1_000
# Workers come back from a back-off spread over this much (see `jitter_ms`).
JITTER_MS: Final = 200

EDGE: Final = "edge"
BELOW: Final = "below"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One send the provider refused as "too many", on the server's clock."""

    at_ms: int
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # EDGE or BELOW
    hold_until_ms: int  # the customer's workers start no new grant before this (plus jitter)
    learned_guard_ms: int  # the customer's start guard widening from now on
    cap_estimate: int | None  # BELOW: the cap for the rest of the minute
    why: str  # for the operator


def decayed_guard_ms(learned_ms: int, learned_at_ms: int | None, now_ms: int) -> int:
    """A learned start guard, halved for every `GUARD_HALF_LIFE_MS` since it was last learned."""
    if learned_ms <= 0 or learned_at_ms is None:
        return 0
    age = max(0, now_ms - learned_at_ms)
    return math.floor(learned_ms * 0.5 ** (age / GUARD_HALF_LIFE_MS))


def max_learned_guard_ms(*, guard_ms: int, window_ms: int) -> int:
    """The widest start guard pacing learns: the window must stay open (2 guards + widening)."""
    return max(0, min(MAX_LEARNED_GUARD_MS, window_ms // 4, window_ms - 2 * guard_ms - 1))


def judge(
    *,
    refusals: Sequence[Refusal],
    minute_start_ms: int,
    window_ms: int,
    guard_ms: int,
    learned_guard_ms: int,
    previous_used: int,
    previous_cap: int,
    used_now: int,
    cap: int,
) -> Verdict:
    """What a lease's refusals (all charged to the minute at `minute_start_ms`) teach.

    ``learned_guard_ms``: the customer's current (decayed) widening; ``previous_used`` /
    ``previous_cap``: the account's charge and cap in the minute before; ``used_now``: the
    account's charge in this minute once the refused sends were refunded (what the provider may
    have counted); ``cap``: the cap in force.

    EDGE when the first refusal came within `EDGE_MS` of the start window opening and the
    provider's previous minute was full: the provider still counted it in its previous minute.
    If its minute had not turned, it counted there what we charged to this minute so far as well,
    so "full" is ``previous_used + used_now`` against the previous cap (after a first minute that
    began late and sent little, the provider's previous minute fills with this one's sends).
    Its start guard widens to cover the last such refusal (the provider's minute turned no
    earlier) plus `GUARD_MARGIN_MS`, and at least doubles if a widening was already in force; its
    workers hold until the widened window opens (or the Retry-After, if later).
    BELOW otherwise: the provider has less room than our count says. The rest of the minute is
    capped at ``used_now`` (what was accepted and is in flight), and the workers hold for the
    Retry-After (or `BACKOFF_MS`). A Retry-After is honoured up to one window.
    """
    if not refusals:
        raise ValueError("judge needs at least one refusal")
    first = min(r.at_ms for r in refusals)
    # A Retry-After is honoured up to one window: a per-minute cap has turned by then.
    retry_at = max(
        (
            r.at_ms + min(r.retry_after_ms, window_ms)
            for r in refusals
            if r.retry_after_ms is not None
        ),
        default=None,
    )
    opens = minute_start_ms + guard_ms + learned_guard_ms
    edge_until = opens + min(EDGE_MS, window_ms // 8)
    full = previous_cap > 0 and previous_used + used_now >= FULL_SHARE * previous_cap
    if first <= edge_until and full:
        last = max(r.at_ms for r in refusals if r.at_ms <= edge_until)
        widest = max_learned_guard_ms(guard_ms=guard_ms, window_ms=window_ms)
        seen = last - minute_start_ms - guard_ms + GUARD_MARGIN_MS
        # Refused again although a widening was in force: the skew is more than that widening,
        # by how much the refusals cannot say (a worker stops at its first one), so at least
        # double it: repeated edges converge in a few minutes.
        learned = min(widest, max(seen, 2 * learned_guard_ms))
        hold = minute_start_ms + guard_ms + learned
        return Verdict(
            kind=EDGE,
            hold_until_ms=max(hold, retry_at or hold),
            learned_guard_ms=learned,
            cap_estimate=None,
            why=(
                f"refused {first - minute_start_ms} ms into a minute after a full one: the "
                f"provider's minute had not turned; start guard widened by {learned} ms"
            ),
        )
    estimate = max(0, min(cap, used_now))
    last_at = max(r.at_ms for r in refusals)
    return Verdict(
        kind=BELOW,
        hold_until_ms=retry_at if retry_at is not None else last_at + BACKOFF_MS,
        learned_guard_ms=learned_guard_ms,
        cap_estimate=estimate,
        why=(
            f"refused {first - minute_start_ms} ms into the minute at {used_now} of {cap}: "
            f"someone else sends on the account or its cap is lower; capped at {estimate} "
            "for the rest of the minute"
        ),
    )


def jitter_ms(worker_id: int, minute_start_ms: int) -> int:
    """A worker's spread after a back-off: 0..JITTER_MS-1, different for neighbouring workers."""
    return (worker_id * 7919 + minute_start_ms // 1000) % JITTER_MS


# --- shared provider accounts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One customer of a provider account, as the account's minute sees it."""

    customer_id: int
    per_minute: int  # its own limit
    used: int  # charged to it this minute, its open spill from the previous minute included
    backlogged: bool  # it has queued recipients of a sending message


def equal_shares(*, cap: int, members: Sequence[Member]) -> dict[int, int]:
    """Each backlogged member's share of the account's minute.

    What the members without backlog already used is set aside; the rest is split equally among
    the backlogged ones, a member never getting more than its own limit, what that leaves going
    to the others (water-filling). Shares are whole sends and sum to at most the room.
    """
    room = max(0, cap - sum(m.used for m in members if not m.backlogged))
    wanting = sorted((m for m in members if m.backlogged), key=lambda m: m.per_minute)
    shares: dict[int, int] = {}
    for index, member in enumerate(wanting):
        fair = room // (len(wanting) - index)
        shares[member.customer_id] = min(member.per_minute, fair)
        room -= shares[member.customer_id]
    return shares


def account_room(*, cap: int, members: Sequence[Member], customer_id: int) -> int:
    """How many more the account lets ``customer_id`` be granted now (may be <= 0).

    The account's cap less everything its customers used this minute, less what is still held
    for the OTHER backlogged customers: each one's equal share minus what it used. So while
    several customers have backlog, none can take another's share; once a customer has no
    backlog (or has used its share), what is left of the minute is anyone's.
    """
    shares = equal_shares(cap=cap, members=members)
    used = sum(m.used for m in members)
    held = sum(
        max(0, shares.get(m.customer_id, 0) - m.used)
        for m in members
        if m.customer_id != customer_id and m.backlogged
    )
    return cap - used - held
