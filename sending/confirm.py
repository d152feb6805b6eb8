"""What Send now, Schedule, Cancel and Retry unknown will do, said before they do it (the
confirmation and scheduling pages).

Counts here are per message and run once per page view, when a person asks. The plan comes from
the planner (sending/planner.py): the send and every send it competes with (the customer's
others, and those of the customers sharing its provider account, running or scheduled) on one
timeline, each customer at the rate it will really get (its limit, the account's cap, its
max_workers times the rate its last workers measured), the account's cap shared between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from . import planner
from .models import Message, Recipient, Worker

# The planner's per-worker rate: the mean of what this many of the customer's last workers
# measured.
RATE_SAMPLE = 10


@dataclass(frozen=True)
class SendPlan:
    message: Message
    recipients: int  # queued: what will be sent
    ahead: int  # queued in the customer's messages sending before it (served first)
    sharing: int  # other customers sending through the same provider account meanwhile
    plan: planner.Plan  # its rate, and how long from its start to its last recipient
    starts_at: datetime
    finishes_at: datetime | None
    overlaps: tuple[str, ...]  # sends it competes with, and what that costs either of them
    problems: tuple[str, ...]


@dataclass(frozen=True)
class CancelPlan:
    message: Message
    cancelled: int  # queued now: cancelled at once
    out: int  # with workers now: recorded as they report; any they did not start is cancelled
    finished: int


def _queued(message_ids) -> dict[int, int]:
    rows = (
        Recipient.objects.filter(message_id__in=list(message_ids), status=Recipient.Status.QUEUED)
        .values("message_id")
        .annotate(n=Count("*"))
    )
    return {row["message_id"]: row["n"] for row in rows}


def per_worker_rate(customer_id: int) -> float | None:
    """The mean send rate (per second) its last workers measured, None before any did."""
    rates = list(
        Worker.objects.filter(customer_id=customer_id, rate_per_s__isnull=False)
        .order_by("-id")
        .values_list("rate_per_s", flat=True)[:RATE_SAMPLE]
    )
    return sum(rates) / len(rates) if rates else None


def _customer_rate(customer, window_s: float) -> tuple[int, str]:
    limit = customer.send_limit
    account = customer.provider_account
    return planner.customer_per_minute(
        per_minute=limit.per_minute,
        account_cap=account.per_minute_cap if account else None,
        max_workers=limit.max_workers,
        worker_per_s=per_worker_rate(customer.pk),
        window_s=window_s,
        paused=limit.paused,
    )


def _competing(message: Message) -> list[Message]:
    """The sends that share this one's customer or provider account, running or scheduled."""
    customer = message.customer
    same = Q(customer=customer)
    if customer.provider_account_id is not None:
        same |= Q(customer__provider_account_id=customer.provider_account_id)
    return list(
        Message.objects.filter(same, status__in=(Message.Status.SENDING, Message.Status.SCHEDULED))
        .exclude(pk=message.pk)
        .select_related("customer__send_limit", "customer__provider_account")
        .order_by("pk")
    )


