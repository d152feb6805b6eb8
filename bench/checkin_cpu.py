"""Check-in CPU benchmark: ``python -m bench.checkin_cpu`` (PostgreSQL only).

The Python CPU one check-in costs the server, measured in-process: ``time.process_time()`` around
``sending.checkin.checkin`` for check-ins that report 500 recipients sent and are granted the
next 500, one worker, no HTTP. What PostgreSQL spends is not in the figure (another process);
the statements' round trips are, as the time this process waits is not CPU.

Setup: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/emailops_bench_cpu`` (created and
migrated if missing). The bench makes its own customer, message and recipients, and deletes them
at the end.

Figures (last line, one JSON object): ``cpu_ms_median`` / ``cpu_ms_mean`` (Python CPU per
check-in), ``wall_ms_median`` (its wall time, the database's share included), ``checkins``
(counted: 500 in, 500 out), ``warmup`` (check-ins not counted).
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime

from cryptography.fernet import Fernet

from bench.support import delete_customers, ensure_database, insert_queued_recipients

BATCH = 500
WARMUP = 20
CHECKINS = 300
SLUG_PREFIX = "bench-cpu-"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/emailops_bench_cpu"


def _setup(run_id: str) -> int:
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
        customer=customer,
        subject="Bench {{ first_name }}",
        text_body="Hello {{ first_name }}",
        status=Message.Status.SENDING,
        started_at=timezone.now(),
    )
    insert_queued_recipients(message.pk, (WARMUP + CHECKINS + 2) * BATCH)
    return customer.pk


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
    for seq in range(1, WARMUP + CHECKINS + 1):
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
    return {
        "cpu_ms_median": round(statistics.median(cpu), 3),
        "cpu_ms_mean": round(statistics.fmean(cpu), 3),
        "wall_ms_median": round(statistics.median(wall), 3),
        "checkins": len(cpu),
        "warmup": WARMUP,
    }


def main() -> int:
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
    customer_id = _setup(run_id)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        figures = run(customer_id)
    finally:
        delete_customers(slug_prefix=SLUG_PREFIX, account_prefix=SLUG_PREFIX)
    print(
        f"check-in CPU (in-process, {BATCH} in / {BATCH} out, PostgreSQL): "
        f"median {figures['cpu_ms_median']} ms, mean {figures['cpu_ms_mean']} ms of Python CPU; "
        f"wall median {figures['wall_ms_median']} ms; load {load}"
    )
    print(json.dumps({**figures, "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
