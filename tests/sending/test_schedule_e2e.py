"""Scheduled sends end to end on PostgreSQL: a send scheduled a few seconds ahead starts when due
under beat with real Celery worker processes; the planner's ETA against a real local send; a
retry of recipients a failing provider used every attempt on.

Everything is real but the length of a minute (see test_faults.py for the harness)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from customers.models import SendLimit
from sending import confirm, services
from sending.models import Message, Recipient
from sending.runtimes import LocalRuntime
from tests.factories import make_message, sandbox_customer
from tests.sending import test_faults
from tests.sending.test_faults import (  # noqa: F401 - celery_workers, fault_minutes: fixtures
    assert_provider_saw_each_at_most_once,
    celery_workers,
    completed,
    drive,
    fault_minutes,
    provider_ms,
    scaled_sandbox,
    wait_until,
)


def draft_with(customer, n) -> Message:
    message = make_message(customer, n)
    Message.objects.filter(pk=message.pk).update(status=Message.Status.DRAFT, started_at=None)
    message.refresh_from_db()
    return message


@pytest.mark.usefixtures("fault_minutes")
def test_the_planners_eta_is_within_ten_percent_of_a_real_send(api_url, postgres, settings):
    settings.WORKER_API_URL = api_url
    window_s = settings.SEND_WINDOW_MS / 1000  # 4 s "minutes"
    # 12 minutes' worth: each minute's budget goes out in a burst at its start, so a send ends
    # up to a minute before the plan's steady rate says, depending on where in its first
    # minute it starts: at most 1/12 of the whole.
    cap, n = 20, 240
    sandbox = scaled_sandbox(settings, cap=cap, latency_ms=20)
    try:
        customer = sandbox_customer(sandbox, per_minute=cap, batch_size=10, concurrency=2)
        SendLimit.objects.filter(customer=customer).update(max_workers=2)
        message = draft_with(customer, n)
        plan = confirm.send_plan(message).plan
        assert plan.seconds == (n / cap - 1.5) * window_s  # bursts: see planner.in_bursts

        services.message_start(message_id=message.pk)
        message.refresh_from_db()
        runtime = LocalRuntime(mode="thread", timeout_s=60)
        drive(customer, runtime, until=completed(message), timeout_s=90, what="completion")
        last = max(Recipient.objects.filter(message=message).values_list("sent_at", flat=True))
        took = (last - message.started_at).total_seconds()
        assert abs(took - plan.seconds) <= 0.10 * plan.seconds, (took, plan.seconds)
        assert_provider_saw_each_at_most_once(message, sandbox)
    finally:
        sandbox.stop()


@pytest.mark.usefixtures("fault_minutes")
def test_recipients_a_failing_provider_used_every_attempt_on_are_retried_and_sent_once(
    api_url, postgres, settings
):
    settings.WORKER_API_URL = api_url
    settings.SEND_MAX_ATTEMPTS = 2
    n = 10
    sandbox = scaled_sandbox(settings, cap=60, latency_ms=10)
    try:
        customer = sandbox_customer(sandbox, per_minute=60, batch_size=10, concurrency=2)
        message = make_message(customer, n)
        sandbox.inject_fault(500, count=n * settings.SEND_MAX_ATTEMPTS)  # every attempt fails
        runtime = LocalRuntime(mode="thread", timeout_s=60)
        drive(customer, runtime, until=completed(message), timeout_s=60, what="completion")
        rows = Recipient.objects.filter(message=message)
        assert {(r.status, r.attempts) for r in rows} == {("failed", 2)}
        assert sandbox.sends == []

        assert services.message_retry_failed(message_id=message.pk) == n
        drive(customer, runtime, until=completed(message), timeout_s=60, what="the retry")
        assert {r.status for r in Recipient.objects.filter(message=message)} == {"sent"}
        assert len(sandbox.sends) == n
        assert_provider_saw_each_at_most_once(message, sandbox)
    finally:
        sandbox.stop()


# Last in the file: its Celery teardown leaves the producer pool closed for a while.
def test_a_scheduled_send_starts_when_due_under_beat_with_real_celery_workers(
    request, api_url, postgres, settings, monkeypatch
):
    # The database fixtures first: celery_workers gives its processes the test database's name.
    # The broker on this run's own Redis database: the shared default (13) may be another
    # run's at the same time, whose workers would take these tasks to their own database.
    monkeypatch.setattr(test_faults, "_dedicated", lambda redis_url: redis_url)
    celery = request.getfixturevalue("celery_workers")  # WATCHDOG_S=1, 4 s minutes
    cap, n = 60, 30
    sandbox = scaled_sandbox(settings, cap=cap, latency_ms=20)
    try:
        customer = sandbox_customer(sandbox, per_minute=cap, batch_size=15, concurrency=2)
        message = draft_with(customer, n)
        at = timezone.now() + timedelta(seconds=8)
        services.message_schedule(message_id=message.pk, at=at)
        celery.start("scheduler", beat=True)
        # Still waiting shortly before its time; sending from its time on.
        wait_until(lambda: timezone.now() >= at - timedelta(seconds=1), timeout_s=10)
        message.refresh_from_db()
        assert message.status == Message.Status.SCHEDULED, celery.output()
        try:
            wait_until(completed(message), timeout_s=60, every_s=0.2, what="completion")
        except AssertionError:
            message.refresh_from_db()
            print(message.status, message.started_at, message.start_problem)
            print(list(Recipient.objects.filter(message=message).values_list("status", flat=True)))
            print(celery.output())
            raise
        message.refresh_from_db()
        assert message.started_at >= at, "started before its time"
        assert not message.start_problem
        assert_provider_saw_each_at_most_once(message, sandbox)
        assert len(sandbox.sends) == n
        assert min(s.arrived_ms for s in sandbox.sends) >= provider_ms(
            settings.SEND_WINDOW_MS, at.timestamp() * 1000
        ), "mail arrived before its time"
    finally:
        sandbox.stop()
