"""Suppression-list actions: suppress addresses (unsubscribe links, provider bounces and
complaints, imports, staff), and resubscribe one with a reason, recorded in Resubscription.

Adding is idempotent: an address already on the customer's list keeps its first row (and
reason); the unique index on (customer, lower(email)) decides, in one INSERT … ON CONFLICT DO
NOTHING, so two webhooks racing for the same address cannot both add it.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from .models import Resubscription, Suppression


def suppress(
    *,
    customer_id: int,
    emails: Iterable[str],
    reason: str,
    source: str = "",
    user=None,
) -> int:
    """Add addresses to a customer's suppression list; returns how many rows were new."""
    rows = {e.strip().lower() for e in emails if e and e.strip()}
    if not rows:
        return 0
    before = Suppression.objects.filter(customer_id=customer_id, email__in=rows).count()
    Suppression.objects.bulk_create(
        [
            Suppression(
                customer_id=customer_id,
                email=email,
                reason=reason,
                source=source[:200],
                created_by=user,
            )
            for email in sorted(rows)
        ],
        ignore_conflicts=True,
    )
    after = Suppression.objects.filter(customer_id=customer_id, email__in=rows).count()
    return after - before


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
