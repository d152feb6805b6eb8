"""A provider account's destination cannot change without its credentials entered again, and the
change is in the account's history; the credentials are never shown back."""

import json

from django.urls import reverse
from playwright.sync_api import Page, expect

from customers.models import ProviderAccount
from tests.factories import ProviderAccountFactory

PASSWORD = "smtp-Pa55word-typed-once"


def open_account(page: Page, name: str) -> None:
    page.goto(reverse("admin:index"))
    page.get_by_role("link", name="Provider accounts").click()
    page.get_by_role("link", name=name).click()


def test_moving_an_account_needs_its_credentials_again_and_is_audited(
    browse, superuser, screenshot
):
    account = ProviderAccountFactory(
        name="College SMTP",
        kind="smtp",
        settings={"host": "smtp.college.example", "port": 587, "use_tls": True},
        credentials={"username": "mailer", "password": PASSWORD},
    )
    moved = json.dumps({"host": "mail.elsewhere.example", "port": 587, "use_tls": True})
    with browse(superuser) as page:
        open_account(page, "College SMTP")
        expect(page.locator(".field-stored_credentials")).to_contain_text(
            "password, username (values hidden)"
        )
        page.get_by_label("Settings").fill(moved)
        page.get_by_role("button", name="Save", exact=True).click()

        expect(page.locator(".errornote")).to_be_visible()
        expect(page.locator(".errorlist.nonfield")).to_contain_text(
            "Changing host needs the credentials entered again"
        )
        screenshot(page, "refused")
        assert PASSWORD not in page.content()

        page.locator("#id_new_credentials").fill(
            json.dumps({"username": "mailer", "password": "new-" + PASSWORD})
        )
        page.get_by_role("button", name="Save and continue editing").click()
        expect(page.locator(".messagelist .success")).to_contain_text("was changed successfully")
        expect(page.locator("#id_new_credentials")).to_have_value("")  # never shown
        screenshot(page, "saved")
        assert PASSWORD not in page.content()

        page.get_by_role("link", name="History", exact=True).click()
        latest = page.locator("#change-history tbody tr").first
        expect(latest).to_contain_text("admin")
        expect(latest).to_contain_text("destination changed: host; credentials entered")
        screenshot(page, "history")
    account.refresh_from_db()
    assert account.settings["host"] == "mail.elsewhere.example"
    assert account.credentials["password"] == "new-" + PASSWORD
    assert account.history.latest().history_user == superuser
    assert ProviderAccount.objects.count() == 1
