"""Check-in CPU benchmark: ``python -m bench.checkin_cpu`` (PostgreSQL only).

The Python CPU one check-in costs the server, measured in-process: ``time.process_time()`` around
``sending.checkin.checkin`` for check-ins that report 500 recipients sent and are granted the
next 500, one worker, no HTTP. What PostgreSQL spends is not in the figure (another process);
the statements' round trips are, as the time this process waits is not CPU.

Setup: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/emailops_bench_cpu`` (created and
migrated if missing). The bench makes its own customer, message and recipients, and deletes them
at the end.

``--addresses``: how the recipients come to be.
- ``generated`` (the default): one ``INSERT … SELECT generate_series``, addresses ``r1@…``,
  ``r2@…`` in id order, so ids and the unique (message, lower(email)) index run nearly alike.
- ``shuffled``: through the real import (``sending.imports.import_recipients``) from a CSV whose
  addresses are in random order, as a list sorted by name or student number is. Every status
  change writes a new entry into that unique index (a status change is never a HOT update), so
  where the ids of a batch sit in that index is part of a check-in's cost.

Figures (last line, one JSON object): ``cpu_ms_median`` / ``cpu_ms_mean`` (Python CPU per
check-in), ``wall_ms_median`` (its wall time, the database's share included), ``db_cpu_ms_mean``
(CPU of this connection's PostgreSQL backend per counted check-in, from ``/proc``; null when the
database runs elsewhere), ``checkins`` (counted: 500 in, 500 out), ``warmup`` (check-ins not
counted), ``addresses``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet

from bench import proc_cpu
from bench.support import delete_customers, ensure_database, insert_queued_recipients

BATCH = 500
WARMUP = 20
CHECKINS = 300
SLUG_PREFIX = "bench-cpu-"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/emailops_bench_cpu"


def _setup(run_id: str, addresses: str) -> int:
    from django.utils import timezone

    from customers.models import Customer, ProviderAccount, SendLimit
    from sending.models import Message

    account = ProviderAccount.objects.create(
        name=f"{SLUG_PREFIX}{run_id}",
        kind=ProviderAccount.Kind.SANDBOX,
        credentials={"api_key": "bench-not-a-secret"},
        per_minute_cap=1_000_000,
    )
    slug = f"{SLUG_PREFIX}{run_id}"
    customer = Customer.objects.create(
        name=slug, slug=slug, default_from_email=f"news@{slug}.example", provider_account=account
    )
    SendLimit.objects.create(
        customer=customer, per_minute=1_000_000, batch_size=BATCH, max_workers=1, concurrency=16
    )
    message = Message.objects.create(
        customer=customer, subject="Bench {{ first_name }}", text_body="Hello {{ first_name }}"
    )
    recipients = (WARMUP + CHECKINS + 2) * BATCH
    if addresses == "shuffled":
        _import_shuffled(message, recipients)
    else:
        insert_queued_recipients(message.pk, recipients)
    Message.objects.filter(pk=message.pk).update(
        status=Message.Status.SENDING, started_at=timezone.now()
    )
    return customer.pk


def _import_shuffled(message, n: int) -> None:
    """n recipients through the real import, from a CSV listing their addresses in random
    order (the same order every run)."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.db import connection, transaction

    from sending.imports import import_recipients

    numbers = list(range(n))
    random.Random(7).shuffle(numbers)
    lines = "".join(f"student.{i:07d}@m{message.pk}.example,Student {i}\n" for i in numbers)
    upload = SimpleUploadedFile(
        "bench.csv", f"email,first_name\n{lines}".encode(), content_type="text/csv"
    )
    with transaction.atomic():
        imported = import_recipients(message=message, file=upload).imported
    if imported != n:
        raise RuntimeError(f"imported {imported} of {n} recipients")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sending_recipient")


