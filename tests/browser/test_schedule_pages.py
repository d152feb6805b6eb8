"""Schedule / Reschedule / Unschedule, Test send and Retry failed, pressed in Chromium."""

from datetime import date, time, timedelta

from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import expect

from customers.models import SendLimit
from sending import scheduling
from sending.models import Message, Recipient, TestSend
from sending.sandbox import SandboxServer
from tests.browser.test_message_page import flash, status
from tests.factories import (
    API_KEY,
    CustomerFactory,
    MessageFactory,
    ProviderAccountFactory,
    RecipientFactory,
    make_message,
    sandbox_customer,
)

CHICAGO = "America/Chicago"


def draft(customer=None, n=3, subject="Orientation week") -> Message:
    customer = customer or CustomerFactory(time_zone=CHICAGO)
    message = MessageFactory(customer=customer, subject=subject)
    RecipientFactory.create_batch(n, message=message)
    return message


def message_page(message) -> str:
    return reverse("admin:sending_message_change", args=[message.pk])


def test_support_schedules_reschedules_and_unschedules_in_the_customers_zone(
    browse, support_user, screenshot
):
    message = draft()
    day = timezone.now().astimezone(message.customer.time_zone).date() + timedelta(days=3)
    with browse(support_user) as page:
        page.goto(message_page(message))
        page.get_by_role("link", name="Schedule…").click()
        expect(page.locator("#content-main")).to_contain_text("time zone, America/Chicago")
        page.get_by_label("Date").fill(day.isoformat())
        page.get_by_label("Time").fill("09:00")
        page.get_by_role("button", name="Show the plan for this time").click()
        plan = page.locator(".schedule-plan")
        expect(plan).to_contain_text("3 will be sent this message.")
        expect(plan).to_contain_text(f"{day:%a %-d %b %Y} 09:00 America/Chicago")
        screenshot(page, "schedule-page")
        page.get_by_role("button", name="Schedule", exact=True).click()

        expect(flash(page)).to_contain_text("Scheduled: “Orientation week” starts")
        expect(status(page)).to_have_text("Scheduled")
        expect(page.locator(".message-starts")).to_contain_text("09:00 America/Chicago (in ")
        screenshot(page, "scheduled-message-page")

        page.get_by_role("link", name="Reschedule…").click()
        page.get_by_label("Time").fill("14:30")
        page.get_by_role("button", name="Reschedule").click()
        expect(page.locator(".message-starts")).to_contain_text("14:30 America/Chicago")
    message.refresh_from_db()
    zone = message.customer.time_zone
    assert message.status == Message.Status.SCHEDULED
    assert message.scheduled_at == scheduling.local_to_utc(day, time(14, 30), zone)

    with browse(support_user) as page:
        page.goto(message_page(message))
        page.get_by_role("button", name="Unschedule").click()
        expect(flash(page)).to_have_text(f"Unscheduled: message {message.pk} is a draft.")
        expect(status(page)).to_have_text("Draft")
    message.refresh_from_db()
    assert (message.status, message.scheduled_at) == (Message.Status.DRAFT, None)


def test_a_time_the_clocks_skip_is_refused_and_nothing_changes(browse, support_user, screenshot):
    message = draft()
    with browse(support_user) as page:
        page.goto(reverse("admin:sending_message_schedule", args=[message.pk]))
        page.get_by_label("Date").fill("2099-03-08")  # US clocks skip 02:00-03:00 that night
        page.get_by_label("Time").fill("02:30")
        page.get_by_role("button", name="Schedule", exact=True).click()
        expect(page.locator(".errornote, .errorlist")).to_contain_text(
            "does not exist in America/Chicago"
        )
        screenshot(page, "dst-gap-refused")
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT and message.scheduled_at is None


def test_the_changelist_shows_when_sends_start_and_unschedules(browse, support_user):
    message = draft()
    at = scheduling.local_to_utc(date(2099, 1, 6), time(9, 0), message.customer.time_zone)
    Message.objects.filter(pk=message.pk).update(status="scheduled", scheduled_at=at)
    with browse(support_user) as page:
        page.goto(reverse("admin:sending_message_changelist"))
        expect(page.locator("td.field-starts")).to_contain_text("Tue 06 Jan 2099 09:00")
        page.locator(f"input[name=_selected_action][value='{message.pk}']").check()
        page.locator("select[name=action]").select_option("unschedule")
        page.get_by_role("button", name="Go").click()
        expect(flash(page)).to_have_text(f"Unscheduled: message {message.pk} is a draft.")
    message.refresh_from_db()
    assert message.status == Message.Status.DRAFT


