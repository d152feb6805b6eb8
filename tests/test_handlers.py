"""The ASGI application's HTTP routing: the worker API's own handler, and the site's, through the
application the server runs (`emailops.asgi.application`)."""

import asyncio
import threading

import orjson
import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application

from emailops.asgi import application
from emailops.handlers import WorkerAPIHandler, http_router


async def _arequest(
    method: str, path: str, *, host="127.0.0.1", body=b"", headers=(), app=application
):
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host.encode()), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    communicator = ApplicationCommunicator(app, scope)
    await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
    start = await communicator.receive_output(timeout=10)
    content = b""
    while True:
        message = await communicator.receive_output(timeout=10)
        content += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait()
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, content


def _request(*args, **kwargs):
    return asyncio.run(_arequest(*args, **kwargs))


@pytest.fixture(autouse=True)
def _plain_http(settings):
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    settings.SECURE_SSL_REDIRECT = False


async def _acheckin_without_token(app=application):
    body = orjson.dumps({"worker_id": 1, "seq": 1, "request_id": "r", "report": None})
    return await _arequest(
        "POST",
        "/api/worker/v1/checkin",
        body=body,
        headers=[(b"content-type", b"application/json")],
        app=app,
    )


def _checkin_without_token(app=application):
    return asyncio.run(_acheckin_without_token(app))


def test_the_worker_api_answers_through_the_application():
    status, headers, content = _checkin_without_token()
    assert status == 401
    assert orjson.loads(content)["error"].startswith("Unauthorized")
    # Security headers still apply; the site's session, CSRF and frame middleware do not.
    assert headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in headers
    assert "x-frame-options" not in headers

    status, headers, content = _request("GET", "/api/worker/v1/openapi.yaml")
    assert status == 200
    assert content.startswith(b"openapi: 3")


@pytest.mark.django_db
def test_the_site_keeps_its_middleware():
    status, headers, _ = _request("GET", "/admin/login/")
    assert status == 200
    assert headers["x-frame-options"] == "DENY"
    assert "csrftoken=" in headers["set-cookie"]


def test_the_worker_api_refuses_a_host_not_allowed():
    status, _, _ = _request("GET", "/api/worker/v1/openapi.yaml", host="evil.example")
    assert status == 400


def test_the_worker_api_redirects_to_https_when_the_site_does(settings):
    settings.SECURE_SSL_REDIRECT = True
    # Middleware reads its settings when the handler is made, as the server makes it at start.
    app = http_router(get_asgi_application(), WorkerAPIHandler())
    status, headers, _ = _checkin_without_token(app)
    assert status == 301
    assert headers["location"] == "https://127.0.0.1/api/worker/v1/checkin"


def test_worker_api_requests_start_no_thread_of_their_own(monkeypatch):
    """Django's handler starts a thread per request for its sync middleware and signals; the
    worker API's runs that little sync work on one shared thread."""
    started = []
    real_start = threading.Thread.start

    def counting_start(thread):
        started.append(thread.name)
        return real_start(thread)

    async def run():
        await _acheckin_without_token()  # the shared thread exists from here on
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for _ in range(5):
            assert (await _acheckin_without_token())[0] == 401
        api_threads = list(started)
        await _arequest("GET", "/static/nothing-here.css")  # the site's handler, for contrast
        return api_threads, started[len(api_threads) :]

    api_threads, site_threads = asyncio.run(run())
    assert api_threads == []
    assert site_threads != []
