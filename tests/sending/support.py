"""Helpers for the check-in tests and those that build on them (conductor, concurrency, the
OpenAPI contract): a customer and a sending message made directly, and a check-in at a fixed
time through the real service."""

from datetime import timedelta

import orjson
from django.utils import timezone

from customers.models import Customer, SendLimit
from sending import checkin, tokens
from sending.clock import Clock
from sending.models import Message, Recipient
from sending.wire import parse_checkin

WINDOW_MS = 60_000
# 1.5 s into a calendar minute: inside the window, far from both guard bands.
T0 = 1_795_000_000_000 - 1_795_000_000_000 % WINDOW_MS + 1_500


def make_customer(slug="state-u", *, per_minute=600, batch_size=50, max_workers=5):
    customer = Customer.objects.create(name=slug, slug=slug, default_from_email=f"news@{slug}.edu")
    SendLimit.objects.create(
        customer=customer, per_minute=per_minute, batch_size=batch_size, max_workers=max_workers
    )
    return customer


def make_message(customer, n, *, started_minutes_ago=0, subject="Hello {{ first_name }}"):
    message = Message.objects.create(
        customer=customer,
        subject=subject,
        text_body="Hi {{ first_name }}",
        status=Message.Status.SENDING,
        started_at=timezone.now() - timedelta(minutes=started_minutes_ago),
    )
    Recipient.objects.bulk_create(
        Recipient(message=message, email=f"s{i}@{customer.slug}.edu", merge_data={"first_name": i})
        for i in range(n)
    )
    return message


def call(worker, token, seq, report=None, *, at=T0, request_id="inv-1"):
    body = {"worker_id": worker.pk, "seq": seq, "request_id": request_id, "report": report}
    answer = checkin.checkin(
        claims=tokens.verify(token), request=parse_checkin(body), clock=Clock(at)
    )
    # As the worker receives it: the answer embeds pre-serialized JSON (orjson.Fragment).
    return orjson.loads(orjson.dumps(answer))


def report_all_sent(answer, *, done_ms=100):
    batch = answer["batch"]
    return {
        "lease_id": batch["lease_id"],
        "elapsed_ms": 500,
        "results": [
            {"id": r["id"], "status": "sent", "provider_id": f"p{r['id']}", "done_ms": done_ms}
            for r in batch["recipients"]
        ],
    }
