"""`/healthz`: is this process able to serve — can it reach the database and Redis?

Answered by a small ASGI app in front of Django (see emailops.asgi), not by a Django view: load
balancers and container health checks call it by the task's IP address over plain HTTP, which
ALLOWED_HOSTS and the HTTPS redirect would refuse, and it needs no session or CSRF machinery.

200 {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}
503 {"status": "failing", "checks": {"database": "ok", "redis": "ConnectionError: …"}}

Redis is checked only when REDIS_URL is set (the embedded mode has none).
"""

from __future__ import annotations

import asyncio
import json

from django.conf import settings
from django.db import connections

PATH = "/healthz"
TIMEOUT_S = 3.0


def _describe(exc: BaseException) -> str:
    # Driver messages name the host and port, never the password; keep them short.
    return f"{type(exc).__name__}: {exc}".strip()[:300]


def check_database(alias: str = "default") -> str:
    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return _describe(exc)
    finally:
        # Checks run in a pool thread: do not leave a connection behind in it.
        connection.close()
    return "ok"


def check_redis() -> str:
    import redis

    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )
    try:
        client.ping()
    except Exception as exc:
        return _describe(exc)
    finally:
        client.close()
    return "ok"


def run_checks() -> dict[str, str]:
    checks = {"database": check_database()}
    if settings.REDIS_URL:
        checks["redis"] = check_redis()
    return checks


def report() -> tuple[int, dict]:
    checks = run_checks()
    healthy = all(result == "ok" for result in checks.values())
    return (200 if healthy else 503), {"status": "ok" if healthy else "failing", "checks": checks}


async def app(scope, receive, send) -> None:
    """The ASGI app answering PATH (GET or HEAD)."""
    if scope["method"] not in ("GET", "HEAD"):
        status, body = 405, {"error": "GET or HEAD only"}
    else:
        try:
            status, body = await asyncio.wait_for(asyncio.to_thread(report), TIMEOUT_S * 3)
        except TimeoutError:
            status, body = 503, {"status": "failing", "checks": {"timeout": "checks hung"}}
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-store"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    body_bytes = b"" if scope["method"] == "HEAD" else payload
    await send({"type": "http.response.body", "body": body_bytes})
