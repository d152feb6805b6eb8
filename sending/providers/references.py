"""Credentials by reference: a provider account may name a Secrets Manager secret or an SSM
parameter (by ARN) instead of storing its credentials; the worker reads it with its own role, so
the credentials never travel through the worker API.

The value is a JSON object (the same one the admin would store). It is read once per process —
on Lambda, once per cold start — and kept in memory, never logged or written anywhere. A secret
rotated in place reaches a warm function at its next cold start.
"""

from __future__ import annotations

import json
import threading

_cache: dict[str, dict] = {}
_lock = threading.Lock()


class UnreadableReference(RuntimeError):
    """The reference cannot be read, or does not hold a JSON object (its value is never shown)."""


def resolve(ref: str) -> dict:
    """The credentials a reference holds, read on first use and kept for the process."""
    with _lock:
        cached = _cache.get(ref)
        if cached is None:
            cached = _cache[ref] = _read(ref)
    return dict(cached)


def forget() -> None:
    """Drop what was read (tests; a warm process that must re-read)."""
    with _lock:
        _cache.clear()


def _read(ref: str) -> dict:
    import boto3

    parts = ref.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] not in ("secretsmanager", "ssm"):
        raise UnreadableReference(f"not a Secrets Manager secret or SSM parameter ARN: {ref}")
    service, region = parts[2], parts[3]
    client = boto3.client(service, region_name=region)
    if service == "secretsmanager":
        text = client.get_secret_value(SecretId=ref).get("SecretString")
    else:
        text = client.get_parameter(Name=ref, WithDecryption=True)["Parameter"]["Value"]
    try:
        value = json.loads(text or "")
    except ValueError:
        raise UnreadableReference(f"{ref} does not hold a JSON object") from None
    if not isinstance(value, dict):
        raise UnreadableReference(f"{ref} does not hold a JSON object")
    return value
