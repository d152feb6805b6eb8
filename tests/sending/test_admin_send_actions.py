"""Send now / Pause / Resume / Cancel from the admin, checked against the custom permissions."""

import pytest
from django.urls import reverse

from sending.models import Message, Recipient
from tests.factories import MessageFactory, RecipientFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def kicked(enqueued_tasks):
    """The customers whose conductor tick was enqueued (read back from the broker)."""
    return enqueued_tasks


@pytest.fixture
def message():
    message = MessageFactory()
    RecipientFactory.create_batch(3, message=message)
    return message


def action_url(message, action):
    return reverse("admin:sending_message_action", args=[message.pk, action])


def test_support_can_send_now_from_the_change_page(
    client, message, kicked, django_capture_on_commit_callbacks
):
    client.force_login(UserFactory(groups=["Support"]))
    page = client.get(reverse("admin:sending_message_change", args=[message.pk]))
    assert action_url(message, "send") in page.content.decode()
    # The button asks first: recipients, the rate, the ETA; nothing has started yet.
    confirmation = client.post(action_url(message, "send"))
    assert confirmation.status_code == 200
    page = confirmation.content.decode()
    assert "3 will be sent this message" in page and "600 a minute" in page
    assert "about 1 s" in page
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT and kicked.take() == []
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(action_url(message, "send"), {"post": "yes"}, follow=True)
    assert response.status_code == 200
    assert "Sending started" in response.content.decode()
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert kicked.take() == [("sending.tasks.conduct", [message.customer_id])]


def test_an_operator_cannot_start_a_send_but_can_pause_and_resume(client, message):
    client.force_login(UserFactory(groups=["Operators"]))
    assert client.post(action_url(message, "send")).status_code == 403
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT
    Message.objects.filter(pk=message.pk).update(status=Message.Status.SENDING)
    client.post(action_url(message, "pause"))
    message.refresh_from_db()
    assert message.status == Message.Status.PAUSED
    client.post(action_url(message, "resume"))
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert client.post(action_url(message, "cancel")).status_code == 403


def test_a_get_changes_nothing(client, message):
    client.force_login(UserFactory(groups=["Support"]))
    assert client.get(action_url(message, "send")).status_code == 403
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT


def test_an_impossible_transition_is_reported_not_applied(client, message):
    client.force_login(UserFactory(groups=["Operators"]))
    response = client.post(action_url(message, "pause"), follow=True)
    assert "cannot pause it" in response.content.decode()
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT


def test_cancel_from_the_changelist_cancels_queued_recipients(client, message):
    client.force_login(UserFactory(groups=["Support"]))
    chosen = {"action": "cancel", "_selected_action": [message.pk]}
    confirmation = client.post(reverse("admin:sending_message_changelist"), chosen)
    assert "3 recipients not yet sent will be cancelled" in confirmation.content.decode()
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT
    response = client.post(
        reverse("admin:sending_message_changelist"), {**chosen, "post": "yes"}, follow=True
    )
    assert response.status_code == 200
    message.refresh_from_db()
    assert message.status == Message.Status.CANCELLED
    assert set(Recipient.objects.filter(message=message).values_list("status", flat=True)) == {
        "cancelled"
    }


def test_the_changelist_offers_only_the_actions_the_user_may_take(client, message):
    client.force_login(UserFactory(groups=["Operators"]))
    page = client.get(reverse("admin:sending_message_changelist")).content.decode()
    assert 'value="pause"' in page and 'value="resume"' in page
    assert 'value="send_now"' not in page and 'value="cancel"' not in page
