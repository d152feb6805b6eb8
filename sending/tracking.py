"""What providers tell us after a send (django-anymail tracking events): stored once, turned
into suppressions, used to settle `unknown` recipients and to halt a message whose bounce or
complaint rate crosses its customer's threshold.

Each event is one transaction: the event row (its unique (esp, event_id, email) key makes a
provider's retries no-ops), then, only if the row is new, the suppression, the settling and the
halt check. If anything fails the webhook answers 500 and the provider retries the whole event.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from customers import suppressions
from customers.models import Suppression

from . import services
from .models import Message, Recipient, TrackingEvent

log = logging.getLogger(__name__)

RECIPIENT_HEADER = "x-emailops-idempotency-key"  # sending.providers.IDEMPOTENCY_HEADER
RECIPIENT_METADATA = "emailops_recipient_id"  # sending.providers.IDEMPOTENCY_METADATA
# Evidence that the provider took the message (an `unknown` recipient was sent) ...
ACCEPTED_TYPES = frozenset(
    {"queued", "sent", "delivered", "bounced", "deferred", "opened", "clicked", "complained",
     "autoresponded", "unsubscribed"}
)  # fmt: skip
# ... or that it did not.
REFUSED_TYPES = frozenset({"rejected", "failed"})
# The fewest sends a message is judged on (fewer: one bounce in three sends would halt it).
HALT_MIN_SENDS = 100


@dataclass(frozen=True)
class Outcome:
    new: bool
    kind: str = TrackingEvent.Kind.OTHER
    recipient_id: int | None = None
    suppressed: bool = False
    settled: str = ""
    halted: str = ""


def kind_of(event, esp_name: str) -> str:
    """hard_bounce, complaint or other. anymail's `bounced` includes soft bounces for some
    providers: the provider's own bounce type decides."""
    raw = event.esp_event if isinstance(event.esp_event, dict) else {}
    if event.event_type == "complained":
        return TrackingEvent.Kind.COMPLAINT
    if event.event_type != "bounced":
        return TrackingEvent.Kind.OTHER
    if esp_name == "Postmark":
        hard = raw.get("Type") == "HardBounce"
    elif esp_name == "Amazon SES":
        hard = (raw.get("bounce") or {}).get("bounceType") == "Permanent"
    else:
        hard = True  # anymail's `bounced` for the others is a permanent failure
    return TrackingEvent.Kind.HARD_BOUNCE if hard else TrackingEvent.Kind.OTHER


def recipient_id_of(event) -> int | None:
    """Our recipient id, as the send carried it: Postmark metadata, or (SES) the idempotency
    header that SES notifications echo back in `mail.headers`."""
    candidates = [(event.metadata or {}).get(RECIPIENT_METADATA)]
    raw = event.esp_event if isinstance(event.esp_event, dict) else {}
    for header in (raw.get("mail") or {}).get("headers") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == RECIPIENT_HEADER:
            candidates.append(header.get("value"))
    for value in candidates:
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    return None


def _event_id(event) -> str:
    if event.event_id:
        return str(event.event_id)[:255]
    # Postmark sends IDs only with bounces: any other event is keyed by its whole payload.
    body = json.dumps(event.esp_event, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _find_recipient(event) -> dict | None:
    fields = ("id", "message_id", "message__customer_id", "message__status", "status")
    rid = recipient_id_of(event)
    if rid is not None:
        row = Recipient.objects.filter(pk=rid).values(*fields).first()
        if row is not None:
            return row
    if event.message_id:
        return (
            Recipient.objects.filter(provider_message_id=str(event.message_id)[:255])
            .values(*fields)
            .first()
        )
    return None


EVENT_COLUMNS = (
    "esp", "event_id", "email", "event_type", "kind", "description", "customer_id", "message_id",
    "recipient_id", "occurred_at", "received_at",
)  # fmt: skip


def _insert_new(values: dict) -> bool:
    """Insert the event row unless its (esp, event_id, email) is stored already: one statement,
    no savepoint. True if it is new."""
    table = TrackingEvent._meta.db_table
    marks = ", ".join(["%s"] * len(EVENT_COLUMNS))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(EVENT_COLUMNS)}) VALUES ({marks}) "  # noqa: S608
            "ON CONFLICT DO NOTHING RETURNING id",
            [values[column] for column in EVENT_COLUMNS],
        )
        return cursor.fetchone() is not None


