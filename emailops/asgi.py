"""The ASGI entry point production serves (uvicorn): the site, and the worker API routed to a
handler of its own (emailops.handlers)."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "emailops.settings")

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from emailops.handlers import WorkerAPIHandler, http_router  # noqa: E402

application = ProtocolTypeRouter({"http": http_router(django_asgi_app, WorkerAPIHandler())})

# What is loaded by now lives as long as the process: take it out of the garbage collector's
# generations, so that the full collections a check-in's garbage triggers do not walk all of it.
gc.freeze()
