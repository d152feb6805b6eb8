"""The Support and Operators groups made by customers/migrations/0002_groups.py."""

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from customers.models import Customer
from tests.factories import (
    CustomerFactory,
    MessageFactory,
    ProviderAccountFactory,
    UserFactory,
    customer_form,
)

pytestmark = pytest.mark.django_db


def _perms(group_name):
    group = Group.objects.get(name=group_name)
    return {
        f"{app}.{codename}"
        for app, codename in group.permissions.values_list("content_type__app_label", "codename")
    }


def _limit_form(limit, **changes):
    data = {
        "per_minute": limit.per_minute,
        "max_workers": limit.max_workers,
        "batch_size": limit.batch_size,
        "concurrency": limit.concurrency,
        "guard_ms": limit.guard_ms,
    }
    data.update(changes)
    return data


def _message_form(message, **changes):
    data = {
        "subject": message.subject,
        "from_email": "",
        "reply_to": "",
        "text_body": message.text_body,
        "html_body": message.html_body,
    }
    data.update(changes)
    return data


@pytest.fixture
def support(client):
    user = UserFactory(username="sam", groups=["Support"])
    client.force_login(user)
    return user


@pytest.fixture
def operator(client):
    user = UserFactory(username="olga", groups=["Operators"])
    client.force_login(user)
    return user


def test_the_groups_have_the_permissions_of_their_role():
    support = _perms("Support")
    for model in ("customers.customer", "customers.suppression", "sending.message"):
        app, name = model.split(".")
        assert {f"{app}.{action}_{name}" for action in ("add", "change", "delete", "view")} <= (
            support
        )
    assert {
        "customers.view_provideraccount",
        "customers.view_sendlimit",
        "sending.start_message",
        "sending.cancel_message",
        "sending.delete_recipient",
        "sending.export_recipients",
    } <= support
    assert "customers.change_sendlimit" not in support
    assert "customers.change_provideraccount" not in support

    operators = _perms("Operators")
    assert {
        "customers.change_sendlimit",
        "sending.pause_message",
        "sending.resume_message",
        "customers.view_customer",
        "customers.view_provideraccount",
        "sending.view_message",
        "sending.view_recipient",
    } <= operators
    assert not {p for p in operators if p.split(".")[1].startswith(("add_", "delete_"))}
    assert "sending.change_message" not in operators
    assert "sending.start_message" not in operators
    assert "sending.export_recipients" not in operators


def test_support_cannot_change_a_send_limit(client, support):
    limit = CustomerFactory(per_minute=600).send_limit
    url = reverse("admin:customers_sendlimit_change", args=[limit.pk])
    assert client.get(url).status_code == 200  # may look
    assert client.post(url, _limit_form(limit, per_minute=900)).status_code == 403
    limit.refresh_from_db()
    assert limit.per_minute == 600


def test_support_editing_a_customer_cannot_change_its_send_limit_inline(client, support):
    customer = CustomerFactory(per_minute=600)
    limit = customer.send_limit
    url = reverse("admin:customers_customer_change", args=[customer.pk])
    data = customer_form(customer, limit, notes="Called them.", **{"send_limit-0-per_minute": 900})
    response = client.post(url, data)
    assert response.status_code == 302
    customer.refresh_from_db()
    limit.refresh_from_db()
    assert customer.notes == "Called them."  # the customer is theirs to edit …
    assert limit.per_minute == 600  # … its limit is not
    assert limit.history.count() == 1  # only the creation


def test_support_cannot_revert_a_send_limit_through_its_history(client, support):
    limit = CustomerFactory(per_minute=600).send_limit
    first = limit.history.earliest()
    limit.per_minute = 800
    limit.save()
    url = reverse("admin:customers_sendlimit_simple_history", args=[limit.pk, first.history_id])
    assert client.post(url, _limit_form(limit, per_minute=600)).status_code == 403
    limit.refresh_from_db()
    assert limit.per_minute == 800


def test_support_moving_a_customer_below_its_limit_is_refused(client, support):
    customer = CustomerFactory(per_minute=900)
    small = ProviderAccountFactory(per_minute_cap=500, name="Small")
    url = reverse("admin:customers_customer_change", args=[customer.pk])
    response = client.post(
        url, customer_form(customer, customer.send_limit, provider_account=small.pk)
    )
    assert response.status_code == 200
    assert "above the cap of Small (500/min)" in response.content.decode()
    customer.refresh_from_db()
    assert customer.provider_account != small


def test_support_can_add_a_customer_and_it_gets_a_send_limit(client, support):
    account = ProviderAccountFactory()
    data = customer_form(provider_account=account.pk)
    data["send_limit-TOTAL_FORMS"] = "0"  # the inline is view-only for them: no form rendered
    response = client.post(reverse("admin:customers_customer_add"), data)
    assert response.status_code == 302
    assert Customer.objects.get(slug="new-college").send_limit.per_minute == 600


def test_operator_cannot_edit_a_message(client, operator):
    message = MessageFactory(subject="Original")
    url = reverse("admin:sending_message_change", args=[message.pk])
    assert client.get(url).status_code == 200  # may look
    assert client.post(url, _message_form(message, subject="Changed")).status_code == 403
    message.refresh_from_db()
    assert message.subject == "Original"


def test_operator_can_change_a_send_limit_and_the_change_records_who(client, operator):
    limit = CustomerFactory(per_minute=600).send_limit
    url = reverse("admin:customers_sendlimit_change", args=[limit.pk])
    response = client.post(url, _limit_form(limit, per_minute=450, paused="on"))
    assert response.status_code == 302
    limit.refresh_from_db()
    assert (limit.per_minute, limit.paused) == (450, True)
    latest = limit.history.latest()
    assert latest.history_user == operator
    delta = latest.diff_against(latest.prev_record)
    assert {(c.field, c.old, c.new) for c in delta.changes} == {
        ("per_minute", 600, 450),
        ("paused", False, True),
    }


def test_operator_cannot_raise_a_limit_above_the_account_cap(client, operator):
    customer = CustomerFactory(provider_account=ProviderAccountFactory(per_minute_cap=1000))
    limit = customer.send_limit
    url = reverse("admin:customers_sendlimit_change", args=[limit.pk])
    response = client.post(url, _limit_form(limit, per_minute=1001))
    assert response.status_code == 200
    assert "at most 1000 per minute" in str(response.context["adminform"].form.errors)
    limit.refresh_from_db()
    assert limit.per_minute == 600


def test_operator_cannot_edit_a_customer(client, operator):
    customer = CustomerFactory(notes="")
    url = reverse("admin:customers_customer_change", args=[customer.pk])
    response = client.post(url, customer_form(customer, customer.send_limit, notes="x"))
    assert response.status_code == 403
    customer.refresh_from_db()
    assert customer.notes == ""
