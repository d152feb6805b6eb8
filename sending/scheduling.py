"""Scheduled sends: times in the customer's time zone, and starting them when they are due.

Starting stays database-driven: beat runs the watchdog every WATCHDOG_S, and the watchdog
(`start_due_messages`) starts every scheduled message whose time has come. With
SCHEDULE_HANDOVER on (the default), it also hands the
messages due before its next run to Celery with an `eta` of their scheduled time (one task per
instant, `start_handed_over`): a few seconds ahead at most, far inside Redis's visibility timeout,
and harmless if it is lost or runs twice (the next watchdog run starts what is due; a start
checks the message is still scheduled for that time). No task is ever enqueued further ahead.

A scheduled start that cannot happen (the customer deactivated, no recipients left) sends the
message back to draft with the reason in `Message.start_problem`, shown on its page: it must
not start on its own days later when the obstacle goes away.
"""

from __future__ import annotations

import logging
import time as time_module
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from . import services
from .models import Message

log = logging.getLogger(__name__)

START_TASK = "sending.tasks.start_scheduled"
# A start this much after its scheduled time is shown as late on the message page.
LATE_AFTER_S = 30
# The watchdog hands over messages due before its next run, plus this margin for beat's jitter.
HANDOVER_MARGIN_S = 1.0


# Time zones ------------------------------------------------------------------------------------


def local_to_utc(day: date, at: time, zone: ZoneInfo) -> datetime:
    """A wall-clock date and time in `zone` as an aware UTC datetime.

    A time the clocks skip (spring forward) is refused; a time that happens twice (fall back)
    is the first of the two, and `describe` shows its zone abbreviation so staff can see which.
    """
    local = datetime.combine(day, at.replace(tzinfo=None, fold=0), tzinfo=zone)
    as_utc = local.astimezone(ZoneInfo("UTC"))
    if as_utc.astimezone(zone).replace(tzinfo=None) != local.replace(tzinfo=None):
        raise ValidationError(
            f"{day:%a %d %b %Y} {at:%H:%M} does not exist in {zone.key}: the clocks skip it "
            "(daylight saving time starts). Pick another time."
        )
    return as_utc


def in_zone(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone)


