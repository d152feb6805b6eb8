"""The ASGI entry's HTTP routing: the worker API gets a handler of its own, without the site's
middleware.

Under ASGI, Django runs each sync middleware hook in a thread: the site's chain (sessions, CSRF,
auth, messages, …) costs a thread hop per hook and request before the view runs. Workers check
in several times a second, and none of that chain serves them: they carry a bearer token, not a
session or a CSRF cookie, and read JSON, not pages. Their requests keep what does apply to them:
SecurityMiddleware (HTTPS redirect and headers), run on the event loop, and the ALLOWED_HOSTS
check that CommonMiddleware makes for the site.
"""

import time

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

from emailops.middleware import SecurityMiddleware

WORKER_API_PREFIX = "/api/worker/"
# Where a worker API request's arrival is noted in its ASGI scope (time.monotonic_ns()): the
# check-in tells the worker how long it held the request before deciding (sending.checkin).
RECEIVED_NS = "emailops.received_ns"


class WorkerAPIHandler(ASGIHandler):
    """Django's ASGI handler with SecurityMiddleware as its only middleware, and the host check."""

    def load_middleware(self, is_async=False):
        if not is_async:
            raise ValueError("WorkerAPIHandler serves ASGI (async) requests only")
        # What BaseHandler.load_middleware builds, for a chain of one async-capable middleware.
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        view = self._get_response_async

        async def allowed_host(request):
            request.get_host()  # raises DisallowedHost (400), as CommonMiddleware does
            return await view(request)

        inner = convert_exception_to_response(allowed_host)
        self._middleware_chain = convert_exception_to_response(SecurityMiddleware(inner))

    async def __call__(self, scope, receive, send):
        # Django opens a ThreadSensitiveContext per request, which starts a thread of its own for
        # the request's sync code. Here that code is only the request signals' receivers and
        # closing the response (the views run their database work in a pool thread: see
        # sending.api), so it runs on asgiref's one shared thread instead of a new one each time.
        if scope["type"] != "http":
            raise ValueError(f"the worker API serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)


def http_router(site, worker_api):
    """An ASGI app sending worker API requests to `worker_api`, health checks to
    `emailops.health` and the rest to `site`."""
    from emailops import health

    async def route(scope, receive, send):
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == health.PATH:
            app = health.app
        elif path.startswith(WORKER_API_PREFIX):
            scope[RECEIVED_NS] = time.monotonic_ns()
            app = worker_api
        else:
            app = site
        await app(scope, receive, send)

    return route
