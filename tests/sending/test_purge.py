import logging
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sending.models import Message, Recipient
from tests.factories import MessageFactory, RecipientFactory

pytestmark = pytest.mark.django_db

RETENTION_DAYS = 30


@pytest.fixture(autouse=True)
def _retention(settings):
    settings.RECIPIENT_DATA_RETENTION_DAYS = RETENTION_DAYS


def _ended(days_ago, status="completed", **fields):
    message = MessageFactory(status=status, **fields)
    when = timezone.now() - timedelta(days=days_ago)
    # updated_at is auto_now: set both through update() so the test controls them.
    Message.objects.filter(pk=message.pk).update(completed_at=when, updated_at=when)
    return message


def _purge(*args) -> str:
    out = StringIO()
    call_command("purge_personal_data", *args, stdout=out)
    return out.getvalue()


def test_purge_replaces_addresses_and_merge_data_of_old_messages_only():
    old = _ended(RETENTION_DAYS + 1)
    kept_data = {"first_name": "Ada"}
    r1 = RecipientFactory(
        message=old,
        email="Ada@Example.edu",
        merge_data=kept_data,
        status="failed",
        attempts=2,
        provider_message_id="0100-x",
        last_error="550 5.1.1 <Ada@Example.edu>: mailbox unavailable",
    )
    r2 = RecipientFactory(message=old, email="bob@example.edu", status="sent")
    recent = _ended(RETENTION_DAYS - 1)
    r3 = RecipientFactory(message=recent, email="carol@example.edu", merge_data=kept_data)
    draft = MessageFactory()
    r4 = RecipientFactory(message=draft, email="dan@example.edu", merge_data=kept_data)

    out = _purge()

    r1.refresh_from_db()
    assert r1.email == f"{r1.pk}@purged.invalid"
    assert r1.merge_data == {}
    assert r1.last_error == "550 5.1.1 <[purged address]>: mailbox unavailable"
    # What the delivery log counts stays.
    assert (r1.status, r1.attempts, r1.provider_message_id) == ("failed", 2, "0100-x")
    r2.refresh_from_db()
    assert r2.email == f"{r2.pk}@purged.invalid"
    old.refresh_from_db()
    assert old.purged_at is not None

    for untouched in (r3, r4):
        email = untouched.email
        untouched.refresh_from_db()
        assert (untouched.email, untouched.merge_data) == (email, kept_data)
    recent.refresh_from_db()
    assert recent.purged_at is None
    assert "Purged 2 recipients of 1 messages" in out


def test_purge_covers_cancelled_messages_even_without_a_completion_time():
    cancelled = _ended(RETENTION_DAYS + 5, status="cancelled")
    Message.objects.filter(pk=cancelled.pk).update(completed_at=None)
    recipient = RecipientFactory(message=cancelled, status="cancelled")
    _purge()
    recipient.refresh_from_db()
    assert recipient.email.endswith("@purged.invalid")


def test_purge_is_idempotent():
    old = _ended(RETENTION_DAYS + 1)
    RecipientFactory.create_batch(3, message=old)
    _purge()
    old.refresh_from_db()
    purged_at = old.purged_at
    emails = sorted(Recipient.objects.values_list("email", flat=True))

    out = _purge()
    assert "Purged 0 recipients of 0 messages" in out
    old.refresh_from_db()
    assert old.purged_at == purged_at
    assert sorted(Recipient.objects.values_list("email", flat=True)) == emails


def test_dry_run_reports_and_changes_nothing():
    old = _ended(RETENTION_DAYS + 1)
    RecipientFactory.create_batch(4, message=old)
    out = _purge("--dry-run")
    assert f"Would purge message {old.pk} (4 recipients)" in out
    assert "Would purge 4 recipients of 1 messages" in out
    old.refresh_from_db()
    assert old.purged_at is None
    assert not Recipient.objects.filter(email__endswith="@purged.invalid").exists()


def test_purge_is_one_update_per_message_whatever_the_recipients():
    for _ in range(2):
        RecipientFactory.create_batch(20, message=_ended(RETENTION_DAYS + 1))
    with CaptureQueriesContext(connection) as captured:
        _purge()
    recipient_updates = [q for q in captured if q["sql"].startswith('UPDATE "sending_recipient"')]
    assert len(recipient_updates) == 2


def test_purge_is_logged(caplog):
    old = _ended(RETENTION_DAYS + 1)
    RecipientFactory(message=old)
    with caplog.at_level(logging.INFO, logger="sending.management.commands.purge_personal_data"):
        _purge()
    assert f"Purged the personal data of 1 recipients of message {old.pk}" in caplog.text
