"""Demo data for a laptop: a sandbox account, Demo University, and a draft with 2,000 recipients.

Safe to run again: what exists is left as it is (staff may have edited it), nothing is duplicated.
"""

from django.core.management.base import BaseCommand
from django.db import transaction

from customers.models import Customer, ProviderAccount
from customers.services import customer_create, send_limit_ensure
from sending.models import Message, Recipient

ACCOUNT_NAME = "Demo sandbox"
ACCOUNT_CAP = 1_200
# `make run` serves the sandbox provider here, with this account's key and cap.
SANDBOX_URL = "http://127.0.0.1:8025/"
SANDBOX_API_KEY = "demo-sandbox-key"
CUSTOMER_SLUG = "demo"
CUSTOMER_NAME = "Demo University"
PER_MINUTE = 600
RECIPIENTS = 2_000
FIRST_NAMES = [
    "Ada",
    "Alan",
    "Barbara",
    "Claude",
    "Donald",
    "Edsger",
    "Frances",
    "Grace",
    "Hedy",
    "Ivan",
    "John",
    "Katherine",
    "Leslie",
    "Margaret",
    "Niklaus",
    "Radia",
    "Shafi",
    "Tim",
    "Ursula",
    "Whitfield",
]

SUBJECT = "Welcome to the new term, {{ first_name }}"
TEXT_BODY = """Hello {{ first_name }},

Welcome back to Demo University. Registration for the new term opens on Monday.

Student services
"""
HTML_BODY = """<p>Hello {{ first_name }},</p>
<p>Welcome back to <strong>Demo University</strong>. Registration for the new term opens on
Monday.</p>
<p>Student services</p>
"""


class Command(BaseCommand):
    help = "Create the demo provider account, customer and draft message (idempotent)."

    @transaction.atomic
    def handle(self, *args, **options):
        account, created = ProviderAccount.objects.get_or_create(
            name=ACCOUNT_NAME,
            defaults={
                "kind": ProviderAccount.Kind.SANDBOX,
                "per_minute_cap": ACCOUNT_CAP,
                "settings": {"api_url": SANDBOX_URL},
                "credentials": {"api_key": SANDBOX_API_KEY},
            },
        )
        self._report(created, f"provider account {account.name} ({account.per_minute_cap}/min)")

        customer = Customer.objects.filter(slug=CUSTOMER_SLUG).first()
        created = customer is None
        if created:
            customer = customer_create(
                name=CUSTOMER_NAME,
                slug=CUSTOMER_SLUG,
                default_from_email="news@demo-university.example",
                provider_account=account,
                per_minute=PER_MINUTE,
            )
        limit = send_limit_ensure(customer=customer)
        self._report(created, f"customer {customer.name} (limit {limit.per_minute}/min)")

        message = customer.messages.order_by("id").first()
        created = message is None
        if created:
            message = Message(
                customer=customer, subject=SUBJECT, text_body=TEXT_BODY, html_body=HTML_BODY
            )
            message.full_clean()
            message.save()
            Recipient.objects.bulk_create(
                [
                    Recipient(
                        message=message,
                        email=f"student{n:04d}@demo-university.example",
                        merge_data={"first_name": FIRST_NAMES[n % len(FIRST_NAMES)]},
                    )
                    for n in range(1, RECIPIENTS + 1)
                ],
                batch_size=500,
            )
        status = message.get_status_display().lower()
        recipients = message.recipients.count()
        self._report(created, f'{status} message "{message.subject}" with {recipients} recipients')

    def _report(self, created: bool, what: str) -> None:
        if created:
            self.stdout.write(self.style.SUCCESS(f"Created {what}."))
        else:
            self.stdout.write(f"Kept the existing {what}.")