def test_a_failed_and_a_late_start_show_on_the_message_page(browse, support_user, screenshot):
    failed = draft()
    failed.start_problem = "Scheduled for Tue 09:00 America/Chicago, it could not start: no."
    failed.save()
    late = draft()
    at = timezone.now() - timedelta(hours=1)
    Message.objects.filter(pk=late.pk).update(
        status="sending", scheduled_at=at, started_at=at + timedelta(minutes=4)
    )
    with browse(support_user) as page:
        page.goto(message_page(failed))
        expect(page.locator(".message-start-problem")).to_have_text(failed.start_problem)
        page.goto(message_page(late))
        expect(page.locator(".message-late")).to_contain_text("it started 4 min late")
        screenshot(page, "late-start")


def test_support_sends_a_test_through_the_customers_provider(browse, support_user, screenshot):
    sandbox = SandboxServer(caps={API_KEY: 1_000}).start()
    try:
        customer = sandbox_customer(sandbox, per_minute=100)
        message = draft(customer, subject="Hello {{ first_name }}")
        Recipient.objects.filter(message=message).update(merge_data={"first_name": "Someone"})
        chosen = Recipient.objects.filter(message=message).order_by("id").last()
        Recipient.objects.filter(pk=chosen.pk).update(merge_data={"first_name": "Grace"})
        with browse(support_user) as page:
            page.goto(message_page(message))
            page.get_by_role("link", name="Test send…").click()
            page.get_by_label("Send to").fill("staff@college.edu, dean@college.edu")
            page.get_by_label("Merge data of").select_option(str(chosen.pk))
            screenshot(page, "test-send-form")
            page.get_by_role("button", name="Send the test").click()
            expect(flash(page)).to_contain_text("Test send sent: staff@college.edu: ")
            page.get_by_role("link", name="Test send…").click()
            expect(page.locator(".test-sends")).to_contain_text("dean@college.edu")
            screenshot(page, "test-send-history")
        record = TestSend.objects.get()
        assert record.outcome == TestSend.Outcome.SENT and record.created_by == support_user
        assert sorted(s.to for s in sandbox.sends) == ["dean@college.edu", "staff@college.edu"]
        assert {s.subject for s in sandbox.sends} == {"[Test] Hello Grace"}
    finally:
        sandbox.stop()


def test_support_retries_failed_recipients_after_confirming(
    browse, support_user, conductor_kicks, screenshot, settings
):
    message = make_message(CustomerFactory(), 3, subject="Financial aid")
    ids = list(
        Recipient.objects.filter(message=message).order_by("id").values_list("pk", flat=True)
    )
    Recipient.objects.filter(pk=ids[0]).update(status="failed", attempts=settings.SEND_MAX_ATTEMPTS)
    Recipient.objects.filter(pk=ids[1]).update(status="failed", attempts=1)
    Recipient.objects.filter(pk=ids[2]).update(status="sent", attempts=1)
    Message.objects.filter(pk=message.pk).update(status="completed", completed_at=timezone.now())
    with browse(support_user) as page:
        page.goto(message_page(message))
        page.get_by_role("link", name="Retry 1 failed…").click()
        expect(page.locator(".retry-count")).to_contain_text("1 recipient failed only because")
        screenshot(page, "retry-failed-confirmation")
        page.get_by_role("button", name="Yes, retry 1").click()
        expect(flash(page)).to_have_text("Retrying 1 failed recipients of “Financial aid”.")
        expect(status(page)).to_have_text("Sending")
    message.refresh_from_db()
    assert message.status == Message.Status.SENDING
    assert Recipient.objects.get(pk=ids[0]).status == "queued"
    assert Recipient.objects.get(pk=ids[1]).status == "failed"
    assert conductor_kicks() == [message.customer_id]


def test_the_scheduling_page_flags_a_send_competing_for_the_account(
    browse, support_user, screenshot
):
    account = ProviderAccountFactory(per_minute_cap=600)
    running_customer = CustomerFactory(provider_account=account, name="Lakeside College")
    customer = CustomerFactory(provider_account=account, time_zone=CHICAGO)
    SendLimit.objects.filter(customer__in=[running_customer, customer]).update(per_minute=600)
    make_message(running_customer, 3_000, subject="Housing lottery")  # 5 min alone
    message = draft(customer, n=600)  # 1 min alone
    with browse(support_user) as page:
        page.goto(reverse("admin:sending_message_schedule", args=[message.pk]))
        soon = timezone.now().astimezone(customer.time_zone) + timedelta(minutes=2)
        page.get_by_label("Date").fill(soon.date().isoformat())
        page.get_by_label("Time").fill(f"{soon:%H:%M}")
        page.get_by_role("button", name="Show the plan for this time").click()
        overlap = page.locator(".plan-overlap")
        expect(overlap).to_contain_text(
            "“Orientation week” and “Housing lottery” (Lakeside College) share 600/min "
            "(the provider account's cap)"
        )
        expect(overlap).to_contain_text("“Orientation week” finishes at")
        expect(overlap).to_contain_text("“Housing lottery” finishes at")
        screenshot(page, "competing-sends")
