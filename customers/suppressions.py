"""Suppression-list actions: suppress addresses (unsubscribe links, provider bounces and
complaints, imports, staff), and resubscribe one with a reason, recorded in Resubscription.

Adding is idempotent: an address already on the customer's list keeps its first row (and
reason); the unique index on (customer, lower(email)) decides, in one INSERT … ON CONFLICT DO
NOTHING, so two webhooks racing for the same address cannot both add it.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, transaction
from django.utils import timezone

from .models import Resubscription, Suppression

INSERT_CHUNK = 1000


def suppress(
    *,
    customer_id: int,
    emails: Iterable[str],
    reason: str,
    source: str = "",
    user=None,
) -> int:
    """Add addresses to a customer's suppression list; returns how many rows were new.

    One INSERT … ON CONFLICT DO NOTHING RETURNING per thousand addresses (PostgreSQL, and SQLite
    3.35+): a webhook or an unsubscribe click costs one statement."""
    rows = sorted({e.strip().lower() for e in emails if e and e.strip()})
    created_at = timezone.now()
    table = Suppression._meta.db_table
    added = 0
    with connection.cursor() as cursor:
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[start : start + INSERT_CHUNK]
            values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(chunk))
            params = []
            for email in chunk:
                params += [customer_id, email, reason, source[:200], user and user.pk, created_at]
            cursor.execute(
                f"INSERT INTO {table} (customer_id, email, reason, source, created_by_id, "  # noqa: S608
                f"created_at) VALUES {values} ON CONFLICT DO NOTHING RETURNING id",
                params,
            )
            added += len(cursor.fetchall())
    return added


@transaction.atomic
def resubscribe(*, suppression_id: int, reason: str, user) -> Resubscription:
    """Take an address off the list, recording who did it, why, and what the row said."""
    if not user.has_perm("customers.delete_suppression"):
        raise PermissionDenied("You may not take addresses off the suppression list.")
    reason = reason.strip()
    if not reason:
        raise ValidationError({"reason": "Say why this address may be mailed again."})
    row = Suppression.objects.select_for_update().filter(pk=suppression_id).first()
    if row is None:
        raise ValidationError("This address is no longer on the suppression list.")
    record = Resubscription.objects.create(
        customer_id=row.customer_id,
        email=row.email,
        reason=reason,
        suppressed_reason=row.reason,
        suppressed_source=row.source,
        suppressed_at=row.created_at,
        created_by=user,
    )
    row.delete()
    return record
