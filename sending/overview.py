"""The overview of every customer sending now: what the overview page opens with."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Exists, OuterRef, Q

from customers.models import Customer

from . import alerts, live
from .clock import datetime_to_ms, ms_to_datetime
from .models import ConductorLease, CustomerMinute, Lease, Message

SPARK_MINUTES = 30


def customers_sending() -> list[Customer]:
    """Customers with a message sending or paused, or batches still out."""
    busy = Message.objects.filter(
        customer=OuterRef("pk"), status__in=[Message.Status.SENDING, Message.Status.PAUSED]
    )
    out = Lease.objects.filter(customer=OuterRef("pk"), state=Lease.State.OPEN)
    return list(
        Customer.objects.filter(Q(Exists(busy)) | Q(Exists(out)))
        .select_related("send_limit")
        .order_by("name")
    )


def overview(now_ms: int) -> dict:
    customers = customers_sending()
    ids = [c.pk for c in customers]
    window = int(settings.SEND_WINDOW_MS)
    minute_ms = now_ms - now_ms % window
    since = ms_to_datetime(minute_ms) - timedelta(milliseconds=window * SPARK_MINUTES)
    spark: dict[int, list[list[int]]] = {c: [] for c in ids}
    for customer_id, start, sent, cap in (
        CustomerMinute.objects.filter(customer_id__in=ids, minute_start__gte=since)
        .order_by("minute_start")
        .values_list("customer_id", "minute_start", "sent", "cap")
    ):
        spark[customer_id].append([datetime_to_ms(start), sent, cap])
    heartbeats = dict(
        ConductorLease.objects.filter(customer_id__in=ids).values_list(
            "customer_id", "heartbeat_at"
        )
    )
    samples = live.last_samples(ids)
    silent_after_ms = 2 * 1000 * float(getattr(settings, "CONDUCTOR_LEASE_S", 5))
    lines = []
    for customer in customers:
        sample = samples.get(customer.pk)
        line = live.overview_line(sample) if sample else {"customer": customer.pk, "alerts": []}
        heartbeat = heartbeats.get(customer.pk)
        heartbeat_ms = datetime_to_ms(heartbeat) if heartbeat else None
        sending = Message.objects.filter(customer=customer, status=Message.Status.SENDING)
        if (
            heartbeat_ms is not None
            and now_ms - heartbeat_ms > silent_after_ms
            and sending.exists()
        ):
            line["alerts"] = [
                *line.get("alerts", []),
                {
                    "kind": alerts.SILENT_CONDUCTOR,
                    "title": alerts.TITLES[alerts.SILENT_CONDUCTOR],
                    "text": f"no tick for {(now_ms - heartbeat_ms) // 1000} s",
                },
            ]
        limit = customer.send_limit
        lines.append(
            {
                **line,
                "name": customer.name,
                "time_zone": str(customer.time_zone),
                "per_minute": limit.per_minute,
                "max_workers": limit.max_workers,
                "paused": limit.paused,
                "spark": spark[customer.pk],
                "heartbeat": heartbeat_ms,
            }
        )
    return {"t": now_ms, "window_ms": window, "customers": lines}
