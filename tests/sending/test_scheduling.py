"""Scheduling: wall-clock times in the customer's zone across DST, the watchdog's starts and
hand-overs, failed starts, unscheduling, and retrying failed recipients (services, real DB)."""

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from sending import scheduling, services
from sending.models import Message, Recipient
from tests.factories import CustomerFactory, MessageFactory, RecipientFactory, make_message

CHICAGO = ZoneInfo("America/Chicago")

pytestmark = pytest.mark.django_db


def test_a_wall_clock_time_is_converted_with_the_offset_of_its_own_day():
    # 2026-03-08: US clocks spring forward at 02:00 (CST -6 -> CDT -5).
    before = scheduling.local_to_utc(date(2026, 3, 7), time(9, 0), CHICAGO)
    after = scheduling.local_to_utc(date(2026, 3, 8), time(9, 0), CHICAGO)
    assert before == datetime(2026, 3, 7, 15, 0, tzinfo=UTC)
    assert after == datetime(2026, 3, 8, 14, 0, tzinfo=UTC)
    # ... and back on 2026-11-01 (CDT -> CST).
    assert scheduling.local_to_utc(date(2026, 11, 1), time(9, 0), CHICAGO) == datetime(
        2026, 11, 1, 15, 0, tzinfo=UTC
    )


def test_a_time_the_clocks_skip_is_refused():
    with pytest.raises(ValidationError, match="does not exist in America/Chicago"):
        scheduling.local_to_utc(date(2026, 3, 8), time(2, 30), CHICAGO)


def test_a_time_that_happens_twice_is_the_first_and_says_which():
    first = scheduling.local_to_utc(date(2026, 11, 1), time(1, 30), CHICAGO)
    assert first == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # 01:30 CDT, not CST
    now = datetime(2026, 10, 31, 12, 0, tzinfo=UTC)
    assert scheduling.wall_clock(first, CHICAGO, now=now) == "Sun 01:30 America/Chicago (CDT)"


def test_the_message_page_sentence():
    customer = CustomerFactory(time_zone="America/Chicago")
    at = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)  # Tue 09:00 CDT
    message = MessageFactory(customer=customer, status="scheduled", scheduled_at=at)
    now = at - timedelta(hours=2, minutes=13)
    assert scheduling.describe_start(message, now=now) == (
        "starts Tue 09:00 America/Chicago (in 2 h 13 min)"
    )
    far = at - timedelta(days=9)
    assert scheduling.describe_start(message, now=far) == (
        "starts Tue 10 Mar 2026 09:00 America/Chicago (in 9 d 0 h)"
    )


def _schedulable(customer=None, n=3):
    customer = customer or CustomerFactory(time_zone="America/Chicago")
    message = MessageFactory(customer=customer)
    for i in range(n):
        RecipientFactory(message=message, email=f"r{i}@x.edu")
    return message


def test_a_send_scheduled_across_the_dst_change_starts_at_its_wall_clock_time(enqueued_tasks):
    message = _schedulable()
    # Scheduled on Saturday (CST) for Sunday 09:00, after the clocks moved: 14:00 UTC.
    at = scheduling.local_to_utc(date(2099, 3, 8), time(9, 0), CHICAGO)
    services.message_schedule(message_id=message.pk, at=at)
    assert scheduling.start_due_messages(now=at - timedelta(hours=1)) == []  # 09:00 CST
    assert scheduling.start_due_messages(now=at) == [message.pk]
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert message.started_at == at


def test_due_messages_start_together_one_kick_a_customer_and_the_rest_say_why(
    enqueued_tasks, django_capture_on_commit_callbacks
):
    first, second, closed = (CustomerFactory(time_zone="America/Chicago") for _ in range(3))
    ready = [_schedulable(first) for _ in range(3)] + [_schedulable(second) for _ in range(2)]
    blocked = _schedulable(closed)
    at = timezone.now() + timedelta(minutes=1)
    for message in [*ready, blocked]:
        services.message_schedule(message_id=message.pk, at=at)
    closed.is_active = False
    closed.save()
    enqueued_tasks.purge()

    with django_capture_on_commit_callbacks(execute=True):
        assert scheduling.start_due_messages(now=at) == sorted(m.pk for m in ready)

    # One statement started them all at their time; each customer's conductor kicked once.
    started = Message.objects.filter(pk__in=[m.pk for m in ready])
    assert set(started.values_list("status", "started_at")) == {(Message.Status.SENDING, at)}
    assert sorted(enqueued_tasks.take()) == [
        ("sending.tasks.conduct", [first.pk]),
        ("sending.tasks.conduct", [second.pk]),
    ]
    # The one that cannot start went the slow way: back to draft, saying why.
    blocked.refresh_from_db()
    assert blocked.status == Message.Status.DRAFT
    assert "is not active" in blocked.start_problem
    # A second run finds nothing more to start.
    assert scheduling.start_due_messages(now=at) == []


