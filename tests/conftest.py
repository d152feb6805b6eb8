"""Shared fixtures.

Tests run on PostgreSQL when DATABASE_URL points at it, on SQLite otherwise. A test that needs a
real service asks for `postgres` or `redis_url`; it is skipped when the service is not configured,
except under CI (CI=true), where a missing service is a failure.
"""

import os
import socket
import threading
import time

import pytest
import uvicorn
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
def _fresh_cache():
    """The live pages keep per-customer state in the cache (Redis under REDIS_URL), keyed by
    customer id: a test must not find an earlier test's."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


class AsgiServer:
    """The project's ASGI application (`emailops.asgi`, websockets included) served by uvicorn in
    a thread of the test process: production's server and routing, on the test database."""

    def __init__(self):
        from emailops.asgi import application

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            application, lifespan="off", log_level="warning", ws="websockets-sansio"
        )
        self._server = uvicorn.Server(config)
        self._thread = None

    def start(self) -> "AsgiServer":
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()


@pytest.fixture
def asgi_server(transactional_db, monkeypatch):
    """A live server as production runs it (uvicorn, ASGI), on the test database. Its requests
    run on connections of their own, so the data a test makes must be committed
    (`transactional_db`); those connections are closed after each request so that the test
    database can be dropped at the end."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    server = AsgiServer().start()
    yield server
    server.stop()
