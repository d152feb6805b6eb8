import asyncio
import logging

import pytest
from asgiref.sync import iscoroutinefunction
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpResponse
from django.test import AsyncRequestFactory, RequestFactory

from emailops.middleware import StaticFilesMiddleware


@pytest.fixture
def static_root(settings, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from static")
    settings.STATIC_ROOT = str(tmp_path)
    settings.STATIC_URL = "/static/"
    settings.WHITENOISE_USE_FINDERS = False
    settings.WHITENOISE_AUTOREFRESH = False
    return tmp_path


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_async_chain_serves_static_files_and_passes_the_rest_on(static_root):
    async def inner(request):
        return HttpResponse(f"app {request.path}")

    middleware = StaticFilesMiddleware(inner)
    assert iscoroutinefunction(middleware)
    factory = AsyncRequestFactory()

    static = asyncio.run(middleware(factory.get("/static/hello.txt")))
    assert static.status_code == 200
    assert _body(static) == b"hello from static"

    other = asyncio.run(middleware(factory.get("/api/worker/v1/checkin")))
    assert other.content == b"app /api/worker/v1/checkin"


def test_sync_chain_still_works(static_root):
    middleware = StaticFilesMiddleware(lambda request: HttpResponse("app"))
    assert not iscoroutinefunction(middleware)
    assert _body(middleware(RequestFactory().get("/static/hello.txt"))) == b"hello from static"
    assert middleware(RequestFactory().get("/elsewhere")).content == b"app"


def test_no_middleware_makes_django_adapt_the_async_chain(caplog, settings):
    """A sync-only middleware costs every async request a thread hop (the worker API's views are
    async): with DEBUG on, Django logs each one it has to adapt."""
    settings.DEBUG = True
    with caplog.at_level(logging.DEBUG, logger="django.request"):
        ASGIHandler()
    messages = [r.getMessage() for r in caplog.records]
    adapted = [m for m in messages if "adapted" in m]
    assert adapted == []
