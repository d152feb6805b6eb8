"""The ASGI entry point production serves (uvicorn): the site, and the worker API routed to a
handler of its own (emailops.handlers)."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from emailops.handlers import WorkerAPIHandler, http_router  # noqa: E402
from sending.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http_router(django_asgi_app, WorkerAPIHandler()),
        # The live pages: staff only (the consumers check permissions), same origin only.
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

# What is loaded by now lives as long as the process: take it out of the garbage collector's
# generations, so that the full collections a check-in's garbage triggers do not walk all of it.
gc.freeze()
