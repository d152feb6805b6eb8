"""Test sends through a real sandbox provider, charged to the customer's minute (PostgreSQL)."""

import pytest
from django.core.exceptions import ValidationError

from sending import testsend
from sending.clock import Clock, datetime_to_ms, ms_to_datetime
from sending.models import CustomerMinute, Message, Recipient, TestSend
from tests.factories import RecipientFactory, sandbox_customer


@pytest.fixture
def message(sandbox, postgres, fast_minutes):
    customer = sandbox_customer(sandbox, per_minute=10)
    message = Message.objects.create(
        customer=customer, subject="Hello {{ first_name }}", text_body="Hi {{ first_name }}"
    )
    RecipientFactory(message=message, email="ada@x.edu", merge_data={"first_name": "Ada"})
    RecipientFactory(message=message, email="bo@x.edu", merge_data={"first_name": "Bo"})
    return message


def test_a_test_send_goes_out_with_the_chosen_merge_data_and_is_charged(message, sandbox, settings):
    bo = Recipient.objects.get(message=message, email="bo@x.edu")
    record = testsend.send_test(
        message_id=message.pk,
        addresses=["staff@college.edu", "dean@college.edu"],
        recipient_id=bo.pk,
    )
    assert record.outcome == TestSend.Outcome.SENT, record.detail
    sends = sandbox.sends
    assert sorted(s.to for s in sends) == ["dean@college.edu", "staff@college.edu"]
    assert {s.subject for s in sends} == {"[Test] Hello Bo"}
    minute = CustomerMinute.objects.get(customer=message.customer, minute_start=record.minute_start)
    assert (minute.granted, minute.sent, minute.cap) == (2, 2, 10)
    # Each send arrived inside the minute it was charged to, before its trailing guard band.
    start = datetime_to_ms(record.minute_start)
    guard = message.customer.send_limit.guard_ms
    assert all(start <= s.arrived_ms < start + settings.SEND_WINDOW_MS - guard for s in sends)
    assert TestSend.objects.get().merge_from == bo
    # The message's recipients are untouched.
    assert set(Recipient.objects.filter(message=message).values_list("status", flat=True)) == {
        "queued"
    }


def test_a_test_send_never_pushes_a_minute_over(message, sandbox, settings):
    # Every minute of the next few is already spent by the real send.
    now = Clock.read().now_ms
    window = settings.SEND_WINDOW_MS
    for k in range(4):
        start = now - now % window + k * window
        CustomerMinute.objects.create(
            customer=message.customer, minute_start=ms_to_datetime(start), cap=10, granted=9
        )
    record = testsend.send_test(message_id=message.pk, addresses=["a@college.edu", "b@college.edu"])
    assert record.outcome == TestSend.Outcome.REFUSED
    assert "1 of 10 left" in record.detail
    assert sandbox.sends == []
    assert all(m.granted == 9 for m in CustomerMinute.objects.filter(customer=message.customer))
    # One address fits.
    record = testsend.send_test(message_id=message.pk, addresses=["a@college.edu"])
    assert record.outcome == TestSend.Outcome.SENT
    assert sorted(m.granted for m in CustomerMinute.objects.filter(customer=message.customer)) == [
        9,
        9,
        9,
        10,
    ]


def test_bad_addresses_are_refused_before_anything_happens():
    with pytest.raises(ValidationError):
        testsend.parse_addresses("staff@college.edu, not-an-address")
    with pytest.raises(ValidationError, match="At most 5"):
        testsend.parse_addresses(" ".join(f"s{i}@c.edu" for i in range(6)))
    assert testsend.parse_addresses("a@c.edu, A@c.edu\nb@c.edu") == ["a@c.edu", "b@c.edu"]


def test_a_recipient_of_another_message_is_refused(message):
    other = RecipientFactory()
    with pytest.raises(ValidationError, match="not one of this message's"):
        testsend.send_test(message_id=message.pk, addresses=["a@c.edu"], recipient_id=other.pk)
    assert not TestSend.objects.exists()
