"""One-click unsubscribe links (RFC 8058): signed tokens over customer and address, and the
URLs every bulk message carries (the headers
themselves are added by sending.providers).

A token is signed with UNSUBSCRIBE_KEY, a key of its own: rotating SECRET_KEY (sessions, worker
tokens) must not break links already sitting in inboxes. It names the customer and the address,
not the recipient row (the retention purge deletes those), and never expires: a recipient may
unsubscribe from a years-old message. Anyone holding a link can unsubscribe that one address from
that one customer's mail, which is what the link is for; a changed byte makes it worthless.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core import signing
from django.urls import reverse

SALT = "emailops.customers.unsubscribe"


class LinkRejected(Exception):
    """The token is forged, tampered with or malformed."""


@dataclass(frozen=True)
class Unsubscribe:
    customer_id: int
    email: str


def _signer() -> signing.Signer:
    return signing.Signer(key=settings.UNSUBSCRIBE_KEY, salt=SALT, algorithm="sha256")


def make_token(*, customer_id: int, email: str) -> str:
    return _signer().sign_object({"c": customer_id, "e": email.strip().lower()}, compress=False)


def read_token(token: str) -> Unsubscribe:
    try:
        payload = _signer().unsign_object(token)
    except signing.BadSignature as exc:
        raise LinkRejected("the link's signature is not valid") from exc
    except ValueError as exc:  # bad base64 or JSON under a valid-looking signature
        raise LinkRejected("the link is malformed") from exc
    try:
        return Unsubscribe(customer_id=int(payload["c"]), email=str(payload["e"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise LinkRejected("the link's payload is not valid") from exc


def unsubscribe_url(*, customer_id: int, email: str) -> str:
    """The absolute URL recipients' mail clients POST to (PUBLIC_BASE_URL + the public path)."""
    return url_maker()(customer_id, email)


def url_maker():
    """`make(customer_id, email) -> url`, with the URL's fixed part worked out once (a batch
    builds hundreds of links)."""
    marker = "TOKEN"
    path = reverse("public:unsubscribe", kwargs={"token": marker})
    before, after = path.split(marker)
    prefix = settings.PUBLIC_BASE_URL.rstrip("/") + before

    def make(customer_id: int, email: str) -> str:
        return prefix + make_token(customer_id=customer_id, email=email) + after

    return make