def until(seconds: float) -> str:
    """A duration ahead as people read it: "45 s", "2 h 13 min", "3 d 4 h"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def wall_clock(moment: datetime, zone: ZoneInfo, *, now: datetime, full: bool = False) -> str:
    """ "Tue 09:00 America/Chicago" (with the date when it is not within the coming week, and
    the zone's abbreviation when the same wall time happens twice that night)."""
    local = moment.astimezone(zone)
    ahead = moment - now
    day = "%a" if timedelta(0) <= ahead < timedelta(days=6) and not full else "%a %d %b %Y"
    text = f"{local:{day} %H:%M} {zone.key}"
    again = local.replace(fold=1 - local.fold)
    if again.utcoffset() != local.utcoffset():
        text += f" ({local:%Z})"
    return text


def describe_start(message: Message, *, now: datetime | None = None) -> str:
    """What the message page says of a scheduled start: "starts Tue 09:00 America/Chicago
    (in 2 h 13 min)"."""
    now = now or timezone.now()
    zone = message.customer.time_zone
    when = wall_clock(message.scheduled_at, zone, now=now)
    left = (message.scheduled_at - now).total_seconds()
    if left > 0:
        return f"starts {when} (in {until(left)})"
    return f"due since {when} ({until(-left)} ago): starting"


def lateness(message: Message) -> float | None:
    """How many seconds after its scheduled time a scheduled message started (None: not a
    scheduled start, or not started)."""
    if message.scheduled_at is None or message.started_at is None:
        return None
    return (message.started_at - message.scheduled_at).total_seconds()


# Starting --------------------------------------------------------------------------------------


def start_due_messages(*, now: datetime | None = None) -> list[int]:
    """Run by the watchdog: start every scheduled message that is due, and hand those due before
    the next run to Celery for their exact time. Returns the ids started here."""
    now = now or timezone.now()
    scheduled = Message.objects.filter(status=Message.Status.SCHEDULED)
    due = list(scheduled.filter(scheduled_at__lte=now).values_list("pk", flat=True))
    started = _start_many(due, now=now)
    if not settings.SCHEDULE_HANDOVER:
        return started
    horizon = now + timedelta(seconds=settings.WATCHDOG_S + HANDOVER_MARGIN_S)
    soon = scheduled.filter(scheduled_at__gt=now, scheduled_at__lte=horizon)
    # One task per instant, not per message: a hundred messages due at 09:00 are started one
    # after the other by one task (as the watchdog itself does), not by a hundred at once.
    by_time: dict[datetime, list[int]] = {}
    for message_id, at in soon.order_by("scheduled_at", "pk").values_list("pk", "scheduled_at"):
        by_time.setdefault(at, []).append(message_id)
    for at, message_ids in by_time.items():
        current_app.send_task(START_TASK, args=(message_ids, at.isoformat()), eta=at)
    return started


def start_handed_over(message_ids: list[int], expected_at: str) -> list[int]:
    """The hand-over task's work: start these messages, due at `expected_at` (waiting for it
    if the timer fired a little early). Returns the ids started."""
    early = (datetime.fromisoformat(expected_at) - timezone.now()).total_seconds()
    if 0 < early <= settings.WATCHDOG_S + HANDOVER_MARGIN_S:
        # A timer may fire a little early (another host's clock): wait for the time itself
        # rather than leave the start to the next watchdog run.
        time_module.sleep(early)
    return _start_many(message_ids, now=timezone.now(), expected_at=expected_at)


def _start_many(message_ids: list[int], *, now: datetime, expected_at: str | None = None):
    """Start what can start in one statement (`services.start_due`); the rest one by one, which
    sends a message that cannot start back to draft with the reason. Returns the ids started."""
    at = None if expected_at is None else datetime.fromisoformat(expected_at)
    started = services.start_due(message_ids=message_ids, now=now, scheduled_at=at)
    done = set(started)
    for message_id in message_ids:
        if message_id not in done and start_scheduled(message_id, expected_at=expected_at, now=now):
            started.append(message_id)
    if done:  # the one-by-one starts say for themselves when they are late
        _warn_late(sorted(done), now=now)
    return sorted(started)


def _warn_late(message_ids: list[int], *, now: datetime) -> None:
    for message_id, customer_id, at in Message.objects.filter(pk__in=message_ids).values_list(
        "pk", "customer_id", "scheduled_at"
    ):
        late = (now - at).total_seconds() if at else None
        if late is not None and late > LATE_AFTER_S:
            log.warning(
                "scheduled message %s started %.0f s late",
                message_id,
                late,
                extra={"message_id": message_id, "customer_id": customer_id},
            )


def start_scheduled(message_id: int, *, expected_at: str | None = None, now=None) -> int | None:
    """Start a scheduled message if it is due (and still scheduled for `expected_at`, when given:
    a message rescheduled since it was handed over is left for its new time). A start that fails
    sends the message back to draft with the reason on it. Returns the customer's id if it
    started, else None."""
    now = now or timezone.now()
    with transaction.atomic():
        message = (
            Message.objects.select_for_update(of=("self",))
            .select_related("customer")
            .filter(pk=message_id, status=Message.Status.SCHEDULED)
            .first()
        )
        if message is None or message.scheduled_at > now:
            return None
        if expected_at is not None and message.scheduled_at != datetime.fromisoformat(expected_at):
            return None
        try:
            with transaction.atomic():
                services.message_start(message_id=message_id, now=now)
        except ValidationError as exc:
            reason = " ".join(exc.messages)
            zone = message.customer.time_zone
            message.status = Message.Status.DRAFT
            message.start_problem = (
                f"Scheduled for {wall_clock(message.scheduled_at, zone, now=now)}, it could not "
                f"start at {in_zone(now, zone):%H:%M:%S}: {reason} It is a draft again."
            )
            message.scheduled_at = None
            message.save(update_fields=["status", "start_problem", "scheduled_at", "updated_at"])
            log.error(
                "scheduled message %s could not start: %s",
                message_id,
                reason,
                extra={"message_id": message_id, "customer_id": message.customer_id},
            )
            return None
    late = lateness(Message(scheduled_at=message.scheduled_at, started_at=now))
    if late is not None and late > LATE_AFTER_S:
        log.warning(
            "scheduled message %s started %.0f s late",
            message_id,
            late,
            extra={"message_id": message_id, "customer_id": message.customer_id},
        )
    return message.customer_id
