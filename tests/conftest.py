"""Shared fixtures.

Tests run on PostgreSQL when DATABASE_URL points at it, on SQLite otherwise. A test that needs a
real service asks for `postgres` or `redis_url`; it is skipped when the service is not configured,
except under CI (CI=true), where a missing service is a failure.
"""

import os

import pytest
from django.conf import settings
from django.db import connection

UNDER_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing(reason: str):
    if UNDER_CI:
        pytest.fail(f"{reason} (CI=true: services are required)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def postgres(db):
    """The test needs PostgreSQL (SKIP LOCKED, COPY, concurrency)."""
    if connection.vendor != "postgresql":
        _missing("needs PostgreSQL: set DATABASE_URL=postgres://…")
    return connection


@pytest.fixture
def redis_url():
    url = settings.REDIS_URL
    if not url:
        _missing("needs Redis: set REDIS_URL=redis://…")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        _missing(f"Redis at {url} is not answering: {exc}")
    return url


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
