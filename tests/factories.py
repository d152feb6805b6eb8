"""Test data. A CustomerFactory customer gets its SendLimit the way the product creates one."""

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from customers.models import Customer, ProviderAccount, SendLimit, Suppression
from customers.services import customer_create
from sending.models import ConductorLease, CustomerMinute, Lease, Message, Recipient, Worker

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@staff.example")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def groups(self, create, names, **kwargs):
        """UserFactory(groups=["Support"]): the groups made by the data migration."""
        if create and names:
            groups = list(Group.objects.filter(name__in=names))
            # A transactional test's flush would have removed them; fail plainly, not as a 403.
            assert len(groups) == len(names), f"groups {names} missing (made by a data migration)"
            self.groups.add(*groups)
        self.save()


class SuperUserFactory(UserFactory):
    is_superuser = True


class ProviderAccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProviderAccount

    name = factory.Sequence(lambda n: f"Account {n}")
    kind = ProviderAccount.Kind.SANDBOX
    per_minute_cap = 1_200
    credentials = factory.LazyFunction(dict)


class CustomerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Customer

    name = factory.Sequence(lambda n: f"College {n}")
    slug = factory.Sequence(lambda n: f"college-{n}")
    default_from_email = factory.LazyAttribute(lambda c: f"news@{c.slug}.example")
    provider_account = factory.SubFactory(ProviderAccountFactory)

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        return customer_create(**kwargs)


class SendLimitFactory(factory.django.DjangoModelFactory):
    """Only for a customer without one; CustomerFactory already makes it."""

    class Meta:
        model = SendLimit

    customer = factory.SubFactory(CustomerFactory)


class SuppressionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Suppression

    customer = factory.SubFactory(CustomerFactory)
    email = factory.Sequence(lambda n: f"gone{n}@example.edu")


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Message

    customer = factory.SubFactory(CustomerFactory)
    subject = "Hello {{ first_name }}"
    text_body = "Dear {{ first_name }},\nwelcome."
    html_body = "<p>Dear {{ first_name }},</p>"


class RecipientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Recipient

    message = factory.SubFactory(MessageFactory)
    email = factory.Sequence(lambda n: f"student{n}@example.edu")
    merge_data = factory.LazyAttributeSequence(lambda r, n: {"first_name": f"Student{n}"})


# The engine's rows, for the read-only admin and the live pages ----------------------------------


def _minute_start(minutes_ago: int = 0):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now().replace(second=0, microsecond=0)
    return now - timedelta(minutes=minutes_ago)


class WorkerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Worker

    customer = factory.SubFactory(CustomerFactory)
    state = Worker.State.RUNNING
    # A stored answer carries the provider block: the admin must never show it.
    last_response = factory.LazyFunction(
        lambda: {
            "decision": "send",
            "batch": {"lease_id": 1, "provider": {"credentials": {"api_key": "SECRET-KEY"}}},
        }
    )


class LeaseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Lease

    worker = factory.SubFactory(WorkerFactory)
    customer = factory.LazyAttribute(lambda lease: lease.worker.customer)
    minute_start = factory.LazyFunction(_minute_start)
    size = 3
    recipient_ids = factory.LazyFunction(lambda: [1, 2, 3])
    granted_at = factory.LazyAttribute(lambda lease: lease.minute_start)
    start_at = factory.LazyAttribute(lambda lease: lease.minute_start)
    stop_starting_at = factory.LazyAttribute(lambda lease: lease.minute_start)
    minute_ends_in_ms = 60_000
    guard_ms = 250
    overdue_at = factory.LazyAttribute(lambda lease: lease.minute_start)
    expires_at = factory.LazyAttribute(lambda lease: lease.minute_start)


class CustomerMinuteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = CustomerMinute

    customer = factory.SubFactory(CustomerFactory)
    minute_start = factory.LazyFunction(_minute_start)
    cap = 600


class ConductorLeaseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ConductorLease

    customer = factory.SubFactory(CustomerFactory)
    holder = "chain-1"
