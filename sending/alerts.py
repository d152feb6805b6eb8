"""Alerts that reach someone who is not watching.

A silent conductor, a minute over the cap, a throttling storm and lost workers are logged at
WARNING or ERROR with the customer's and its sending messages' ids, and e-mailed to ADMINS
(ALERT_MAIL_ADMINS) and to the customer's alert address, if it has one — through Django's mail,
never through the paced send. Each kind is sent at most once every ALERT_REPEAT_S per customer
(a cache `add`, so a conductor ticking twice a second does not repeat it every tick); the live
pages show the condition for as long as it lasts.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.cache import cache
from django.core.mail import mail_admins, send_mail
from django.db import transaction

log = logging.getLogger(__name__)

OVER_CAP = "over_cap"
THROTTLING = "throttling"
LOST_WORKERS = "lost_workers"
SILENT_CONDUCTOR = "silent_conductor"
HALTED = "halted"

TITLES = {
    OVER_CAP: "A minute went over the cap",
    THROTTLING: "The provider is throttling",
    LOST_WORKERS: "Workers were lost",
    SILENT_CONDUCTOR: "The conductor went silent",
    HALTED: "A message halted itself (bounces or complaints)",
}
LEVELS = {
    OVER_CAP: logging.ERROR,
    THROTTLING: logging.WARNING,
    LOST_WORKERS: logging.WARNING,
    SILENT_CONDUCTOR: logging.ERROR,
    HALTED: logging.ERROR,
}


def repeat_s() -> float:
    return float(getattr(settings, "ALERT_REPEAT_S", 600))


def throttling_storm(*, throttled: int, per_minute: int) -> bool:
    """Throttled sends in this minute and the last: a few are a provider's clock at a minute's
    edge; this many mean the provider counts something we do not."""
    return throttled >= max(5, per_minute // 100)


def check(sample: dict, *, lost: int = 0) -> list[dict]:
    """The alerts a sample shows, each raised (logged, mailed) at most once per repeat period."""
    customer_id = sample["customer"]
    previous, minute = sample["previous"], sample["minute"]
    found = []
    if previous["cap"] and previous["sent"] > previous["cap"]:
        found.append(
            (OVER_CAP, f"{previous['sent']} sent in the minute of a {previous['cap']} cap")
        )
    throttled = minute["throttled"] + previous["throttled"]
    if throttling_storm(throttled=throttled, per_minute=sample["limits"]["per_minute"]):
        found.append((THROTTLING, f"{throttled} sends throttled in the last two minutes"))
    if lost:
        found.append((LOST_WORKERS, f"{lost} workers stopped checking in"))
    message_ids = [m["id"] for m in sample["messages"]]
    for kind, text in found:
        raise_alert(kind=kind, customer_id=customer_id, message_ids=message_ids, text=text)
    return [{"kind": kind, "title": TITLES[kind], "text": text} for kind, text in found]


def raise_alert(*, kind: str, customer_id: int, message_ids: list[int], text: str) -> bool:
    """Log and mail an alert unless the same kind was raised for the customer lately."""
    if not cache.add(f"live:alert:{kind}:{customer_id}", time.time(), repeat_s()):
        return False
    log.log(
        LEVELS[kind],
        "alert %s: customer %s, messages %s: %s",
        kind,
        customer_id,
        message_ids,
        text,
        extra={"alert": kind, "customer_id": customer_id, "message_ids": message_ids},
    )
    transaction.on_commit(lambda: _mail(kind, customer_id, message_ids, text))
    return True


def _mail(kind: str, customer_id: int, message_ids: list[int], text: str) -> None:
    from customers.models import Customer

    customer = Customer.objects.filter(pk=customer_id).only("name", "alert_email").first()
    name = customer.name if customer else f"customer {customer_id}"
    subject = f"{TITLES[kind]}: {name}"
    body = f"{text}.\n\nCustomer {customer_id} ({name}); messages sending: {message_ids or 'none'}."
    try:
        if getattr(settings, "ALERT_MAIL_ADMINS", False):
            mail_admins(subject, body)
        if customer is not None and customer.alert_email:
            send_mail(
                f"{settings.EMAIL_SUBJECT_PREFIX}{subject}",
                body,
                None,
                [customer.alert_email],
            )
    except Exception:
        # The alert is logged already; a mail server down must not stop the conductor.
        log.exception("could not mail alert %s for customer %s", kind, customer_id)


def conductors_silent(customer_ids: list[int]) -> None:
    """Customers sending with no live conductor, found by beat's watchdog (which starts a new
    one): those whose conductor died holding its lease. A lease released by a conductor that
    went idle is not silence: a send just started has no conductor until its first tick."""
    from django.utils import timezone

    from .models import ConductorLease, Message

    customer_ids = list(
        ConductorLease.objects.filter(customer_id__in=customer_ids, expires_at__lt=timezone.now())
        .exclude(holder="")
        .values_list("customer_id", flat=True)
    )
    sending = Message.objects.filter(
        customer_id__in=customer_ids, status=Message.Status.SENDING
    ).values_list("customer_id", "pk")
    by_customer: dict[int, list[int]] = {}
    for customer_id, message_id in sending:
        by_customer.setdefault(customer_id, []).append(message_id)
    for customer_id in customer_ids:
        raise_alert(
            kind=SILENT_CONDUCTOR,
            customer_id=customer_id,
            message_ids=by_customer.get(customer_id, []),
            text="no conductor renewed its lease; the watchdog started a new one",
        )
