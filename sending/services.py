"""Starting, pausing, resuming and cancelling sends, and retrying the ones in doubt.

Each action is atomic, checks the acting user's custom permission (sending.start_message, …),
records who did it in the message's admin history, and kicks the customer's conductor only after
commit.
"""

import logging
from datetime import datetime

from celery import current_app
from django.conf import settings
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, transaction
from django.utils import timezone

from . import alerts, queue
from .models import Message, Recipient

log = logging.getLogger(__name__)

CONDUCT_TASK = "sending.tasks.conduct"


def _check(user, perm: str) -> None:
    if user is not None and not user.has_perm(f"sending.{perm}"):
        raise PermissionDenied(f"You do not have permission to {perm.replace('_', ' ')}.")


def _locked(message_id: int) -> Message:
    # The message's row only (`of`): locking the joined customer too would block every check-in
    # of the customer at its foreign-key checks while a cancel's long UPDATE runs, and a check-in
    # holding claimed rows there deadlocks with the cancel waiting for those rows.
    return (
        Message.objects.select_for_update(of=("self",))
        .select_related("customer")
        .get(pk=message_id)
    )


def _transition(message: Message, *, to: str, allowed: tuple[str, ...], verb: str) -> None:
    if message.status not in allowed:
        raise ValidationError(
            f"“{message}” is {message.get_status_display().lower()}: cannot {verb}."
        )
    message.status = to


def _record(message: Message, user, text: str) -> None:
    log.info(
        "message %s: %s by %s",
        message.pk,
        text,
        user or "the system",
        extra={"message_id": message.pk, "customer_id": message.customer_id},
    )
    if user is not None:
        LogEntry.objects.log_actions(
            user_id=user.pk,
            queryset=[message],
            action_flag=CHANGE,
            change_message=text,
            single_object=True,
        )


def _kick(customer_id: int) -> None:
    """Enqueue a conductor tick for the customer once the transaction commits.

    By the task's name: this layer does not import the task adapters (sending/tasks.py).
    """
    transaction.on_commit(lambda: current_app.send_task(CONDUCT_TASK, args=(customer_id,)))


def _check_sendable(message: Message) -> None:
    customer = message.customer
    if not customer.is_active:
        raise ValidationError(f"{customer} is not active.")
    if customer.provider_account_id is None:
        raise ValidationError(f"{customer} has no provider account to send through.")
    if not message.recipients.filter(status=Recipient.Status.QUEUED).exists():
        raise ValidationError(f"“{message}” has no recipients to send to. Import some first.")


def start_due(*, message_ids: list[int], now: datetime, scheduled_at=None) -> list[int]:
    """The scheduler's start of many messages at once (one statement): every one of
    `message_ids` still scheduled, due by `now` (and, when given, still scheduled for exactly
    `scheduled_at`) and sendable (an active customer with a provider account, queued recipients)
    goes to sending, started at `now`; each customer's conductor is kicked once. Returns the ids
    started. Those left out are the caller's to try one by one (`message_start`), which says why
    one cannot start. A hundred messages due at 09:00 started one transaction each took seconds
    (bench.schedule)."""
    if not message_ids:
        return []
    from customers.models import Customer

    table, customers = Message._meta.db_table, Customer._meta.db_table
    marks = ", ".join(["%s"] * len(message_ids))
    adapt = connection.ops.adapt_datetimefield_value
    exact = "" if scheduled_at is None else " AND m.scheduled_at = %s"
    sql = f"""
        UPDATE {table} SET status = %s, started_at = %s, start_problem = '', updated_at = %s
        WHERE id IN (
            SELECT m.id FROM {table} m JOIN {customers} c ON c.id = m.customer_id
            WHERE m.id IN ({marks}) AND m.status = %s AND m.scheduled_at <= %s{exact}
              AND c.is_active AND c.provider_account_id IS NOT NULL
              AND EXISTS (SELECT 1 FROM {Recipient._meta.db_table} r
                          WHERE r.message_id = m.id AND r.status = %s)
        ) AND status = %s
        RETURNING id, customer_id
    """  # noqa: S608 - table names and placeholders only
    params = [Message.Status.SENDING.value, adapt(now), adapt(now), *message_ids]
    params += [Message.Status.SCHEDULED.value, adapt(now)]
    params += [] if scheduled_at is None else [adapt(scheduled_at)]
    params += [Recipient.Status.QUEUED.value, Message.Status.SCHEDULED.value]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        started = sorted(cursor.fetchall())
        for customer_id in sorted({c for _, c in started}):
            _kick(customer_id)
    for message_id, customer_id in started:
        log.info(
            "message %s: Started sending (scheduled) by the system",
            message_id,
            extra={"message_id": message_id, "customer_id": customer_id},
        )
    return [message_id for message_id, _ in started]


