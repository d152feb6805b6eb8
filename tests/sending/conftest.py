"""Fixtures of the sending tests: the worker API as production serves it, a
sandbox provider, a frozen server clock; and no local worker outlives its test."""

import time

import pytest

from sending.clock import Clock
from sending.runtimes import shutdown_local_workers
from sending.sandbox import SandboxServer
from tests.conftest import FAST_WINDOW_MS
from tests.factories import API_KEY


@pytest.fixture
def api_url(asgi_server, fast_minutes):
    """The worker API's base URL, served by uvicorn (emailops.asgi) on the test database."""
    return f"{asgi_server.url}/api/worker/v1/"


@pytest.fixture
def sandbox():
    server = SandboxServer(caps={API_KEY: 100_000}).start()
    yield server
    server.stop()


@pytest.fixture
def frozen_server_clock(monkeypatch):
    """The API's clock stands 300 ms into a 2-second minute: grants are deterministic."""
    now = time.time_ns() // 1_000_000
    at = now - now % FAST_WINDOW_MS + 300
    monkeypatch.setattr(Clock, "read", classmethod(lambda cls: cls(at)))
    return at


@pytest.fixture(autouse=True)
def _no_local_worker_outlives_its_test():
    yield
    assert shutdown_local_workers(timeout_s=10), "a local worker is still running"
