import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from customers.models import Customer, ProviderAccount, SendLimit, Suppression
from tests.factories import (
    CustomerFactory,
    MessageFactory,
    ProviderAccountFactory,
    SuppressionFactory,
    customer_form,
)

pytestmark = pytest.mark.django_db

SECRET = "smtp-pa55word-do-not-show"


def _account_form(account, **changes):
    data = {
        "name": account.name,
        "kind": account.kind,
        "per_minute_cap": account.per_minute_cap,
        "settings": "{}",
        "new_credentials": "",
    }
    data.update(changes)
    return data


# Provider accounts --------------------------------------------------------------------------


def test_stored_credentials_never_appear_on_the_change_page(admin_client):
    account = ProviderAccountFactory(credentials={"username": "mailer", "password": SECRET})
    response = admin_client.get(
        reverse("admin:customers_provideraccount_change", args=[account.pk])
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert SECRET not in html
    assert "password, username (values hidden)" in html
    assert "Leave blank to keep the stored credentials" in html


def test_blank_credentials_keep_the_stored_ones(admin_client):
    account = ProviderAccountFactory(credentials={"password": SECRET})
    url = reverse("admin:customers_provideraccount_change", args=[account.pk])
    response = admin_client.post(url, _account_form(account, per_minute_cap=1500))
    assert response.status_code == 302
    account.refresh_from_db()
    assert account.per_minute_cap == 1500
    assert account.credentials == {"password": SECRET}


def test_entered_credentials_replace_the_stored_ones(admin_client):
    account = ProviderAccountFactory(credentials={"password": SECRET})
    url = reverse("admin:customers_provideraccount_change", args=[account.pk])
    admin_client.post(url, _account_form(account, new_credentials='{"api_key": "new-key"}'))
    account.refresh_from_db()
    assert account.credentials == {"api_key": "new-key"}

    admin_client.post(url, _account_form(account, clear_credentials="on"))
    account.refresh_from_db()
    assert account.credentials == {}


def test_invalid_credentials_are_refused_without_echoing_them(admin_client):
    account = ProviderAccountFactory(credentials={"password": SECRET})
    url = reverse("admin:customers_provideraccount_change", args=[account.pk])
    typed = '{"password": "typed-secret-123"'  # no closing brace
    response = admin_client.post(url, _account_form(account, new_credentials=typed))
    assert response.status_code == 200
    assert "Not valid JSON" in str(response.context["adminform"].form.errors["new_credentials"])
    assert "typed-secret-123" not in response.content.decode()
    account.refresh_from_db()
    assert account.credentials == {"password": SECRET}


def test_credentials_can_be_set_when_the_account_is_added(admin_client):
    response = admin_client.post(
        reverse("admin:customers_provideraccount_add"),
        {
            "name": "Postmark main",
            "kind": "postmark",
            "per_minute_cap": "3000",
            "settings": "{}",
            "new_credentials": '{"server_token": "pm-token"}',
        },
    )
    assert response.status_code == 302
    assert ProviderAccount.objects.get(name="Postmark main").credentials == {
        "server_token": "pm-token"
    }


def test_lowering_the_cap_below_a_customer_limit_is_refused_in_admin(admin_client):
    account = ProviderAccountFactory(per_minute_cap=1200)
    CustomerFactory(provider_account=account, name="Busy College", per_minute=900)
    url = reverse("admin:customers_provideraccount_change", args=[account.pk])
    response = admin_client.post(url, _account_form(account, per_minute_cap=800))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["per_minute_cap"]
    assert "Busy College (900/min)" in str(errors)
    account.refresh_from_db()
    assert account.per_minute_cap == 1200


# Customers and send limits ------------------------------------------------------------------


def test_adding_a_customer_creates_its_send_limit_with_defaults(admin_client):
    account = ProviderAccountFactory(per_minute_cap=400)
    data = customer_form(provider_account=account.pk)
    # The inline left as rendered: unchanged, so Django would not save it by itself.
    data.update({"send_limit-0-per_minute": "600", "send_limit-0-max_workers": "5"})
    data.update({"send_limit-0-batch_size": "500", "send_limit-0-concurrency": "16"})
    data["send_limit-0-guard_ms"] = "250"
    response = admin_client.post(reverse("admin:customers_customer_add"), data)
    assert response.status_code == 302, response.context["errors"]
    customer = Customer.objects.get(slug="new-college")
    # Defaults, except the rate, which the account's cap bounds.
    assert customer.send_limit.per_minute == 400
    assert customer.send_limit.max_workers == 5


def test_adding_a_customer_with_limits_keeps_them(admin_client):
    account = ProviderAccountFactory(per_minute_cap=1200)
    data = customer_form(provider_account=account.pk)
    data.update(
        {
            "send_limit-0-per_minute": "900",
            "send_limit-0-max_workers": "8",
            "send_limit-0-batch_size": "200",
            "send_limit-0-concurrency": "16",
            "send_limit-0-guard_ms": "250",
        }
    )
    response = admin_client.post(reverse("admin:customers_customer_add"), data)
    assert response.status_code == 302
    limit = Customer.objects.get(slug="new-college").send_limit
    assert (limit.per_minute, limit.max_workers, limit.batch_size) == (900, 8, 200)


def test_a_new_customer_limit_above_its_account_cap_is_refused(admin_client):
    account = ProviderAccountFactory(per_minute_cap=1000, name="Small SES")
    data = customer_form(provider_account=account.pk)
    data.update(
        {
            "send_limit-0-per_minute": "1001",
            "send_limit-0-max_workers": "5",
            "send_limit-0-batch_size": "500",
            "send_limit-0-concurrency": "16",
            "send_limit-0-guard_ms": "250",
        }
    )
    response = admin_client.post(reverse("admin:customers_customer_add"), data)
    assert response.status_code == 200
    assert "above the cap of Small SES (1000/min)" in response.content.decode()
    assert not Customer.objects.exists()


def test_moving_a_customer_to_an_account_with_a_lower_cap_is_refused(admin_client):
    customer = CustomerFactory(per_minute=900)
    small = ProviderAccountFactory(per_minute_cap=500, name="Small")
    url = reverse("admin:customers_customer_change", args=[customer.pk])
    response = admin_client.post(
        url, customer_form(customer, customer.send_limit, provider_account=small.pk)
    )
    assert response.status_code == 200
    assert "allows at most 500 per minute" in response.content.decode()
    customer.refresh_from_db()
    assert customer.provider_account != small


def test_customer_list_shows_limits_and_messages_sending_in_a_fixed_number_of_queries(
    admin_client,
):
    url = reverse("admin:customers_customer_changelist")

    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(url).status_code == 200
        return len(captured)

    busy = CustomerFactory(name="Busy", per_minute=750)
    MessageFactory.create_batch(2, customer=busy, status="sending")
    MessageFactory(customer=busy, status="draft")
    few = queries()
    for _ in range(5):
        MessageFactory(customer=CustomerFactory(), status="sending")
    assert queries() == few

    response = admin_client.get(url, {"q": "Busy"})
    row = response.context["cl"].result_list[0]
    assert (row.limit_per_minute, row.limit_max_workers, row.n_sending) == (750, 5, 2)


def test_customer_list_filters_by_provider_kind_and_active(admin_client):
    CustomerFactory(name="Sandboxed")
    CustomerFactory(name="On SES", provider_account=ProviderAccountFactory(kind="amazon_ses"))
    CustomerFactory(name="Retired", is_active=False)
    url = reverse("admin:customers_customer_changelist")
    response = admin_client.get(url, {"provider_account__kind__exact": "amazon_ses"})
    assert [c.name for c in response.context["cl"].result_list] == ["On SES"]
    response = admin_client.get(url, {"is_active__exact": "0"})
    assert [c.name for c in response.context["cl"].result_list] == ["Retired"]


def test_send_limit_changes_show_who_when_and_old_to_new(admin_client, admin_user):
    customer = CustomerFactory(per_minute=600)
    limit = customer.send_limit
    url = reverse("admin:customers_customer_change", args=[customer.pk])
    response = admin_client.post(
        url, customer_form(customer, limit, **{"send_limit-0-per_minute": "900"})
    )
    assert response.status_code == 302
    limit.refresh_from_db()
    assert limit.per_minute == 900
    latest = limit.history.latest()
    assert latest.history_user == admin_user

    html = admin_client.get(url).content.decode()
    assert "<del>600</del> → <ins>900</ins>" in html
    assert admin_user.username in html
    assert reverse("admin:customers_sendlimit_history", args=[limit.pk]) in html


def test_send_limit_history_page_lists_the_change(admin_client):
    customer = CustomerFactory(per_minute=600)
    limit = customer.send_limit
    limit.per_minute = 700
    limit.save()
    response = admin_client.get(reverse("admin:customers_sendlimit_history", args=[limit.pk]))
    assert response.status_code == 200
    assert "700" in response.content.decode()


# Suppressions -------------------------------------------------------------------------------


def test_suppression_added_in_admin_is_stored_lower_cased_with_its_author(admin_client, admin_user):
    customer = CustomerFactory()
    response = admin_client.post(
        reverse("admin:customers_suppression_add"),
        {"customer": customer.pk, "email": " Ada.Lovelace@Example.EDU ", "reason": "manual"},
    )
    assert response.status_code == 302
    suppression = Suppression.objects.get()
    assert suppression.email == "ada.lovelace@example.edu"
    assert suppression.created_by == admin_user


def test_duplicate_suppression_is_a_form_error_whatever_the_case(admin_client):
    existing = SuppressionFactory(email="ada@example.edu")
    response = admin_client.post(
        reverse("admin:customers_suppression_add"),
        {"customer": existing.customer_id, "email": "ADA@example.edu", "reason": "manual"},
    )
    assert response.status_code == 200
    assert "already suppressed" in str(response.context["adminform"].form.errors["email"])
    assert Suppression.objects.count() == 1


def test_suppressions_are_searched_by_email_and_filtered_by_reason(admin_client):
    SuppressionFactory(email="ada@example.edu", reason="hard_bounce")
    SuppressionFactory(email="alan@example.edu", reason="complaint")
    url = reverse("admin:customers_suppression_changelist")
    response = admin_client.get(url, {"q": "ADA@"})
    assert [s.email for s in response.context["cl"].result_list] == ["ada@example.edu"]
    response = admin_client.get(url, {"reason__exact": "complaint"})
    assert [s.email for s in response.context["cl"].result_list] == ["alan@example.edu"]


def test_send_limits_cannot_be_added_or_deleted_on_their_own(admin_client):
    limit = CustomerFactory().send_limit
    assert admin_client.get(reverse("admin:customers_sendlimit_add")).status_code == 403
    delete = reverse("admin:customers_sendlimit_delete", args=[limit.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert SendLimit.objects.filter(pk=limit.pk).exists()
