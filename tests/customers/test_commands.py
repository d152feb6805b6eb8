from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.contrib.auth import authenticate, get_user_model
from django.core.management import CommandError, call_command
from django.db import connection

from customers.models import Customer, ProviderAccount, SendLimit
from sending.models import Message, Recipient
from tests.factories import ProviderAccountFactory

pytestmark = pytest.mark.django_db


def _run(*args, **options) -> str:
    out = StringIO()
    call_command(*args, stdout=out, **options)
    return out.getvalue()


def _counts():
    return tuple(
        model.objects.count()
        for model in (ProviderAccount, Customer, SendLimit, Message, Recipient)
    )


# seed_demo ----------------------------------------------------------------------------------


def test_seed_demo_creates_the_demo_customer_and_a_draft_with_recipients():
    out = _run("seed_demo")
    customer = Customer.objects.get(slug="demo")
    assert customer.name == "Demo University"
    assert customer.provider_account.kind == "sandbox"
    assert customer.provider_account.per_minute_cap == 1200
    assert customer.send_limit.per_minute == 600
    message = customer.messages.get()
    assert message.status == "draft"
    assert "{{ first_name }}" in message.subject
    assert message.recipients.count() == 2000
    recipient = message.recipients.order_by("id").first()
    assert (
        message.compiled()
        .render(recipient.merge_data)[0]
        .endswith(recipient.merge_data["first_name"])
    )
    assert "Created customer Demo University" in out


def test_seed_demo_is_idempotent_and_keeps_staff_edits():
    _run("seed_demo")
    before = _counts()
    SendLimit.objects.filter(customer__slug="demo").update(per_minute=300)
    out = _run("seed_demo")
    assert _counts() == before
    assert SendLimit.objects.get(customer__slug="demo").per_minute == 300
    assert "Created" not in out
    assert out.count("Kept the existing") == 3


# ensure_admin -------------------------------------------------------------------------------


@pytest.fixture
def var_dir(settings, tmp_path, monkeypatch):
    settings.VAR_DIR = tmp_path
    monkeypatch.delenv("EMAILOPS_ADMIN_PASSWORD", raising=False)
    return tmp_path


def _printed_password(out: str) -> str:
    line = next(line for line in out.splitlines() if line.strip().startswith("Password"))
    return line.split()[1]


def test_ensure_admin_creates_a_superuser_and_prints_the_login(var_dir):
    out = _run("ensure_admin")
    assert "http://127.0.0.1:8000/admin/" in out
    assert "Username   admin" in out
    password = _printed_password(out)
    assert (var_dir / "admin_password").read_text().strip() == password
    user = authenticate(username="admin", password=password)
    assert user is not None
    assert user.is_superuser and user.is_staff


def test_ensure_admin_prints_the_same_login_on_every_run(var_dir):
    first = _printed_password(_run("ensure_admin"))
    out = _run("ensure_admin")
    assert _printed_password(out) == first
    assert get_user_model().objects.filter(username="admin").count() == 1
    assert authenticate(username="admin", password=first) is not None


def test_ensure_admin_uses_the_password_from_the_environment(var_dir, monkeypatch):
    monkeypatch.setenv("EMAILOPS_ADMIN_PASSWORD", "from-the-env-1234")
    out = _run("ensure_admin")
    assert _printed_password(out) == "from-the-env-1234"
    assert authenticate(username="admin", password="from-the-env-1234") is not None
    assert not (var_dir / "admin_password").exists()


def test_ensure_admin_repairs_a_demoted_admin(var_dir):
    password = _printed_password(_run("ensure_admin"))
    get_user_model().objects.filter(username="admin").update(is_superuser=False)
    out = _run("ensure_admin")
    assert "is_superuser" in out
    assert authenticate(username="admin", password=password).is_superuser


# rotate_encryption_keys ---------------------------------------------------------------------


def _raw_token(account) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT credentials FROM customers_provideraccount WHERE id = %s", [account.pk]
        )
        return cursor.fetchone()[0]


def test_rotation_re_encrypts_credentials_with_the_first_key(settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEYS = [old]
    account = ProviderAccountFactory(credentials={"api_key": "pm-secret"})
    empty = ProviderAccountFactory(credentials={})
    before = _raw_token(account)

    settings.FIELD_ENCRYPTION_KEYS = [new, old]
    out = _run("rotate_encryption_keys")
    assert "2 provider account(s)" in out
    after = _raw_token(account)
    assert after != before
    assert "pm-secret" not in after

    settings.FIELD_ENCRYPTION_KEYS = [new]  # the old key is gone: everything still reads
    account.refresh_from_db()
    empty.refresh_from_db()
    assert account.credentials == {"api_key": "pm-secret"}
    assert empty.credentials == {}


def test_rotation_stops_on_credentials_no_key_can_read(settings):
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    ProviderAccountFactory(name="Orphan", credentials={"api_key": "x"})
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(CommandError, match="Orphan"):
        _run("rotate_encryption_keys")
