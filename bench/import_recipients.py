"""Recipient import benchmark: ``python -m bench.import_recipients`` (PostgreSQL only).

Imports a generated CSV of 100,000 rows (email plus two merge fields) into a fresh draft message
through the real service, ``sending.imports.import_recipients``, from a Django
``TemporaryUploadedFile`` as the admin page gets an upload of that size. The time covers the
whole call: parsing, validation, the duplicate checks, COPY with every index of the recipients
table, and the commit (which runs the deferred foreign-key checks).

The baseline, measured in the same run on a 5,000-row sample of the same rows: one
``Recipient.objects.create`` per row inside one transaction (the naive all-or-nothing import),
without parsing or validation, which flatters it.

Setup: ``createdb -h 127.0.0.1 -U postgres emailops_bench``, then
``DATABASE_URL=postgres://postgres@127.0.0.1:5432/emailops_bench python manage.py migrate``.
The bench creates its own customer and messages and deletes them at the end; it runs
``VACUUM ANALYZE`` on the recipients table before and after, so runs start alike.

Figures (last line, one JSON object): ``rows``, ``seconds`` (median of the runs),
``rows_per_s``, ``baseline_rows_per_s``, and ``seconds_each`` (every run).
"""

import argparse
import json
import os
import statistics
import sys
import time
import uuid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="imports, each into a new message")
    parser.add_argument("--baseline-rows", type=int, default=5_000)
    args = parser.parse_args()

    # Development's settings (secrets generated under var/), unless told otherwise.
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")
    import django

    django.setup()
    from django.db import connection

    if connection.vendor != "postgresql":
        print(
            "bench.import_recipients measures the PostgreSQL COPY path: set DATABASE_URL="
            "postgres://postgres@127.0.0.1:5432/emailops_bench (and run migrate there first); "
            f"the configured database is {connection.vendor}.",
            file=sys.stderr,
        )
        return 2

    from customers.models import Customer
    from sending.models import Message, Recipient

    tag = uuid.uuid4().hex[:8]
    customer = Customer.objects.create(
        name=f"Import bench {tag}", slug=f"import-bench-{tag}", default_from_email="b@bench.example"
    )
    try:
        _vacuum()
        data = _csv(args.rows)
        print(f"CSV: {args.rows:,} rows, {len(data) / 1e6:.1f} MB; load {_load()}")
        seconds_each = []
        for run in range(1, args.runs + 1):
            seconds = _import_once(customer, data, expected=args.rows)
            seconds_each.append(seconds)
            print(f"import run {run}: {seconds:.2f} s ({args.rows / seconds:,.0f} rows/s)")
            # Each run starts from the same table: earlier runs' rows gone, dead tuples vacuumed.
            Recipient.objects.filter(message__customer=customer).delete()
            _vacuum()
        baseline = _baseline(customer, args.baseline_rows)
        print(f"baseline: {args.baseline_rows:,} x Recipient.objects.create in {baseline:.2f} s")
    finally:
        Recipient.objects.filter(message__customer=customer).delete()
        Message.objects.filter(customer=customer).delete()
        customer.delete()
        _vacuum()
    print(f"load after: {_load()}")

    seconds = statistics.median(seconds_each)
    figures = {
        "rows": args.rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(args.rows / seconds),
        "baseline_rows_per_s": round(args.baseline_rows / baseline),
        "seconds_each": [round(s, 3) for s in seconds_each],
    }
    print(json.dumps(figures))
    return 0


def _row(i: int) -> str:
    return f"Student.{i:06d}@Example.edu,Student {i},Course {i % 40}\n"


def _csv(rows: int) -> bytes:
    return ("email,first_name,course\n" + "".join(_row(i) for i in range(rows))).encode()


def _import_once(customer, data: bytes, *, expected: int) -> float:
    from django.core.files.uploadedfile import TemporaryUploadedFile

    from sending.imports import import_recipients
    from sending.models import Message

    message = Message.objects.create(customer=customer, subject="Bench", text_body="Hi")
    upload = TemporaryUploadedFile("bench.csv", "text/csv", len(data), "utf-8")
    try:
        upload.write(data)
        upload.seek(0)
        started = time.perf_counter()
        result = import_recipients(message=message, file=upload)
        seconds = time.perf_counter() - started
    finally:
        upload.close()
    stored = message.recipients.count()
    if (result.imported, stored) != (expected, expected):
        raise SystemExit(f"imported {result.imported}, stored {stored}, expected {expected}")
    return seconds


def _baseline(customer, rows: int) -> float:
    from django.db import transaction

    from sending.models import Message, Recipient

    message = Message.objects.create(customer=customer, subject="Baseline", text_body="Hi")
    sample = [line.rstrip("\n").split(",") for line in map(_row, range(rows))]
    started = time.perf_counter()
    with transaction.atomic():
        for email, first_name, course in sample:
            Recipient.objects.create(
                message=message,
                email=email,
                merge_data={"first_name": first_name, "course": course},
            )
    return time.perf_counter() - started


def _vacuum() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE sending_recipient")


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
