"""Short-lived worker tokens: HMAC-signed (django.core.signing), bound to customer and worker.

A token is minted when a worker is started and refreshed at every check-in, so a worker that keeps
checking in never holds an old one; a token lives WORKER_TOKEN_MAX_AGE seconds. Tokens are signed
with WORKER_TOKEN_KEY, a key of their own (not SECRET_KEY); WORKER_TOKEN_KEY_FALLBACKS are still
accepted, so a key is rotated by moving it to the fallbacks for one token lifetime.
"""

from dataclasses import dataclass

from django.conf import settings
from django.core import signing
from django.core.exceptions import ImproperlyConfigured

SALT = "emailops.sending.worker-token"


class TokenRejected(Exception):
    """The token is forged, malformed or expired."""


@dataclass(frozen=True)
class WorkerClaims:
    customer_id: int
    worker_id: int


def _key() -> str:
    key = settings.WORKER_TOKEN_KEY
    if not key:
        raise ImproperlyConfigured("WORKER_TOKEN_KEY must be set when DEBUG is off.")
    return key


def mint(*, customer_id: int, worker_id: int) -> str:
    return signing.dumps({"c": customer_id, "w": worker_id}, key=_key(), salt=SALT, compress=False)


def verify(token: str) -> WorkerClaims:
    try:
        payload = signing.loads(
            token,
            key=_key(),
            fallback_keys=settings.WORKER_TOKEN_KEY_FALLBACKS,
            salt=SALT,
            max_age=settings.WORKER_TOKEN_MAX_AGE,
        )
    except signing.SignatureExpired as exc:
        raise TokenRejected("token expired") from exc
    except signing.BadSignature as exc:
        raise TokenRejected("token signature is not valid") from exc
    try:
        return WorkerClaims(customer_id=int(payload["c"]), worker_id=int(payload["w"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenRejected("token payload is not valid") from exc