@transaction.atomic
def message_start(*, message_id: int, user=None, now: datetime | None = None) -> Message:
    """Send now (or, for the scheduler, at the scheduled time): draft/scheduled → sending."""
    _check(user, "start_message")
    message = _locked(message_id)
    _check_sendable(message)
    _transition(
        message,
        to=Message.Status.SENDING,
        allowed=(Message.Status.DRAFT, Message.Status.SCHEDULED),
        verb="start it",
    )
    message.started_at = now or timezone.now()
    message.start_problem = ""
    message.save(update_fields=["status", "started_at", "start_problem", "updated_at"])
    _record(message, user, "Started sending")
    _kick(message.customer_id)
    return message


@transaction.atomic
def message_schedule(*, message_id: int, at: datetime, user=None) -> Message:
    _check(user, "start_message")
    message = _locked(message_id)
    if at <= timezone.now():
        raise ValidationError("Pick a time in the future, or use Send now.")
    _check_sendable(message)
    _transition(
        message,
        to=Message.Status.SCHEDULED,
        allowed=(Message.Status.DRAFT, Message.Status.SCHEDULED),
        verb="schedule it",
    )
    message.scheduled_at = at
    message.start_problem = ""
    message.save(update_fields=["status", "scheduled_at", "start_problem", "updated_at"])
    _record(message, user, f"Scheduled for {at.isoformat()}")
    return message


@transaction.atomic
def message_unschedule(*, message_id: int, user=None) -> Message:
    """Scheduled → draft: it will not start by itself."""
    _check(user, "start_message")
    message = _locked(message_id)
    _transition(
        message,
        to=Message.Status.DRAFT,
        allowed=(Message.Status.SCHEDULED,),
        verb="unschedule it",
    )
    message.scheduled_at = None
    message.save(update_fields=["status", "scheduled_at", "updated_at"])
    _record(message, user, "Unscheduled")
    return message


@transaction.atomic
def message_pause(*, message_id: int, user=None) -> Message:
    """Stop new grants for this message at once; batches already out finish and are recorded."""
    _check(user, "pause_message")
    message = _locked(message_id)
    _transition(
        message, to=Message.Status.PAUSED, allowed=(Message.Status.SENDING,), verb="pause it"
    )
    message.save(update_fields=["status", "updated_at"])
    _record(message, user, "Paused")
    return message


@transaction.atomic
def message_halt(*, message_id: int, reason: str) -> Message:
    """The system's pause (sending.tracking: a bounce or complaint rate crossed its threshold):
    like a pause, with the reason on the message page and an alert to staff."""
    message = _locked(message_id)
    _transition(
        message, to=Message.Status.PAUSED, allowed=(Message.Status.SENDING,), verb="halt it"
    )
    message.halt_reason = reason
    message.save(update_fields=["status", "halt_reason", "updated_at"])
    _record(message, None, reason)
    alerts.raise_alert(
        kind=alerts.HALTED, customer_id=message.customer_id, message_ids=[message.pk], text=reason
    )
    return message


