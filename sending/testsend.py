"""Test sends: a message rendered with one recipient's merge data, sent to a few staff addresses
through the customer's own provider, charged to the customer's minute like any send.

Sent here, in the request, rather than as a tiny message through the workers: a test send must
not queue behind a running send of the customer (its messages are served oldest-started first),
nor wait for a worker to start, and a few sends need no pacing beyond one charge. The charge is
made the way a grant is: under the customer's SendLimit row lock (`ledger.lock_limits`, which
serializes every change to its minutes), against the minute's budget as a check-in reads it
(charged, plus what the previous minute's open leases may still spill into it), and committed
before anything is sent, so a check-in that follows sees it. A test send that does not fit is
refused, never sent: it never pushes a minute over.

A send must arrive inside the minute it is charged to: it starts only when its provider calls
(all at once, each bounded by SEND_TIMEOUT_MS) end before the minute's trailing guard band;
later in the minute it waits for the next one to open (a few seconds at most).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import F

from . import ledger, pacing, wire
from .clock import Clock, ms_to_datetime
from .models import CustomerMinute, Message, Recipient, TestSend
from .providers import SendError, open_provider

MAX_ADDRESSES = 5
# Time kept between the charge's commit and the provider calls' start.
START_MARGIN_MS = 200


def parse_addresses(text: str) -> list[str]:
    """One to MAX_ADDRESSES addresses, separated by commas, spaces or new lines."""
    found, seen = [], set()
    for raw in text.replace(",", " ").split():
        validate_email(raw)
        if raw.lower() not in seen:
            seen.add(raw.lower())
            found.append(raw)
    if not found:
        raise ValidationError("Enter at least one address.")
    if len(found) > MAX_ADDRESSES:
        raise ValidationError(f"At most {MAX_ADDRESSES} addresses per test send.")
    return found


def _charge(customer_id: int, size: int) -> tuple[int, int] | str:
    """Charge `size` sends to the current minute: (minute row id, minute start ms), or why not.

    Waits for the next minute when this one has too little time left for the sends to arrive.
    """
    window_ms = settings.SEND_WINDOW_MS
    for _ in range(2):
        with transaction.atomic():
            limits = ledger.lock_limits(customer_id)
            if limits.paused:
                return "The customer's sending is paused."
            now_ms = Clock.read().now_ms
            start = pacing.minute_start(now_ms, window_ms)
            opens = start + limits.guard_ms
            closes = start + window_ms - limits.guard_ms
            if opens <= now_ms and now_ms + START_MARGIN_MS + settings.SEND_TIMEOUT_MS <= closes:
                minute = ms_to_datetime(start)
                pool = ledger.read_pool(
                    customer_id=customer_id, minute_start=minute, window_ms=window_ms
                )
                budget = limits.per_minute - pool.ledger.charged - max(pool.open_spill, 0)
                if budget < size:
                    return (
                        f"This minute's budget has {max(budget, 0)} of {limits.per_minute} left: "
                        f"not enough for {size}. Try again when the minute ends."
                    )
                pool = ledger.with_minute_row(
                    pool, customer_id=customer_id, minute_start=minute, cap=limits.per_minute
                )
                ledger.charge(minute_id=pool.minute_id, size=size, cap=limits.per_minute)
                return pool.minute_id, start
        # Outside the lock: wait for this minute's window to open, or the next one's.
        opens_next = opens if now_ms < opens else start + window_ms + limits.guard_ms
        wait_ms = opens_next - Clock.read().now_ms
        time.sleep(max(wait_ms, 0) / 1000)
    return "No minute had room for it; try again."


def send_test(
    *, message_id: int, addresses: list[str], recipient_id: int | None = None, user=None
) -> TestSend:
    """Send `message` to `addresses` rendered with a recipient's merge data (the first one's when
    `recipient_id` is None); recorded as a TestSend whatever happens."""
    if user is not None and not user.has_perm("sending.start_message"):
        raise PermissionDenied("You do not have permission to send.")
    message = Message.objects.select_related("customer__provider_account").get(pk=message_id)
    customer = message.customer
    provider_config = wire.provider_payload(customer)
    if provider_config is None:
        raise ValidationError(f"{customer} has no provider account to send through.")
    recipients = Recipient.objects.filter(message=message)
    if recipient_id is not None:
        recipient = recipients.filter(pk=recipient_id).first()
        if recipient is None:
            raise ValidationError("That recipient is not one of this message's.")
    else:
        recipient = recipients.order_by("id").first()
    subject, text, html = message.compiled().render(recipient.merge_data if recipient else {})
    content = wire.message_payload(message)
    record = TestSend(message=message, addresses=addresses, merge_from=recipient, created_by=user)
    charged = _charge(customer.pk, len(addresses))
    if isinstance(charged, str):
        record.outcome, record.detail = TestSend.Outcome.REFUSED, charged
        record.save()
        return record
    minute_id, minute_start_ms = charged
    record.minute_start = ms_to_datetime(minute_start_ms)
    record.save()
    timeout_s = settings.SEND_TIMEOUT_MS / 1000
    provider = open_provider(provider_config, timeout=timeout_s)

    def send(numbered):
        i, to = numbered
        try:
            return (
                to,
                provider.send(
                    recipient_id=f"test-{record.pk}-{i}",
                    to=to,
                    subject=f"[Test] {subject}",
                    text=text,
                    html=html,
                    from_email=content["from_email"],
                    reply_to=content["reply_to"],
                ),
                None,
            )
        except SendError as exc:
            return to, "", exc.message

    try:
        with ThreadPoolExecutor(len(addresses)) as pool:
            results = list(pool.map(send, enumerate(addresses)))
    finally:
        provider.close()
    sent = [f"{to}: {provider_id}" for to, provider_id, error in results if error is None]
    failed = [f"{to}: {error}" for to, _, error in results if error is not None]
    CustomerMinute.objects.filter(pk=minute_id).update(
        sent=F("sent") + len(sent), failed=F("failed") + len(failed)
    )
    record.outcome = TestSend.Outcome.FAILED if failed else TestSend.Outcome.SENT
    record.detail = "\n".join(sent + failed)
    record.save(update_fields=["outcome", "detail"])
    return record