def test_the_watchdog_hands_over_what_is_due_before_its_next_run(settings, enqueued_tasks):
    settings.WATCHDOG_S = 2
    settings.SCHEDULE_HANDOVER = True
    soon, later = _schedulable(), _schedulable()
    now = timezone.now()
    services.message_schedule(message_id=soon.pk, at=now + timedelta(seconds=1.5))
    services.message_schedule(message_id=later.pk, at=now + timedelta(seconds=30))
    enqueued_tasks.purge()
    assert scheduling.start_due_messages(now=now) == []
    soon.refresh_from_db()
    assert enqueued_tasks.take() == [
        ("sending.tasks.start_scheduled", [[soon.pk], soon.scheduled_at.isoformat()])
    ]
    # The task starts it at its time, and only once.
    assert not scheduling.start_scheduled(
        soon.pk, expected_at=soon.scheduled_at.isoformat(), now=now
    )
    assert scheduling.start_scheduled(
        soon.pk, expected_at=soon.scheduled_at.isoformat(), now=soon.scheduled_at
    )
    assert not scheduling.start_scheduled(
        soon.pk, expected_at=soon.scheduled_at.isoformat(), now=soon.scheduled_at
    )


def test_a_handed_over_start_of_a_rescheduled_message_does_nothing(enqueued_tasks):
    message = _schedulable()
    first = timezone.now() + timedelta(seconds=2)
    services.message_schedule(message_id=message.pk, at=first)
    services.message_schedule(message_id=message.pk, at=first + timedelta(hours=1))
    assert not scheduling.start_scheduled(message.pk, expected_at=first.isoformat(), now=first)
    message.refresh_from_db()
    assert message.status == Message.Status.SCHEDULED


def test_a_start_that_fails_goes_back_to_draft_and_says_why(enqueued_tasks):
    message = _schedulable()
    at = timezone.now() + timedelta(minutes=1)
    services.message_schedule(message_id=message.pk, at=at)
    message.customer.is_active = False
    message.customer.save()
    assert scheduling.start_due_messages(now=at) == []
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT
    assert message.scheduled_at is None
    assert "could not start" in message.start_problem
    assert "is not active" in message.start_problem
    # Scheduling it again clears the problem.
    message.customer.is_active = True
    message.customer.save()
    services.message_schedule(message_id=message.pk, at=at + timedelta(minutes=1))
    message.refresh_from_db()
    assert message.start_problem == ""


def test_unschedule_makes_a_draft_and_only_of_a_scheduled_message():
    message = _schedulable()
    with pytest.raises(ValidationError, match="cannot unschedule"):
        services.message_unschedule(message_id=message.pk)
    services.message_schedule(message_id=message.pk, at=timezone.now() + timedelta(hours=1))
    services.message_unschedule(message_id=message.pk)
    message.refresh_from_db()
    assert (message.status, message.scheduled_at) == (Message.Status.DRAFT, None)
    assert scheduling.start_due_messages(now=timezone.now() + timedelta(hours=2)) == []


def test_a_late_start_is_measured_from_the_schedule():
    at = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)
    message = Message(scheduled_at=at, started_at=at + timedelta(seconds=95))
    assert scheduling.lateness(message) == 95
    assert scheduling.lateness(Message(scheduled_at=None, started_at=at)) is None


def test_retry_failed_requeues_only_temporary_failures_that_ran_out(
    settings, enqueued_tasks, django_capture_on_commit_callbacks
):
    settings.SEND_MAX_ATTEMPTS = 3
    customer = CustomerFactory()
    message = make_message(customer, 4)
    rows = list(Recipient.objects.filter(message=message).order_by("id"))
    Recipient.objects.filter(pk=rows[0].pk).update(status="failed", attempts=3, last_error="503")
    Recipient.objects.filter(pk=rows[1].pk).update(status="failed", attempts=1, last_error="550")
    Recipient.objects.filter(pk=rows[2].pk).update(status="sent", attempts=1)
    Recipient.objects.filter(pk=rows[3].pk).update(status="sent", attempts=1)
    Message.objects.filter(pk=message.pk).update(status="completed", claim_after=rows[3].pk)
    enqueued_tasks.purge()
    with django_capture_on_commit_callbacks(execute=True):
        assert services.message_retry_failed(message_id=message.pk) == 1
    message.refresh_from_db()
    assert (message.status, message.completed_at, message.claim_after) == ("sending", None, 0)
    got = dict(Recipient.objects.filter(message=message).values_list("pk", "status"))
    assert got == {
        rows[0].pk: "queued",
        rows[1].pk: "failed",
        rows[2].pk: "sent",
        rows[3].pk: "sent",
    }
    assert Recipient.objects.get(pk=rows[0].pk).attempts == 0
    assert enqueued_tasks.take() == [("sending.tasks.conduct", [customer.pk])]
    with pytest.raises(ValidationError, match="no failed recipients"):
        services.message_retry_failed(message_id=message.pk)


def test_retry_failed_refuses_a_cancelled_message():
    message = make_message(CustomerFactory(), 1)
    Recipient.objects.filter(message=message).update(status="failed", attempts=5)
    Message.objects.filter(pk=message.pk).update(status="cancelled")
    with pytest.raises(ValidationError, match="cannot retry"):
        services.message_retry_failed(message_id=message.pk)
    assert Recipient.objects.get(message=message).status == "failed"


def test_a_handed_over_start_that_fires_early_waits_for_its_time(enqueued_tasks):
    message = _schedulable()
    at = timezone.now() + timedelta(seconds=1.5)
    services.message_schedule(message_id=message.pk, at=at)
    assert scheduling.start_handed_over([message.pk], at.isoformat()) == [message.pk]
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert message.started_at >= at
