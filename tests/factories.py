"""Test data, in one place: factory_boy factories (a CustomerFactory customer gets its SendLimit
the way the product creates one), sending data made directly (customers, sending messages,
workers), check-ins at a fixed time through the real service, and what the data became."""

from datetime import timedelta

import factory
import orjson
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from customers.models import Customer, ProviderAccount, SendLimit, Suppression
from customers.services import customer_create
from sending import checkin, tokens
from sending.clock import Clock
from sending.models import ConductorLease, CustomerMinute, Lease, Message, Recipient, Worker
from sending.wire import parse_checkin

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


def customer_form(customer=None, limit=None, **changes):
    """The customer page's POST: its fields and its one send limit inline."""
    data = {
        "name": customer.name if customer else "New College",
        "slug": customer.slug if customer else "new-college",
        "is_active": "on",
        "provider_account": customer.provider_account_id if customer else "",
        "time_zone": "UTC",
        "default_from_email": customer.default_from_email if customer else "news@new.example",
        "default_reply_to": "",
        "notes": "",
        "halt_bounce_percent": "5.00",
        "halt_complaint_percent": "0.30",
        "halt_window": "1000",
        "send_limit-TOTAL_FORMS": "1",
        "send_limit-INITIAL_FORMS": "1" if limit else "0",
        "send_limit-MIN_NUM_FORMS": "0",
        "send_limit-MAX_NUM_FORMS": "1",
    }
    if limit:
        data.update(
            {
                "send_limit-0-id": limit.pk,
                "send_limit-0-customer": customer.pk,
                "send_limit-0-per_minute": limit.per_minute,
                "send_limit-0-max_workers": limit.max_workers,
                "send_limit-0-batch_size": limit.batch_size,
                "send_limit-0-concurrency": limit.concurrency,
                "send_limit-0-guard_ms": limit.guard_ms,
            }
        )
    data.update(changes)
    return {key: value for key, value in data.items() if value is not None}


# --- sending data, made directly ----------------------------------------------------------------

WINDOW_MS = 60_000
# 1.5 s into a calendar minute: inside the window, far from both guard bands.
T0 = 1_795_000_000_000 - 1_795_000_000_000 % WINDOW_MS + 1_500
API_KEY = "sandbox-key"  # the sandbox account's key (sandbox_customer)


def make_customer(slug="state-u", *, per_minute=600, batch_size=50, max_workers=5):
    """A customer with no provider account, and its SendLimit."""
    customer = Customer.objects.create(name=slug, slug=slug, default_from_email=f"news@{slug}.edu")
    SendLimit.objects.create(
        customer=customer, per_minute=per_minute, batch_size=batch_size, max_workers=max_workers
    )
    return customer


def sandbox_customer(sandbox, *, per_minute=1_000, batch_size=20, concurrency=4, api_key=API_KEY):
    """A customer sending through `sandbox` (a running SandboxServer)."""
    account = ProviderAccountFactory(
        settings={"api_url": sandbox.url},
        credentials={"api_key": api_key},
        per_minute_cap=max(per_minute, 1_000),
    )
    customer = CustomerFactory(provider_account=account)
    SendLimit.objects.filter(customer=customer).update(
        per_minute=per_minute, batch_size=batch_size, concurrency=concurrency, max_workers=5
    )
    return customer


def make_message(
    customer, n, *, started_minutes_ago=0, subject="Hello {{ first_name }}", html_body=""
):
    """A message that is sending, with n queued recipients (merge data {"first_name": i})."""
    message = Message.objects.create(
        customer=customer,
        subject=subject,
        text_body="Hi {{ first_name }}",
        html_body=html_body,
        status=Message.Status.SENDING,
        started_at=timezone.now() - timedelta(minutes=started_minutes_ago),
    )
    Recipient.objects.bulk_create(
        Recipient(message=message, email=f"s{i}@{customer.slug}.edu", merge_data={"first_name": i})
        for i in range(n)
    )
    return message


def start_worker(customer, api_url):
    """A worker registered as the conductor registers one, and its invocation event."""
    worker, token = checkin.worker_start(customer_id=customer.pk)
    return worker, {"api_url": api_url, "token": token, "worker_id": worker.pk}


# --- check-ins through the real service ---------------------------------------------------------


def call(
    worker, token, seq, report=None, *, at=T0, request_id="inv-1", late=None, final=False,
    answer_ms=None,
):  # fmt: skip
    """A check-in at a fixed time, through the service; the answer as the worker receives it."""
    body = {"worker_id": worker.pk, "seq": seq, "request_id": request_id, "report": report}
    if final:
        body["final"] = True
    if answer_ms is not None:
        body["answer_ms"] = answer_ms
    if late is not None:
        body["late"] = late
    answer = checkin.checkin(
        claims=tokens.verify(token), request=parse_checkin(body), clock=Clock(at)
    )
    # The answer embeds pre-serialized JSON (orjson.Fragment).
    return orjson.loads(orjson.dumps(answer))


def report_all_sent(answer, *, done_ms=100):
    batch = answer["batch"]
    return {
        "lease_id": batch["lease_id"],
        "elapsed_ms": 500,
        "results": [
            {"id": r["id"], "status": "sent", "provider_id": f"p{r['id']}", "done_ms": done_ms}
            for r in batch["recipients"]
        ],
    }


# --- what the data became -----------------------------------------------------------------------


def statuses(message):
    return dict(Recipient.objects.filter(message=message).values_list("id", "status"))


def assert_sent_once_each(message, sandbox):
    """Every recipient is sent, with the id the sandbox gave it, and the sandbox saw it once."""
    rows = list(Recipient.objects.filter(message=message))
    by_key = {}
    for send in sandbox.sends:
        assert not send.duplicate, f"recipient {send.idempotency_key} was sent twice"
        by_key[send.idempotency_key] = send
    assert sorted(by_key) == sorted(str(r.pk) for r in rows)
    for row in rows:
        assert row.status == "sent", (row.pk, row.status, row.last_error)
        assert row.provider_message_id == by_key[str(row.pk)].message_id
        assert by_key[str(row.pk)].subject == f"Hello {row.merge_data['first_name']}"
    assert sandbox.report()["duplicates"] == {}


# The engine's rows, for the read-only admin and the live pages ----------------------------------


def _minute_start(minutes_ago: int = 0):
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
