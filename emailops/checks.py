"""System checks for a deployment's configuration.

- `manage.py check --deploy`: FIELD_ENCRYPTION_KEY holds Fernet keys; WORKER_API_URL must be
  https when DEBUG is off (loopback addresses excepted: local runs and tests call back into this
  machine), and must not be loopback when the workers run on Lambda, which cannot reach this
  machine's 127.0.0.1.
- every `manage.py check` (the web and migrate tasks run one): with DEBUG off, WORKER_TOKEN_KEY
  must be set (worker tokens are signed with it, not with SECRET_KEY).
- `manage.py check --deploy`: PUBLIC_BASE_URL (the start of every unsubscribe link) must be
  https when DEBUG is off: RFC 8058 one-click unsubscribe requires an https link.
- `manage.py check --database default`: LAMBDA_RESERVED_CONCURRENCY, when set, must cover what
  the active customers' `max_workers` can ask for at once. The migrate task runs both before
  every deploy (see emailops/entrypoint.py).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@register(Tags.security, deploy=True)
def check_worker_api_url(app_configs=None, **kwargs):
    url = getattr(settings, "WORKER_API_URL", "")
    parts = urlsplit(url)
    host = parts.hostname or ""
    problems = []
    if parts.scheme not in ("http", "https") or not host:
        return [
            Error(
                f"WORKER_API_URL is not an http(s) URL: {url!r}.",
                hint="Set it to where workers reach the worker API, e.g. "
                "https://emailops.internal/api/worker/v1/.",
                id="emailops.E001",
            )
        ]
    if not settings.DEBUG and parts.scheme != "https" and not is_loopback(host):
        problems.append(
            Error(
                f"WORKER_API_URL must be https when DEBUG is off, not {parts.scheme}:// "
                f"({host}): worker tokens and provider credentials travel over it.",
                hint="Serve the worker API behind TLS (an internal load balancer with a "
                "certificate, or TLS_CERT/TLS_KEY on the web task; see docs/deploy.md).",
                id="emailops.E002",
            )
        )
    if getattr(settings, "WORKER_RUNTIME", "local") == "lambda" and is_loopback(host):
        problems.append(
            Error(
                f"WORKER_API_URL points at {host}, but WORKER_RUNTIME=lambda: a Lambda worker "
                "cannot reach this machine's loopback address.",
                hint="Set WORKER_API_URL to the worker API's private name.",
                id="emailops.E003",
            )
        )
    return problems


@register(Tags.security, deploy=True)
def check_public_base_url(app_configs=None, **kwargs):
    url = getattr(settings, "PUBLIC_BASE_URL", "")
    parts = urlsplit(url)
    if settings.DEBUG or (parts.scheme == "https" and parts.hostname):
        return []
    return [
        Error(
            f"PUBLIC_BASE_URL must be an https URL when DEBUG is off, not {url!r}: mailbox "
            "providers only honour one-click unsubscribe links over https (RFC 8058).",
            hint="Set it to the public host name serving /public/, e.g. https://mail.example.org.",
            id="emailops.E010",
        )
    ]


@register(Tags.database)
def check_lambda_concurrency(app_configs=None, **kwargs):
    reserved = getattr(settings, "LAMBDA_RESERVED_CONCURRENCY", None)
    if reserved is None or getattr(settings, "WORKER_RUNTIME", "local") != "lambda":
        return []
    from django.db.models import Sum

    from customers.models import SendLimit

    wanted = (
        SendLimit.objects.filter(customer__is_active=True).aggregate(n=Sum("max_workers"))["n"] or 0
    )
    if wanted <= reserved:
        return []
    return [
        Warning(
            f"Active customers' max_workers add up to {wanted}, more than the worker "
            f"function's reserved concurrency ({reserved}): when they all send at once, "
            "invocations past it wait in Lambda's queue and expire.",
            hint="Raise LAMBDA_RESERVED_CONCURRENCY and run `make deploy` (it sets the "
            "function's reserved concurrency from it), or lower max_workers.",
            id="emailops.W001",
        )
    ]


@register(Tags.security, deploy=True)
def check_field_encryption_keys(app_configs=None, **kwargs):
    """Every FIELD_ENCRYPTION_KEY entry must be a Fernet key (the key itself is never shown)."""
    from cryptography.fernet import Fernet

    problems = []
    for position, key in enumerate(getattr(settings, "FIELD_ENCRYPTION_KEYS", []), start=1):
        try:
            Fernet(key.strip())
        except (ValueError, TypeError):
            problems.append(
                Error(
                    f"FIELD_ENCRYPTION_KEY entry {position} is not a Fernet key.",
                    hint='Make one: python -c "from cryptography.fernet import Fernet; '
                    'print(Fernet.generate_key().decode())"',
                    id="emailops.E004",
                )
            )
    return problems


@register(Tags.security)
def check_worker_token_key(app_configs=None, **kwargs):
    """Production signs worker tokens with a key of its own; without one, no worker can start."""
    if settings.DEBUG or getattr(settings, "WORKER_TOKEN_KEY", ""):
        return []
    return [
        Error(
            "WORKER_TOKEN_KEY is not set: worker tokens cannot be signed.",
            hint="Set WORKER_TOKEN_KEY to a long random value of its own (not SECRET_KEY); on "
            "AWS it comes from the emailops/worker-token secret (docs/deploy.md).",
            id="emailops.E005",
        )
    ]