@transaction.atomic
def record(event, *, esp_name: str) -> Outcome:
    """Store one anymail tracking event and act on it (see the module's docstring)."""
    email = (event.recipient or "").strip().lower()[:254]
    kind = kind_of(event, esp_name)
    found = _find_recipient(event)
    new = _insert_new(
        {
            "esp": esp_name[:30],
            "event_id": _event_id(event),
            "email": email,
            "event_type": str(event.event_type)[:20],
            "kind": kind,
            "description": str(event.description or "")[:255],
            "customer_id": found and found["message__customer_id"],
            "message_id": found and found["message_id"],
            "recipient_id": found and found["id"],
            "occurred_at": event.timestamp,
            "received_at": timezone.now(),
        }
    )
    if not new:
        return Outcome(new=False, kind=kind)  # seen before: a retry or a duplicate delivery
    if found is None:
        log.warning("%s %s event for %s names no recipient of ours", esp_name, kind, email)
        return Outcome(new=True, kind=kind)
    suppressed = False
    if kind != TrackingEvent.Kind.OTHER and email:
        reason = (
            Suppression.Reason.HARD_BOUNCE
            if kind == TrackingEvent.Kind.HARD_BOUNCE
            else Suppression.Reason.COMPLAINT
        )
        suppressed = bool(
            suppressions.suppress(
                customer_id=found["message__customer_id"],
                emails=[email],
                reason=reason,
                source=f"{esp_name} webhook: {event.description or ''}"[:200],
            )
        )
    settled = _settle(found, event.event_type, esp_name)
    halted = ""
    if kind != TrackingEvent.Kind.OTHER and found["message__status"] == Message.Status.SENDING:
        halted = check_halt(message_id=found["message_id"])
    return Outcome(True, kind, found["id"], suppressed, settled, halted)


def _settle(found: dict, event_type: str, esp_name: str) -> str:
    """An `unknown` recipient (the worker could not tell whether the provider took it) settled
    by what the provider says happened to it."""
    if found["status"] != Recipient.Status.UNKNOWN:
        return ""
    if event_type in ACCEPTED_TYPES:
        to, note = Recipient.Status.SENT, ""
    elif event_type in REFUSED_TYPES:
        to, note = Recipient.Status.FAILED, f"{esp_name} reported it {event_type}"
    else:
        return ""
    changed = Recipient.objects.filter(pk=found["id"], status=Recipient.Status.UNKNOWN).update(
        status=to, last_error=note
    )
    return to if changed else ""


def rates(message: Message) -> tuple[int, int, int]:
    """(sends judged, hard bounces, complaints) over the message's last `halt_window` sends."""
    window = message.customer.halt_window
    sql = f"""
        WITH last AS (
            SELECT id FROM {Recipient._meta.db_table}
            WHERE message_id = %s AND status = %s ORDER BY id DESC LIMIT %s
        )
        SELECT
            (SELECT COUNT(*) FROM last),
            COUNT(DISTINCT CASE WHEN e.kind = %s THEN e.recipient_id END),
            COUNT(DISTINCT CASE WHEN e.kind = %s THEN e.recipient_id END)
        FROM {TrackingEvent._meta.db_table} e JOIN last ON e.recipient_id = last.id
        WHERE e.kind <> %s
    """  # noqa: S608 (table names from the models, values as parameters)
    params = [
        message.pk,
        Recipient.Status.SENT,
        window,
        TrackingEvent.Kind.HARD_BOUNCE,
        TrackingEvent.Kind.COMPLAINT,
        TrackingEvent.Kind.OTHER,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        sends, bounces, complaints = cursor.fetchone()
    return int(sends), int(bounces), int(complaints)


def halt_reason(*, sends: int, bounces: int, complaints: int, customer) -> str:
    """Why a message with these counts must stop ("" if it may go on). At the threshold, it
    stops: Gmail's and Yahoo's limits are "below 0.3 %"."""
    if sends < HALT_MIN_SENDS:
        return ""
    for count, limit, what in (
        (bounces, customer.halt_bounce_percent, "hard-bounce"),
        (complaints, customer.halt_complaint_percent, "complaint"),
    ):
        if Decimal(count) * 100 >= Decimal(limit) * sends:
            rate = Decimal(count) * 100 / sends
            return (
                f"Halted automatically: {what} rate {rate:.2f} % ({count} of the last {sends} "
                f"sends) reached the customer's limit of {limit} %."
            )
    return ""


def check_halt(*, message_id: int) -> str:
    """Pause a sending message whose rates reached its customer's thresholds; returns why."""
    message = Message.objects.select_related("customer").get(pk=message_id)
    if message.status != Message.Status.SENDING:
        return ""
    sends, bounces, complaints = rates(message)
    reason = halt_reason(
        sends=sends, bounces=bounces, complaints=complaints, customer=message.customer
    )
    if reason:
        services.message_halt(message_id=message_id, reason=reason)
    return reason


def counts(message_id: int) -> dict[str, int]:
    """Hard bounces and complaints received for a message (the message page)."""
    rows = (
        TrackingEvent.objects.filter(message_id=message_id)
        .exclude(kind=TrackingEvent.Kind.OTHER)
        .values_list("kind")
        .annotate(n=Count("id"))
    )
    found = dict(rows)
    return {
        "hard_bounces": found.get(TrackingEvent.Kind.HARD_BOUNCE, 0),
        "complaints": found.get(TrackingEvent.Kind.COMPLAINT, 0),
    }