def send_plan(message: Message, *, at: datetime | None = None) -> SendPlan:
    """What starting `message` now (or at `at`) will do, with every send it competes with."""
    now = timezone.now()
    starts_at = max(at or now, now)
    window_s = settings.SEND_WINDOW_MS / 1000
    customer = message.customer
    others = _competing(message)
    queued = _queued([message.pk, *(m.pk for m in others)])
    recipients = queued.get(message.pk, 0)
    rates = {customer.pk: _customer_rate(customer, window_s)}
    for other in others:
        if other.customer_id not in rates:
            rates[other.customer_id] = _customer_rate(other.customer, window_s)

    def as_send(m: Message, begins: datetime) -> planner.Send:
        return planner.Send(
            key=m.pk,
            customer=m.customer_id,
            account=m.customer.provider_account_id,
            starts_s=(begins - now).total_seconds(),
            remaining=queued.get(m.pk, 0),
            per_minute=rates[m.customer_id][0],
        )

    sends = [as_send(message, starts_at)] + [
        as_send(m, m.started_at if m.status == Message.Status.SENDING else m.scheduled_at)
        for m in others
    ]
    caps = {
        m.customer.provider_account_id: m.customer.provider_account.per_minute_cap
        for m in [message, *others]
        if m.customer.provider_account_id is not None
    }
    finishes = planner.plan_sends(sends, account_caps=caps, window_s=window_s)
    without = planner.timeline(sends[1:], account_caps=caps, window_s=window_s)
    mine = finishes[message.pk]
    per_minute, reason = rates[customer.pk]
    begins_s = sends[0].starts_s
    plan = planner.Plan(
        per_minute=per_minute,
        seconds=None
        if mine.seconds is None
        else math.ceil(planner.in_bursts(max(0.0, mine.seconds - begins_s), window_s=window_s)),
        reason=reason,
    )

    def at_s(seconds):
        return None if seconds is None else now + timedelta(seconds=seconds)

    by_pk = {m.pk: m for m in others}
    overlaps = []
    for key in mine.shared_with:
        other = by_pk[key]
        cap, whose = (
            (per_minute, f"{customer}'s limit")
            if other.customer_id == customer.pk
            else (caps[customer.provider_account_id], "the provider account's cap")
        )
        text = f"“{message}” and “{other}” ({other.customer}) share {cap:,}/min ({whose})"
        late = []
        if mine.delayed:
            late.append(_later(message, at_s(mine.seconds), at_s(mine.alone_s), customer))
        theirs, alone = finishes[key].seconds, without.get(key)
        if theirs is not None and alone is not None and theirs - alone > max(1.0, 0.01 * alone):
            late.append(_later(other, at_s(theirs), at_s(alone), customer))
        overlaps.append(f"{text}: {'; '.join(late)}." if late else f"{text}.")
    ahead = sum(
        queued.get(m.pk, 0)
        for m in others
        if m.customer_id == customer.pk and m.status == Message.Status.SENDING
    )
    sharing = len({by_pk[k].customer_id for k in mine.shared_with} - {customer.pk})
    problems = []
    if not customer.is_active:
        problems.append(f"{customer} is not active.")
    if customer.provider_account is None:
        problems.append(f"{customer} has no provider account to send through.")
    if not recipients:
        problems.append("It has no recipients to send to.")
    if message.status not in (Message.Status.DRAFT, Message.Status.SCHEDULED):
        problems.append(f"It is {message.get_status_display().lower()}.")
    return SendPlan(
        message=message,
        recipients=recipients,
        ahead=ahead,
        sharing=sharing,
        plan=plan,
        starts_at=starts_at,
        finishes_at=at_s(mine.seconds),
        overlaps=tuple(overlaps),
        problems=tuple(problems),
    )


def _later(message: Message, then: datetime | None, alone: datetime | None, customer) -> str:
    zone = customer.time_zone
    if then is None:
        return f"“{message}” does not finish (a paused customer)"
    then, alone = then.astimezone(zone), alone.astimezone(zone)
    # To the second when the minutes alone would not show the difference.
    shown = "%H:%M" if f"{then:%H:%M}" != f"{alone:%H:%M}" else "%H:%M:%S"
    return f"“{message}” finishes at {then:{shown}}, not {alone:{shown}}"


def cancel_plan(message: Message) -> CancelPlan:
    counts = Recipient.objects.filter(message=message).aggregate(
        queued=Count("pk", filter=Q(status=Recipient.Status.QUEUED)),
        leased=Count("pk", filter=Q(status=Recipient.Status.LEASED)),
        finished=Count("pk", filter=Q(status__in=Recipient.TERMINAL_STATUSES)),
    )
    return CancelPlan(
        message=message,
        cancelled=counts["queued"],
        out=counts["leased"],
        finished=counts["finished"],
    )


@dataclass(frozen=True)
class RetryUnknownPlan:
    message: Message
    unknown: int  # queued again: each may already have the email (a possible duplicate)
    problems: tuple[str, ...]


def retry_unknown_plan(message: Message) -> RetryUnknownPlan:
    unknown = Recipient.objects.filter(message=message, status=Recipient.Status.UNKNOWN).count()
    problems = []
    if message.status not in (
        Message.Status.SENDING,
        Message.Status.PAUSED,
        Message.Status.COMPLETED,
    ):
        problems.append(f"It is {message.get_status_display().lower()}.")
    if not unknown:
        problems.append("It has no unknown recipients.")
    return RetryUnknownPlan(message=message, unknown=unknown, problems=tuple(problems))