def _backend_cpu_s() -> float | None:
    """CPU seconds (user + system) of this connection's PostgreSQL backend, when it runs on
    this machine."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    if not Path(f"/proc/{pid}").exists():
        return None
    return proc_cpu.cpu_s([pid])


def _report(answer: dict) -> dict:
    batch = answer["batch"]
    return {
        "lease_id": batch["lease_id"],
        "elapsed_ms": 250,
        "results": [
            {"id": r["id"], "status": "sent", "provider_id": f"p{r['id']}", "done_ms": 20}
            for r in batch["recipients"]
        ],
    }


def run(customer_id: int) -> dict:
    import orjson

    from sending import checkin, tokens
    from sending.clock import Clock
    from sending.wire import parse_checkin

    worker, token = checkin.worker_start(customer_id=customer_id)
    now = time.time_ns() // 1_000_000
    at = now - now % 60_000 + 1_500  # inside the window of the current minute
    cpu, wall = [], []
    report = None
    gc.collect()
    gc.freeze()
    db_cpu_from = None
    for seq in range(1, WARMUP + CHECKINS + 1):
        if seq == WARMUP + 1:
            db_cpu_from = _backend_cpu_s()
        body = {"worker_id": worker.pk, "seq": seq, "request_id": "bench", "report": report}
        claims = tokens.verify(token)
        request = parse_checkin(body)
        c0, w0 = time.process_time(), time.perf_counter()
        answer = checkin.checkin(claims=claims, request=request, clock=Clock(at + seq))
        c1, w1 = time.process_time(), time.perf_counter()
        answer = orjson.loads(orjson.dumps(answer))  # as the worker receives it
        if answer["decision"] != "send":
            raise RuntimeError(f"check-in {seq} was answered {answer}")
        if seq > WARMUP and report is not None and len(answer["batch"]["recipients"]) == BATCH:
            cpu.append((c1 - c0) * 1000)
            wall.append((w1 - w0) * 1000)
        token, report = answer["token"], _report(answer)
    db_cpu_to = _backend_cpu_s()
    db_cpu_ms = None
    if db_cpu_from is not None and db_cpu_to is not None:
        # Over every check-in after the warm-up (all of them report 500 and are granted 500).
        db_cpu_ms = round((db_cpu_to - db_cpu_from) * 1000 / CHECKINS, 2)
    return {
        "cpu_ms_median": round(statistics.median(cpu), 3),
        "cpu_ms_mean": round(statistics.fmean(cpu), 3),
        "wall_ms_median": round(statistics.median(wall), 3),
        "db_cpu_ms_mean": db_cpu_ms,
        "checkins": len(cpu),
        "warmup": WARMUP,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--addresses", choices=("generated", "shuffled"), default="generated")
    args = parser.parse_args(argv)
    url = os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    if not url.startswith(("postgres://", "postgresql://")):
        sys.exit("bench.checkin_cpu needs PostgreSQL: set DATABASE_URL=postgres://…")
    # Production's settings: with DEBUG on, Django would also record every query.
    os.environ["DEBUG"] = "false"
    os.environ.setdefault("SECRET_KEY", "bench-checkin-cpu-" + secrets.token_urlsafe(48))
    os.environ.setdefault(
        "WORKER_TOKEN_KEY", "bench-checkin-cpu-tokens-" + secrets.token_urlsafe(48)
    )
    os.environ.setdefault("FIELD_ENCRYPTION_KEY", Fernet.generate_key().decode())
    os.environ.setdefault("UNSUBSCRIBE_KEY", secrets.token_urlsafe(48))
    os.environ.setdefault("ANYMAIL_WEBHOOK_SECRET", "bench:" + secrets.token_urlsafe(24))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")
    import django

    django.setup()
    from django.core.management import call_command

    ensure_database()
    call_command("migrate", verbosity=0, interactive=False)
    delete_customers(slug_prefix=SLUG_PREFIX, account_prefix=SLUG_PREFIX)
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
    customer_id = _setup(run_id, args.addresses)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        figures = {**run(customer_id), "addresses": args.addresses}
    finally:
        delete_customers(slug_prefix=SLUG_PREFIX, account_prefix=SLUG_PREFIX)
    print(
        f"check-in CPU (in-process, {BATCH} in / {BATCH} out, PostgreSQL): "
        f"median {figures['cpu_ms_median']} ms, mean {figures['cpu_ms_mean']} ms of Python CPU; "
        f"wall median {figures['wall_ms_median']} ms; PostgreSQL backend "
        f"{figures['db_cpu_ms_mean']} ms a check-in; addresses {args.addresses}; load {load}"
    )
    print(json.dumps({**figures, "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
