"""Postmark through anymail's backend, and the local sandbox, which speaks Postmark's API."""

from __future__ import annotations

from . import (
    IDEMPOTENCY_METADATA,
    Provider,
    SendError,
    Throttled,
    anymail_defaults,
    refused_locally,
)

POSTMARK_BACKEND = "anymail.backends.postmark.EmailBackend"
SANDBOX_API_URL = "http://127.0.0.1:8025/"
SANDBOX_API_KEY = "sandbox"
# Postmark ErrorCodes (HTTP 422) about the account, not the message: a later retry can succeed.
# 405: not allowed to send (out of credits); 412/413: account pending approval.
POSTMARK_TEMPORARY_CODES = frozenset({405, 412, 413})


class PostmarkProvider(Provider):
    """anymail's Postmark backend; one requests session (keep-alive) per sending thread."""

    kind = "postmark"
    backend_path = POSTMARK_BACKEND
    default_api_url = "https://api.postmarkapp.com/"

    def server_token(self) -> str:
        return self.credentials.get("server_token") or self.credentials.get("api_key", "")

    def backend_kwargs(self) -> dict:
        kwargs = {
            "server_token": self.server_token(),
            "api_url": self.settings.get("api_url") or self.default_api_url,
            "message_stream": self.settings.get("message_stream"),
            "use_bulk_api": False,
            "generate_message_id": False,
            "timeout": self.timeout,
        }
        return {**kwargs, **anymail_defaults()}

    def build_message(self, **fields):
        message = super().build_message(**fields)
        message.metadata = {IDEMPOTENCY_METADATA: str(fields["recipient_id"])}
        return message

    def map_error(self, exc: Exception) -> SendError | None:
        from anymail.exceptions import AnymailError

        if not isinstance(exc, AnymailError):
            return None
        return refused_locally(exc) or postmark_error(exc)


def postmark_error(exc) -> SendError:
    """Map an anymail Postmark error (HTTP status + Postmark ErrorCode) to SendError/Throttled."""
    from anymail.exceptions import AnymailRecipientsRefused

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(exc, AnymailRecipientsRefused):
        # ErrorCode 406 (inactive recipient: hard bounce or complaint) or 300 (invalid To).
        return SendError(_postmark_text(exc, response), permanent=True, code=status)
    if response is None:
        # No answer at all: connection refused, reset or timed out.
        return SendError(
            f"Postmark call failed: {exc.describe_cause() or exc}",
            permanent=False,
            maybe_sent=_request_maybe_sent(exc.__cause__),
        )
    text = _postmark_text(exc, response)
    if status == 429:
        return Throttled(text, code=status, retry_after=_retry_after(response))
    if status >= 500:
        return SendError(text, permanent=False, code=status)
    error_code = _postmark_error_code(response)
    if error_code in POSTMARK_TEMPORARY_CODES:
        return SendError(text, permanent=False, code=status)
    # 401 (bad server token), 422 with 300 (invalid request), 400/401 (sender signature), ...
    return SendError(text, permanent=True, code=status)


def _request_maybe_sent(cause) -> bool:
    """Whether a failed HTTP call may still have delivered its request."""
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(cause, requests.ConnectTimeout):
        return False
    if isinstance(cause, requests.ConnectionError):
        reason = getattr(cause.args[0], "reason", None) if cause.args else None
        return not isinstance(reason, NewConnectionError)  # refused: never connected
    return isinstance(cause, requests.Timeout)


def _postmark_error_code(response) -> int | None:
    try:
        return int(response.json().get("ErrorCode"))
    except (ValueError, TypeError, AttributeError):
        return None


def _postmark_text(exc, response) -> str:
    if response is None:
        return str(exc.args[0]) if exc.args else str(exc)
    try:
        body = response.json()
        return f"HTTP {response.status_code}, ErrorCode {body['ErrorCode']}: {body['Message']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


def _retry_after(response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError, TypeError):
        return None


class SandboxProvider(PostmarkProvider):
    """The local sandbox (sending/sandbox/) speaks Postmark's API: the same backend."""

    kind = "sandbox"
    default_api_url = SANDBOX_API_URL

    def server_token(self) -> str:
        return self.credentials.get("api_key") or SANDBOX_API_KEY
