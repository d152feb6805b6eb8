"""One-click unsubscribe (RFC 8058): the headers reach the provider, and the link works over
HTTP on the real server (uvicorn) without cookies; a tampered link changes nothing."""

from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings as django_settings
from django.core import signing
from hypothesis import given
from hypothesis import settings as settings_hypothesis
from hypothesis import strategies as st

from customers.models import Suppression
from customers.unsubscribe import (
    SALT,
    LinkRejected,
    Unsubscribe,
    make_token,
    read_token,
    token_maker,
    unsubscribe_url,
)
from sending.models import Recipient
from sending.worker import LocalContext, handler
from tests.factories import CustomerFactory, make_message, sandbox_customer, start_worker

ONE_CLICK = "List-Unsubscribe=One-Click"


@pytest.fixture
def public_url(asgi_server, settings):
    settings.PUBLIC_BASE_URL = asgi_server.url
    return asgi_server.url


def post_one_click(url):
    # As a mailbox provider calls it: a bare POST, no cookies, no CSRF token.
    return requests.post(url, data=ONE_CLICK, timeout=10, headers={
        "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip


def test_every_send_carries_its_own_link_and_a_post_suppresses_the_address(
    public_url, api_url, sandbox
):
    customer = sandbox_customer(sandbox, batch_size=10, concurrency=2)
    message = make_message(customer, 5, subject="Leave at {{ unsubscribe_url }}")
    _, event = start_worker(customer, api_url)

    summary = handler(event, LocalContext(20))

    assert summary["sent"] == 5, summary
    by_address = {}
    for send in sandbox.sends:
        link, post = send.unsubscribe
        assert post == ONE_CLICK
        assert link.startswith("<") and link.endswith(">")
        url = link[1:-1]
        assert url.startswith(f"{public_url}/public/unsubscribe/")
        # The merge field and the header are the same link.
        assert send.subject == f"Leave at {url}"
        by_address[send.to] = url
    assert len(set(by_address.values())) == 5
    target = "s3@" + customer.slug + ".edu"
    assert read_token(urlsplit(by_address[target]).path.split("/")[3]).email == target

    answer = post_one_click(by_address[target])

    assert answer.status_code == 200, answer.text
    assert "You are unsubscribed" in answer.text
    assert "Set-Cookie" not in answer.headers
    [row] = Suppression.objects.filter(customer=customer)
    assert (row.email, row.reason) == (target, "unsubscribed")
    # A second click (providers retry) is harmless.
    assert post_one_click(by_address[target]).status_code == 200
    assert Suppression.objects.filter(customer=customer).count() == 1
    # The next send of this customer skips the address at claim.
    later = make_message(customer, 5)
    _, event = start_worker(customer, api_url)
    handler(event, LocalContext(20))
    assert Recipient.objects.get(message=later, email=target).status == "suppressed"
    assert message.recipients.filter(status="sent").count() == 5


def test_get_shows_a_confirmation_and_changes_nothing(public_url):
    customer = CustomerFactory(name="State University")
    url = unsubscribe_url(customer_id=customer.pk, email="Ada@Example.edu")

    page = requests.get(url, timeout=10)

    assert page.status_code == 200
    assert "Stop mail from <strong>State University</strong>" in page.text
    assert "ada@example.edu" in page.text
    assert '<form method="post">' in page.text
    assert not Suppression.objects.exists()


def tampered(token: str) -> list[str]:
    payload, signature = token.rsplit(":", 1)
    other = signing.Signer(key="not-our-key", salt=SALT, algorithm="sha256")
    forged = other.sign_object({"c": 1, "e": "ada@example.edu"}, compress=False)
    flip = "A" if payload[5] != "A" else "B"
    return [
        payload[:5] + flip + payload[6:] + ":" + signature,  # payload changed
        payload + ":" + signature[:-2] + ("xy" if signature[-2:] != "xy" else "zz"),
        forged,  # signed with another key
        "not-a-token",
    ]


def test_a_tampered_or_forged_link_is_refused_and_changes_nothing(public_url):
    customer = CustomerFactory()
    token = make_token(customer_id=customer.pk, email="ada@example.edu")
    for bad in tampered(token):
        with pytest.raises(LinkRejected):
            read_token(bad)
        for method in ("get", "post"):
            answer = requests.request(
                method, f"{public_url}/public/unsubscribe/{bad}/", data=ONE_CLICK, timeout=10
            )
            assert answer.status_code == 400, (bad, answer.text)
            assert "This unsubscribe link is not valid" in answer.text
            assert "Nothing was changed" in answer.text
    assert not Suppression.objects.exists()


def test_a_link_names_customer_and_address_not_the_recipient_row(db):
    token = make_token(customer_id=7, email=" Ada@Example.EDU ")
    link = read_token(token)
    assert (link.customer_id, link.email) == (7, "ada@example.edu")


def test_the_admin_preview_shows_the_first_recipients_own_link(db, settings):
    from sending.selectors import message_preview
    from tests.factories import MessageFactory, RecipientFactory

    settings.PUBLIC_BASE_URL = "https://mail.example"
    message = MessageFactory(text_body="Leave: {{ unsubscribe_url }}")
    RecipientFactory(message=message, email="ada@example.edu")

    preview = message_preview(message=message)

    url = preview.text.removeprefix("Leave: ")
    assert url.startswith("https://mail.example/public/unsubscribe/")
    token = urlsplit(url).path.split("/")[3]
    assert read_token(token).email == "ada@example.edu"


@settings_hypothesis(max_examples=200, deadline=None)
@given(
    customer_id=st.integers(min_value=1, max_value=2**53),
    email=st.emails()
    | st.text(min_size=1, max_size=60)
    | st.from_regex(r"[ -~]{1,40}", fullmatch=True),
)
def test_the_batch_token_maker_writes_djangos_signed_object_byte_for_byte(customer_id, email):
    # The check-in makes links with a key derived once per batch; a link must still be exactly
    # what Django's signer makes, so read_token (Django's) accepts it and old links stay valid.
    expected = signing.Signer(key=django_settings.UNSUBSCRIBE_KEY, salt=SALT).sign_object(
        {"c": customer_id, "e": email.strip().lower()}
    )
    made = token_maker()(customer_id, email)
    assert made == expected
    assert read_token(made) == Unsubscribe(customer_id=customer_id, email=email.strip().lower())
