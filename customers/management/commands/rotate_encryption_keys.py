"""Re-encrypt every provider account's credentials with the first FIELD_ENCRYPTION_KEY.

Rotation: put the new key first (FIELD_ENCRYPTION_KEY=new,old), run this, then drop the old key.
"""

import logging

from cryptography.fernet import InvalidToken
from django.core.management.base import BaseCommand, CommandError
from django.db.models import TextField, Value
from django.db.models.functions import Cast

from customers.fields import rotate_value
from customers.models import ProviderAccount

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Re-encrypt provider credentials with the first FIELD_ENCRYPTION_KEY."

    def handle(self, *args, **options):
        # The stored tokens as text: rotated without ever decrypting them into a dict here.
        accounts = ProviderAccount.objects.annotate(
            token=Cast("credentials", output_field=TextField())
        ).values_list("pk", "name", "token")
        rotated = skipped = 0
        for pk, name, token in accounts:
            if not token:
                skipped += 1
                continue
            try:
                new_token = rotate_value(token)
            except InvalidToken:
                raise CommandError(
                    f"The credentials of {name} cannot be decrypted with any "
                    "FIELD_ENCRYPTION_KEY; nothing after it was rotated."
                ) from None
            # Only if unchanged since read: a concurrent edit is already under the new key.
            updated = (
                ProviderAccount.objects.annotate(
                    token=Cast("credentials", output_field=TextField())
                )
                .filter(pk=pk, token=token)
                .update(credentials=Value(new_token, output_field=TextField()))
            )
            if updated:
                rotated += 1
                logger.info("Rotated the credentials of provider account %s (%s)", pk, name)
            else:
                logger.info("Provider account %s (%s) changed meanwhile; left as is", pk, name)
        self.stdout.write(
            self.style.SUCCESS(
                f"Re-encrypted the credentials of {rotated} provider account(s) with the first "
                f"key; {skipped} had none stored."
            )
        )
