"""The messages list: select rows, choose an action, press Go."""

from django.urls import reverse
from playwright.sync_api import Page, expect

from sending.models import Message
from tests.factories import CustomerFactory, MessageFactory, RecipientFactory


def select(page: Page, *subjects: str) -> None:
    for subject in subjects:
        row = page.locator("#result_list tbody tr", has_text=subject)
        row.get_by_role("checkbox").check()


def run_action(page: Page, label: str) -> None:
    page.locator("select[name=action]").select_option(label=label)
    page.get_by_role("button", name="Go").click()


def row_status(page: Page, subject: str):
    return page.locator("#result_list tbody tr", has_text=subject).locator(".field-status")


def test_support_sends_two_drafts_and_is_told_why_a_third_cannot_go(
    browse, support_user, conductor_kicks
):
    customer = CustomerFactory()
    ready = [MessageFactory(customer=customer, subject=s) for s in ("Open day", "Exam dates")]
    for message in ready:
        RecipientFactory.create_batch(2, message=message)
    MessageFactory(customer=customer, subject="Nobody yet")
    with browse(support_user) as page:
        page.goto(reverse("admin:index"))
        page.get_by_role("link", name="Messages").first.click()
        select(page, "Open day", "Exam dates", "Nobody yet")
        expect(page.locator(".action-counter")).to_have_text("3 of 3 selected")

        run_action(page, "Send now")

        confirmation = page.locator("#content-main")
        expect(confirmation).to_contain_text("2 will be sent this message.")
        expect(confirmation.locator(".errornote")).to_have_text(
            "Cannot start: It has no recipients to send to."
        )
        page.get_by_role("button", name="Yes, send now").click()

        started = page.locator(".messagelist .success")
        expect(started).to_have_count(2)
        assert sorted(started.all_inner_texts()) == sorted(
            f"Sending started: message {m.pk}." for m in ready
        )
        expect(page.locator(".messagelist .error")).to_have_text(
            "“Nobody yet” has no recipients to send to. Import some first."
        )
        expect(row_status(page, "Open day")).to_have_text("Sending")
        expect(row_status(page, "Exam dates")).to_have_text("Sending")
        expect(row_status(page, "Nobody yet")).to_have_text("Draft")
    statuses = dict(Message.objects.values_list("subject", "status"))
    assert statuses == {"Open day": "sending", "Exam dates": "sending", "Nobody yet": "draft"}
    assert conductor_kicks() == [customer.pk, customer.pk]


def test_an_operator_is_offered_pause_and_resume_only_and_pauses_a_send(browse, operator_user):
    running = MessageFactory(subject="Fees reminder", status=Message.Status.SENDING)
    RecipientFactory.create_batch(2, message=running)
    MessageFactory(subject="Still a draft")
    with browse(operator_user) as page:
        page.goto(reverse("admin:sending_message_changelist"))
        offered = page.locator("select[name=action] option").all_inner_texts()
        assert offered == ["---------", "Pause sending", "Resume sending"]
        select(page, "Fees reminder")

        run_action(page, "Pause sending")

        expect(page.locator(".messagelist .success")).to_have_text(f"Paused: message {running.pk}.")
        expect(row_status(page, "Fees reminder")).to_have_text("Paused")
    running.refresh_from_db()
    assert running.status == Message.Status.PAUSED


def test_go_with_no_row_selected_changes_nothing(browse, support_user):
    MessageFactory(subject="Open day")
    with browse(support_user) as page:
        page.goto(reverse("admin:sending_message_changelist"))

        run_action(page, "Send now")

        expect(page.locator(".messagelist .warning")).to_contain_text(
            "Items must be selected in order to perform actions on them."
        )
    assert Message.objects.get().status == Message.Status.DRAFT
