"""Deliverability benchmark: ``python -m bench.deliverability`` (PostgreSQL and Redis).

Starts the ASGI server we ship (``uvicorn emailops.asgi:application --workers 2``, production
settings) as a subprocess and drives it over HTTP from client threads, each with its own
persistent connection:

- ``measure_webhooks(n)``: n Postmark HardBounce tracking events (the JSON Postmark posts, one
  event per request, behind the webhook's basic auth), each naming one of n recipients of a
  finished message, so each commits an event row and a suppression before it is answered. Timed
  from the first request until the last answer; then the suppression rows are counted (all n
  must be there). The same n events are posted again: ``webhook_duplicates_per_s``, and the
  rows must not change (idempotent on the event id).
- ``measure_unsubscribes(n)``: n one-click unsubscribe POSTs (RFC 8058: no cookies, the body
  ``List-Unsubscribe=One-Click``), each to a different address's signed link; all n
  suppressions must be there afterwards.

Each figure is printed beside baselines measured against the same server in the same run:
``HEAD`` on the webhook URL (Django with the site's middleware and URL routing, anymail's view,
no database: what any request to these views costs before our code runs), and ``/healthz``
(the ASGI app without Django's request handling).

Setup: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/emailops_bench_deliver`` (created if
missing, migrated), ``REDIS_URL`` (default ``redis://127.0.0.1:6379/11``). The bench deletes the
customers (and their rows) it made. The client threads share the machine with the server: on a
small machine the figures are the pair's, not the server's alone.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

CONCURRENCY = 8
SLUG_PREFIX = "bench-deliver-"
ACCOUNT_PREFIX = "bench-deliver-"
POSTMARK_PATH = "/public/anymail/postmark/tracking/"
HEALTH_PATH = "/healthz"
WEBHOOK_SECRET = "bench:" + secrets.token_urlsafe(24)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def drive(port: int, requests: list[tuple[str, str, bytes, dict]], *, threads=CONCURRENCY):
    """Send the requests (method, path, body, headers) from `threads` persistent connections;
    returns (seconds from the first request to the last answer, {status: count})."""
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    position = iter(range(len(requests)))

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        seen: dict[int, int] = {}
        try:
            while True:
                with lock:
                    index = next(position, None)
                if index is None:
                    break
                method, path, body, headers = requests[index]
                conn.request(method, path, body=body or None, headers=headers)
                response = conn.getresponse()
                response.read()
                seen[response.status] = seen.get(response.status, 0) + 1
        finally:
            conn.close()
            with lock:
                for status, count in seen.items():
                    statuses[status] = statuses.get(status, 0) + count

    workers = [threading.Thread(target=run) for _ in range(threads)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began, statuses


def _all_ok(statuses: dict[int, int], n: int, what: str) -> None:
    if statuses.get(200, 0) != n:
        raise RuntimeError(f"{what}: expected {n} answers 200, got {statuses}")


def baselines(port: int, n: int) -> dict:
    """Trivial requests to the same server: HEAD on the webhook URL, and the health check."""
    head = [("HEAD", POSTMARK_PATH, b"", {})] * n
    seconds, statuses = drive(port, head)
    _all_ok(statuses, n, "baseline HEAD")
    django_rate = _rate(n, seconds)
    seconds, statuses = drive(port, [("GET", HEALTH_PATH, b"", {})] * n)
    _all_ok(statuses, n, "baseline /healthz")
    return {"baseline_django_head_per_s": django_rate, "baseline_health_per_s": _rate(n, seconds)}


def _finished_message(n: int):
    """A customer with a completed message of n sent recipients; returns (customer, rows)."""
    from django.db import connection
    from django.utils import timezone

    from bench.harness import insert_recipients
    from customers.models import Customer, SendLimit
    from sending.models import Message, Recipient

    slug = SLUG_PREFIX + secrets.token_hex(4)
    customer = Customer.objects.create(name=slug, slug=slug, default_from_email=f"n@{slug}.edu")
    SendLimit.objects.create(customer=customer)
    message = Message.objects.create(
        customer=customer,
        subject="Bench",
        text_body="Hi",
        status=Message.Status.COMPLETED,
        started_at=timezone.now(),
        completed_at=timezone.now(),
    )
    insert_recipients(connection, message.pk, n, sent=n)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sending_recipient")
    rows = list(Recipient.objects.filter(message=message).values_list("id", "email"))
    return customer, rows


def _postmark_bounce(recipient_id: int, email: str) -> bytes:
    return json.dumps(
        {
            "RecordType": "Bounce",
            "ID": recipient_id,
            "Type": "HardBounce",
            "TypeCode": 1,
            "MessageID": f"bench-{recipient_id}",
            "Metadata": {"emailops_recipient_id": str(recipient_id)},
            "Description": "The server was unable to deliver your message",
            "Email": email,
            "BouncedAt": "2026-12-03T16:33:54Z",
        }
    ).encode()


def measure_webhooks(n: int = 10_000, *, server=None) -> dict:
    """Tracking events per second over HTTP, until their suppressions are committed."""
    from customers.models import Suppression
    from sending.models import TrackingEvent

    with _server(server) as running:
        port = running.port
        customer, rows = _finished_message(n)
        auth = "Basic " + base64.b64encode(WEBHOOK_SECRET.encode()).decode()
        headers = {"Content-Type": "application/json", "Authorization": auth}
        events = [("POST", POSTMARK_PATH, _postmark_bounce(rid, email), headers)
                  for rid, email in rows]  # fmt: skip
        figures = baselines(port, min(n, 5_000))
        seconds, statuses = drive(port, events)
        _all_ok(statuses, n, "webhooks")
        committed = Suppression.objects.filter(customer=customer).count()
        if committed != n:
            raise RuntimeError(f"{committed} suppressions committed, not {n}")
        again, statuses = drive(port, events)
        _all_ok(statuses, n, "repeated webhooks")
        stored = TrackingEvent.objects.filter(customer=customer).count()
        if (Suppression.objects.filter(customer=customer).count(), stored) != (n, n):
            raise RuntimeError("a repeated event changed the rows")
        _cleanup(customer.pk)
    return {
        "webhook_events": n,
        "webhook_events_per_s": _rate(n, seconds),
        "webhook_duplicates_per_s": _rate(n, again),
        "webhook_baseline_django_head_per_s": figures["baseline_django_head_per_s"],
        "webhook_baseline_health_per_s": figures["baseline_health_per_s"],
    }


def measure_unsubscribes(n: int = 5_000, *, server=None) -> dict:
    """One-click unsubscribe POSTs per second, each suppressing its address at once."""
    from django.test import override_settings

    from customers.models import Customer, Suppression
    from customers.unsubscribe import url_maker

    with _server(server) as running:
        port = running.port
        slug = SLUG_PREFIX + secrets.token_hex(4)
        customer = Customer.objects.create(name=slug, slug=slug, default_from_email=f"n@{slug}.edu")
        with override_settings(PUBLIC_BASE_URL=f"http://127.0.0.1:{port}"):
            link = url_maker()
            urls = [link(customer.pk, f"u{i}@{slug}.example") for i in range(n)]
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        posts = [("POST", urlsplit(url).path, b"List-Unsubscribe=One-Click", headers)
                 for url in urls]  # fmt: skip
        figures = baselines(port, min(n, 5_000))
        seconds, statuses = drive(port, posts)
        _all_ok(statuses, n, "unsubscribes")
        committed = Suppression.objects.filter(customer=customer).count()
        if committed != n:
            raise RuntimeError(f"{committed} suppressions committed, not {n}")
        _cleanup(customer.pk)
    return {
        "unsubscribes": n,
        "unsubscribes_per_s": _rate(n, seconds),
        "unsubscribe_baseline_django_head_per_s": figures["baseline_django_head_per_s"],
        "unsubscribe_baseline_health_per_s": figures["baseline_health_per_s"],
    }


class _server:
    """The given running server, or one started (and stopped) here."""

    def __init__(self, server) -> None:
        self.given, self.started = server, None

    def __enter__(self):
        if self.given is not None:
            return self.given
        from bench.worker_api import Server

        self.started = Server()
        self.started.wait_ready()
        return self.started

    def __exit__(self, *exc) -> None:
        if self.started is not None:
            self.started.stop()


def _cleanup(customer_id: int) -> None:
    from bench.support import delete_customers
    from sending.models import TrackingEvent

    TrackingEvent.objects.filter(customer_id=customer_id).delete()
    delete_customers(
        slug_prefix=SLUG_PREFIX, account_prefix=ACCOUNT_PREFIX, customer_ids=[customer_id]
    )


def _configure() -> dict:
    os.environ["ANYMAIL_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    os.environ.setdefault(
        "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/emailops_bench_deliver"
    )
    from bench.harness import configure_environment

    return configure_environment(
        database_url=os.environ["DATABASE_URL"],
        redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"),
    )


def main(argv: list[str] | None = None, *, report: Callable = print) -> int:
    args = argv if argv is not None else sys.argv[1:]
    n = int(args[0]) if args else 10_000
    setup = _configure()
    from bench.worker_api import Server

    server = Server()
    try:
        server.wait_ready()
        webhooks = measure_webhooks(n, server=server)
        report(
            f"webhooks: {webhooks['webhook_events_per_s']} events/s "
            f"({webhooks['webhook_duplicates_per_s']} /s repeated), beside "
            f"{webhooks['webhook_baseline_django_head_per_s']} HEAD/s and "
            f"{webhooks['webhook_baseline_health_per_s']} /healthz/s"
        )
        unsubscribes = measure_unsubscribes(max(1, n // 2), server=server)
        report(
            f"unsubscribes: {unsubscribes['unsubscribes_per_s']} /s, beside "
            f"{unsubscribes['unsubscribe_baseline_django_head_per_s']} HEAD/s"
        )
    except Exception:
        report(f"server log (tail):\n{server.tail()}")
        raise
    finally:
        server.stop()
    report(
        json.dumps(
            {
                **webhooks,
                **unsubscribes,
                "server": "uvicorn --workers 2",
                "client_threads": CONCURRENCY,
                "cpus": os.cpu_count(),
                "load_before": setup["load"],
                "load_after": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
