"""The conductor's steps, one at a time, and the send services."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from customers.models import Customer, ProviderAccount, SendLimit
from sending import checkin, conductor, live, scheduling, services, tasks
from sending.clock import Clock
from sending.models import ConductorLease, Lease, Message, Recipient, Worker
from tests.factories import T0, WINDOW_MS, call, make_message


class RecordingRuntime:
    """Stands in for Lambda: records invocations instead of starting anything."""

    name = "local"

    def __init__(self):
        self.invoked = []

    def invoke(self, *, api_url, token, worker_id):
        self.invoked.append(worker_id)
        return f"req-{worker_id}"


@pytest.fixture
def customer(db):
    account = ProviderAccount.objects.create(name="Sandbox", per_minute_cap=100_000)
    customer = Customer.objects.create(
        name="Tick U", slug="tick-u", default_from_email="a@tick.edu", provider_account=account
    )
    SendLimit.objects.create(customer=customer, per_minute=6000, batch_size=100, max_workers=3)
    return customer


def test_one_conductor_per_customer_and_takeover_after_expiry(customer):
    assert conductor.acquire_lease(customer_id=customer.pk, holder="a", clock=Clock(T0))
    assert not conductor.acquire_lease(customer_id=customer.pk, holder="b", clock=Clock(T0 + 1000))
    assert conductor.acquire_lease(customer_id=customer.pk, holder="a", clock=Clock(T0 + 4000))
    # a stops renewing: once its lease (5 s) has passed, b takes over
    assert not conductor.acquire_lease(customer_id=customer.pk, holder="b", clock=Clock(T0 + 8999))
    assert conductor.acquire_lease(customer_id=customer.pk, holder="b", clock=Clock(T0 + 9001))
    assert ConductorLease.objects.get(customer=customer).holder == "b"
    conductor.release_lease(customer_id=customer.pk, holder="a")  # not a's any more: no effect
    assert ConductorLease.objects.get(customer=customer).holder == "b"
    conductor.release_lease(customer_id=customer.pk, holder="b")
    assert conductor.acquire_lease(customer_id=customer.pk, holder="c", clock=Clock(T0 + 9002))


def test_watchdog_finds_customers_sending_without_a_live_conductor(customer):
    make_message(customer, 10)
    assert conductor.customers_needing_a_conductor(clock=Clock(T0)) == [customer.pk]
    conductor.acquire_lease(customer_id=customer.pk, holder="a", clock=Clock(T0))
    assert conductor.customers_needing_a_conductor(clock=Clock(T0 + 1000)) == []
    assert conductor.customers_needing_a_conductor(clock=Clock(T0 + 6000)) == [customer.pk]


def test_tick_starts_workers_up_to_what_is_needed_and_max_workers(
    customer, django_capture_on_commit_callbacks
):
    make_message(customer, 5000)
    # One call in flight per worker: at the assumed 100 ms a send, 5,000 need many workers.
    SendLimit.objects.filter(customer=customer).update(concurrency=1)
    runtime = RecordingRuntime()
    with django_capture_on_commit_callbacks(execute=True):
        report = conductor.tick(customer_id=customer.pk, clock=Clock(T0), runtime=runtime)
    assert report.sending
    assert len(report.started) == 3  # max_workers
    assert runtime.invoked == report.started
    assert Worker.objects.filter(state="starting").count() == 3
    with django_capture_on_commit_callbacks(execute=True):
        again = conductor.tick(customer_id=customer.pk, clock=Clock(T0 + 500), runtime=runtime)
    assert again.started == []


def test_tick_starts_nobody_when_paused_or_the_minute_is_spent(customer):
    make_message(customer, 5000)
    runtime = RecordingRuntime()
    SendLimit.objects.filter(customer=customer).update(paused=True)
    assert conductor.tick(customer_id=customer.pk, clock=Clock(T0), runtime=runtime).started == []
    SendLimit.objects.filter(customer=customer).update(paused=False, per_minute=100)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    assert len(first["batch"]["recipients"]) == 100  # the whole minute is granted
    Worker.objects.filter(pk=worker.pk).update(state="stopped")
    assert (
        conductor.tick(customer_id=customer.pk, clock=Clock(T0 + 10), runtime=runtime).started == []
    )
    # …but close to the next minute a worker is started so it is warm when the window opens
    near_end = T0 - 1_500 + WINDOW_MS - 2_000
    assert (
        len(conductor.tick(customer_id=customer.pk, clock=Clock(near_end), runtime=runtime).started)
        == 1
    )


def test_tick_completes_messages_with_nothing_left(customer):
    message = make_message(customer, 2)
    Recipient.objects.filter(message=message).update(status="sent")
    report = conductor.tick(customer_id=customer.pk, clock=Clock(T0), runtime=RecordingRuntime())
    assert report.completed == [message.pk]
    message.refresh_from_db()
    assert message.status == "completed" and message.completed_at is not None
    assert not report.sending


def test_tick_marks_silent_workers_lost(customer):
    make_message(customer, 10)
    worker, _ = checkin.worker_start(customer_id=customer.pk)
    Worker.objects.filter(pk=worker.pk).update(started_at=timezone.now() - timedelta(minutes=5))
    conductor.tick(customer_id=customer.pk, runtime=RecordingRuntime())
    worker.refresh_from_db()
    assert worker.state == "lost"


def test_tick_records_a_live_sample_and_publishes_it_after_commit_when_watched(
    customer, django_capture_on_commit_callbacks
):
    make_message(customer, 10)
    live.mark_watched(customer.pk)
    with django_capture_on_commit_callbacks() as callbacks:
        report = conductor.tick(
            customer_id=customer.pk, clock=Clock(T0), runtime=RecordingRuntime()
        )
    # The invocation of the one worker needed and the sample wait for the commit.
    assert len(callbacks) == 2
    assert report.sample["limits"]["per_minute"] == 6000
    (message,) = report.sample["messages"]
    assert message["total"] == 10 and message["done"] == 0
    assert report.sample["eta_s"] == 1  # 10 at 6000 a minute


# --- services ----------------------------------------------------------------------------------


def _draft(customer, n=3):
    message = Message.objects.create(customer=customer, subject="Hi", text_body="Hello")
    Recipient.objects.bulk_create(
        Recipient(message=message, email=f"d{i}@tick.edu") for i in range(n)
    )
    return message


def _staff(*perms):
    user = User.objects.create_user(f"staff-{'-'.join(perms) or 'none'}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=perms))
    return User.objects.get(pk=user.pk)


def test_start_and_resume_enqueue_a_conductor_tick_after_commit(
    customer, django_capture_on_commit_callbacks, enqueued_tasks
):
    message = _draft(customer)
    with pytest.raises(PermissionDenied):
        services.message_start(message_id=message.pk, user=_staff())
    with django_capture_on_commit_callbacks() as callbacks:
        services.message_start(message_id=message.pk, user=_staff("start_message"))
        assert enqueued_tasks.take() == []  # nothing before the commit
    for callback in callbacks:
        callback()
    message.refresh_from_db()
    assert message.status == "sending" and message.started_at
    tick = ("sending.tasks.conduct", [customer.pk])
    assert enqueued_tasks.take() == [tick]
    # The name it is enqueued by is the task's.
    assert tasks.conduct.name == tick[0]

    services.message_pause(message_id=message.pk)
    with django_capture_on_commit_callbacks(execute=True):
        services.message_resume(message_id=message.pk)
    assert enqueued_tasks.take() == [tick]


def test_start_refuses_a_message_without_recipients_or_account(customer):
    empty = _draft(customer, n=0)
    with pytest.raises(ValidationError, match="no recipients"):
        services.message_start(message_id=empty.pk)
    Customer.objects.filter(pk=customer.pk).update(provider_account=None)
    with pytest.raises(ValidationError, match="no provider account"):
        services.message_start(message_id=_draft(customer).pk)


def test_pause_stops_new_grants_at_once_and_resume_restarts(customer):
    message = make_message(customer, 50)
    services.message_pause(message_id=message.pk)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    assert call(worker, token, 1)["decision"] == "stop"
    services.message_resume(message_id=message.pk)
    other, token = checkin.worker_start(customer_id=customer.pk)
    assert call(other, token, 1)["decision"] == "send"
    with pytest.raises(ValidationError, match="cannot resume"):
        services.message_resume(message_id=message.pk)


def test_cancel_cancels_queued_recipients_and_leftovers_from_workers(customer):
    message = make_message(customer, 150)
    worker, token = checkin.worker_start(customer_id=customer.pk)
    first = call(worker, token, 1)
    assert services.message_cancel(message_id=message.pk) == 50  # 100 are out with the worker
    ids = [r["id"] for r in first["batch"]["recipients"]]
    report = {
        "lease_id": first["batch"]["lease_id"],
        "elapsed_ms": 10,
        "results": [
            {"id": ids[0], "status": "sent", "provider_id": "p", "done_ms": 5},
            *({"id": i, "status": "not_started"} for i in ids[1:]),
        ],
    }
    call(worker, first["token"], 2, report, at=T0 + 100)
    conductor.tick(customer_id=customer.pk, clock=Clock(T0 + 200), runtime=RecordingRuntime())
    statuses = set(Recipient.objects.filter(message=message).values_list("status", flat=True))
    assert statuses == {"sent", "cancelled"}
    assert Recipient.objects.filter(message=message, status="sent").count() == 1
    assert not Lease.objects.filter(state="open").exists()


def test_due_scheduled_messages_start(customer):
    message = _draft(customer)
    later = timezone.now() + timedelta(minutes=5)
    services.message_schedule(message_id=message.pk, at=later)
    assert scheduling.start_due_messages(now=later - timedelta(seconds=1)) == []
    assert scheduling.start_due_messages(now=later) == [message.pk]
    message.refresh_from_db()
    assert message.status == "sending"
