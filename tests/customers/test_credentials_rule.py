"""Changing where a provider account sends (kind, host, port, TLS, endpoint, region, API URL)
needs its credentials entered again — on any save, not only in the admin form — and every change
is kept in the account's history (who, when, why), never with the credentials."""

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from customers.models import ProviderAccount
from customers.services import provider_account_save
from tests.factories import ProviderAccountFactory, SuperUserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "smtp-pa55word-kept-secret"


@pytest.fixture
def account():
    return ProviderAccountFactory(
        kind="smtp",
        settings={"host": "smtp.college.example", "port": 587, "use_tls": True},
        credentials={"username": "u", "password": PASSWORD},
    )


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "postmark"},
        {"settings": {"host": "mail.attacker.example", "port": 587, "use_tls": True}},
        {"settings": {"host": "smtp.college.example", "port": 2525, "use_tls": True}},
        {"settings": {"host": "smtp.college.example", "port": 587, "use_tls": False}},
        {"settings": {"host": "smtp.college.example", "port": 587, "api_url": "http://x/"}},
    ],
)
def test_a_new_destination_with_the_stored_credentials_is_refused_on_save(account, change):
    stored = ProviderAccount.objects.get(pk=account.pk)
    for name, value in change.items():
        setattr(stored, name, value)
    with pytest.raises(ValidationError, match="needs the credentials entered again"):
        stored.save()
    with pytest.raises(ValidationError, match="needs the credentials entered again"):
        provider_account_save(account=stored)
    account.refresh_from_db()
    assert account.kind == "smtp" and account.settings["host"] == "smtp.college.example"
    assert account.history.count() == 1  # created; nothing else recorded


def test_other_changes_keep_the_credentials(account):
    account.settings = {**account.settings, "timeout": 10}
    account.per_minute_cap = 900
    account.name = "Renamed"
    provider_account_save(account=account)
    account.refresh_from_db()
    assert account.credentials["password"] == PASSWORD and account.per_minute_cap == 900


def test_a_new_destination_with_credentials_entered_again_is_saved_and_audited(account):
    user = SuperUserFactory()
    account.settings = {**account.settings, "host": "smtp2.college.example"}
    account.enter_credentials(credentials={"username": "u", "password": "new-pass"})
    provider_account_save(account=account, user=user)

    account.refresh_from_db()
    assert account.settings["host"] == "smtp2.college.example"
    assert account.credentials == {"username": "u", "password": "new-pass"}
    latest = account.history.order_by("-history_id").first()
    assert latest.history_user == user
    assert latest.history_change_reason == "destination changed: host; credentials entered"
    assert latest.settings["host"] == "smtp2.college.example"
    assert latest.credentials_changed_at == account.credentials_changed_at
    # The history keeps no credentials, not even encrypted.
    assert "credentials" not in {f.name for f in type(latest)._meta.get_fields()}


def test_an_account_without_credentials_may_move_freely():
    account = ProviderAccountFactory(kind="sandbox", settings={"api_url": "http://a/"})
    account.settings = {"api_url": "http://b/"}
    account.save()
    account.refresh_from_db()
    assert account.settings == {"api_url": "http://b/"}


def test_a_reference_must_be_a_secret_or_parameter_arn_and_not_beside_credentials():
    account = ProviderAccountFactory.build(
        credentials_ref="arn:aws:s3:::bucket/key", per_minute_cap=10
    )
    with pytest.raises(ValidationError, match="Not a Secrets Manager"):
        account.full_clean()
    account.credentials_ref = "arn:aws:ssm:eu-west-1:123456789012:parameter/emailops/smtp"
    account.full_clean()
    account.credentials = {"password": "x"}
    with pytest.raises(ValidationError, match="not both"):
        account.full_clean()


def test_a_secret_in_the_settings_is_refused():
    account = ProviderAccountFactory.build(
        kind="smtp", settings={"host": "h", "Password": "oops"}, per_minute_cap=10
    )
    with pytest.raises(ValidationError, match="Password: enter secrets as credentials"):
        account.full_clean()


# Through the admin -----------------------------------------------------------------------------


def _form(account, **changes):
    return {
        "name": account.name,
        "kind": account.kind,
        "per_minute_cap": account.per_minute_cap,
        "settings": '{"host": "smtp.college.example", "port": 587, "use_tls": true}',
        "new_credentials": "",
        "new_credentials_ref": "",
        **changes,
    }


def test_admin_refuses_a_new_host_without_the_credentials_and_changes_nothing(
    admin_client, account
):
    url = reverse("admin:customers_provideraccount_change", args=[account.pk])
    moved = '{"host": "mail.attacker.example", "port": 587, "use_tls": true}'
    response = admin_client.post(url, _form(account, settings=moved))
    assert response.status_code == 200
    errors = response.context["adminform"].form.non_field_errors()
    assert "Changing host needs the credentials entered again" in str(errors)
    assert PASSWORD not in response.content.decode()
    account.refresh_from_db()
    assert account.settings["host"] == "smtp.college.example"

    entered = '{"username": "u", "password": "re-entered"}'
    response = admin_client.post(url, _form(account, settings=moved, new_credentials=entered))
    assert response.status_code == 302
    account.refresh_from_db()
    assert (account.settings["host"], account.credentials["password"]) == (
        "mail.attacker.example",
        "re-entered",
    )
    record = account.history.order_by("-history_id").first()
    assert record.history_user.username == "admin"
    assert record.history_change_reason == "destination changed: host; credentials entered"


def test_admin_takes_a_reference_instead_of_credentials(admin_client, account):
    url = reverse("admin:customers_provideraccount_change", args=[account.pk])
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:emailops/smtp-AbCdEf"
    response = admin_client.post(url, _form(account, new_credentials_ref="not-an-arn"))
    assert response.status_code == 200
    assert "Not a Secrets Manager" in str(
        response.context["adminform"].form.errors["new_credentials_ref"]
    )
    response = admin_client.post(url, _form(account, new_credentials_ref=arn))
    assert response.status_code == 302
    account.refresh_from_db()
    assert (account.credentials, account.credentials_ref) == ({}, arn)
    page = admin_client.get(url).content.decode()
    assert f"By reference: {arn}" in page
    history = admin_client.get(
        reverse("admin:customers_provideraccount_history", args=[account.pk])
    )
    assert history.status_code == 200 and "credentials entered" in history.content.decode()
