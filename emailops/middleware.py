"""Project middleware."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.middleware import security as django_security
from whitenoise.middleware import WhiteNoiseMiddleware


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, usable in an async middleware chain.

    WhiteNoise's middleware is sync-only. Under ASGI one sync-only middleware makes Django adapt
    the chain around it on every request: a hop into a thread of its own that then blocks on the
    rest of the (async) chain. Looking a path up in WhiteNoise's table of files is in-memory and
    quick, so the async path does it on the event loop and hands every other request straight on.
    (The worker API does not go through this chain at all: see emailops.handlers.)
    """

    async_capable = True

    def __init__(self, get_response=None):
        super().__init__(get_response)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request):
        # With autorefresh (DEBUG) a lookup touches the file system; that is development only.
        if self.autorefresh:
            static_file = self.find_file(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return self.serve(static_file, request)
        return await self.get_response(request)


class SecurityMiddleware(django_security.SecurityMiddleware):
    """Django's SecurityMiddleware, run on the event loop in an async chain.

    Django runs a sync middleware's `process_request` and `process_response` in a thread under
    ASGI: two hops per request. These two only read settings and the request and set headers, so
    the async path calls them directly.
    """

    async def __acall__(self, request):
        response = self.process_request(request)
        if response is None:
            response = await self.get_response(request)
        return self.process_response(request, response)
