"""The recipient queue's statements, on whichever database the suite runs on."""

import json
from datetime import UTC, datetime

import pytest

from customers.models import Customer, Suppression
from sending import queue
from sending.models import Message, Recipient


@pytest.fixture
def message(db):
    customer = Customer.objects.create(name="Queue U", slug="queue-u", default_from_email="a@q.edu")
    return Message.objects.create(customer=customer, subject="Hi", text_body="Hello")


def _recipients(message, n, start=0):
    Recipient.objects.bulk_create(
        Recipient(message=message, email=f"r{i}@example.edu", merge_data={"n": i})
        for i in range(start, start + n)
    )
    return list(
        Recipient.objects.filter(message=message).order_by("id").values_list("id", flat=True)
    )


def test_claim_leases_oldest_first_and_moves_the_cursor(message):
    ids = _recipients(message, 10)
    first = queue.claim(customer_id=message.customer_id, message_id=message.id, after_id=0, limit=4)
    assert [c.id for c in first.leased] == ids[:4]
    assert json.loads(first.leased[0].merge_json) == {"n": 0}
    assert first.last_id == ids[3]
    second = queue.claim(
        customer_id=message.customer_id, message_id=message.id, after_id=first.last_id, limit=10
    )
    assert [c.id for c in second.leased] == ids[4:]
    assert Recipient.objects.filter(status="leased").count() == 10


def test_claim_marks_suppressed_addresses_and_does_not_lease_them(message):
    ids = _recipients(message, 5)
    Suppression.objects.create(customer=message.customer, email="R2@Example.edu")
    result = queue.claim(
        customer_id=message.customer_id, message_id=message.id, after_id=0, limit=5
    )
    assert [c.id for c in result.leased] == [ids[0], ids[1], ids[3], ids[4]]
    assert result.suppressed == 1
    assert Recipient.objects.get(id=ids[2]).status == "suppressed"


def test_record_writes_every_outcome_in_one_statement(message, django_assert_num_queries):
    ids = _recipients(message, 6)
    queue.claim(customer_id=message.customer_id, message_id=message.id, after_id=0, limit=6)
    when = datetime(2026, 11, 26, 12, 0, 1, 234_000, tzinfo=UTC)
    when_ms = round(when.timestamp() * 1000)
    outcomes = [
        queue.StatusChange(
            ids[0], queue.SENT, provider_id="p-0", attempted=True, sent_at_ms=when_ms
        ),
        queue.StatusChange(ids[1], queue.FAILED, error="550 no such user", attempted=True),
        queue.StatusChange(ids[2], queue.RETRY, error="451 try later", attempted=True),
        queue.StatusChange(ids[3], queue.QUEUED, error="429 throttled"),
        queue.StatusChange(ids[4], queue.QUEUED),
        queue.StatusChange(ids[5], queue.UNKNOWN),
    ]
    with django_assert_num_queries(1):
        written = queue.record(outcomes, max_attempts=3)
    assert written == 6
    rows = {r.id: r for r in Recipient.objects.filter(message=message)}
    assert (rows[ids[0]].status, rows[ids[0]].provider_message_id) == ("sent", "p-0")
    assert rows[ids[0]].sent_at == when and rows[ids[0]].attempts == 1
    assert (rows[ids[1]].status, rows[ids[1]].last_error) == ("failed", "550 no such user")
    assert (rows[ids[2]].status, rows[ids[2]].attempts) == ("queued", 1)
    assert (rows[ids[3]].status, rows[ids[3]].attempts) == ("queued", 0)
    assert rows[ids[4]].status == "queued"
    assert rows[ids[5]].status == "unknown"


def test_record_fails_a_temporary_failure_once_attempts_are_used_up(message):
    ids = _recipients(message, 1)
    Recipient.objects.filter(id=ids[0]).update(attempts=2)
    queue.claim(customer_id=message.customer_id, message_id=message.id, after_id=0, limit=1)
    queue.record(
        [queue.StatusChange(ids[0], queue.RETRY, error="451", attempted=True)], max_attempts=3
    )
    row = Recipient.objects.get(id=ids[0])
    assert (row.status, row.attempts) == ("failed", 3)


def test_record_ignores_rows_that_are_no_longer_leased(message):
    ids = _recipients(message, 2)
    queue.claim(customer_id=message.customer_id, message_id=message.id, after_id=0, limit=2)
    Recipient.objects.filter(id=ids[1]).update(status="cancelled")
    queue.record(
        [queue.StatusChange(i, queue.SENT, provider_id="x", attempted=True) for i in ids],
        max_attempts=3,
    )
    untouched = Recipient.objects.get(id=ids[1])
    assert (untouched.status, untouched.provider_message_id, untouched.attempts) == (
        "cancelled",
        "",
        0,
    )
    assert Recipient.objects.get(id=ids[0]).status == "sent"


def test_release_returns_only_leased_rows(message):
    ids = _recipients(message, 3)
    queue.claim(customer_id=message.customer_id, message_id=message.id, after_id=0, limit=2)
    Recipient.objects.filter(id=ids[0]).update(status="sent")
    queue.release(ids, status=queue.UNKNOWN)
    statuses = dict(Recipient.objects.values_list("id", "status"))
    assert [statuses[i] for i in ids] == ["sent", "unknown", "queued"]
