import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction

from customers.models import Customer, SendLimit, Suppression
from customers.services import customer_create, send_limit_ensure
from tests.factories import CustomerFactory, ProviderAccountFactory

pytestmark = pytest.mark.django_db


def _save_limit(customer, **values):
    SendLimit.objects.filter(customer=customer).update(**values)


@pytest.mark.parametrize(
    "values",
    [
        {"per_minute": 0},
        {"per_minute": 1_000_001},
        {"max_workers": 101},
        {"batch_size": 0},
        {"concurrency": 65},
        {"guard_ms": 5001},
    ],
    ids=lambda values: "-".join(f"{k}={v}" for k, v in values.items()),
)
def test_send_limit_out_of_range_is_refused_by_the_database(values):
    customer = CustomerFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        _save_limit(customer, **values)


def test_provider_cap_out_of_range_is_refused_by_the_database():
    with pytest.raises(IntegrityError), transaction.atomic():
        ProviderAccountFactory(per_minute_cap=0)


def test_suppression_is_unique_per_customer_whatever_the_case():
    customer = CustomerFactory()
    Suppression.objects.create(customer=customer, email="ada@example.edu")
    with pytest.raises(IntegrityError), transaction.atomic():
        Suppression.objects.create(customer=customer, email="Ada@Example.EDU")
    # Another customer may suppress the same address.
    Suppression.objects.create(customer=CustomerFactory(), email="ada@example.edu")


def test_send_limit_above_the_account_cap_is_refused_by_validation():
    customer = CustomerFactory(provider_account=ProviderAccountFactory(per_minute_cap=1000))
    limit = customer.send_limit
    limit.per_minute = 1001
    with pytest.raises(ValidationError) as caught:
        limit.full_clean()
    assert "at most 1000 per minute" in str(caught.value.message_dict["per_minute"])
    limit.per_minute = 1000
    limit.full_clean()


def test_lowering_an_account_cap_below_a_customer_limit_is_refused():
    account = ProviderAccountFactory(per_minute_cap=1200)
    CustomerFactory(provider_account=account, name="Busy College", per_minute=900)
    account.per_minute_cap = 800
    with pytest.raises(ValidationError) as caught:
        account.full_clean()
    assert "Busy College (900/min)" in str(caught.value.message_dict["per_minute_cap"])


def test_a_created_customer_has_exactly_one_send_limit_within_its_account_cap():
    small = ProviderAccountFactory(per_minute_cap=100)
    customer = customer_create(
        name="Small", slug="small", default_from_email="a@small.example", provider_account=small
    )
    assert SendLimit.objects.filter(customer=customer).count() == 1
    assert customer.send_limit.per_minute == 100  # the default 600 would be over the cap
    assert send_limit_ensure(customer=customer) == customer.send_limit
    assert SendLimit.objects.filter(customer=customer).count() == 1
    with pytest.raises(IntegrityError), transaction.atomic():
        SendLimit.objects.create(customer=customer)


def test_customer_create_validates_and_changes_nothing_on_bad_input():
    with pytest.raises(ValidationError):
        customer_create(name="Bad", slug="not a slug", default_from_email="a@b.example")
    with pytest.raises(ValidationError):
        customer_create(
            name="Fast",
            slug="fast",
            default_from_email="a@fast.example",
            provider_account=ProviderAccountFactory(per_minute_cap=10),
            per_minute=11,
        )
    assert not Customer.objects.exists()


def test_credentials_are_encrypted_at_rest():
    account = ProviderAccountFactory(credentials={"api_key": "pm-very-secret-token"})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT credentials FROM customers_provideraccount WHERE id = %s", [account.pk]
        )
        (raw,) = cursor.fetchone()
    assert "pm-very-secret-token" not in raw
    assert "api_key" not in raw
    account.refresh_from_db()
    assert account.credentials == {"api_key": "pm-very-secret-token"}
