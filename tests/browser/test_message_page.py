"""The message page's Send now / Pause / Resume / Cancel buttons, pressed in Chromium."""

import re

import pytest
from django.urls import reverse
from playwright.sync_api import Page, expect

from sending.models import Message, Recipient
from tests.factories import MessageFactory, RecipientFactory


def message_with_recipients(status=Message.Status.DRAFT, n=3) -> Message:
    message = MessageFactory(subject="Welcome to the new term", status=status)
    RecipientFactory.create_batch(n, message=message)
    return message


def open_message(page: Page, message: Message) -> None:
    """Opens the message's page and checks that every form of the served markup is a form in the
    browser (a <form> nested in another is dropped by the parser, and a button meant for it then
    submits nowhere) and that every action button belongs to an action form."""
    response = page.goto(reverse("admin:sending_message_change", args=[message.pk]))
    assert response.ok
    served = len(re.findall(r"<form[\s>]", response.text()))
    assert page.evaluate("document.forms.length") == served, "a form of the markup was dropped"
    for button in page.locator(".message-send-actions button").all():
        action = button.evaluate("b => b.form && b.form.getAttribute('action')")
        assert action and "/action/" in action, f"{button.inner_text()!r} submits no action form"


def buttons(page: Page) -> list[str]:
    return page.locator(".message-send-actions button").all_inner_texts()


def status(page: Page):
    return page.locator(".field-status .readonly")


def flash(page: Page, level: str = "success"):
    return page.locator(f".messagelist .{level}")


def test_support_presses_send_now_and_the_send_starts(
    browse, support_user, conductor_kicks, screenshot
):
    message = message_with_recipients()
    with browse(support_user) as page:
        open_message(page, message)
        assert buttons(page) == ["Send now", "Cancel send"]
        expect(status(page)).to_have_text("Draft")

        page.get_by_role("button", name="Send now").click()

        # First what will happen: recipients, the rate they will really get, when it is done.
        confirmation = page.locator("#content-main")
        expect(confirmation).to_contain_text("3 will be sent this message.")
        expect(confirmation).to_contain_text("600 a minute (the customer's send limit)")
        expect(confirmation).to_contain_text("about 1 s from when the send starts")
        screenshot(page, "send-now-confirmation")
        page.get_by_role("button", name="Yes, send now").click()

        expect(flash(page)).to_have_text(f"Sending started: message {message.pk}.")
        expect(status(page)).to_have_text("Sending")
        recipients = page.locator(".message-recipients")
        expect(recipients).to_contain_text("0 of 3 finished")
        expect(recipients).to_contain_text("Queued: 3")
        # Support may cancel a running send; pausing it is an operator's call.
        assert buttons(page) == ["Cancel send"]
        # Nothing is left to edit once the send started: Close, not Save.
        expect(page.get_by_role("button", name="Save")).to_have_count(0)
        expect(page.get_by_role("link", name="Close")).to_be_visible()
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert message.started_at is not None
    assert conductor_kicks() == [message.customer_id]


def test_an_operator_pauses_and_resumes_a_send(browse, operator_user, conductor_kicks):
    message = message_with_recipients(Message.Status.SENDING)
    with browse(operator_user) as page:
        open_message(page, message)
        assert buttons(page) == ["Pause"]

        page.get_by_role("button", name="Pause").click()

        expect(flash(page)).to_have_text(f"Paused: message {message.pk}.")
        expect(status(page)).to_have_text("Paused")
        assert buttons(page) == ["Resume"]

        page.get_by_role("button", name="Resume").click()

        expect(flash(page)).to_have_text(f"Resumed: message {message.pk}.")
        expect(status(page)).to_have_text("Sending")
        assert buttons(page) == ["Pause"]
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert conductor_kicks() == [message.customer_id]  # resuming wakes the conductor


def test_support_cancels_a_paused_send_and_its_recipients(browse, support_user, screenshot):
    message = message_with_recipients(Message.Status.PAUSED)
    with browse(support_user) as page:
        open_message(page, message)
        assert buttons(page) == ["Cancel send"]

        page.get_by_role("button", name="Cancel send").click()

        expect(page.locator("#content-main")).to_contain_text(
            "3 recipients not yet sent will be cancelled."
        )
        screenshot(page, "cancel-confirmation")
        page.get_by_role("button", name="Yes, cancel").click()

        expect(flash(page)).to_have_text(f"Cancelled: message {message.pk}.")
        expect(status(page)).to_have_text("Cancelled")
        recipients = page.locator(".message-recipients")
        expect(recipients).to_contain_text("3 of 3 finished")
        expect(recipients).to_contain_text("Cancelled: 3")
        assert buttons(page) == []
    message.refresh_from_db()
    assert message.status == Message.Status.CANCELLED
    assert set(message.recipients.values_list("status", flat=True)) == {Recipient.Status.CANCELLED}


@pytest.mark.parametrize(
    "who, shown",
    [
        ("support_user", {"draft": ["Send now", "Cancel send"], "sending": ["Cancel send"]}),
        ("operator_user", {"draft": [], "sending": ["Pause"]}),
        ("superuser", {"draft": ["Send now", "Cancel send"], "sending": ["Pause", "Cancel send"]}),
    ],
)
def test_each_user_sees_only_the_buttons_they_may_press(browse, request, who, shown):
    user = request.getfixturevalue(who)
    messages = {
        "draft": message_with_recipients(),
        "sending": message_with_recipients(Message.Status.SENDING),
    }
    seen = {}
    with browse(user) as page:
        for status_name, message in messages.items():
            open_message(page, message)
            seen[status_name] = buttons(page)
    assert seen == shown


def test_a_refused_action_says_why_and_changes_nothing(browse, support_user, conductor_kicks):
    message = MessageFactory(subject="Nobody to send to")
    with browse(support_user) as page:
        open_message(page, message)

        page.get_by_role("button", name="Send now").click()

        expect(page.locator(".errornote")).to_have_text(
            "Cannot start: It has no recipients to send to."
        )
        expect(page.get_by_role("button", name="Yes, send now")).to_have_count(0)
        page.get_by_role("link", name="Take me back").click()
        expect(status(page)).to_have_text("Draft")
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT
    assert conductor_kicks() == []


def test_enter_in_a_field_saves_the_draft_and_never_sends_it(browse, support_user, conductor_kicks):
    """The action buttons sit among the change form's fieldsets: Enter must still mean Save."""
    message = message_with_recipients()
    with browse(support_user) as page:
        open_message(page, message)
        subject = page.get_by_role("textbox", name="Subject")
        subject.fill("Welcome back")

        subject.press("Enter")

        expect(flash(page)).to_contain_text("was changed successfully")
    message.refresh_from_db()
    assert message.subject == "Welcome back"
    assert message.status == Message.Status.DRAFT
    assert conductor_kicks() == []
