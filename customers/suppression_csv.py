"""Suppression lists as CSV: import (all or nothing, by the recipient import's rules) and export.

The import reads a file with an `email` column and, optionally, `reason` (unsubscribed,
hard_bounce, complaint, manual; empty means manual) and `source`; other columns (an export's
`created_at`) are ignored, so an exported file imports again as it is. The file is checked by
sending.imports' scanner: a bad line rejects the whole file with every problem listed by line
number. An address already on the customer's list, or on an earlier line, is skipped and
reported, not imported twice.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import IO

from django.db import transaction

from sending.imports import CsvScan, ImportRejected, ImportResult, check_size

from .models import Customer, Suppression

EXPORT_COLUMNS = ("email", "reason", "source", "created_at")
REASONS = {choice.value for choice in Suppression.Reason}
BULK_CHUNK = 2_000


@transaction.atomic
def import_suppressions(*, customer: Customer, file: IO[bytes], user=None) -> ImportResult:
    """Add the addresses a CSV file lists to the customer's suppression list, or raise
    ImportRejected (nothing added)."""
    # Serializes imports into one customer's list (and with its own re-checks below).
    Customer.objects.select_for_update().filter(pk=customer.pk).exists()
    check_size(file)
    scan = CsvScan(file=file)
    scan.seen.update(
        email.lower()
        for email in Suppression.objects.filter(customer=customer)
        .values_list("email", flat=True)
        .iterator()
    )
    file.seek(0)
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    try:
        rows = _rows(scan, scan.start(text), customer=customer, user=user, filename=file.name)
        imported = 0
        chunk: list[Suppression] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= BULK_CHUNK:
                imported += _write(chunk)
                chunk = []
        if not scan.error_count:
            imported += _write(chunk)
    finally:
        text.detach()  # closing the wrapper would close the caller's file
    if scan.error_count:
        raise ImportRejected(scan.errors, error_count=scan.error_count)
    if scan.data_lines == 0:
        raise ImportRejected(["The file has a header line but no addresses."])
    return ImportResult(imported=imported, duplicate_lines=tuple(sorted(scan.duplicate_lines)))


def _rows(scan, rows, *, customer, user, filename) -> Iterator[Suppression]:
    names = [name.lower() for name in scan.merge_fields]
    reason_at = names.index("reason") if "reason" in names else None
    source_at = names.index("source") if "source" in names else None
    default_source = f"CSV import: {filename}"[:200]
    for line, email, values in rows:
        reason = (values[reason_at] if reason_at is not None else "") or "manual"
        if reason not in REASONS:
            scan.error(
                line, f"“{reason}” is not a reason: use one of {', '.join(sorted(REASONS))}."
            )
            continue
        source = (values[source_at] if source_at is not None else "") or default_source
        yield Suppression(
            customer=customer,
            email=email.lower(),
            reason=reason,
            source=source[:200],
            created_by=user,
        )


def _write(chunk: list[Suppression]) -> int:
    # The rows are new by the scan's check; ignore_conflicts covers an address a webhook added
    # meanwhile (the unique index decides; that row is then counted here though not new).
    Suppression.objects.bulk_create(chunk, ignore_conflicts=True)
    return len(chunk)


def export_rows(queryset) -> Iterator[str]:
    """CSV lines (header first) for the suppressions in `queryset`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(values) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    yield line(EXPORT_COLUMNS)
    for row in queryset.order_by("email").values_list(*EXPORT_COLUMNS).iterator(chunk_size=2000):
        email, reason, source, created_at = row
        yield line([email, reason, _safe(source), created_at.isoformat()])


def _safe(value: str) -> str:
    """A cell a spreadsheet would run as a formula (=, +, -, @) is quoted with a leading '."""
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value
