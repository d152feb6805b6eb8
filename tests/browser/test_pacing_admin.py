"""What operators see of throttling and shared accounts: a provider account's customers with
their combined limit, and what pacing learned from refusals (customer pacing)."""

import re
from datetime import timedelta

from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import expect

from customers.models import SendLimit
from sending.models import CustomerPacing
from tests.factories import CustomerFactory, ProviderAccountFactory


def test_an_operator_sees_who_shares_a_provider_account_and_their_combined_limit(
    browse, operator_user, screenshot
):
    account = ProviderAccountFactory(name="Shared Postmark", per_minute_cap=1_200)
    for name in ("Alder College", "Birch College", "Cedar College"):
        customer = CustomerFactory(name=name, provider_account=account)
        SendLimit.objects.filter(customer=customer).update(per_minute=1_000)
    CustomerFactory(name="Elsewhere College")  # on an account of its own
    with browse(operator_user) as page:
        page.goto(reverse("admin:index"))
        page.get_by_role("link", name="Provider accounts").click()
        page.get_by_role("link", name="Shared Postmark").click()
        sharing = page.locator(".field-sharing")
        for name in ("Alder College", "Birch College", "Cedar College"):
            expect(sharing).to_contain_text(f"{name} — 1000/min")
        expect(sharing).not_to_contain_text("Elsewhere College")
        expect(sharing).to_contain_text("Combined 3000/min against a cap of 1200/min")
        expect(sharing).to_contain_text("each gets at least an equal share")
        screenshot(page, "provider-account")


def test_an_operator_sees_what_pacing_learned_from_refusals_and_why(
    browse, operator_user, screenshot
):
    customer = CustomerFactory(name="Riverside College")
    now = timezone.now()
    why = (
        "refused 412 ms into a minute after a full one: the provider's minute had not turned; "
        "start guard widened by 262 ms"
    )
    CustomerPacing.objects.create(
        customer=customer,
        learned_guard_ms=262,
        guard_learned_at=now - timedelta(hours=1),
        last_refusal_at=now - timedelta(hours=1),
        last_refusal=why,
    )
    with browse(operator_user) as page:
        page.goto(reverse("admin:index"))
        page.get_by_role("link", name="Customer pacing").click()
        row = page.locator("#result_list tbody tr", has_text="Riverside College")
        # An hour later the widening has halved (its half-life): 131, less the seconds since.
        expect(row.locator(".field-guard_in_force")).to_have_text(re.compile(r"^1(29|30|31)$"))
        expect(row.locator(".field-last_refusal")).to_contain_text("had not turned")
        screenshot(page, "customer-pacing-list")
        row.get_by_role("link", name="Riverside College").click()
        expect(page.locator(".field-last_refusal")).to_contain_text("widened by 262 ms")
        screenshot(page, "customer-pacing")
