"""The deployment's system checks (emailops/checks.py)."""

import pytest
from cryptography.fernet import Fernet
from django.core.checks import run_checks

from emailops.checks import is_loopback
from tests.factories import CustomerFactory


def ids(**kwargs):
    return {message.id for message in run_checks(include_deployment_checks=True, **kwargs)}


@pytest.mark.parametrize(
    ("debug", "url", "runtime", "expected"),
    [
        (False, "http://emailops.internal/api/worker/v1/", "local", {"emailops.E002"}),
        (False, "https://emailops.internal/api/worker/v1/", "lambda", set()),
        (False, "http://127.0.0.1:8000/api/worker/v1/", "local", set()),
        (False, "http://[::1]:8000/api/worker/v1/", "local", set()),
        (True, "http://emailops.internal/api/worker/v1/", "local", set()),
        (False, "https://127.0.0.1:8000/api/worker/v1/", "lambda", {"emailops.E003"}),
        (False, "emailops.internal/api", "local", {"emailops.E001"}),
    ],
)
def test_the_worker_api_url_must_be_https_off_loopback_when_debug_is_off(
    settings, debug, url, runtime, expected
):
    settings.DEBUG = debug
    settings.WORKER_API_URL = url
    settings.WORKER_RUNTIME = runtime
    assert ids() & {"emailops.E001", "emailops.E002", "emailops.E003"} == expected


def test_loopback_names_and_addresses():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["10.0.0.1", "emailops.internal", "localhost.evil.example"]))


def test_an_encryption_key_that_is_not_a_fernet_key_is_an_error_that_does_not_show_it(settings):
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), "not-a-key-s3cret"]
    messages = [m for m in run_checks(include_deployment_checks=True) if m.id == "emailops.E004"]
    assert [m.msg for m in messages] == ["FIELD_ENCRYPTION_KEY entry 2 is not a Fernet key."]
    assert "s3cret" not in messages[0].hint


@pytest.mark.django_db
def test_reserved_concurrency_below_the_active_customers_max_workers_is_a_warning(settings):
    settings.WORKER_RUNTIME = "lambda"
    for max_workers in (5, 7):
        customer = CustomerFactory()
        customer.send_limit.max_workers = max_workers
        customer.send_limit.save()
    inactive = CustomerFactory(is_active=False)
    inactive.send_limit.max_workers = 50
    inactive.send_limit.save()

    settings.LAMBDA_RESERVED_CONCURRENCY = 12
    assert "emailops.W001" not in ids(databases=["default"])
    settings.LAMBDA_RESERVED_CONCURRENCY = 11
    warnings = [m for m in run_checks(databases=["default"]) if m.id == "emailops.W001"]
    assert len(warnings) == 1 and "add up to 12" in warnings[0].msg
    settings.LAMBDA_RESERVED_CONCURRENCY = None
    assert "emailops.W001" not in ids(databases=["default"])


@pytest.mark.parametrize(
    ("debug", "key", "expected"),
    [(False, "", {"emailops.E005"}), (False, "k" * 50, set()), (True, "", set())],
)
def test_production_needs_a_worker_token_key(settings, debug, key, expected):
    settings.DEBUG = debug
    settings.WORKER_TOKEN_KEY = key
    found = {m.id for m in run_checks()}  # not only --deploy: every check refuses it
    assert found & {"emailops.E005"} == expected
