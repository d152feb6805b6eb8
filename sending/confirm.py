"""What Send now, Cancel and Retry unknown will do, said before they do it (the confirmation
pages).

Counts here are per message and run once per page view, when a person asks; the rate and the
ETA come from the planner, the same function the live pages and the scheduler use.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Q

from . import live, planner
from .models import Message, Recipient


@dataclass(frozen=True)
class SendPlan:
    message: Message
    recipients: int  # queued: what will be sent
    ahead: int  # queued in the customer's messages already sending (served first)
    sharing: int  # other customers sending through the same provider account now
    plan: planner.Plan
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


def send_plan(message: Message) -> SendPlan:
    customer = message.customer
    limit = customer.send_limit
    account = customer.provider_account
    sending = list(
        Message.objects.filter(customer=customer, status=Message.Status.SENDING)
        .exclude(pk=message.pk)
        .values_list("pk", flat=True)
    )
    queued = _queued([message.pk, *sending])
    recipients = queued.get(message.pk, 0)
    ahead = sum(n for pk, n in queued.items() if pk != message.pk)
    sharing = 0
    if account is not None:
        sharing = (
            Message.objects.filter(
                customer__provider_account=account, status=Message.Status.SENDING
            )
            .exclude(customer=customer)
            .values("customer")
            .distinct()
            .count()
        )
    recent = (live.last_samples([customer.pk]).get(customer.pk) or {}).get("rate_per_s")
    plan = planner.eta(
        remaining=recipients,
        ahead=ahead,
        per_minute=limit.per_minute,
        account_cap=account.per_minute_cap if account else None,
        paused=limit.paused,
        recent_per_s=recent if ahead else None,
        recent_seconds=planner.RECENT_MIN_SECONDS if recent and ahead else 0,
        window_s=settings.SEND_WINDOW_MS / 1000,
    )
    problems = []
    if not customer.is_active:
        problems.append(f"{customer} is not active.")
    if account is None:
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
        problems=tuple(problems),
    )


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
