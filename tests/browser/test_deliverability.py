"""Suppression lists, resubscribe, the unsubscribe page, the automatic halt's settings and the
message page's bounces and complaints, driven in Chromium."""

from pathlib import Path

from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import Page, expect

from customers.models import Customer, Resubscription, Suppression
from customers.unsubscribe import unsubscribe_url
from sending.models import Message, TrackingEvent
from tests.factories import CustomerFactory, MessageFactory, SuppressionFactory, customer_form

GOOD = b"""email,reason,source
ada@example.edu,unsubscribed,asked by phone
grace@example.edu,,
OLD@example.edu,complaint,
"""
BAD = b"""email,reason
ada@example.edu,unsubscribed
grace@example.edu,bounced
"""


def upload(page: Page, customer: Customer, content: bytes) -> None:
    page.goto(reverse("admin:customers_suppression_changelist"))
    page.locator(".object-tools").get_by_role("link", name="Import CSV").click()
    expect(page.get_by_role("heading", name="Import suppressions")).to_be_visible()
    page.get_by_label("Customer").select_option(label=customer.name)
    page.get_by_label("CSV file").set_input_files(
        files=[{"name": "list.csv", "mimeType": "text/csv", "buffer": content}]
    )
    page.get_by_role("button", name="Import").click()


def test_support_imports_a_suppression_csv(browse, support_user, screenshot):
    customer = CustomerFactory(name="State University")
    SuppressionFactory(customer=customer, email="old@example.edu")
    with browse(support_user) as page:
        upload(page, customer, GOOD)

        expect(page.locator(".messagelist .success")).to_have_text(
            "Added 2 addresses to State University's suppression list; skipped 1 already on it "
            "or repeated."
        )
        expect(page.locator("#result_list tbody tr")).to_have_count(3)
        screenshot(page, "suppression-list-after-import")
    rows = Suppression.objects.filter(customer=customer).values_list("email", "reason")
    assert sorted(rows) == [
        ("ada@example.edu", "unsubscribed"),
        ("grace@example.edu", "manual"),
        ("old@example.edu", "manual"),
    ]


def test_a_bad_suppression_file_imports_nothing_and_says_why(browse, support_user, screenshot):
    customer = CustomerFactory(name="State University")
    with browse(support_user) as page:
        upload(page, customer, BAD)

        expect(page.locator(".import-errors .errornote")).to_have_text(
            "Nothing was imported. Fix this problem and upload the file again."
        )
        expect(page.locator(".import-errors li")).to_have_text(
            ["Line 3: “bounced” is not a reason: use one of complaint, hard_bounce, manual, "
             "unsubscribed."]
        )  # fmt: skip
        screenshot(page, "suppression-import-rejected")
    assert not Suppression.objects.exists()


def test_support_exports_the_selected_suppressions(browse, support_user):
    customer = CustomerFactory()
    SuppressionFactory(customer=customer, email="a@example.edu", reason="hard_bounce")
    SuppressionFactory(customer=customer, email="b@example.edu", reason="complaint")
    with browse(support_user) as page:
        page.goto(reverse("admin:customers_suppression_changelist"))
        page.locator("#action-toggle").check()
        page.locator("select[name=action]").select_option("export_csv")
        with page.expect_download() as download:
            page.get_by_role("button", name="Go").click()
        content = Path(download.value.path()).read_text().splitlines()
    assert content[0] == "email,reason,source,created_at"
    assert [line.split(",")[:2] for line in content[1:]] == [
        ["a@example.edu", "hard_bounce"],
        ["b@example.edu", "complaint"],
    ]


