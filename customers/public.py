"""The public unsubscribe page (RFC 8058 one-click): no session, no cookies, no CSRF token.
And `pooled`, which serves it and the providers' webhooks from a pool thread.

A mailbox provider POSTs `List-Unsubscribe=One-Click` to the link and the address is suppressed
for that customer at once; a person who opens the link (GET) sees a page with a button that
POSTs the same. A GET changes nothing: link scanners fetch links in mail before anyone clicks.
"""

import functools

from asgiref.sync import sync_to_async
from django.db import close_old_connections
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from . import suppressions
from .models import Customer
from .unsubscribe import LinkRejected, read_token


def _rejected(request, reason: str) -> HttpResponse:
    return render(request, "public/unsubscribe_invalid.html", {"reason": reason}, status=400)


def pooled(view):
    """An async view running the sync `view` in asgiref's thread pool.

    Under ASGI Django runs a sync view in a new thread per request, so each request would open
    (and drop) a database connection of its own. Pool threads live on and keep theirs
    (CONN_MAX_AGE): what a burst of webhooks or unsubscribe clicks costs is then its queries,
    not a connection each. The view must not rely on thread-sensitive state (these use none).
    """

    def in_thread(request, *args, **kwargs):
        close_old_connections()  # what Django does around a request, for this thread's one
        try:
            return view(request, *args, **kwargs)
        finally:
            close_old_connections()

    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        return await sync_to_async(in_thread, thread_sensitive=False)(request, *args, **kwargs)

    return wrapper


@csrf_exempt  # mailbox providers POST without a token (RFC 8058): the signed link is the proof
@pooled
@require_http_methods(["GET", "POST"])
def unsubscribe(request, token: str) -> HttpResponse:
    try:
        link = read_token(token)
    except LinkRejected as exc:
        return _rejected(request, str(exc))
    customer = Customer.objects.filter(pk=link.customer_id).only("name").first()
    if customer is None:
        return _rejected(request, "the sender of this link no longer exists")
    context = {"customer": customer, "email": link.email}
    if request.method == "GET":
        return render(request, "public/unsubscribe.html", context)
    suppressions.suppress(
        customer_id=link.customer_id,
        emails=[link.email],
        reason="unsubscribed",
        source="one-click unsubscribe link",
    )
    return render(request, "public/unsubscribed.html", context)
