"""Editing a customer's send limit: Operators change it, and every change is in its history."""

from django.urls import reverse
from playwright.sync_api import Page, expect

from customers.models import SendLimit
from tests.factories import CustomerFactory


def open_send_limit(page: Page, customer_name: str) -> None:
    page.goto(reverse("admin:index"))
    page.get_by_role("link", name="Send limits").click()
    page.get_by_role("link", name=customer_name).click()


def test_an_operator_changes_the_limit_and_sees_it_saved_and_in_the_history(browse, operator_user):
    customer = CustomerFactory(name="Riverside College")
    before = customer.send_limit.per_minute
    with browse(operator_user) as page:
        open_send_limit(page, "Riverside College")
        per_minute = page.get_by_role("spinbutton", name="Per minute")
        expect(per_minute).to_have_value(str(before))

        per_minute.fill("900")
        page.get_by_role("button", name="Save", exact=True).click()

        expect(page.locator(".messagelist .success")).to_contain_text("was changed successfully")
        row = page.locator("#result_list tbody tr", has_text="Riverside College")
        expect(row.locator(".field-per_minute")).to_have_text("900")

        row.get_by_role("link", name="Riverside College").click()
        expect(page.locator(".field-changes")).to_contain_text(f"per minute: {before} → 900")
        page.get_by_role("link", name="History", exact=True).click()
        expect(page.locator("#change-history tbody tr").first).to_contain_text("operator")
        expect(page.locator("#change-history tbody tr").first).to_contain_text("Changed")
    limit = SendLimit.objects.get(customer=customer)
    assert limit.per_minute == 900
    assert limit.history.latest().history_user == operator_user


def test_a_limit_above_the_accounts_cap_is_refused_and_nothing_changes(browse, operator_user):
    customer = CustomerFactory(name="Riverside College", provider_account__per_minute_cap=1_200)
    before = customer.send_limit.per_minute
    with browse(operator_user) as page:
        open_send_limit(page, "Riverside College")

        page.get_by_role("spinbutton", name="Per minute").fill("5000")
        page.get_by_role("button", name="Save", exact=True).click()

        expect(page.locator(".errornote")).to_be_visible()
        expect(page.locator(".field-per_minute .errorlist")).to_contain_text(
            "allows at most 1200 per minute"
        )
    assert SendLimit.objects.get(customer=customer).per_minute == before


def test_support_sees_the_limit_but_cannot_edit_it(browse, support_user):
    customer = CustomerFactory(name="Riverside College")
    with browse(support_user) as page:
        open_send_limit(page, "Riverside College")

        expect(page.locator(".field-per_minute .readonly")).to_have_text(
            str(customer.send_limit.per_minute)
        )
        expect(page.get_by_role("spinbutton")).to_have_count(0)
        expect(page.get_by_role("button", name="Save", exact=True)).to_have_count(0)