def test_support_resubscribes_an_address_with_a_reason(browse, support_user, screenshot):
    row = SuppressionFactory(email="ada@example.edu", reason="unsubscribed", source="link")
    with browse(support_user) as page:
        page.goto(reverse("admin:customers_suppression_change", args=[row.pk]))
        page.get_by_role("link", name="Resubscribe this address…").click()
        expect(page.locator("#content-main")).to_contain_text("This person unsubscribed")
        page.get_by_role("button", name="Resubscribe").click()  # no reason yet
        expect(page.locator(".errorlist")).to_contain_text("This field is required.")
        page.get_by_label("Reason").fill("She wrote to ask for the newsletter again")
        screenshot(page, "resubscribe")
        page.get_by_role("button", name="Resubscribe").click()

        expect(page.locator(".messagelist .success")).to_have_text(
            f"{row.customer} may mail ada@example.edu again (taken off its suppression list)."
        )
        page.goto(reverse("admin:customers_resubscription_changelist"))
        expect(page.locator("#result_list tbody tr")).to_have_count(1)
        expect(page.locator("#result_list")).to_contain_text("She wrote to ask")
        screenshot(page, "resubscribe-audit")
    assert not Suppression.objects.exists()
    assert Resubscription.objects.get().created_by == support_user


def test_a_recipient_unsubscribes_on_the_page_the_link_opens(browse, live, settings, screenshot):
    settings.PUBLIC_BASE_URL = live.url
    customer = CustomerFactory(name="State University")
    url = unsubscribe_url(customer_id=customer.pk, email="ada@example.edu")
    with browse() as page:  # a recipient: no session
        page.goto(url)
        expect(page.get_by_role("heading", name="Unsubscribe")).to_be_visible()
        screenshot(page, "unsubscribe-page")

        page.get_by_role("button", name="Unsubscribe").click()

        expect(page.get_by_role("heading", name="You are unsubscribed")).to_be_visible()
        screenshot(page, "unsubscribed")
        page.goto(url.replace("/unsubscribe/", "/unsubscribe/x"))
        expect(
            page.get_by_role("heading", name="This unsubscribe link is not valid")
        ).to_be_visible()
        screenshot(page, "unsubscribe-link-not-valid")
    [row] = Suppression.objects.all()
    assert (row.customer, row.email, row.reason) == (customer, "ada@example.edu", "unsubscribed")


def test_the_message_page_shows_bounces_complaints_and_why_it_halted(
    browse, support_user, screenshot
):
    message = MessageFactory(
        subject="Welcome to the new term",
        status=Message.Status.PAUSED,
        started_at=timezone.now(),
        halt_reason="Halted automatically: hard-bounce rate 5.00 % (5 of the last 100 sends) "
        "reached the customer's limit of 5.00 %.",
    )
    for i, kind in enumerate(["hard_bounce"] * 5 + ["complaint", "other"]):
        TrackingEvent.objects.create(
            esp="Postmark",
            event_id=str(i),
            email=f"r{i}@x.edu",
            event_type="bounced",
            kind=kind,
            message_id=message.pk,
        )
    with browse(support_user) as page:
        page.goto(reverse("admin:sending_message_change", args=[message.pk]))
        expect(page.locator(".message-halted")).to_contain_text("hard-bounce rate 5.00 %")
        box = page.locator(".message-deliverability")
        expect(box.locator("[data-field=hard-bounces]")).to_have_text("5")
        expect(box.locator("[data-field=complaints]")).to_have_text("1")
        screenshot(page, "message-halted")


def test_support_sets_a_customers_halt_thresholds(browse, superuser, screenshot):
    customer = CustomerFactory(name="State University")
    with browse(superuser) as page:
        page.goto(reverse("admin:customers_customer_change", args=[customer.pk]))
        section = page.locator("fieldset", has_text="Automatic halt")
        expect(section).to_contain_text("pauses itself")
        page.get_by_label("Halt complaint percent").fill("0.25")
        page.get_by_label("Halt window").fill("50")  # below the smallest window: refused
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.locator(".errornote")).to_be_visible()
        screenshot(page, "customer-halt-refused")
        page.get_by_label("Halt window").fill("2000")
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.locator(".messagelist .success")).to_be_visible()
    customer.refresh_from_db()
    assert (str(customer.halt_complaint_percent), customer.halt_window) == ("0.25", 2000)
    assert customer_form  # the customer page's POST helper knows these fields too
