"""The worker API (v1): thin views that authenticate, parse, call a service and serialize.

Described in sending/openapi.yaml, served at /api/worker/v1/openapi.yaml. The views are async
and run the service in a worker thread of their own (not Django's single thread for sync code),
so concurrent check-ins really run concurrently, each on its own database connection.
"""

from pathlib import Path

import orjson
from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from emailops.handlers import RECEIVED_NS
from emailops.logs import log_ids

from . import checkin as checkin_service
from . import leases, tokens, wire

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
MAX_BODY_BYTES = 2 * 1024 * 1024


def _error(status: int, message: str, problems: list[str] | None = None) -> JsonResponse:
    body: dict = {"error": message}
    if problems:
        body["problems"] = problems
    response = JsonResponse(body, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="emailops-worker"'
    return response


def _claims(request: HttpRequest) -> tokens.WorkerClaims:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise tokens.TokenRejected("missing bearer token")
    return tokens.verify(token.strip())


def _body(request: HttpRequest):
    if request.content_type != "application/json":
        raise wire.BadRequest(["Content-Type must be application/json"])
    if len(request.body) > MAX_BODY_BYTES:
        raise wire.BadRequest([f"body is larger than {MAX_BODY_BYTES} bytes"])
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise wire.BadRequest([f"body is not valid JSON: {exc}"]) from exc


def _in_thread(func, *args, **kwargs):
    # What Django does around every request, for this thread's own connection: drop it when it
    # is broken or past CONN_MAX_AGE. But not the health check CONN_HEALTH_CHECKS adds for the
    # site's pages, a `SELECT 1` round trip before each request's first statement: on a busy
    # server that was over a third of a progress call's time (docs/benchmarks.md). A
    # connection that died while idle (a database restart) fails one request instead, which
    # the worker retries (5xx), and the error marks it for closing at the next call
    # (`errors_occurred`, checked just above).
    close_old_connections()
    connection.health_check_done = True
    try:
        return func(*args, **kwargs)
    finally:
        close_old_connections()


async def _handle(request: HttpRequest, parse, call) -> HttpResponse:
    try:
        claims = _claims(request)
    except tokens.TokenRejected as exc:
        return _error(401, f"Unauthorized: {exc}")
    try:
        parsed = parse(_body(request))
    except wire.BadRequest as exc:
        return _error(400, "Bad request", exc.problems)
    report = getattr(parsed, "report", None)
    lease_id = getattr(parsed, "lease_id", None) or getattr(report, "lease_id", None)
    try:
        with log_ids(customer_id=claims.customer_id, worker_id=claims.worker_id, lease_id=lease_id):
            result = await sync_to_async(_in_thread, thread_sensitive=False)(call, claims, parsed)
    except wire.Forbidden as exc:
        return _error(403, f"Forbidden: {exc}")
    except wire.Conflict as exc:
        return _error(409, f"Conflict: {exc}")
    if result is None:
        return HttpResponse(status=204)
    # orjson: a batch's answer carries hundreds of recipients (and embeds their merge data as
    # pre-serialized JSON, orjson.Fragment).
    return HttpResponse(orjson.dumps(result), content_type="application/json")


@csrf_exempt
@require_POST
async def checkin(request: HttpRequest) -> HttpResponse:
    return await _handle(
        request,
        wire.parse_checkin,
        lambda claims, parsed: checkin_service.checkin(
            claims=claims, request=parsed, received_ns=request.scope.get(RECEIVED_NS)
        ),
    )


@csrf_exempt
@require_POST
async def progress(request: HttpRequest) -> HttpResponse:
    return await _handle(
        request,
        wire.parse_progress,
        lambda claims, parsed: leases.record_progress(claims=claims, request=parsed),
    )


@csrf_exempt  # so that a POST is answered 405, like any other method but GET
@require_GET
def openapi(request: HttpRequest) -> HttpResponse:
    return HttpResponse(OPENAPI_PATH.read_bytes(), content_type="application/yaml")
