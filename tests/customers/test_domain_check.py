"""The sending-domain check against a real DNS server on 127.0.0.1 (tests/dns_server.py)."""

import time

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from customers.domain_check import Verdict, check_domain, from_domain
from tests.dns_server import LocalDNS
from tests.factories import CustomerFactory, UserFactory

# A 2048-bit DKIM key is longer than one TXT string (255 bytes): DNS carries it in pieces.
KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 340 + "IDAQAB"
PUBLISHED = {
    "example.edu": [["v=spf1 include:amazonses.com -all"], ["google-site-verification=abc"]],
    "s1._domainkey.example.edu": [["v=DKIM1; k=rsa; p=" + KEY[:200], KEY[200:]]],
    "_dmarc.example.edu": [["v=DMARC1; p=reject; rua=mailto:dmarc@example.edu"]],
}


@pytest.fixture
def dns_server(settings):
    def start(txt):
        server = LocalDNS(txt)
        settings.DNS_NAMESERVERS = ["127.0.0.1"]
        settings.DNS_PORT = server.port
        settings.DNS_TIMEOUT_S = 0.5
        return server

    return start


def verdicts(report):
    return {f.check: f.verdict for f in report.findings}


def test_a_domain_that_publishes_all_three_passes_and_long_keys_are_joined(dns_server):
    with dns_server(PUBLISHED) as server:
        report = check_domain("example.edu", "s1")
    assert verdicts(report) == {"SPF": Verdict.OK, "DKIM": Verdict.OK, "DMARC": Verdict.OK}
    assert report.all_ok
    spf, dkim, dmarc = report.findings
    assert spf.records == ("v=spf1 include:amazonses.com -all",)  # the other TXT left out
    assert dkim.records == ("v=DKIM1; k=rsa; p=" + KEY,)
    assert dmarc.summary == 'Policy "reject".'
    assert server.queries == ["example.edu", "s1._domainkey.example.edu", "_dmarc.example.edu"]


def test_a_domain_that_publishes_nothing_is_told_what_is_missing(dns_server):
    with dns_server({"example.edu": [["google-site-verification=abc"]]}):
        report = check_domain("example.edu", "s1")
    assert verdicts(report) == {
        "SPF": Verdict.MISSING,
        "DKIM": Verdict.MISSING,
        "DMARC": Verdict.MISSING,
    }
    assert not report.all_ok
    assert "Gmail and Yahoo require one" in report.findings[2].summary


@pytest.mark.parametrize(
    ("records", "check", "verdict", "says"),
    [
        ({"example.edu": [["v=spf1 -all"], ["v=spf1 mx -all"]]}, "SPF", Verdict.ERROR, "2 SPF"),
        ({"example.edu": [["v=spf1 +all"]]}, "SPF", Verdict.WARNING, "anyone"),
        ({"s1._domainkey.example.edu": [["v=DKIM1; p="]]}, "DKIM", Verdict.ERROR, "revoked"),
        (
            {"_dmarc.example.edu": [["v=DMARC1; rua=mailto:x@example.edu"]]},
            "DMARC",
            Verdict.ERROR,
            "no valid policy",
        ),
        ({"_dmarc.example.edu": [["v=DMARC1; p=none"]]}, "DMARC", Verdict.OK, "enough"),
    ],
)
def test_records_that_are_published_but_wrong_say_what_is_wrong(
    dns_server, records, check, verdict, says
):
    with dns_server(records):
        finding = {f.check: f for f in check_domain("example.edu", "s1").findings}[check]
    assert finding.verdict == verdict
    assert says in finding.summary


def test_without_a_selector_dkim_is_not_looked_up_and_the_page_says_why(dns_server):
    with dns_server(PUBLISHED) as server:
        report = check_domain("example.edu", "")
    assert [f.check for f in report.findings] == ["SPF", "DKIM", "DMARC"]
    assert report.findings[1].verdict == Verdict.UNCHECKED
    assert "No DKIM selector" in report.findings[1].summary
    assert server.queries == ["example.edu", "_dmarc.example.edu"]


@pytest.mark.parametrize("fault", ["silent", "refuse"])
def test_a_server_that_does_not_answer_judges_nothing_and_gives_up_in_time(dns_server, fault):
    with dns_server(PUBLISHED) as server:
        setattr(server, fault, True)
        began = time.monotonic()
        report = check_domain("example.edu", "s1")
        took = time.monotonic() - began
    assert verdicts(report) == {c: Verdict.UNCHECKED for c in ("SPF", "DKIM", "DMARC")}
    assert all("Could not be looked up" in f.summary for f in report.findings)
    assert took < 3 * 0.5 + 1  # three lookups, each bounded by DNS_TIMEOUT_S


def test_the_from_domain_is_the_address_domain_part():
    assert from_domain("news@Mail.Example.EDU.") == "mail.example.edu"
    assert from_domain("news@example.edu") == "example.edu"


@pytest.mark.django_db
def test_a_selector_must_be_dns_labels():
    customer = CustomerFactory()
    for good in ("s1", "selector-1", "k2.mail", "20230601"):
        customer.dkim_selector = good
        customer.full_clean()
    for bad in ("s1 x", "-s1", "s1.", "a_b", "é", "s1._domainkey"):
        customer.dkim_selector = bad
        with pytest.raises(ValidationError) as raised:
            customer.full_clean()
        assert "dkim_selector" in raised.value.message_dict, bad


def test_the_page_needs_permission_to_view_the_customer(client, dns_server, staff_groups):
    customer = CustomerFactory(default_from_email="news@example.edu", dkim_selector="s1")
    url = reverse("admin:customers_customer_domain", args=[customer.pk])
    client.force_login(UserFactory(username="nobody", is_staff=True))
    assert client.get(url).status_code == 403
    client.force_login(UserFactory(username="support", groups=["Support"]))
    with dns_server(PUBLISHED):
        page = client.get(url)
    assert page.status_code == 200
    assert "v=DMARC1; p=reject" in page.content.decode()
    assert client.get(reverse("admin:customers_customer_domain", args=[0])).status_code == 404
