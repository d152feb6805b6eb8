"""Shared fixtures.

Tests run on PostgreSQL when DATABASE_URL points at it, on SQLite otherwise. A test that needs a
real service asks for `postgres` or `redis_url`; it is skipped when the service is not configured,
except under CI (CI=true), where a missing service is a failure.
"""

import importlib
import os
import socket
import threading
import time

import pytest
import uvicorn
from django.conf import settings
from django.db import connection

UNDER_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(items):
    """A test that asks for a service's fixture carries its marker (`-m postgres`, `-m redis`)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "postgres" in fixtures:
            item.add_marker(pytest.mark.postgres)
        if "redis_url" in fixtures:
            item.add_marker(pytest.mark.redis)


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


FAST_WINDOW_MS = 2_000


@pytest.fixture
def fast_minutes(settings):
    """2-second "minutes", so that windows, throttles and lease expiry happen within a test."""
    settings.SEND_WINDOW_MS = FAST_WINDOW_MS
    settings.SEND_TIMEOUT_MS = 1_000
    settings.WORKER_DEADLINE_MARGIN_MS = 1_000
    settings.WORKER_SEND_MARGIN_MS = 300
    settings.WORKER_ANSWER_GUESS_MS = 100
    settings.WORKER_API_TIMEOUT_S = 5
    settings.WORKER_API_BACKOFF_MS = 50


class EnqueuedTasks:
    """The default Celery queue of this process's broker (in-memory, or Redis with REDIS_URL),
    read back: what the code under test really enqueued."""

    def __init__(self, connection):
        from emailops.celery import app

        self._queue = app.amqp.queues[app.conf.task_default_queue](connection.default_channel)
        self._queue.declare()
        self._queue.purge()

    def take(self) -> list[tuple[str, list]]:
        """(task name, args) of every message on the queue, oldest first; they are consumed."""
        taken = []
        while (message := self._queue.get(no_ack=True)) is not None:
            args, _kwargs, _embed = message.decode()
            taken.append((message.headers["task"], list(args)))
        return taken

    def purge(self) -> None:
        self._queue.purge()


@pytest.fixture
def staff_groups(transactional_db):
    """The Support and Operators groups for a transactional test: they come from a data
    migration, which the flush after each earlier transactional test removed. Made again by the
    migration's own function (serialized rollback would do it too, but clashes with the content
    types an earlier flush's post_migrate recreated)."""
    from types import SimpleNamespace

    from django.apps import apps

    editor = SimpleNamespace(connection=connection)
    importlib.import_module("customers.migrations.0002_groups").add_groups(apps, editor)
    # Later migrations that grant the groups more (exports: Support; resubscriptions' audit).
    for later in ("0005_support_exports_delivery_logs", "0007_resubscription_permissions"):
        importlib.import_module(f"customers.migrations.{later}").grant(apps, editor)


@pytest.fixture
def enqueued_tasks():
    from emailops.celery import app

    with app.connection_for_write() as connection:
        tasks = EnqueuedTasks(connection)
        yield tasks
        tasks.purge()


@pytest.fixture(autouse=True)
def _fresh_channel_layers():
    """Each test serves websockets from an event loop of its own (a new uvicorn thread, or a
    communicator's loop), and a channel layer keeps per-loop receive state: a consumer still
    receiving when an earlier test's loop stopped would make every later receive fail ("Two
    event loops are trying to receive() on one channel layer at once!"). Production has one
    loop per process."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()


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
