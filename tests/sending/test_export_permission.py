"""Exporting a delivery log is a permission of its own (sending.export_recipients, granted to
Support by customers/migrations/0005) and every export is recorded: an admin LogEntry (on the
message's history when it is one message's log) and a log line."""

import logging

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse

from tests.factories import MessageFactory, RecipientFactory, UserFactory

pytestmark = pytest.mark.django_db

RECIPIENTS = "admin:sending_recipient_changelist"
EXPORT = "admin:sending_recipient_export"


@pytest.fixture
def message():
    message = MessageFactory(subject="Open day")
    RecipientFactory(message=message, email="ada@example.edu", status="sent")
    return message


def test_support_may_export_and_the_export_is_recorded(client, message, caplog):
    user = UserFactory(username="sam", groups=["Support"])
    client.force_login(user)
    caplog.set_level(logging.INFO, logger="sending.admin.recipients")

    page = client.get(reverse(RECIPIENTS), {"message__id__exact": message.pk}).content.decode()
    assert "Export delivery log (CSV)" in page
    response = client.get(reverse(EXPORT), {"message__id__exact": message.pk})

    assert response.status_code == 200
    assert b"ada@example.edu" in b"".join(response.streaming_content)
    entry = LogEntry.objects.get()
    assert (entry.user, entry.object_id, entry.object_repr) == (user, str(message.pk), "Open day")
    assert entry.content_type.model == "message"
    assert "Exported the delivery log (CSV)" in entry.change_message
    assert f"message__id__exact={message.pk}" in entry.change_message
    assert f"delivery log exported by user {user.pk}: message {message.pk}" in caplog.text
    # It is on the message's history page.
    history = client.get(reverse("admin:sending_message_history", args=[message.pk]))
    assert "Exported the delivery log" in history.content.decode()


def test_the_action_records_how_many_were_selected(client, message):
    client.force_login(UserFactory(groups=["Support"]))
    chosen = message.recipients.get()
    response = client.post(
        reverse(RECIPIENTS),
        {"action": "export_delivery_log", "_selected_action": [chosen.pk], "index": 0},
    )
    assert response.status_code == 200 and response.streaming
    assert LogEntry.objects.get().change_message == (
        "Exported the delivery log (CSV): 1 selected recipient(s)."
    )


def test_who_may_only_view_recipients_may_not_export(client, message):
    operator = UserFactory(username="olga", groups=["Operators"])
    assert operator.has_perm("sending.view_recipient")
    client.force_login(operator)

    page = client.get(reverse(RECIPIENTS))
    assert page.status_code == 200
    assert "Export delivery log" not in page.content.decode()  # neither link nor action
    assert client.get(reverse(EXPORT)).status_code == 403
    response = client.post(
        reverse(RECIPIENTS),
        {"action": "export_delivery_log", "_selected_action": [message.recipients.get().pk]},
    )
    assert not getattr(response, "streaming", False)
    assert not LogEntry.objects.exists()
