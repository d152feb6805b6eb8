"""Short-lived worker tokens: HMAC-signed (django.core.signing), bound to customer and worker.

A token is minted when a worker is started and refreshed at every check-in, so a worker that keeps
checking in never holds an old one; a token lives WORKER_TOKEN_MAX_AGE seconds.
"""

from dataclasses import dataclass

from django.conf import settings
from django.core import signing

SALT = "emailops.sending.worker-token"


class TokenRejected(Exception):
    """The token is forged, malformed or expired."""


@dataclass(frozen=True)
class WorkerClaims:
    customer_id: int
    worker_id: int


def mint(*, customer_id: int, worker_id: int) -> str:
    return signing.dumps({"c": customer_id, "w": worker_id}, salt=SALT, compress=False)


def verify(token: str) -> WorkerClaims:
    try:
        payload = signing.loads(token, salt=SALT, max_age=settings.WORKER_TOKEN_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise TokenRejected("token expired") from exc
    except signing.BadSignature as exc:
        raise TokenRejected("token signature is not valid") from exc
    try:
        return WorkerClaims(customer_id=int(payload["c"]), worker_id=int(payload["w"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenRejected("token payload is not valid") from exc
