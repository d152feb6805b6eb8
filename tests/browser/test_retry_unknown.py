"""Recipients in doubt (`unknown`) on the message page and the list, pressed in Chromium: the
explicit Retry unknown, through a confirmation that says how many may get the email twice, and
the export of who they are."""

import csv
import io

from django.contrib.admin.models import LogEntry
from django.urls import reverse
from playwright.sync_api import expect

from sending.models import Message, Recipient
from tests.browser.test_message_list import run_action, select
from tests.browser.test_message_page import flash, open_message, status
from tests.factories import MessageFactory, RecipientFactory


def message_in_doubt(subject="Results are out", *, sent=2, unknown=3, failed=0):
    message = MessageFactory(subject=subject, status=Message.Status.COMPLETED)
    RecipientFactory.create_batch(sent, message=message, status="sent", attempts=1)
    RecipientFactory.create_batch(
        unknown, message=message, status="unknown", attempts=1, last_error="read timed out"
    )
    RecipientFactory.create_batch(failed, message=message, status="failed", attempts=3)
    return message


def test_support_retries_the_unknown_recipients_after_being_told_how_many_may_get_it_twice(
    browse, support_user, conductor_kicks, screenshot
):
    message = message_in_doubt()
    with browse(support_user) as page:
        open_message(page, message)
        doubt = page.locator(".message-unknown")
        expect(doubt).to_contain_text("3 recipients in doubt")
        screenshot(page, "message-page-with-unknown")

        doubt.get_by_role("button", name="Retry unknown…").click()

        confirmation = page.locator("#content-main")
        expect(confirmation.locator(".retry-unknown-warning")).to_contain_text(
            "Up to 3 recipients may get this email twice."
        )
        expect(confirmation).to_contain_text("3 recipients will be queued and sent again")
        screenshot(page, "retry-unknown-confirmation")
        page.get_by_role("button", name="Yes, send to them again").click()

        expect(flash(page)).to_have_text(
            f"Queued again: 3 unknown recipients of message {message.pk}."
        )
        expect(status(page)).to_have_text("Sending")
        expect(page.locator(".message-recipients")).to_contain_text("Queued: 3")
        expect(page.locator(".message-unknown")).to_have_count(0)
    message.refresh_from_db()
    assert (message.status, message.completed_at) == ("sending", None)
    counts = sorted(Recipient.objects.filter(message=message).values_list("status", flat=True))
    assert counts == ["queued"] * 3 + ["sent"] * 2
    assert conductor_kicks() == [message.customer_id]
    entry = LogEntry.objects.get(object_id=str(message.pk))
    assert entry.change_message == "Retried 3 unknown recipients (each may get the email twice)"


def test_no_changes_nothing_and_the_list_action_retries_only_what_it_can(
    browse, support_user, screenshot
):
    message = message_in_doubt("Fees reminder")
    clean = message_in_doubt("Welcome week", unknown=0)
    with browse(support_user) as page:
        open_message(page, message)
        page.get_by_role("button", name="Retry unknown…").click()
        page.get_by_role("link", name="No, take me back").click()
        expect(page.locator(".message-unknown")).to_contain_text("3 recipients in doubt")

        page.goto(reverse("admin:sending_message_changelist"))
        select(page, "Fees reminder", "Welcome week")
        run_action(page, "Retry unknown recipients…")
        confirmation = page.locator("#content-main")
        expect(confirmation.locator(".retry-unknown-warning")).to_contain_text(
            "Up to 3 recipients may get this email twice."
        )
        expect(confirmation.locator("dd.errornote")).to_have_text(
            "Cannot retry: It has no unknown recipients."
        )
        screenshot(page, "retry-unknown-from-the-list")
        page.get_by_role("button", name="Yes, send to them again").click()

        expect(page.locator(".messagelist .success")).to_have_text(
            f"Queued again: 3 unknown recipients of message {message.pk}."
        )
        expect(page.locator(".messagelist .error")).to_have_text(
            "“Welcome week” has no unknown recipients."
        )
    assert Recipient.objects.filter(message=message, status="queued").count() == 3
    clean.refresh_from_db()
    assert clean.status == "completed"


def test_the_unknown_recipients_export_lists_them_and_only_them(browse, support_user):
    message = message_in_doubt(failed=1)
    unknown = set(
        Recipient.objects.filter(message=message, status="unknown").values_list("email", flat=True)
    )
    with browse(support_user) as page:
        open_message(page, message)
        with page.expect_download() as download:
            page.get_by_role("link", name="Export unknown (CSV)").click()
        text = download.value.path().read_text()  # gone once the browser closes
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {row["email"] for row in rows} == unknown
    assert {row["status"] for row in rows} == {"unknown"}


def test_an_operator_may_neither_export_the_unknown_nor_retry_them(browse, operator_user):
    message = message_in_doubt()
    with browse(operator_user) as page:
        open_message(page, message)
        doubt = page.locator(".message-unknown")
        expect(doubt).to_contain_text("3 recipients in doubt")
        # Delivery logs are personal data: exporting them is Support's (sending.export_recipients).
        expect(doubt.get_by_role("link", name="Export unknown (CSV)")).to_have_count(0)
        expect(page.get_by_role("button", name="Retry unknown…")).to_have_count(0)
        page.goto(reverse("admin:sending_message_changelist"))
        offered = page.locator("select[name=action] option").all_inner_texts()
        assert "Retry unknown recipients…" not in offered
        # Posting to the button's address anyway is refused.
        answer = page.request.post(
            reverse("admin:sending_message_retry_unknown", args=[message.pk])
        )
        assert answer.status == 403
    assert Recipient.objects.filter(message=message, status="unknown").count() == 3
