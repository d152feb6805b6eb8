"""Support checks a customer's sending domain from the customer page (DNS: a real server on
127.0.0.1)."""

from playwright.sync_api import expect

from tests.dns_server import LocalDNS
from tests.factories import CustomerFactory


def test_support_checks_the_sending_domain_and_fixes_the_selector(
    browse, support_user, settings, screenshot
):
    customer = CustomerFactory(name="Lakeside University", default_from_email="news@lakeside.edu")
    published = {
        "lakeside.edu": [["v=spf1 include:amazonses.com -all"], ["v=spf1 mx -all"]],
        "mail2026._domainkey.lakeside.edu": [["v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOC"]],
    }
    with LocalDNS(published) as server:
        settings.DNS_NAMESERVERS = ["127.0.0.1"]
        settings.DNS_PORT = server.port
        settings.DNS_TIMEOUT_S = 0.5
        with browse(support_user) as page:
            page.goto("/admin/customers/customer/")
            page.get_by_role("link", name="Lakeside University").click()
            page.get_by_role("link", name="Sending domain").click()
            expect(page.locator("h1")).to_have_text("Sending domain of Lakeside University")
            rows = page.get_by_role("table", name="What lakeside.edu publishes")
            expect(rows.get_by_role("row", name="SPF")).to_contain_text("2 SPF records")
            expect(rows.get_by_role("row", name="DKIM")).to_contain_text("No DKIM selector")
            expect(rows.get_by_role("row", name="DMARC")).to_contain_text("No DMARC record")
            screenshot(page, "domain-check-before")

            # The selector is entered from the page's link; the check then finds the key.
            page.get_by_role("link", name="Change the from address or DKIM selector").click()
            page.get_by_role("textbox", name="DKIM selector").fill("mail2026")
            screenshot(page, "customer-page")
            page.get_by_role("button", name="Save and continue editing").click()
            expect(page.locator(".messagelist .success")).to_contain_text("changed successfully")
            page.get_by_role("link", name="Sending domain").click()
            rows = page.get_by_role("table", name="What lakeside.edu publishes")
            expect(rows.get_by_role("row", name="DKIM")).to_contain_text("A DKIM key is published")
            page.get_by_role("link", name="Check again").click()
            expect(rows.get_by_role("row", name="DKIM")).to_contain_text("A DKIM key is published")
            screenshot(page, "domain-check-after")
    assert "mail2026._domainkey.lakeside.edu" in server.queries
    customer.refresh_from_db()
    assert customer.dkim_selector == "mail2026"
