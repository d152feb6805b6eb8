"""Start latency of scheduled sends: 100 messages scheduled for the same minute across 20
customers, from the scheduled time to each message's first grant.

    DATABASE_URL=postgres://… REDIS_URL=redis://…/n python -m bench.schedule

Runs the production topology of bench.harness (uvicorn, Celery workers and beat with the
watchdog every WATCHDOG_S at its default, local workers in threads, the sandbox provider) twice
in one run, each time with a fresh fleet:

- watchdog only (SCHEDULE_HANDOVER=false): the watchdog starts what is due, so a start waits for
  the first watchdog run after its time;
- hand-over (SCHEDULE_HANDOVER=true, the default): the watchdog also hands the messages due
  before its next run to Celery with an `eta` of their scheduled time (sending/scheduling.py).

The JSON's `start_latency_*` are the default's (hand-over); `watchdog_only_start_latency_*` the
alternative's, measured beside it in the same run.

Each customer has 5 messages of 2 recipients and a batch size of 20, so its first grant takes
recipients of all five: a message's first grant measures its start, not its turn behind the
customer's other messages. Every message is scheduled for the same whole minute, at least
LEAD_S ahead. A message's first grant is the earliest `granted_at` of a lease holding one of
its recipients; its start is `started_at` (both are reported, and the time between them: the
conductor's tick, a worker's start and its first check-in). Prints a line per round, then JSON
(last line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import UTC, datetime, timedelta

from bench import deliverability
from bench.harness import (
    Fleet,
    FleetSpec,
    configure_environment,
    flush_redis,
    insert_recipients,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/emailops_bench_schedule"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
CUSTOMERS = 20
MESSAGES_PER_CUSTOMER = 5
RECIPIENTS = 2
LEAD_S = 20  # the scheduled minute is at least this far ahead (the fleet is up by then)
TIMEOUT_S = 60  # after the scheduled time, every message must have had its first grant


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _summary(values: list[float]) -> dict:
    return {
        "p50_ms": _r(_percentile(values, 0.50)),
        "p95_ms": _r(_percentile(values, 0.95)),
        "max_ms": _r(max(values) if values else None),
    }


def _r(value):
    return None if value is None else round(value, 1)


def _messages(fleet: Fleet) -> list[int]:
    """Each fleet customer's draft, plus MESSAGES_PER_CUSTOMER - 1 more of RECIPIENTS each."""
    from django.db import connection

    from sending.models import Message

    ids = []
    for c in fleet.customers:
        ids.append(c.message_id)
        for _ in range(MESSAGES_PER_CUSTOMER - 1):
            message = Message.objects.create(
                customer_id=c.customer_id,
                subject="Scheduled {{ first_name }}",
                text_body="Hello {{ first_name }}.",
            )
            insert_recipients(connection, message.pk, RECIPIENTS)
            ids.append(message.pk)
    return ids


def _first_grants(message_ids: list[int]) -> dict[int, datetime]:
    from sending.models import Lease, Recipient

    owner = dict(
        Recipient.objects.filter(message_id__in=message_ids).values_list("id", "message_id")
    )
    customers = set(
        Recipient.objects.filter(message_id__in=message_ids).values_list(
            "message__customer_id", flat=True
        )
    )
    first: dict[int, datetime] = {}
    for granted_at, recipient_ids in Lease.objects.filter(customer_id__in=customers).values_list(
        "granted_at", "recipient_ids"
    ):
        for rid in recipient_ids:
            message_id = owner.get(rid)
            if message_id is not None and (
                message_id not in first or granted_at < first[message_id]
            ):
                first[message_id] = granted_at
    return first


