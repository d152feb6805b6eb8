"""Customer actions: every customer is created with exactly one SendLimit; send limits steered
live; provider accounts saved with their credentials rule and history."""

from django.core.exceptions import PermissionDenied, ValidationError
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


# What the live page may change while a send runs; the rest stays on the send limit's own page.
STEERABLE_FIELDS = ("per_minute", "max_workers", "concurrency", "paused")


@transaction.atomic
def send_limit_steer(*, customer_id: int, user, changes: dict) -> tuple[SendLimit, dict]:
    """Change a customer's limits while it sends (the live page's controls).

    Validated as the send limit's own page validates (ranges, the account's cap), recorded in its
    history with the user, and read by the next check-in (each one reads the row) and the next
    conductor tick: applied within a second. Returns the limit and {field: (old, new)} of what
    changed.
    """
    if not user.has_perm("customers.change_sendlimit"):
        raise PermissionDenied("You may not change send limits.")
    unknown = set(changes) - set(STEERABLE_FIELDS)
    if unknown:
        raise ValidationError(f"These cannot be changed here: {', '.join(sorted(unknown))}.")
    # The limit's row only: the check-ins lock it too, and hold it briefly.
    limit = SendLimit.objects.select_for_update(of=("self",)).select_related(
        "customer__provider_account"
    )
    limit = limit.get(customer_id=customer_id)
    delta = {
        name: (getattr(limit, name), value)
        for name, value in changes.items()
        if getattr(limit, name) != value
    }
    if not delta:
        return limit, {}
    for name, (_, value) in delta.items():
        setattr(limit, name, value)
    limit.full_clean()  # field ranges and SendLimit.clean: never above the account's cap
    limit._history_user = user
    limit._change_reason = "changed on the live page"
    limit.save(update_fields=list(delta))
    return limit, delta


@transaction.atomic
def provider_account_save(*, account: ProviderAccount, user=None) -> ProviderAccount:
    """Save a provider account, validated, and record the change in its history with who and why.

    Changing its kind, host, endpoint or API URL (`DESTINATION_SETTINGS`) needs its credentials
    entered again (`ProviderAccount.enter_credentials`); the model refuses it otherwise, on any
    save. The history never holds the credentials, only when they were entered.
    """
    changes = account.destination_changes()
    account.full_clean()
    reasons = []
    if changes:
        reasons.append(f"destination changed: {', '.join(changes)}")
    if account.credentials_were_entered:
        reasons.append("credentials entered" if account.has_credentials else "credentials removed")
    account._history_user = user
    account._change_reason = "; ".join(reasons)
    account.save()
    return account
