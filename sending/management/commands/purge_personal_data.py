"""Purge recipients' addresses and merge data once a message is past its retention period.

A message qualifies when it completed, or was cancelled, more than RECIPIENT_DATA_RETENTION_DAYS
ago and has not been purged. Each recipient keeps its row (status, attempts, provider id: the
delivery log stays countable) but its address becomes `<id>@purged.invalid`, its merge data `{}`,
and the address is cut out of its last error. One UPDATE per message; safe to run again.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.db.models import CharField, F, Q, QuerySet, Value
from django.db.models.functions import Cast, Concat, Replace
from django.utils import timezone

from sending.models import Message, Recipient

logger = logging.getLogger(__name__)

PURGED_DOMAIN = "@purged.invalid"


def messages_due(*, now) -> QuerySet[Message]:
    cutoff = now - timedelta(days=settings.RECIPIENT_DATA_RETENTION_DAYS)
    ended = Q(completed_at__lt=cutoff) | Q(
        # A cancelled message may never have been marked completed: its last change counts.
        status=Message.Status.CANCELLED,
        completed_at__isnull=True,
        updated_at__lt=cutoff,
    )
    return (
        Message.objects.filter(
            ended,
            status__in=(Message.Status.COMPLETED, Message.Status.CANCELLED),
            purged_at__isnull=True,
        )
        .select_related("customer")
        .order_by("id")
    )


@transaction.atomic
def purge_message(*, message_id: int, now) -> int:
    """Purge one message's recipients; 0 if another run got there first."""
    claimed = Message.objects.filter(pk=message_id, purged_at__isnull=True).update(
        purged_at=now, updated_at=now
    )
    if not claimed:
        return 0
    # Right-hand sides read the old row, so the error text loses the address being replaced.
    return Recipient.objects.filter(message_id=message_id).update(
        email=Concat(Cast(F("id"), CharField()), Value(PURGED_DOMAIN)),
        merge_data={},
        last_error=Replace(F("last_error"), F("email"), Value("[purged address]")),
    )


class Command(BaseCommand):
    help = (
        "Replace recipients' addresses and merge data of messages completed or cancelled more "
        "than RECIPIENT_DATA_RETENTION_DAYS ago."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="Report what would be purged; change nothing."
        )

    def handle(self, *args, dry_run=False, **options):
        now = timezone.now()
        days = settings.RECIPIENT_DATA_RETENTION_DAYS
        messages = list(messages_due(now=now))
        purged_recipients = 0
        for message in messages:
            if dry_run:
                count = message.recipients.count()
                self.stdout.write(f"Would purge message {message.pk} ({count} recipients).")
            else:
                count = purge_message(message_id=message.pk, now=now)
                logger.info(
                    "Purged the personal data of %d recipients of message %d (%s)",
                    count,
                    message.pk,
                    message.customer,
                )
            purged_recipients += count
        verb = "Would purge" if dry_run else "Purged"
        summary = (
            f"{verb} {purged_recipients} recipients of {len(messages)} messages ended more than "
            f"{days} days ago."
        )
        logger.info(summary)
        self.stdout.write(self.style.SUCCESS(summary) if not dry_run else summary)