def run_round(handover: bool) -> dict:
    from sending import services
    from sending.models import Message

    os.environ["SCHEDULE_HANDOVER"] = "true" if handover else "false"
    spec = FleetSpec(
        customers=CUSTOMERS,
        per_minute=600,
        recipients=RECIPIENTS,
        batch_size=20,
        concurrency=2,
        max_workers=1,
        latency_ms=50.0,
        slug_prefix="bench-schedule-",
    )
    fleet = Fleet(spec)
    try:
        fleet.create()
        message_ids = _messages(fleet)
        fleet.start()
        now = datetime.now(UTC)
        at = (now + timedelta(seconds=LEAD_S + 60)).replace(second=0, microsecond=0)
        for message_id in message_ids:
            services.message_schedule(message_id=message_id, at=at)
        while datetime.now(UTC) < at + timedelta(seconds=TIMEOUT_S):
            fleet.check_alive()
            if len(_first_grants(message_ids)) == len(message_ids):
                break
            time.sleep(1)
        grants = _first_grants(message_ids)
        starts = dict(Message.objects.filter(pk__in=message_ids).values_list("pk", "started_at"))
        to_grant = [(grants[m] - at).total_seconds() * 1000 for m in message_ids if m in grants]
        to_start = [(starts[m] - at).total_seconds() * 1000 for m in message_ids if starts.get(m)]
        # From its start to its first grant: the conductor's tick, a worker's start and its
        # first check-in.
        start_to_grant = [
            (grants[m] - starts[m]).total_seconds() * 1000
            for m in message_ids
            if m in grants and starts.get(m)
        ]
        return {
            "mechanism": "watchdog + hand-over to Celery" if handover else "watchdog only",
            "messages": len(message_ids),
            "granted": len(to_grant),
            "started": len(to_start),
            "scheduled_for": at.isoformat(),
            "first_grant": _summary(to_grant),
            "started_at": _summary(to_start),
            "start_to_first_grant": _summary(start_to_grant),
        }
    finally:
        fleet.stop()
        fleet.delete()


def _deliverability(events: int) -> dict:
    """Webhook ingestion and one-click unsubscribes over HTTP, each beside its baseline (the
    server's cheapest answers), as `python -m bench.deliverability` measures them."""
    from bench.worker_api import Server

    server = Server()
    try:
        server.wait_ready()
        webhooks = deliverability.measure_webhooks(events, server=server)
        unsubscribes = deliverability.measure_unsubscribes(max(1, events // 2), server=server)
    finally:
        server.stop()
    print(f"[deliverability] {json.dumps({**webhooks, **unsubscribes})}", flush=True)
    return {**webhooks, **unsubscribes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.schedule", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--skip-watchdog-only", action="store_true", help="only the default (hand-over) round"
    )
    parser.add_argument(
        "--events",
        type=int,
        default=10_000,
        help="tracking events posted for the webhook figure (bench.deliverability); 0 skips it",
    )
    args = parser.parse_args(argv)
    # The webhook and unsubscribe figures the issue asks beside the start latency come from
    # bench.deliverability, on the same database; its server needs the webhook secret it posts.
    os.environ["ANYMAIL_WEBHOOK_SECRET"] = deliverability.WEBHOOK_SECRET
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    conf = configure_environment(database_url=database_url, redis_url=redis_url)
    from django.conf import settings

    print(f"bench.schedule: load average at start {conf['load']} (2 cores)", flush=True)
    rounds = {}
    try:
        for name, handover in (("watchdog", False), ("handover", True)):
            if name == "watchdog" and args.skip_watchdog_only:
                continue
            flush_redis(redis_url)
            rounds[name] = run_round(handover)
            print(f"[{name}] {json.dumps(rounds[name])}", flush=True)
    finally:
        flush_redis(redis_url)
    delivered = _deliverability(args.events) if args.events else {}
    # The default mechanism (SCHEDULE_HANDOVER on) is the figure; the watchdog alone beside it.
    ours = rounds["handover"]["first_grant"]
    other = rounds.get("watchdog", {}).get("first_grant", {})
    out = {
        "start_latency_p50_ms": ours["p50_ms"],
        "start_latency_p95_ms": ours["p95_ms"],
        "watchdog_only_start_latency_p50_ms": other.get("p50_ms"),
        "watchdog_only_start_latency_p95_ms": other.get("p95_ms"),
        "webhook_events_per_s": delivered.get("webhook_events_per_s"),
        "unsubscribes_per_s": delivered.get("unsubscribes_per_s"),
        "deliverability": delivered,
        "rounds": rounds,
        "settings": {
            "customers": CUSTOMERS,
            "messages_per_customer": MESSAGES_PER_CUSTOMER,
            "watchdog_s": settings.WATCHDOG_S,
            "database": conf["database"],
            "redis": conf["redis"],
        },
        "load_avg": f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}",
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
