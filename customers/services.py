"""Customer actions: every customer is created with exactly one SendLimit."""

from django.core.exceptions import ValidationError
from django.db import transaction

from .models import Customer, ProviderAccount, SendLimit

DEFAULT_PER_MINUTE = SendLimit._meta.get_field("per_minute").default


def send_limit_fits_account(*, per_minute: int, account: ProviderAccount | None) -> None:
    """Refuse a limit above the provider account's cap: the provider would answer 429."""
    if account is not None and per_minute > account.per_minute_cap:
        raise ValidationError(
            {
                "per_minute": f"The provider account {account.name} allows at most "
                f"{account.per_minute_cap} per minute."
            }
        )


@transaction.atomic
def send_limit_ensure(*, customer: Customer) -> SendLimit:
    """The customer's SendLimit, created with the defaults (within the account's cap) if missing."""
    account = customer.provider_account
    per_minute = DEFAULT_PER_MINUTE
    if account is not None:
        per_minute = min(per_minute, account.per_minute_cap)
    limit, _ = SendLimit.objects.get_or_create(
        customer=customer, defaults={"per_minute": per_minute}
    )
    return limit


@transaction.atomic
def customer_create(
    *,
    name: str,
    slug: str,
    default_from_email: str,
    provider_account: ProviderAccount | None = None,
    per_minute: int | None = None,
    **fields,
) -> Customer:
    customer = Customer(
        name=name,
        slug=slug,
        default_from_email=default_from_email,
        provider_account=provider_account,
        **fields,
    )
    customer.full_clean()
    customer.save()
    if per_minute is None:
        send_limit_ensure(customer=customer)
    else:
        limit = SendLimit(customer=customer, per_minute=per_minute)
        limit.full_clean()
        limit.save()
    return customer