@transaction.atomic
def message_resume(*, message_id: int, user=None) -> Message:
    _check(user, "resume_message")
    message = _locked(message_id)
    _transition(
        message, to=Message.Status.SENDING, allowed=(Message.Status.PAUSED,), verb="resume it"
    )
    message.halt_reason = ""  # staff looked at why it halted and chose to go on
    message.save(update_fields=["status", "halt_reason", "updated_at"])
    _record(message, user, "Resumed")
    _kick(message.customer_id)
    return message


@transaction.atomic
def message_cancel(*, message_id: int, user=None) -> int:
    """Cancel a message: every queued recipient is cancelled (one statement). Recipients out with
    a worker are recorded as it reports them; any it did not start are cancelled by the conductor.
    Returns the number of recipients cancelled."""
    _check(user, "cancel_message")
    message = _locked(message_id)
    _transition(
        message,
        to=Message.Status.CANCELLED,
        allowed=(
            Message.Status.DRAFT,
            Message.Status.SCHEDULED,
            Message.Status.SENDING,
            Message.Status.PAUSED,
        ),
        verb="cancel it",
    )
    message.completed_at = timezone.now()
    message.save(update_fields=["status", "completed_at", "updated_at"])
    cancelled = queue.cancel_queued(message_ids=[message.pk])
    _record(message, user, f"Cancelled ({cancelled} recipients not sent)")
    return cancelled


@transaction.atomic
def message_retry_unknown(*, message_id: int, user=None) -> int:
    """Send again to the recipients whose send is in doubt (`unknown`), on a person's explicit
    word: each of them may already have the email and get it twice (the confirmation page says
    how many). Never done automatically. A completed message goes back to sending. Returns how
    many recipients were queued again."""
    _check(user, "start_message")
    message = _locked(message_id)
    allowed = (Message.Status.SENDING, Message.Status.PAUSED, Message.Status.COMPLETED)
    if message.status not in allowed:
        raise ValidationError(
            f"“{message}” is {message.get_status_display().lower()}: cannot retry its unknown "
            "recipients."
        )
    requeued = queue.requeue_unknown(message_id=message.pk)
    if not requeued:
        raise ValidationError(f"“{message}” has no unknown recipients.")
    if message.status == Message.Status.COMPLETED:
        message.status, message.completed_at = Message.Status.SENDING, None
        message.save(update_fields=["status", "completed_at", "updated_at"])
    _record(
        message,
        user,
        f"Retried {requeued} unknown recipients (each may get the email twice)",
    )
    _kick(message.customer_id)
    return requeued


def retryable_failures(message_id: int):
    """Recipients that failed only because their temporary failures used up every attempt (a
    permanent refusal on an earlier attempt has fewer attempts and is not retried)."""
    return Recipient.objects.filter(
        message_id=message_id,
        status=Recipient.Status.FAILED,
        attempts__gte=settings.SEND_MAX_ATTEMPTS,
    )


@transaction.atomic
def message_retry_failed(*, message_id: int, user=None) -> int:
    """Queue again, with fresh attempts, the recipients whose temporary failures ran out of
    attempts (one statement). A completed message is sending again; a paused one sends them
    once resumed. Returns how many were queued."""
    _check(user, "start_message")
    message = _locked(message_id)
    if message.status not in (
        Message.Status.SENDING,
        Message.Status.PAUSED,
        Message.Status.COMPLETED,
    ):
        raise ValidationError(
            f"“{message}” is {message.get_status_display().lower()}: "
            "cannot retry its failed recipients."
        )
    requeued = retryable_failures(message.pk).update(status=Recipient.Status.QUEUED, attempts=0)
    if not requeued:
        raise ValidationError(f"“{message}” has no failed recipients to retry.")
    # Claims look past the cursor first: start it again so these are found at once.
    message.claim_after = 0
    fields = ["claim_after", "updated_at"]
    if message.status == Message.Status.COMPLETED:
        message.status = Message.Status.SENDING
        message.completed_at = None
        fields += ["status", "completed_at"]
    message.save(update_fields=fields)
    _record(message, user, f"Retrying {requeued} failed recipients")
    if message.status == Message.Status.SENDING:
        _kick(message.customer_id)
    return requeued
