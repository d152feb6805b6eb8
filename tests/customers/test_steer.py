"""Steering a send: the live page's limits, changed through one service."""

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from customers.models import SendLimit
from customers.services import send_limit_steer
from tests.factories import CustomerFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_an_operator_changes_limits_and_the_history_records_who_and_what():
    customer = CustomerFactory(per_minute=600)
    operator = UserFactory(groups=["Operators"])
    limit, delta = send_limit_steer(
        customer_id=customer.pk,
        user=operator,
        changes={"per_minute": 300, "max_workers": 2, "paused": True, "concurrency": 16},
    )
    assert delta == {"per_minute": (600, 300), "max_workers": (5, 2), "paused": (False, True)}
    limit.refresh_from_db()
    assert (limit.per_minute, limit.max_workers, limit.paused) == (300, 2, True)
    record = limit.history.latest("history_date")
    assert record.history_user == operator
    assert record.history_change_reason == "changed on the live page"


def test_a_limit_above_the_accounts_cap_is_refused_and_nothing_changes():
    customer = CustomerFactory(per_minute=600)  # the account's cap is 1,200
    operator = UserFactory(groups=["Operators"])
    with pytest.raises(ValidationError, match="at most 1200"):
        send_limit_steer(
            customer_id=customer.pk, user=operator, changes={"per_minute": 5000, "max_workers": 9}
        )
    limit = SendLimit.objects.get(customer=customer)
    assert (limit.per_minute, limit.max_workers) == (600, 5)
    assert limit.history.count() == 1  # only its creation


@pytest.mark.parametrize("changes", [{"max_workers": 0}, {"concurrency": 65}])
def test_out_of_range_values_are_refused(changes):
    customer = CustomerFactory()
    with pytest.raises(ValidationError):
        send_limit_steer(
            customer_id=customer.pk, user=UserFactory(groups=["Operators"]), changes=changes
        )


def test_support_may_not_steer_and_other_fields_cannot_be_changed_here():
    customer = CustomerFactory()
    with pytest.raises(PermissionDenied):
        send_limit_steer(
            customer_id=customer.pk,
            user=UserFactory(groups=["Support"]),
            changes={"per_minute": 10},
        )
    with pytest.raises(ValidationError, match="batch_size"):
        send_limit_steer(
            customer_id=customer.pk,
            user=UserFactory(groups=["Operators"]),
            changes={"batch_size": 10},
        )
    assert SendLimit.objects.get(customer=customer).per_minute == 600
